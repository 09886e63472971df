#!/usr/bin/env python
"""What a fleet's host queues cost the broker: N hosts' ``<host>`` and ``<host>-alt``, declared
as a worker declares them at its start (Celery's missing-queue creation, with this package's
no-loss settings: durable, classic or quorum), on RabbitMQ (a vhost of its own, deleted
afterwards) and on a private Redis.

For each broker and size: the time to declare them all (one connection, as a fleet's workers
would each declare their two), the time one more worker's two declarations take once they
exist, and the broker's memory before and after (RabbitMQ: the Erlang VM's total; Redis:
``used_memory``). On RabbitMQ also its file handles: what ``rabbitmqctl status`` counts as
used of its limit, and the files the node's process has open.

RabbitMQ is a private single node this script starts with an open-file limit of ``--nofile``
(65,536, RabbitMQ's production guidance, or the hard limit when that is lower) and stops at the
end (tests/rabbitcluster.py). A quorum queue takes file handles of the node's limit, so a node
at a distribution's default of 1,024 accepts no new connection past about 300 of them
(scripts/quorumfds.py). ``--rabbit-url`` and ``--rabbit-node`` measure a running node instead:

    python scripts/brokerscale.py --hosts 1000,10000
    python scripts/brokerscale.py --hosts 1000 --brokers classic \
        --rabbit-url amqp://guest:guest@127.0.0.1:5672 --rabbit-node rabbit@localhost
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VHOST = "orch_scale"


def log(text: str) -> None:
    print(f"[brokerscale {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


#: File handles a quorum queue (its leader, on a single node) takes of RabbitMQ 3.10's limit,
#: open or not: ``rabbitmqctl status``'s count grows by 3 a queue (scripts/quorumfds.py).
QUORUM_HANDLES = 3


class Rabbit:
    """The RabbitMQ node measured: a private one (started here with ``nofile`` as its
    open-file limit, stopped by :meth:`close`), or a running one at ``url``, whose
    rabbitmqctl name is ``node``."""

    def __init__(self, url: str | None = None, node: str | None = None,
                 nofile: int = 65536) -> None:
        self.cluster = None
        if url is None:
            from tests.rabbitcluster import RabbitCluster

            self.cluster = RabbitCluster(size=1, nofile=nofile)
            try:
                self.cluster.start()
            except BaseException:
                self.cluster.destroy()
                raise
            url = self.cluster.nodes[0].url
            node = self.cluster.nodes[0].name
        self.url, self.node = url, node
        # Its process, to count its open files, when it runs on this machine.
        local = urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")
        self.pid = int(self.eval("list_to_integer(os:getpid()).")) if local else None
        log(f"RabbitMQ {self.node} at {self.url_for('')}: open-file limit "
            f"{self.open_file_limit()}, {self.file_handles()['limit']} file handles")

    def ctl(self, *args: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
        if self.cluster is not None:
            return self.cluster.ctl(self.cluster.nodes[0], *args, check=check, timeout=timeout)
        node = ["-n", self.node] if self.node else []
        return subprocess.run(["rabbitmqctl", *node, *args], check=check, capture_output=True,
                              text=True, timeout=timeout)

    def eval(self, expression: str) -> str:
        return self.ctl("eval", expression).stdout.strip()

    def url_for(self, vhost: str) -> str:
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path=f"/{vhost}"))

    def memory(self) -> int:
        """The Erlang VM's memory, bytes."""
        return int(self.eval("erlang:memory(total)."))

    def file_handles(self) -> dict:
        """``rabbitmqctl status``'s file descriptors: used and limit (RabbitMQ's own count,
        which quorum queues take from whether or not they hold a file open)."""
        status = json.loads(self.ctl("status", "--formatter", "json", timeout=60).stdout)
        fds = status["file_descriptors"]
        return {"used": fds["total_used"], "limit": fds["total_limit"]}

    def open_files(self) -> int | None:
        """Files the node's process has open (None when it runs elsewhere or is not ours to
        read)."""
        return self._proc("open_files")

    def open_file_limit(self) -> int | None:
        return self._proc("open_file_limit")

    def _proc(self, what: str) -> int | None:
        """tests.rabbitcluster's ``what(pid)`` of the node's process, from /proc (None: not
        on this machine)."""
        from tests import rabbitcluster

        if self.pid is None:
            return None
        try:
            return getattr(rabbitcluster, what)(self.pid)
        except OSError:
            return None

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.destroy()
            self.cluster = None


def make_app(url: str, queue_type: str):
    from celery import Celery

    from orchestrator.config import Settings
    from orchestrator.policy import no_loss

    os.environ["ORCHESTRATOR_QUEUE_TYPE"] = queue_type
    app = Celery("brokerscale")
    app.conf.update(no_loss(url, Settings.from_env()))
    # A node out of file handles takes a connection and never answers: fail, not hang.
    app.conf.broker_connection_timeout = 60
    return app


