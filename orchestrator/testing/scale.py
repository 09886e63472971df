"""The scale bed: thousands of hosts on one ledger, without a Celery worker each.

A simulated host does, against the ledger, what an idle worker of this package does, with the
same code: it registers (:meth:`Registry.register`), beats every heartbeat interval from a
random first point (:meth:`Registry.heartbeat`, as ``workers.heartbeat``, reading when the
fleet's lease runs out), and every ``LOOK_SECONDS`` its fleet looks ask for the lease once a
beat saw it free, or at the holder's pace in a small fleet
(:func:`orchestrator.looks.fleet_lease`); while it holds the lease it looks at every host
(:func:`orchestrator.looks.stranded`, :func:`orchestrator.looks.settle_waits`). It serves no
step, so it sends nothing and settles nothing: what it finds is left to the real workers. An
idle host's own looks ask nothing (``workers.resend``, ``workers.waits``), so it has none.

:class:`SimulatedFleet` runs N such hosts in a few processes (``python -m
orchestrator.testing.scale``), each a heap of timers; :func:`ledger_sample` reads what
PostgreSQL counts (transactions committed, its processes' CPU, connections) so that two samples
give the fleet's cost over a window. ``scripts/scalebed.py`` runs the bed at 2, 50, 1,000 and
10,000 hosts beside a real flow load; the test suite runs a small one.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import Settings
from orchestrator.ledger.engines import Database
from orchestrator.ledger.lease import Leases
from orchestrator.ledger.store import Ledger
from orchestrator.looks import LOOK_SECONDS, fleet_lease, settle_waits, stranded
from orchestrator.registry import Registry

#: What a simulated host's registry row says it runs.
CODE_VERSION = "scalebed"
READY = "scalebed: ready"


def host_names(first: int, count: int, prefix: str = "sim") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(first, first + count)]


class SimulatedHosts:
    """Some hosts of the bed, in this process."""

    def __init__(self, db_url: str, names: list[str], settings: Settings) -> None:
        self.db = Database(db_url)
        self.settings = settings
        self.registry = Registry(self.db, settings.heartbeat_interval, self.db.health)
        self.ledger = Ledger(self.db, {})
        self.names = names
        self.nodes = [f"{name}@scalebed" for name in names]
        leases = Leases(self.db)
        self.leases = [fleet_lease(leases, node, settings.heartbeat_interval)
                       for node in self.nodes]
        for lease in self.leases:  # each heartbeat reads the lease's expiry, as a worker's
            lease.watched_every(settings.heartbeat_interval)
        #: Counted by kind: beats, lease asks (statements), looks.
        self.counts = {"beat": 0, "ask": 0, "look": 0}

    def register(self) -> None:
        for name, node, lease in zip(self.names, self.nodes, self.leases, strict=True):
            size = self.registry.register(node, name, consumes_main=True, consumes_alt=True,
                                          pid=os.getpid(), steps=[], code_version=CODE_VERSION)
            lease.first_ask_within(size)

    def run(self, until: float | None = None) -> None:
        """Until SIGTERM (or ``until`` on the monotonic clock): each host's heartbeat and
        fleet looks on their clocks."""
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        interval = self.settings.heartbeat_interval
        now = time.monotonic()
        timers: list[tuple[float, int, str]] = []
        for i in range(len(self.nodes)):
            timers.append((now + interval * random.random(), i, "beat"))
            # The fleet looks tick on the grid a worker's periodic jobs share.
            timers.append((now + LOOK_SECONDS * random.random(), i, "look"))
        heapq.heapify(timers)
        while not stop and (until is None or time.monotonic() < until):
            due, i, kind = timers[0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, 0.5))
                continue
            heapq.heappop(timers)
            if kind == "beat":
                lease = self.leases[i]
                beat = self.registry.heartbeat(self.nodes[i], "up", lease=lease.name)
                if beat.read_lease:
                    lease.seen(beat.lease_expires_at)
                self.counts["beat"] += 1
                heapq.heappush(timers, (due + interval, i, kind))
            else:
                self._look(i)
                heapq.heappush(timers, (due + LOOK_SECONDS, i, kind))

    def _look(self, i: int) -> None:
        lease = self.leases[i]
        before = lease.last
        if lease.hold():
            self.counts["look"] += 1
            stranded(self.ledger, self.settings, None)
            settle_waits(self.ledger, None, lambda _step: None)
        if lease.last is not before:
            self.counts["ask"] += 1


@dataclass
class SimulatedFleet:
    """``hosts`` simulated hosts in ``processes`` processes against ``db_url``."""

    db_url: str
    hosts: int
    processes: int = 2
    log_dir: Path | None = None
    env: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 600.0) -> None:
        per = -(-self.hosts // max(1, self.processes))
        first = 0
        while first < self.hosts:
            count = min(per, self.hosts - first)
            log = subprocess.DEVNULL
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                log = (self.log_dir / f"sim-{first}.log").open("w")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "orchestrator.testing.scale", "--db", self.db_url,
                 "--first", str(first), "--count", str(count)],
                stdout=subprocess.PIPE, stderr=log, text=True,
                env={**os.environ, **(self.env or {})}))
            first += count
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            line = ""
            while READY not in line:
                line = proc.stdout.readline()  # type: ignore[union-attr]
                if not line and proc.poll() is not None:
                    raise RuntimeError(f"a simulated host process exited {proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError("simulated hosts did not register in time")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []

    def __enter__(self) -> SimulatedFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class LedgerSample:
    """What PostgreSQL has counted for one database, at one moment."""

    at: float
    transactions: int
    cpu_seconds: float
    connections: int

    def rate_since(self, earlier: LedgerSample) -> dict[str, float]:
        seconds = self.at - earlier.at
        return {
            "seconds": seconds,
            "transactions_per_second": (self.transactions - earlier.transactions) / seconds,
            "cpu_share_of_one_core": (self.cpu_seconds - earlier.cpu_seconds) / seconds,
        }


def _ticks() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def postgres_cpu_seconds(postmaster_pid: int) -> float:
    """CPU the server's processes have used: the postmaster's own, its reaped children's
    (backends that ended, as the idle ones now do) and its live children's."""
    def fields(pid: int) -> list[str]:
        text = Path(f"/proc/{pid}/stat").read_text()
        return text[text.rindex(")") + 2:].split()

    own = fields(postmaster_pid)
    total = sum(int(x) for x in own[11:15])  # utime stime cutime cstime
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            f = fields(int(entry.name))
        except (OSError, ValueError):
            continue
        if int(f[1]) == postmaster_pid:
            total += int(f[11]) + int(f[12])
    return total / _ticks()


def ledger_sample(admin_dsn: str, database: str, postmaster_pid: int) -> LedgerSample:
    """One sample of ``database``, read from the server's ``postgres`` database (so that it
    is not counted in ``database``'s). PostgreSQL 15 writes a backend's counts within a
    second of its transaction when it can, within ten when busy, and when it exits."""
    import psycopg

    with psycopg.connect(f"{admin_dsn} dbname=postgres", autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        xacts, connections = conn.execute(
            "SELECT xact_commit + xact_rollback, "
            "(SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> "
            "pg_backend_pid()) FROM pg_stat_database WHERE datname = %s",
            (database, database)).fetchone()
    return LedgerSample(time.monotonic(), int(xacts), postgres_cpu_seconds(postmaster_pid),
                        int(connections))


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Simulated hosts of the scale bed.")
    parser.add_argument("--db", required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    hosts = SimulatedHosts(args.db, host_names(args.first, args.count), Settings.from_env())
    hosts.register()
    print(READY, flush=True)
    hosts.run()
    print(f"scalebed: {hosts.counts}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
