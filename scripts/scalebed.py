#!/usr/bin/env python
"""The scale bed: what a fleet of N hosts costs one ledger, idle and beside a real load.

For each fleet size (default 2, 50, 1,000 and 10,000 hosts) against a private PostgreSQL:

1. N simulated hosts (``orchestrator.testing.scale``: the registration, heartbeat, fleet lease
   and fleet looks a worker runs, without a Celery consumer each) in two processes, plus two
   real ``celery worker`` processes (hosts ``beda`` and ``bedb``, ``-c 2``) of a three-step
   flow app, on a private Redis;
2. after a warm-up, a window (``--window`` seconds, default 90) in which a steady load runs
   through the real workers (``--rate`` operations a second, three steps each over the two
   hosts): PostgreSQL's committed transactions a second, its processes' CPU, its connections;
   the p50/p99 of a step's completion in the real flows (from the step before it, or the
   submit, to its completion, as the ledger recorded them);
3. the operator views at that size: ``views.hosts`` with ``--state draining`` and the first
   page of 50, in this process.

The idle cost per host is the slope between two sizes with the load off (``--idle``):
``(tx/s at N - tx/s at 2) / (N - 2)``.

``--real K`` starts K real idle workers (``-c 1``) instead of simulated hosts, and
``--sim K`` runs K simulated ones in the same way: the two figures per host are compared in
docs/BENCHMARKS.md.

    python scripts/scalebed.py --idle --sizes 2,50,1000,10000
    python scripts/scalebed.py --sizes 2,10000            # with the real load
    python scripts/scalebed.py --idle --real 40 && python scripts/scalebed.py --idle --sizes 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FLOW_APP = '''\
"""Three steps over two hosts, the shape of a resize: prep (b), move (a), finish (b)."""
import os

from celery import Celery

from orchestrator import Orchestrator

app = Celery("bedflow")
orch = Orchestrator(app, routing=os.environ["BED_ROUTING"])


@orch.step
def prep(ctx):
    return {"prepared": True}


@orch.step
def move(ctx):
    return None


@orch.step
def finish(ctx):
    return None


orch.flow("three", [("prep", "b"), ("move", "a"), ("finish", "b")])
'''
ROUTING = """\
steps:
  prep: {queue: main, reason: nothing started}
  move: {queue: alt, reason: started}
  finish: {queue: alt, reason: started}
"""


def log(text: str) -> None:
    print(f"[scalebed {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def step_latencies(db_url: str, since: float) -> list[float]:
    """Seconds from a step's being queued (its operation submitted, or the step before it
    completed) to its completion, for operations submitted since ``since``."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    with engine.connect() as conn:
        ops = dict(conn.execute(text(
            "SELECT id, created_at FROM operations WHERE created_at >= :s AND status = "
            "'completed'"), {"s": since}).all())
        rows = conn.execute(text(
            "SELECT operation_id, position, finished_at FROM step_log WHERE status = "
            "'completed' AND finished_at IS NOT NULL ORDER BY operation_id, position")).all()
    engine.dispose()
    done: dict[str, dict[int, float]] = {}
    for op_id, position, finished in rows:
        if op_id in ops:
            done.setdefault(op_id, {})[position] = finished
    out = []
    for op_id, steps in done.items():
        for position, finished in steps.items():
            queued = ops[op_id] if position == 0 else steps.get(position - 1)
            if queued is not None:
                out.append(finished - queued)
    return out