def declare(app, names: list[str]) -> float:
    began = time.perf_counter()
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for name in names:
            app.amqp.queues[name].bind(channel).declare()
    return time.perf_counter() - began


def names_for(hosts: int) -> list[str]:
    return [q for i in range(hosts) for q in (f"sim{i:05d}", f"sim{i:05d}-alt")]


def rabbit(node: Rabbit, hosts: int, queue_type: str) -> dict:
    if queue_type == "quorum":
        handles = node.file_handles()
        room = (handles["limit"] - handles["used"]) // QUORUM_HANDLES
        if room < 2 * hosts + 1:
            raise SystemExit(
                f"brokerscale: {2 * hosts} quorum queues need about "
                f"{QUORUM_HANDLES * (2 * hosts + 1)} file handles; {node.node} has "
                f"{handles['limit'] - handles['used']} free of {handles['limit']} (its "
                f"open-file limit less 97): past that it accepts no new connection. Start "
                f"it with a higher open-file limit (ulimit -n, systemd's LimitNOFILE).")
    node.ctl("-q", "delete_vhost", VHOST, check=False)
    node.ctl("-q", "add_vhost", VHOST)
    node.ctl("-q", "set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    try:
        app = make_app(node.url_for(VHOST), queue_type)
        before, handles_before = node.memory(), node.file_handles()
        files_before = node.open_files()
        seconds = declare(app, names_for(hosts))
        time.sleep(5)  # quorum queues' members settle
        after, handles_after = node.memory(), node.file_handles()
        files_after = node.open_files()
        one_more = declare(app, ["extra-host", "extra-host-alt"])
        return {"broker": f"rabbitmq {queue_type}", "hosts": hosts, "queues": 2 * hosts,
                "declare_seconds": round(seconds, 1),
                "declare_ms_per_host": round(1000 * seconds / hosts, 2),
                "one_more_host_ms": round(1000 * one_more, 1),
                "memory_mb": round((after - before) / 2**20, 1),
                "memory_kb_per_host": round((after - before) / 1024 / hosts, 1),
                "file_handles_used": handles_after["used"] - handles_before["used"],
                "file_handles_limit": handles_after["limit"],
                "open_files": (None if files_before is None or files_after is None
                               else files_after - files_before),
                "open_file_limit": node.open_file_limit()}
    finally:
        began = time.perf_counter()
        node.ctl("-q", "delete_vhost", VHOST, check=False, timeout=1800)
        log(f"vhost deleted in {time.perf_counter() - began:.1f} s")


def redis_(hosts: int) -> dict:
    import redis

    from orchestrator.local.embedded import embedded_redis

    with embedded_redis() as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(url)
        app = make_app(url, "classic")
        before = client.info("memory")["used_memory"]
        seconds = declare(app, names_for(hosts))
        after = client.info("memory")["used_memory"]
        one_more = declare(app, ["extra-host", "extra-host-alt"])
        return {"broker": "redis", "hosts": hosts, "queues": 2 * hosts,
                "declare_seconds": round(seconds, 1),
                "declare_ms_per_host": round(1000 * seconds / hosts, 2),
                "one_more_host_ms": round(1000 * one_more, 1),
                "memory_mb": round((after - before) / 2**20, 2),
                "memory_kb_per_host": round((after - before) / 1024 / hosts, 2),
                "keys": client.dbsize()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="1000,10000")
    parser.add_argument("--brokers", default="redis,classic,quorum")
    parser.add_argument("--rabbit-url", default=None,
                        help="a running RabbitMQ (its vhost is replaced with the script's); "
                             "default: a private node started and stopped here")
    parser.add_argument("--rabbit-node", default=None,
                        help="that node's name for rabbitmqctl -n (default: rabbitmqctl's)")
    parser.add_argument("--nofile", type=int, default=65536,
                        help="the private node's open-file limit (at most the hard limit)")
    parser.add_argument("--file-handles", type=int, default=None,
                        help="set the node's file-handle count limit to this, above what its "
                             "open-file limit gives (a measurement on a machine whose hard "
                             "limit is too low: empty quorum queues open no file; a node in "
                             "production raises its open-file limit instead)")
    args = parser.parse_args(argv)
    results = []
    # Stopped with SIGTERM, it still stops the node it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    node = None
    try:
        for hosts in (int(h) for h in args.hosts.split(",")):
            for broker in args.brokers.split(","):
                log(f"{broker}: {hosts} hosts")
                if broker == "redis":
                    result = redis_(hosts)
                else:
                    if node is None:
                        node = Rabbit(args.rabbit_url, args.rabbit_node, args.nofile)
                        if args.file_handles:
                            node.eval(f"file_handle_cache:set_limit({args.file_handles}).")
                            log(f"file handles: {node.file_handles()}")
                    result = rabbit(node, hosts, broker)
                log(json.dumps(result))
                results.append(result)
    finally:
        if node is not None:
            node.close()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
