#!/usr/bin/env python
"""What a fleet's host queues cost the broker: N hosts' ``<host>`` and ``<host>-alt``, declared
as a worker declares them at its start (Celery's missing-queue creation, with this package's
no-loss settings: durable, classic or quorum), on RabbitMQ (a vhost of its own, deleted
afterwards) and on a private Redis.

For each broker and size: the time to declare them all (one connection, as a fleet's workers
would each declare their two), the time one more worker's two declarations take once they
exist, and the broker's memory before and after (RabbitMQ: the Erlang VM's total; Redis:
``used_memory``).

    python scripts/brokerscale.py --hosts 1000,10000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VHOST = "orch_scale"


def log(text: str) -> None:
    print(f"[brokerscale {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def rabbit_memory() -> int:
    out = subprocess.run(["rabbitmqctl", "eval", "erlang:memory(total)."], check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip())


def make_app(url: str, queue_type: str):
    from celery import Celery

    from orchestrator.config import Settings
    from orchestrator.policy import no_loss

    os.environ["ORCHESTRATOR_QUEUE_TYPE"] = queue_type
    app = Celery("brokerscale")
    app.conf.update(no_loss(url, Settings.from_env()))
    # Quorum queues: a new connection right after a thousand declares may wait for the node
    # (each queue a Raft member settling) longer than a worker's usual connect timeout.
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


def rabbit(hosts: int, queue_type: str) -> dict:
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", VHOST], capture_output=True)
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", VHOST], check=True)
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", VHOST, "guest", ".*", ".*",
                    ".*"], check=True)
    try:
        app = make_app(f"amqp://guest:guest@127.0.0.1:5672/{VHOST}", queue_type)
        before = rabbit_memory()
        seconds = declare(app, names_for(hosts))
        time.sleep(5)  # quorum queues' members settle
        after = rabbit_memory()
        one_more = declare(app, ["extra-host", "extra-host-alt"])
        return {"broker": f"rabbitmq {queue_type}", "hosts": hosts, "queues": 2 * hosts,
                "declare_seconds": round(seconds, 1),
                "declare_ms_per_host": round(1000 * seconds / hosts, 2),
                "one_more_host_ms": round(1000 * one_more, 1),
                "memory_mb": round((after - before) / 2**20, 1),
                "memory_kb_per_host": round((after - before) / 1024 / hosts, 1)}
    finally:
        began = time.perf_counter()
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", VHOST], capture_output=True,
                       timeout=1800)
        log(f"vhost deleted in {time.perf_counter() - began:.1f} s")


def redis_(hosts: int) -> dict:
    import redis

    from orchestrator.testing.embedded import embedded_redis

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
    args = parser.parse_args(argv)
    results = []
    for hosts in (int(h) for h in args.hosts.split(",")):
        for broker in args.brokers.split(","):
            log(f"{broker}: {hosts} hosts")
            result = redis_(hosts) if broker == "redis" else rabbit(hosts, broker)
            log(json.dumps(result))
            results.append(result)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