class Bed:
    def __init__(self, args: argparse.Namespace) -> None:
        from orchestrator.local.embedded import embedded_redis
        from orchestrator.testing.pgserver import PrivatePostgres

        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="scalebed-"))
        self.pg = PrivatePostgres().init()
        self.pg.start()
        self.pg.wait_answering()
        self.admin = f"host=127.0.0.1 port={self.pg.port} user=postgres"
        self.db_url = self.pg.create_database("ledger")  # apart from the samples' database
        self._redis_cm = embedded_redis()
        self.redis = self._redis_cm.__enter__()
        self.broker = f"redis://127.0.0.1:{self.redis.port}/0"
        (self.tmp / "bedflow_app.py").write_text(FLOW_APP)
        (self.tmp / "routing.yaml").write_text(ROUTING)
        os.environ.update({
            "ORCHESTRATOR_DB_URL": self.db_url, "ORCHESTRATOR_BROKER_URL": self.broker,
            "BED_ROUTING": str(self.tmp / "routing.yaml"),
        })
        sys.path.insert(0, str(self.tmp))
        import bedflow_app  # noqa: F401  (the app the real workers run)

        self.orch = bedflow_app.orch
        self.orch.db.engine()  # the schema
        self.postmaster = int((self.pg.data / "postmaster.pid").read_text().split()[0])
        self.fleet = None

    def close(self) -> None:
        if self.fleet is not None:
            self.fleet.kill_all()
        self._redis_cm.__exit__(None, None, None)
        self.pg.destroy()

    def sample(self):
        from orchestrator.testing.scale import ledger_sample

        return ledger_sample(self.admin, "ledger", self.postmaster)

    def forget_hosts(self) -> None:
        """A fresh registry between sizes (operations stay)."""
        import psycopg

        with psycopg.connect(f"{self.admin} dbname=ledger", autocommit=True) as conn:
            conn.execute("DELETE FROM services WHERE host NOT IN ('beda', 'bedb')")
            conn.execute("DELETE FROM leases")

    def start_real(self, hosts: list[str], concurrency: int) -> None:
        from orchestrator.local.fleet import Fleet

        if self.fleet is None:
            self.fleet = Fleet(env={"BED_ROUTING": str(self.tmp / "routing.yaml"),
                                    "PYTHONPATH": f"{self.tmp}:{ROOT}"},
                               log_dir=self.tmp / "logs", app="bedflow_app", cwd=self.tmp)
        for host in hosts:
            self.fleet.start(host, concurrency=concurrency, ready=False)
        for worker in self.fleet.workers:
            worker.wait_ready(timeout=300)

    def connection_holders(self) -> dict[str, int]:
        """The ledger's connections at this moment by the kind of process that holds each
        (a real worker's main process, one of its pool processes, a simulated host's
        process, this bed), from the client ports PostgreSQL reports and ``ss``."""
        import psycopg

        with psycopg.connect(f"{self.admin} dbname=postgres", autocommit=True) as conn:
            ports = [row[0] for row in conn.execute(
                "SELECT client_port FROM pg_stat_activity WHERE datname = 'ledger'")]
        owner: dict[int, int] = {}
        ss = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True).stdout
        for line in ss.splitlines():
            fields = line.split()
            if len(fields) < 6 or "pid=" not in fields[5]:
                continue
            port = int(fields[3].rsplit(":", 1)[1])
            owner[port] = int(fields[5].split("pid=")[1].split(",")[0])
        kinds: dict[str, int] = {}

        def command(pid: int) -> str:
            try:
                return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                return ""

        for port in ports:
            pid = owner.get(port)
            if pid is None:
                kind = "unknown"
            elif pid == os.getpid():
                kind = "bed"
            elif " worker" in command(pid):
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                kind = "pool process" if " worker" in command(parent) else "worker main"
            else:
                kind = "simulated hosts"
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    def views(self) -> dict[str, float]:
        from orchestrator.ops import views

        out = {}
        for name, only in (("hosts --state draining", views.HostFilter(states=("draining",))),
                           ("hosts, first page of 50", views.HostFilter(limit=50))):
            began = time.perf_counter()
            views.hosts(self.orch, with_queues=True, only=only)
            out[name] = round(time.perf_counter() - began, 3)
        return out

    def load(self, stop: threading.Event, rate: float) -> None:
        period = 1.0 / rate
        next_at = time.monotonic()
        while not stop.is_set():
            self.orch.submit("three", {"a": "beda", "b": "bedb"})
            next_at += period
            stop.wait(max(0.0, next_at - time.monotonic()))

    def measure(self, label: str, hosts: int, *, simulated: int, load: bool,
                forget: bool = True) -> dict:
        """``forget``: a fresh registry first (not with real workers just started, whose
        rows and lease it would delete under them)."""
        from orchestrator.testing.scale import SimulatedFleet

        if forget:
            self.forget_hosts()
        sim = SimulatedFleet(self.db_url, simulated, processes=2, log_dir=self.tmp / "sim")
        began = time.time()
        if simulated:
            sim.start()
        log(f"{label}: {hosts} hosts registered in {time.time() - began:.1f} s; warming up")
        try:
            time.sleep(self.args.warmup)
            stop = threading.Event()
            loader = threading.Thread(target=self.load, args=(stop, self.args.rate))
            since = time.time()
            if load:
                loader.start()
            first = self.sample()
            connections = [first.connections]
            end = time.monotonic() + self.args.window
            while time.monotonic() < end:
                time.sleep(min(5.0, max(0.0, end - time.monotonic())))
                connections.append(self.sample().connections)
            last = self.sample()
            stop.set()
            if load:
                loader.join()
            result = {"label": label, "hosts": hosts, "load": load,
                      **last.rate_since(first), "connections_max": max(connections),
                      "connections_last": last.connections,
                      "connections_by_process": self.connection_holders()}
            if load:
                time.sleep(3)  # the last submits' steps complete
                latencies = step_latencies(self.db_url, since)
                result.update(steps=len(latencies),
                              step_p50_ms=round(1000 * percentile(latencies, 0.5), 1),
                              step_p99_ms=round(1000 * percentile(latencies, 0.99), 1))
            result["views_seconds"] = self.views()
            log(json.dumps(result))
            return result
        finally:
            sim.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,50,1000,10000")
    parser.add_argument("--idle", action="store_true", help="no load through the real hosts")
    parser.add_argument("--real", type=int, default=0,
                        help="this many real idle workers (-c 1) instead of simulated hosts")
    parser.add_argument("--window", type=float, default=90.0)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=10.0, help="operations a second")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    bed = Bed(args)
    results = []
    try:
        bed.start_real(["beda", "bedb"], concurrency=2)
        if args.real:
            bed.start_real([f"real{i:03d}" for i in range(args.real)], concurrency=1)
            results.append(bed.measure(f"{args.real} real idle workers", args.real + 2,
                                       simulated=0, load=not args.idle, forget=False))
        else:
            for size in (int(s) for s in args.sizes.split(",")):
                results.append(bed.measure(f"{size} hosts", size, simulated=max(0, size - 2),
                                           load=not args.idle))
    finally:
        bed.close()
    base = results[0]
    for r in results:
        extra = r["hosts"] - base["hosts"]
        if extra > 0:
            r["per_added_host_tx_per_second"] = round(
                (r["transactions_per_second"] - base["transactions_per_second"]) / extra, 4)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
