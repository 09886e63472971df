#!/usr/bin/env python
"""How many quorum queues a RabbitMQ node holds before it accepts no new connection, for its
open-file limit: a private single node (tests/rabbitcluster.py) started with ``ulimit -n``
at ``--nofile``; quorum queues declared in steps on one connection, and after each step the
node's open files (``/proc/PID/fd`` and ``rabbitmqctl status``'s count) and whether a new
connection gets the broker's greeting within ``--wait`` seconds.

    python scripts/quorumfds.py --nofile 1024 --queues 800
    python scripts/quorumfds.py --nofile 20000 --queues 2000 --step 200
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def log(text: str) -> None:
    print(f"[quorumfds {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def greets(port: int, wait: float) -> float | None:
    """Seconds until a new connection gets the broker's Connection.Start (the first frame
    of an AMQP 0-9-1 handshake); None when it does not within ``wait``."""
    began = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        try:
            frame = sock.recv(7)
        except TimeoutError:
            return None
    return round(time.perf_counter() - began, 3) if frame[:1] == b"\x01" else None


def main(argv: list[str] | None = None) -> int:
    import kombu

    from tests.rabbitcluster import RabbitCluster, open_file_limit, open_files

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument("--queues", type=int, default=800)
    parser.add_argument("--step", type=int, default=25)
    parser.add_argument("--wait", type=float, default=10.0)
    parser.add_argument("--queue-type", default="quorum", choices=("quorum", "classic"))
    args = parser.parse_args(argv)
    # Stopped with SIGTERM, it still stops the node it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cluster = RabbitCluster(size=1, nofile=args.nofile).start()
    node = cluster.nodes[0]
    rows = []
    reservations = {}
    limit = None
    try:
        pid = cluster.beam_pid(node)
        limit = open_file_limit(pid)
        log(f"node {node.name} (pid {pid}) open-file limit {limit}")
        # What each quorum queue's member reserves in the node's file-handle cache.
        reservations = {key: cluster.ctl(node, "eval", f"application:get_env(rabbit, {key}).")
                        .stdout.strip() for key in ("file_handle_leader_reservation",
                                                    "file_handle_other_reservation")}
        log(json.dumps(reservations))

        def row(queues: int) -> dict:
            # The greeting first: a node out of file handles answers no status either.
            greeting = greets(node.port, args.wait)
            try:
                fds = json.loads(cluster.ctl(node, "status", "--formatter", "json",
                                             timeout=60).stdout)["file_descriptors"]
            except subprocess.TimeoutExpired:
                fds = {}
            return {"queues": queues, "open_files": open_files(pid),
                    "status_used": fds.get("total_used"),
                    "status_limit": fds.get("total_limit"),
                    "new_connection_s": greeting}

        rows.append(row(0))
        log(json.dumps(rows[-1]))
        hung = 0
        with kombu.Connection(node.url, connect_timeout=30) as conn:
            channel = conn.default_channel
            declared = 0
            while declared < args.queues:
                for _ in range(args.step):
                    channel.queue_declare(f"fd{declared:05d}", durable=True, auto_delete=False,
                                          arguments={"x-queue-type": args.queue_type})
                    declared += 1
                time.sleep(2)
                rows.append(row(declared))
                log(json.dumps(rows[-1]))
                hung = hung + 1 if rows[-1]["new_connection_s"] is None else 0
                if hung >= 3:
                    break
    finally:
        cluster.destroy()
    first = next((r["queues"] for r in rows if r["new_connection_s"] is None), None)
    grown = rows[-1]["open_files"] - rows[0]["open_files"]
    print(json.dumps({"open_file_limit": limit, "queue_type": args.queue_type,
                      "reservations": reservations,
                      "first_hang_at_queues": first,
                      "open_files_per_queue": round(grown / max(rows[-1]["queues"], 1), 2),
                      "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
