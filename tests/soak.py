"""Chaos soak: real workers, random SIGTERM / SIGKILL / restarts, hundreds of mixed operations.

    python -m tests.soak                       # 100 operations, 3 hosts, >= 10 signals
    python -m tests.soak --operations 500 --signals 40 --json soak.json --report

Three hosts (``compute1..3``), each a real ``celery worker`` (orchestrator.local.fleet). A driver
thread submits operations over time (boot, live migration with the odd abort or
force-complete, cold migration, resize on the same host or another, cross-cell resize,
confirm, revert, consoles, events), each picked to be valid for its instance's current state,
plus a few deliberately sent to busy instances: a refusal (InstanceBusy / InvalidState) is
counted, not an error. A chaos thread meanwhile sends SIGTERM (a drain, sometimes hurried by a
second SIGTERM), SIGKILL (the host dies; pool processes die with it through Celery's
PDEATHSIG) or SIGKILL to one pool process, never taking more than ``--max-down`` hosts away at
once, waits for a SIGTERMed worker to exit by itself, and restarts every host after a while.

At the end every host is restarted, every operation must reach completed or failed (within
``--settle-timeout``) and the broker must be empty; then the soak checks and reports: failures
are grouped by reason and must each be explained (an injected failure, an abort we asked for,
a network event lost with a pool process we killed), no step's effect was applied twice, every
instance and migration is in the state its last operation implies, and no message is left in
any queue. Exit status 0 when all of that holds, 1 otherwise (2: could not start).

The broker is ``--broker`` / ``ORCHESTRATOR_BROKER_URL`` (default Redis DB 14); its soak keys
(host queues, kombu's unacked set) are deleted first. The database is a temporary SQLite file
unless ``--db`` is given (its tables are dropped and recreated). Workers use a short Redis
visibility timeout so that messages held by a killed worker come back during the run.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from orchestrator.errors import LedgerUnavailable

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BROKER = "redis://127.0.0.1:6379/14"
FLAVORS = ("m1.small", "m1.medium", "m1.large")
#: The faults injected on a schedule while the driver runs, each a SoakConfig count.
FAULTS = ("ledger_restarts", "partitions", "broker_failovers", "ledger_failovers")
#: What a submit refused because the broker was away says (a fail-over, a partition): a
#: refusal for any other reason (a declare the broker refuses, a bug) is no fault of ours.
BROKER_AWAY = re.compile(r"(?i)connect|refused|reset|timed? ?out|closed|broken pipe|eof|"
                         r"unreachable|no route|errno|readonly|master|failover|fail-over")
#: The faults done to the ledger's PostgreSQL, one at a time (a restart never meets a failover).
LEDGER_FAULTS = ("ledger_restarts", "ledger_failovers")
#: workers.resend's line for a step it sent again.
RESENT_RE = re.compile(r"\bresent \S+ of \S+ to \S+: ")

#: Steps made slower than the rest, so that signals often land in the middle of them.
SLOW_STEPS = ("resize_instance", "live_migration", "prep_snapshot_based_resize_at_source",
              "finish_revert_resize")
TERMINAL = ("completed", "failed")
EX_DRAIN_EXPIRED = 75  # workers.drain.EX_DRAIN_EXPIRED (not imported before the env is set)
RECEIVED_RE = re.compile(r"Task compute\.\w+\[([0-9a-f-]{36}\.\d+)\] received")
#: Project bugs the soak recognises (its report says which failure is which).
KNOWN_ISSUES = (
    "message lost by a SIGKILLed worker (kombu Redis: BRPOP pops it before it is recorded "
    "as unacked, so no visibility timeout brings it back)",
    "drain waited for an orphaned step (recorded running by a worker that was killed; its "
    "message waits for the visibility timeout, on a queue the draining host may not consume)",
    "operation recorded but its first step never sent: its submitter died between the two "
    "(README 'Known window', no sweeper; every later drain of its host waits for it)",
)
SUMMARY_RE = re.compile(
    r"drain: summary for (?P<host>\S+) after (?P<secs>[\d.]+)s \((?P<why>.*?)\): "
    r"steps completed during drain: (?P<completed>\S+); messages handed back: (?P<back>\d+); "
    r"steps left in (?P<alt>\S+): (?P<left>\S+)"
)


@dataclass
class SoakConfig:
    operations: int = 100
    hosts: int = 3
    signals: int = 10
    seed: int | None = None
    broker: str = DEFAULT_BROKER
    db: str | None = None
    graceful_timeout: float = 8.0
    visibility_timeout: float = 10.0
    step_delay: float = 0.05
    slow_step_delay: float = 0.5
    concurrency: int = 2
    #: Operations submitted per second (on average).
    rate: float = 2.5
    #: Hosts that may be draining, down or starting at once.
    max_down: int = 2
    #: Inject a few deterministic failures (they must show up as explained failures).
    inject_failures: bool = True
    #: Seconds a build waits for network-vif-plugged (Nova's 300 is longer than a soak).
    vif_timeout: float = 30.0
    settle_timeout: float = 240.0
    workdir: Path | None = None
    keep: bool = False
    progress: bool = True
    #: Ledger outages to inject while the driver runs: the soak's own PostgreSQL
    #: (orchestrator/testing/pgserver.py) stopped (fast and immediate, in turn) and started again.
    ledger_restarts: int = 0
    #: How long each outage lasts, seconds (drawn between the two).
    ledger_outage: tuple[float, float] = (2.0, 6.0)
    #: Partitions to inject while the driver runs: each host in a network namespace of its
    #: own (tests/netbed.py), one cut from the broker, the ledger or both for a few seconds.
    #: The soak then runs its own broker and PostgreSQL on the bed's bridge.
    partitions: int = 0
    partition_seconds: tuple[float, float] = (3.0, 8.0)
    #: Broker fail-overs to inject while the driver runs. On Redis the soak runs its own
    #: Sentinel set (tests/sentinel.py), kills its primary and lets the sentinels promote
    #: the replica; what replication had not passed on is lost, for the resend to recover.
    #: On RabbitMQ it runs its own three-node cluster (tests/rabbitcluster.py) with quorum
    #: host queues, and stops a node (each in turn, the first one first) for a few seconds.
    broker_failovers: int = 0
    #: How long a RabbitMQ node stays down, seconds (drawn between the two).
    node_loss_seconds: tuple[float, float] = (3.0, 6.0)
    #: Ledger failovers to inject while the driver runs: the soak's ledger is then a primary
    #: and a synchronous standby (tests/pgfailover.py), its URL naming both; the primary is
    #: crashed, the standby promoted, and the old primary rebuilt as the new standby.
    ledger_failovers: int = 0

    def host_names(self) -> list[str]:
        return [f"compute{i}" for i in range(1, self.hosts + 1)]

    def fail_steps(self) -> list[str]:
        """Injected failures, each leaving its instance ACTIVE where it was (Nova's rules):
        a refused prep on a destination, and a live migration rolled back."""
        if not self.inject_failures or self.hosts < 2:
            return []
        names = self.host_names()
        return [f"prep_resize@{names[-1]}", f"pre_live_migration@{names[1]}"]


@dataclass
class SoakResult:
    ok: bool
    #: Everything wrong that is not a known issue.
    problems: list[str]
    #: Failures diagnosed as a known project bug (KNOWN_ISSUES).
    known: list[str]
    report: dict[str, Any]
    text: str
    workdir: Path


@dataclass
class Host:
    name: str
    worker: Any = None  # orchestrator.local.fleet.WorkerProcess
    #: starting, up, draining (SIGTERM sent), killed (SIGKILL sent), down (exited)
    phase: str = "down"
    since: float = 0.0
    restart_at: float = 0.0
    signalled_at: float = 0.0
    hurry_at: float | None = None
    #: Wall-clock time of the second SIGTERM, if one was sent.
    hurried: float | None = None
    starts: int = 0


@dataclass
class Submitted:
    id: str
    label: str
    instance: str
    at: float


@dataclass
class Stats:
    attempts: int = 0
    submitted: list[Submitted] = field(default_factory=list)
    refused: Counter = field(default_factory=Counter)
    signals: Counter = field(default_factory=Counter)
    restarts: int = 0
    #: Ledger outages injected, by pg_ctl stop mode; and the seconds each lasted.
    ledger_outages: Counter = field(default_factory=Counter)
    ledger_outage_seconds: list[float] = field(default_factory=list)
    #: Partitions injected, by what the host was cut from.
    partitions: Counter = field(default_factory=Counter)
    #: Seconds without a primary, per broker fail-over.
    broker_failover_seconds: list[float] = field(default_factory=list)
    #: Seconds from the ledger's primary crashed to its standby taking writes, per failover.
    ledger_failover_seconds: list[float] = field(default_factory=list)
    exits: Counter = field(default_factory=Counter)
    #: (wall time, host, what, pid): kills and expired drains, to explain what they lost.
    incidents: list[tuple[float, str, str, int]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    startup_seconds: list[float] = field(default_factory=list)
    drain_seconds: list[float] = field(default_factory=list)


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


class Soak:
    def __init__(self, config: SoakConfig) -> None:
        self.cfg = config
        self.seed = config.seed if config.seed is not None else random.randrange(1 << 30)
        self.rng_driver = random.Random(self.seed)
        self.rng_chaos = random.Random(self.seed + 1)
        self.hosts = {name: Host(name) for name in config.host_names()}
        self.stats = Stats()
        self.problems: list[str] = []
        #: Problems diagnosed as a known project bug (see KNOWN_ISSUES); still a failed soak.
        self.known: list[str] = []
        #: Hosts that stuck operations still need (their final drain waits for them).
        self.stuck_hosts: set[str] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.driver_done = threading.Event()
        self.t0 = time.monotonic()
        self.timings: dict[str, float] = {}
        self.fleet: Any = None
        #: The soak's own PostgreSQL when it injects ledger outages or partitions (a primary
        #: and a standby with ledger failovers); the ledger faults take turns on it.
        self.ledger: Any = None
        self.ledger_turn = threading.Lock()
        #: Its own Sentinel set (Redis) or RabbitMQ cluster when it injects broker fail-overs.
        self.sentinels: Any = None
        self.rabbit: Any = None
        #: The network bed (tests/netbed.py), with partitions.
        self.net: Any = None
        self.backends: Any = None
        self.workdir = Path(config.workdir or tempfile.mkdtemp(prefix="orch-soak-"))
        self.names = 0
        #: Average seconds between two chaos strikes while the driver runs.
        driving = config.operations / config.rate
        self.gap = max(1.0, min(6.0, driving / (1.4 * max(1, config.signals))))

    # -- small helpers ---------------------------------------------------------------------
    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def say(self, text: str) -> None:
        if self.cfg.progress:
            print(f"[soak {self.now():7.1f}s] {text}", flush=True)

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)
        self.say(f"PROBLEM: {text}")

    def event(self, host: str, what: str, **detail: Any) -> None:
        with self.lock:
            self.stats.timeline.append({"t": self.now(), "clock": _clock(time.time()),
                                        "host": host, "event": what, **detail})

    def env(self) -> dict[str, str]:
        cfg = self.cfg
        return {
            "ORCHESTRATOR_BROKER_URL": cfg.broker,
            "ORCHESTRATOR_DB_URL": cfg.db or f"sqlite:///{self.workdir / 'soak.db'}",
            "ORCHESTRATOR_ROUTING_FILE": os.environ.get("ORCHESTRATOR_ROUTING_FILE")
            or str(REPO_ROOT / "routing.yaml"),
            "ORCHESTRATOR_STEP_DELAY": str(cfg.step_delay),
            "ORCHESTRATOR_STEP_DELAYS": ",".join(f"{s}={cfg.slow_step_delay}" for s in SLOW_STEPS),
            "ORCHESTRATOR_FAIL_STEPS": ",".join(cfg.fail_steps()),
            "ORCHESTRATOR_VISIBILITY_TIMEOUT": str(cfg.visibility_timeout),
            # Steps whose message was lost are sent again after this (workers.resend).
            "ORCHESTRATOR_RESEND_AFTER": "5",
            "ORCHESTRATOR_HEARTBEAT_INTERVAL": "1",
            "ORCHESTRATOR_GRACEFUL_SHUTDOWN_TIMEOUT": str(cfg.graceful_timeout),
            "ORCHESTRATOR_VIF_PLUGGING_TIMEOUT": str(cfg.vif_timeout),
            **({"ORCHESTRATOR_SENTINEL_MASTER": self.sentinels.master} if self.sentinels else {}),
            # Host queues that outlive a node: replicated on every node of the cluster.
            **({"ORCHESTRATOR_QUEUE_TYPE": "quorum"} if self.rabbit else {}),
        }

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> SoakResult:
        from tests import netbed

        cfg = self.cfg
        rabbit = bool(cfg.broker_failovers) and not self._redis_broker()
        if rabbit and cfg.partitions:
            raise ValueError("--broker-failovers on RabbitMQ (a cluster of the soak's own, on "
                             "loopback) cannot go with --partitions")
        try:
            if cfg.partitions:  # each host a machine of its own, the services on the bridge
                self.net = netbed.NetBed().create()
                for name in self.hosts:
                    self.net.machine(name)
            self.backends = netbed.backends(
                cfg.broker, self.workdir, self.net,
                sentinel=bool(cfg.broker_failovers) and not rabbit, rabbit_cluster=rabbit,
                ledger=bool(cfg.ledger_restarts or cfg.partitions),
                ledger_pair=bool(cfg.ledger_failovers))
            self.ledger, self.sentinels = self.backends.ledger, self.backends.sentinels
            self.rabbit = self.backends.rabbit
            cfg.broker = self.backends.broker_url
            if self.ledger is not None:
                cfg.db = self.ledger.url
            return self._run_with_ledger()
        finally:
            if self.backends is not None:
                self.backends.close()
            if self.net is not None:
                self.net.destroy()

    def _run_with_ledger(self) -> SoakResult:
        env = self.env()
        with _environ(env):
            from nova_app.app import app
            from orchestrator.local.fleet import Fleet
            from orchestrator.policy import publish_retry_policy
            from orchestrator.seams.celery_internals import point_app_at, use_queue_type

            app.conf.task_publish_retry_policy = publish_retry_policy(self.cfg.broker)
            if self.sentinels is not None:
                app.conf.broker_transport_options = {
                    **(app.conf.broker_transport_options or {}),
                    "master_name": self.sentinels.master}
            point_app_at(app, self.cfg.broker)  # pools made for another broker, if any
            if self.rabbit is not None:  # this process declares what the workers declare
                use_queue_type(app, "quorum")
            self.app = app
            self._reset_broker()
            self._reset_db(env["ORCHESTRATOR_DB_URL"])
            self.fleet = Fleet(env=env, log_dir=self.workdir / "logs")
            try:
                return self._run()
            finally:
                self.stop.set()
                self.fleet.stop_all(timeout=15)
                if self.rabbit is not None:
                    use_queue_type(app, app.orchestrator.settings.queue_type)

    def _run(self) -> SoakResult:
        cfg = self.cfg
        self.say(f"seed {self.seed}; {cfg.operations} operations, {cfg.hosts} hosts, "
                 f">= {cfg.signals} signals; workdir {self.workdir}")
        for host in self.hosts.values():
            self._start(host)
        self._wait(lambda: all(h.phase == "up" for h in self.hosts.values()), 60, "hosts up")
        self.timings["startup"] = self.now()

        driver = threading.Thread(target=self._driver, name="soak-driver", daemon=True)
        chaos = threading.Thread(target=self._chaos, name="soak-chaos", daemon=True)
        threads = [driver, chaos] + [
            threading.Thread(target=self._fault_schedule, args=(fault,), name=f"soak-{fault}",
                             daemon=True) for fault in FAULTS if getattr(self.cfg, fault)]
        for thread in threads:
            thread.start()
        last = time.monotonic()
        while any(thread.is_alive() for thread in threads):
            time.sleep(0.2)
            if time.monotonic() - last >= 5:
                last = time.monotonic()
                self._progress()
        self.timings["chaos_end"] = self.now()
        self.say("driver and chaos done; restarting every host")

        self._restore_all()
        self.timings["all_up"] = self.now()
        settled = self._settle()
        self.timings["settled"] = self.now()
        report = self._verify(settled)
        self._final_stop()
        self.timings["stopped"] = self.now()
        report.update(self._logs())
        # A forced exit is the exit deadline doing its job (nothing is lost: the steps it
        # stopped were unacknowledged), but what wedged Celery's shutdown is worth reading.
        report["findings"] = self._orphan_waits(report["drains_expired"]) + [
            f"exit forced by the exit deadline: {f}" for f in report["exits_forced"]]
        report["timings"] = dict(self.timings)
        report["problems"] = list(self.problems)
        report["known_issues"] = list(self.known)
        ok = not self.problems and not self.known
        text = format_report(report, ok)
        (self.workdir / "report.json").write_text(json.dumps(report, indent=2, default=str))
        if ok and not cfg.keep and cfg.workdir is None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return SoakResult(ok=ok, problems=list(self.problems), known=list(self.known),
                          report=report, text=text, workdir=self.workdir)

    def _wait(self, cond: Callable[[], bool], timeout: float, what: str) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._supervise(time.monotonic(), chaos=False)
            if cond():
                return True
            time.sleep(0.1)
        self.problem(f"timed out after {timeout:.0f}s waiting for {what}")
        return False

    def _redis_broker(self) -> bool:
        return urlparse(self.cfg.broker).scheme.startswith(("redis", "sentinel"))

    def _redis(self) -> Any:
        """A client of the Redis broker (its primary now, under Sentinel)."""
        import redis

        if self.sentinels is not None:
            return self.sentinels.primary()
        return redis.Redis.from_url(self.cfg.broker)

    def _reset_broker(self) -> None:
        queues = [q for h in self.hosts for q in (h, f"{h}-alt")] + ["orchestrator"]
        if self._redis_broker():
            client = self._redis()
            client.ping()
            client.delete(*self._queue_keys(client), "unacked", "unacked_index", "unacked_mutex")
        else:
            from orchestrator.broker import delete_queues

            delete_queues(self.app, queues)

    def _reset_db(self, url: str) -> None:
        if not url.startswith("sqlite"):
            from nova_app.app import MIGRATIONS
            from orchestrator.ledger.engines import reset

            reset(url, [MIGRATIONS])

    def _progress(self) -> None:
        from sqlalchemy import func, select

        from orchestrator.ledger import engines as db
        from orchestrator.ledger.models import Operation

        try:
            with db.read() as s:
                counts = dict(s.execute(
                    select(Operation.status, func.count()).group_by(Operation.status)).all())
        except LedgerUnavailable:
            counts = "unknown (ledger unreachable)"
        phases = " ".join(f"{h.name}:{h.phase}" for h in self.hosts.values())
        self.say(f"submitted {len(self.stats.submitted)}/{self.cfg.operations} "
                 f"(refused {sum(self.stats.refused.values())}), operations {counts}, "
                 f"signals {sum(self.stats.signals.values())}, {phases}")

    # -- hosts -----------------------------------------------------------------------------
    def _start(self, host: Host) -> None:
        # Half the starts prefetch several messages per process (and some run one process),
        # so that a SIGTERM finds fetched, unstarted main-queue messages to hand back.
        concurrency, prefetch = self.rng_chaos.choice(
            [(self.cfg.concurrency, 1), (self.cfg.concurrency, 1), (self.cfg.concurrency, 4),
             (1, 4)])
        machine = self.net.machines[host.name] if self.net is not None else None
        host.worker = self.fleet.start(
            host.name, concurrency=concurrency,
            graceful_timeout=self.cfg.graceful_timeout, ready=False,
            extra=("--prefetch-multiplier", str(prefetch)),
            prefix=tuple(machine.command([])) if machine is not None else (),
        )
        host.phase, host.since = "starting", time.monotonic()
        host.hurry_at = host.hurried = None
        host.starts += 1
        if host.starts > 1:
            self.stats.restarts += 1
        self.event(host.name, "start", pid=host.worker.pid, concurrency=concurrency,
                   prefetch=prefetch)

    def _exited(self, host: Host, code: int, now: float) -> None:
        """Book a worker's exit and schedule its restart."""
        phase, took = host.phase, now - host.signalled_at
        kind = {"draining": "drain", "killed": "kill"}.get(phase, f"unexpected ({phase})")
        if phase == "draining" and code == -signal.SIGTERM and self._ended_before_hurry(host):
            # Python restores SIG_DFL while the interpreter exits: a second SIGTERM that
            # arrives after the drain has ended (summary logged) kills it by signal.
            kind = "drain ended, then killed by its second SIGTERM while exiting"
        self.stats.exits[f"{kind}: {code}"] += 1
        self.event(host.name, "exit", code=code, after=round(took, 2), phase=phase)
        if phase == "draining":
            self.stats.drain_seconds.append(round(took, 2))
            if code == EX_DRAIN_EXPIRED:
                self.stats.incidents.append(
                    (time.time(), host.name, "drain deadline", host.worker.pid))
            elif code != 0 and not kind.startswith("drain ended"):
                self.problem(f"{host.name} (pid {host.worker.pid}) exited {code} after SIGTERM, "
                             f"not 0 or {EX_DRAIN_EXPIRED}: see {host.worker.log_path}")
        elif phase == "killed":
            if code != -signal.SIGKILL:
                self.problem(f"{host.name} exited {code} after SIGKILL")
        else:
            self.problem(f"{host.name} (pid {host.worker.pid}) exited {code} while {phase}, "
                         f"unasked: see {host.worker.log_path}")
        host.phase, host.since = "down", now
        host.restart_at = now + self.rng_chaos.uniform(0.5, 3.0)

    def _ended_before_hurry(self, host: Host) -> bool:
        """Whether the worker logged its drain summary before we sent the second SIGTERM."""
        if host.hurried is None:
            return False
        for line in host.worker.log().splitlines():
            if SUMMARY_RE.search(line):
                logged = _log_time(line)
                return logged is not None and logged <= host.hurried
        return False

    def _supervise(self, now: float, chaos: bool = True) -> None:
        """Move each host along: ready, exited, restarted (and a pending second SIGTERM)."""
        for host in self.hosts.values():
            worker = host.worker
            code = worker.proc.poll() if worker is not None else None
            if host.phase == "starting":
                if code is not None:
                    self._exited(host, code, now)
                elif " ready." in worker.log():
                    host.phase = "up"
                    self.stats.startup_seconds.append(round(now - host.since, 2))
                    self.event(host.name, "ready", after=round(now - host.since, 2))
                    host.since = now
            elif host.phase == "up":
                if code is not None:
                    self._exited(host, code, now)
            elif host.phase == "draining":
                if code is not None:
                    self._exited(host, code, now)
                elif chaos and host.hurry_at is not None and now >= host.hurry_at:
                    host.hurry_at, host.hurried = None, time.time()
                    worker.signal(signal.SIGTERM)
                    self.stats.signals["SIGTERM (second)"] += 1
                    self.event(host.name, "SIGTERM (second)", pid=worker.pid)
                elif now - host.signalled_at > self.cfg.graceful_timeout + 20:
                    self.problem(f"{host.name} (pid {worker.pid}) still running "
                                 f"{now - host.signalled_at:.0f}s after SIGTERM, graceful "
                                 f"timeout {self.cfg.graceful_timeout}s: SIGKILL; see "
                                 f"{worker.log_path}")
                    worker.signal(signal.SIGKILL)
                    host.phase = "killed"
            elif host.phase == "killed":
                if code is not None:
                    self._exited(host, code, now)
                elif now - host.signalled_at > 10:
                    self.problem(f"{host.name} (pid {worker.pid}) alive 10s after SIGKILL")
                    host.signalled_at = now
            elif host.phase == "down" and (not chaos or now >= host.restart_at):
                self._start(host)

    def _strike(self, now: float) -> bool:
        """Send one random signal to a host that is up; False if none may be hit now."""
        rng = self.rng_chaos
        up = [h for h in self.hosts.values() if h.phase == "up" and now - h.since >= 0.5]
        if not up:
            return False
        away = sum(h.phase != "up" for h in self.hosts.values())
        host = rng.choice(up)
        kinds = ["SIGTERM", "SIGKILL", "SIGKILL (pool process)"]
        if away < self.cfg.max_down:
            kind = rng.choices(kinds, [0.5, 0.33, 0.17])[0]
        elif rng.random() < 0.3:  # no other host may go away now; a pool process may
            kind = kinds[2]
        else:
            return False
        worker = host.worker
        if kind == "SIGKILL (pool process)":
            children = worker.pool_pids()
            if not children:
                return False
            pid = rng.choice(children)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return False
            self.stats.incidents.append((time.time(), host.name, kind, pid))
            self.event(host.name, kind, pid=pid, parent=worker.pid)
        elif kind == "SIGTERM":
            worker.signal(signal.SIGTERM)
            host.phase, host.signalled_at = "draining", now
            host.hurry_at = now + rng.uniform(0.3, 3.0) if rng.random() < 0.15 else None
            self.event(host.name, kind, pid=worker.pid)
        else:
            worker.signal(signal.SIGKILL)
            host.phase, host.signalled_at = "killed", now
            self.stats.incidents.append((time.time(), host.name, kind, worker.pid))
            self.event(host.name, kind, pid=worker.pid)
        self.stats.signals[kind] += 1
        return True

    def _chaos(self) -> None:
        rng = self.rng_chaos
        next_at = time.monotonic() + rng.uniform(0.5, 1.5) * self.gap
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                self._supervise(now)
                sent = sum(self.stats.signals.values())
                if self.driver_done.is_set() and sent >= self.cfg.signals:
                    return
                if now >= next_at:
                    gap = self.gap if not self.driver_done.is_set() else min(self.gap, 2.0)
                    next_at = now + (rng.uniform(0.5, 1.5) * gap if self._strike(now) else 0.3)
                time.sleep(0.05)
        except Exception:
            self.problem(f"chaos thread crashed:\n{traceback.format_exc()}")

    def _fault_schedule(self, fault: str) -> None:
        """Inject ``fault`` (a name in :data:`FAULTS`, also the config's count of it) that
        many times while the driver runs, one in each equal slice of the driving time, at a
        random moment of the slice; each injection lasts a few seconds and undoes itself."""
        count, inject = getattr(self.cfg, fault), getattr(self, f"_inject_{fault}")
        rng = random.Random(self.seed + 2 + FAULTS.index(fault))
        driving = self.cfg.operations / self.cfg.rate
        try:
            for i in range(count):
                at = self.t0 + driving * (i + rng.uniform(0.2, 0.8)) / count
                while time.monotonic() < at and not self.stop.is_set():
                    time.sleep(0.1)
                if self.stop.is_set():
                    return
                if fault in LEDGER_FAULTS:
                    with self.ledger_turn:
                        inject(i, rng)
                else:
                    inject(i, rng)
        except Exception:
            self.problem(f"{fault} injection crashed:\n{traceback.format_exc()}")
        finally:
            getattr(self, f"_undo_{fault}")()

    def _inject_ledger_restarts(self, i: int, rng: random.Random) -> None:
        """The ledger's PostgreSQL stopped (``fast``: clients cut, clean; ``immediate``: a
        crash, WAL recovery at start, in turn) for a few seconds, and started again."""
        mode, outage = ("fast", "immediate")[i % 2], rng.uniform(*self.cfg.ledger_outage)
        began = time.monotonic()
        self.ledger.stop(mode)
        self.event("ledger", f"PostgreSQL stopped ({mode})", seconds=round(outage, 1))
        time.sleep(outage)  # the outage's length: the fault, not a wait
        self.ledger.start()
        self.ledger.wait_answering()
        self.stats.ledger_outages[mode] += 1
        self.stats.ledger_outage_seconds.append(round(time.monotonic() - began, 1))
        self.event("ledger", "PostgreSQL started")

    def _undo_ledger_restarts(self) -> None:
        with self.ledger_turn:
            if not self.ledger.running():
                self.ledger.start()

    def _inject_ledger_failovers(self, i: int, rng: random.Random) -> None:
        """The ledger's primary crashed (``pg_ctl stop -m immediate``) and its synchronous
        standby promoted; then the old primary rebuilt as the new standby (``pg_basebackup``)
        and made synchronous again, the workers running all along on the two-host URL."""
        began = time.monotonic()
        self.ledger.fail_over()
        without = time.monotonic() - began
        self.event("ledger", "primary crashed, standby promoted", seconds=round(without, 1))
        self.ledger.rebuild_standby()
        self.stats.ledger_failover_seconds.append(round(without, 1))
        self.event("ledger", "old primary rebuilt as the synchronous standby")

    def _undo_ledger_failovers(self) -> None:
        pass  # each failover leaves a primary and a synchronous standby

    def _inject_partitions(self, i: int, rng: random.Random) -> None:
        """A random host cut from the broker, the ledger or both for a few seconds."""
        name = rng.choice(sorted(self.hosts))
        machine = self.net.machines[name]
        cut = rng.choice(["broker", "ledger", "both"])
        seconds = rng.uniform(*self.cfg.partition_seconds)
        if cut == "both":
            machine.cut()
        else:
            machine.cut_from(self.net.broker_address if cut == "broker"
                             else self.net.ledger_address)
        self.event(name, f"cut from {cut}", seconds=round(seconds, 1))
        time.sleep(seconds)  # the partition's length: the fault, not a wait
        machine.heal()
        self.stats.partitions[cut] += 1
        self.event(name, "healed")

    def _undo_partitions(self) -> None:
        for machine in self.net.machines.values():
            machine.heal()

    def _inject_broker_failovers(self, i: int, rng: random.Random) -> None:
        """Redis: the broker's primary killed; the sentinels promote the replica. RabbitMQ:
        a node of the cluster stopped for a few seconds (the first one first: the one kombu's
        fail-over URL names first, where most clients are), then started again."""
        if self.rabbit is not None:
            index = i % len(self.rabbit.nodes)
            seconds = rng.uniform(*self.cfg.node_loss_seconds)
            began = time.monotonic()
            self.rabbit.stop_node(index)
            self.event("broker", f"RabbitMQ node {index + 1} stopped", seconds=round(seconds, 1))
            time.sleep(seconds)  # the node's absence: the fault, not a wait
            self.rabbit.start_node(self.rabbit.nodes[index])
            self.stats.broker_failover_seconds.append(round(time.monotonic() - began, 1))
            self.event("broker", f"RabbitMQ node {index + 1} back")
            return
        self.event("broker", "primary killed")
        without = self.sentinels.fail_over()
        self.stats.broker_failover_seconds.append(round(without, 1))
        self.event("broker", "replica promoted", seconds=round(without, 1))

    def _undo_broker_failovers(self) -> None:
        pass  # each fail-over leaves a primary and a replica in sync

    def _restore_all(self) -> None:
        """Restart every host (a draining one first exits by itself) and wait for them."""
        self._wait(lambda: all(h.phase == "up" for h in self.hosts.values()),
                   self.cfg.graceful_timeout + 90, "every host to be up again")

    # -- the driver ------------------------------------------------------------------------
    def _snapshot(self) -> tuple[list[Any], dict[str, Any], dict[str, str]]:
        from sqlalchemy import select

        from nova_app.models import Instance, Migration
        from nova_app.operations import NON_EXCLUSIVE
        from orchestrator.ledger import engines as db
        from orchestrator.ledger.models import Operation

        with db.read() as s:
            instances = s.execute(select(Instance).order_by(Instance.name)).scalars().all()
            busy: dict[str, Any] = {}
            live: dict[str, str] = {}
            for op in s.execute(select(Operation).where(
                    Operation.status.in_(("queued", "running")))).scalars():
                if op.kind in NON_EXCLUSIVE:
                    continue
                busy[op.params["instance_id"]] = op
                if op.kind == "live_migration" and op.params.get("migration_id") is not None:
                    mig = s.get(Migration, op.params.get("migration_id"))
                    live[op.params["instance_id"]] = mig.status if mig else "?"
        return instances, busy, live

    def _choose(self) -> tuple[str, str, Callable[[], Any]] | None:
        from nova_app import operations as ops

        rng, hosts = self.rng_driver, list(self.hosts)
        instances, busy, live = self._snapshot()
        idle = [i for i in instances if i.id not in busy]
        target = max(4, min(30, self.cfg.operations // 5))

        def others(i: Any) -> list[str]:
            return [h for h in hosts if h != i.host]

        def new_flavor(i: Any) -> str:
            return rng.choice([f for f in FLAVORS if f != i.flavor])

        roll = rng.random()
        alive = [i for i in instances if i.vm_state != "error"]
        if len(alive) < target and (roll < 0.4 or not idle):
            self.names += 1
            name, host = f"vm{self.names:03d}", rng.choice(hosts)
            return "boot", name, lambda: ops.boot(name, host, rng.choice(FLAVORS))
        if roll < 0.06 and busy:  # a request for a busy instance: must be refused
            pick = rng.choice(sorted(busy))
            i = next(i for i in instances if i.id == pick)
            return "busy-probe", i.name, lambda: ops.resize(i.name, new_flavor(i))
        if roll < 0.10 and live:
            pick = rng.choice(sorted(live))
            i = next(i for i in instances if i.id == pick)
            if rng.random() < 0.5:
                return "live-migration-abort", i.name, lambda: ops.live_migration_abort(i.name)
            return ("live-migration-force-complete", i.name,
                    lambda: ops.live_migration_force_complete(i.name))
        if roll < 0.17:
            usable = [i for i in instances if i.vm_state in ("active", "resized")]
            if usable:
                i = rng.choice(usable)
                what = rng.choice(["console", "vnc", "event"])
                if what == "event":
                    return "event", i.name, lambda: ops.external_event(i.name, "network-changed")
                kind = "output" if what == "console" else "vnc"
                return f"console-{kind}", i.name, lambda: ops.console(i.name, kind)
        idle = [i for i in idle if i.vm_state in ("active", "resized")]
        if not idle:
            return None
        i = rng.choice(idle)
        if i.vm_state == "resized":
            if rng.random() < 0.55:
                return "confirm", i.name, lambda: ops.confirm(i.name)
            return "revert", i.name, lambda: ops.revert(i.name)
        dest = rng.choice(others(i)) if len(hosts) > 1 else i.host
        choices: list[tuple[str, Callable[[], Any], float]] = [
            ("resize-same-host", lambda: ops.resize(i.name, new_flavor(i)), 15),
        ]
        if len(hosts) > 1:
            choices += [
                ("live-migration", lambda: ops.live_migrate(i.name, dest), 25),
                ("cold-migration", lambda: ops.resize(i.name, dest=dest), 15),
                ("resize-other-host", lambda: ops.resize(i.name, new_flavor(i), dest), 20),
                ("cross-cell-resize",
                 lambda: ops.resize(i.name, new_flavor(i), dest, cross_cell=True), 15),
            ]
        label, fn, _ = rng.choices(choices, [c[2] for c in choices])[0]
        return label, i.name, fn

    def _driver(self) -> None:
        from nova_app.operations import BrokerUnavailable, InstanceBusy, InvalidState

        rng, cfg, stats = self.rng_driver, self.cfg, self.stats
        idle = 0
        try:
            while (len(stats.submitted) < cfg.operations and not self.stop.is_set()
                   and stats.attempts < 5 * cfg.operations):
                time.sleep(rng.uniform(0.5, 1.5) / cfg.rate)
                try:
                    choice = self._choose()
                except LedgerUnavailable:  # an outage of the soak's: try again later
                    stats.refused["ledger unreachable"] += 1
                    continue
                if choice is None:
                    idle += 1
                    if idle * 1.0 / cfg.rate > 60:
                        self.problem("driver: no instance could take an operation for 60s")
                        return
                    continue
                idle = 0
                label, instance, submit = choice
                stats.attempts += 1
                try:
                    op = submit()
                except (InstanceBusy, InvalidState) as exc:
                    stats.refused[f"{label}: {type(exc).__name__}"] += 1
                    continue
                except LedgerUnavailable:  # nothing recorded, nothing sent
                    stats.refused[f"{label}: ledger unreachable"] += 1
                    continue
                except BrokerUnavailable:  # recorded, not sent: abandoned, the caller told
                    stats.refused[f"{label}: broker unavailable"] += 1
                    continue
                stats.submitted.append(Submitted(op.id, label, instance, self.now()))
        except Exception:
            self.problem(f"driver crashed:\n{traceback.format_exc()}")
        finally:
            self.timings["submitted"] = self.now()
            self.driver_done.set()

    # -- the end ---------------------------------------------------------------------------
    def _pending(self) -> tuple[dict[str, int], frozenset]:
        """What is still moving: operations not terminal (and where each stands), queued and
        unacked messages."""
        from sqlalchemy import select

        from orchestrator.broker import queue_depth
        from orchestrator.ledger import engines as db
        from orchestrator.ledger.models import Operation

        with db.read() as s:
            active = s.execute(select(Operation).where(
                Operation.status.in_(("queued", "running")))).scalars().all()
            where = frozenset((op.id, op.position, op.step_state) for op in active)
        queued = sum(queue_depth(self.app, q) for q in self._queues())
        return {"active_operations": len(active),
                "waiting_for_events": sum(state == "waiting" for _, _, state in where),
                "queued_messages": queued, "unacked_messages": self._unacked()}, where

    def _queue_keys(self, client: Any) -> list[bytes]:
        """The Redis lists of our queues (kombu adds one per priority: ``<queue>\\x06\\x16N``)."""
        keys: set[bytes] = set()
        for q in self._queues():
            keys.update(k for k in client.keys(f"{q}*")
                        if k == q.encode() or k.startswith(q.encode() + b"\x06\x16"))
        return sorted(keys)

    def _queues(self) -> list[str]:
        return [q for h in self.hosts for q in (h, f"{h}-alt")] + ["orchestrator"]

    def _unacked(self) -> int:
        if not self._redis_broker():
            return 0
        return int(self._redis().hlen("unacked"))

    def _settle(self) -> bool:
        """Wait until every operation is terminal and the broker is empty (and stays so).

        Gives up early when operations are left but nothing can move them any more: no
        message queued or unacknowledged (a killed worker's come back after the visibility
        timeout), no build waiting for its event, every host up, for longer than a
        visibility timeout plus kombu's restore interval. They are then reported as stuck.
        """
        deadline = time.monotonic() + self.cfg.settle_timeout
        patience = self.cfg.visibility_timeout + min(10, self.cfg.visibility_timeout // 4) + 8
        quiet_since: float | None = None
        frozen_since, last_where = time.monotonic(), None
        last_log = 0.0
        pending: dict[str, int] = {}
        while time.monotonic() < deadline:
            now = time.monotonic()
            self._supervise(now, chaos=False)
            pending, where = self._pending()
            if not any(pending.values()):
                quiet_since = quiet_since or now
                if now - quiet_since >= 2.0:
                    self.say(f"settled: {pending}")
                    return True
            else:
                quiet_since = None
            moving = (pending["queued_messages"] or pending["unacked_messages"]
                      or pending["waiting_for_events"]
                      or any(h.phase != "up" for h in self.hosts.values()))
            if moving or where != last_where:
                frozen_since, last_where = now, where
            elif now - frozen_since >= patience:
                self.say(f"nothing has moved for {patience:.0f}s with an empty broker: "
                         f"{pending['active_operations']} operation(s) stuck")
                return False
            if now - last_log >= 5:
                last_log = now
                self.say(f"settling: {pending}")
            time.sleep(0.25)
        self.say(f"not settled within {self.cfg.settle_timeout:.0f}s: {pending}")
        return False

    def _final_stop(self) -> None:
        """SIGTERM every host: with nothing in flight each must exit 0 at once."""
        self._wait(lambda: all(h.phase == "up" for h in self.hosts.values()), 60,
                   "every host up before the final stop")
        for host in self.hosts.values():
            if host.phase in ("up", "starting") and host.worker is not None:
                host.worker.signal(signal.SIGTERM)
                host.phase, host.signalled_at = "final", time.monotonic()
        for host in self.hosts.values():
            if host.phase != "final":
                continue
            try:
                code = host.worker.wait(timeout=self.cfg.graceful_timeout + 15)
            except Exception:
                code = None
            self.event(host.name, "final exit", code=code)
            if code == EX_DRAIN_EXPIRED and host.name in self.stuck_hosts:
                self.known.append(f"{host.name} exited {code} on the final SIGTERM: its drain "
                                  f"waited for the stuck operation(s) above until its deadline")
            elif code != 0:
                self.problem(f"{host.name} exited {code} on the final SIGTERM (nothing in "
                             f"flight: expected 0 at once); see {host.worker.log_path}")
            host.phase = "stopped"

    # -- verification ----------------------------------------------------------------------
    def _verify(self, settled: bool) -> dict[str, Any]:
        from sqlalchemy import select

        from nova_app.models import Instance, Migration
        from orchestrator.ledger import engines as db
        from orchestrator.ledger.models import Event, Operation, StepRecord

        with db.read() as s:
            ops = s.execute(select(Operation).order_by(Operation.created_at)).scalars().all()
            instances = {i.id: i for i in s.execute(select(Instance)).scalars()}
            migrations = {m.id: m for m in s.execute(select(Migration)).scalars()}
            records = s.execute(select(StepRecord)).scalars().all()
            events = s.execute(select(Event)).scalars().all()
        by_op: dict[str, list[Any]] = defaultdict(list)
        for rec in records:
            by_op[rec.operation_id].append(rec)
        ops_by_id = {op.id: op for op in ops}
        submitted_ids = {sub.id for sub in self.stats.submitted}
        labels = {sub.id: sub.label for sub in self.stats.submitted}

        leftovers = self._leftovers(ops_by_id)
        present = {m["id"] for m in leftovers}
        received = self._received()

        # 1. every operation terminal
        stuck = []
        for op in ops:
            if op.status not in TERMINAL:
                step = op.current or ("-", "-")
                stuck.append({
                    "operation": op.id, "kind": op.kind, "status": op.status,
                    "instance": instances[op.params["instance_id"]].name,
                    "at": f"{step[0]}@{step[1]}", "step_state": op.step_state,
                    "queue": op.queue, "next_published": op.next_published,
                    "steps": [f"{r.step}@{r.host}:{r.status}x{r.attempts}"
                              for r in sorted(by_op[op.id], key=lambda r: r.position)],
                    "diagnosis": self._diagnose(op, present, received),
                })
                self.stuck_hosts |= op.remaining_hosts()
        for entry in stuck:
            if entry["diagnosis"] is not None:
                self.known.append(f"operation stuck: {entry}")
            else:
                self.problem(f"operation stuck: {entry}")

        # 2. failures, grouped by reason, each explained or not
        failures: dict[str, list[str]] = defaultdict(list)
        unexplained: list[dict[str, Any]] = []
        for op in ops:
            if op.status != "failed":
                continue
            reason = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", op.error or "?")
            failures[reason].append(op.id)
            why = self._explain(op, instances, migrations, by_op, events)
            if why is None:
                entry = {"operation": op.id, "kind": op.kind, "error": op.error,
                         "instance": instances[op.params["instance_id"]].name,
                         "steps": [f"{r.step}@{r.host}:{r.status}x{r.attempts}"
                                   for r in sorted(by_op[op.id], key=lambda r: r.position)]}
                unexplained.append(entry)
                self.problem(f"unexplained failure: {entry}")

        # 3. effects applied once; redeliveries
        twice = [(r.operation_id, r.position, r.step, r.applied) for r in records if r.applied > 1]
        for entry in twice:
            self.problem(f"effect applied more than once: {entry}")
        odd = [(r.operation_id, r.position, r.step, r.status, r.applied) for r in records
               if (r.status == "completed") != (r.applied == 1)
               or (r.status in ("running", "waiting") and ops_by_id[r.operation_id].status
                   in TERMINAL)]
        for entry in odd:
            self.problem(f"step log inconsistent (status vs applied / terminal operation): "
                         f"{entry}")
        redelivered = [r for r in records if r.attempts > 1]

        # 4. instances and migrations
        inconsistent = self._check_instances(ops, instances, migrations, by_op)
        for entry in inconsistent:
            self.problem(f"instance state: {entry}")

        # 5. the broker
        for entry in leftovers:
            self.problem(f"message left in the broker: {entry}")

        latencies: dict[str, list[float]] = defaultdict(list)
        for op in ops:
            if op.finished_at is not None:
                latencies[op.kind].append(op.finished_at - op.created_at)
        by_label = Counter(labels.get(op.id, "internal:" + op.kind) for op in ops)
        statuses = Counter((labels.get(op.id, "internal:" + op.kind), op.status) for op in ops)
        return {
            "seed": self.seed,
            "config": {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in asdict(self.cfg).items()},
            "settled": settled,
            "operations": {
                "attempted": self.stats.attempts,
                "submitted": len(self.stats.submitted),
                "internal (network events)": len(ops) - len(submitted_ids & ops_by_id.keys()),
                "refused": dict(self.stats.refused),
                "refused_total": sum(self.stats.refused.values()),
                "completed": sum(op.status == "completed" for op in ops),
                "failed": sum(op.status == "failed" for op in ops),
                "stuck": stuck,
                "by_kind": {k: {st: statuses[(k, st)] for st in TERMINAL + ("queued", "running")
                                if statuses[(k, st)]} for k in sorted(by_label)},
            },
            "failures": {reason: {"count": len(ids), "operations": ids}
                         for reason, ids in sorted(failures.items(), key=lambda kv: -len(kv[1]))},
            "unexplained_failures": unexplained,
            "signals": dict(self.stats.signals),
            "signals_total": sum(self.stats.signals.values()),
            "restarts": self.stats.restarts,
            "ledger_outages": dict(self.stats.ledger_outages),
            "partitions": dict(self.stats.partitions),
            "broker_failover_seconds": list(self.stats.broker_failover_seconds),
            "ledger_outage_seconds": list(self.stats.ledger_outage_seconds),
            "ledger_failover_seconds": list(self.stats.ledger_failover_seconds),
            "exits": dict(self.stats.exits),
            "steps": {
                "total": len(records),
                "redelivered": len(redelivered),
                "redelivered_by_step": dict(Counter(r.step for r in redelivered)),
                "max_attempts": max((r.attempts for r in records), default=0),
                "applied_more_than_once": twice,
                "no_effect_twice": not twice,
            },
            "instances": {
                "total": len(instances),
                "by_state": dict(Counter(f"{i.vm_state}/{i.task_state}"
                                         for i in instances.values())),
                "inconsistent": inconsistent,
            },
            "broker_leftovers": leftovers,
            "latency_seconds": {
                kind: {"n": len(v), "p50": round(statistics.median(v), 2),
                       "max": round(max(v), 2)}
                for kind, v in sorted(latencies.items())
            },
            "startup_seconds": _spread(self.stats.startup_seconds),
            "drain_seconds": _spread(self.stats.drain_seconds),
            "timeline": self.stats.timeline,
        }

    def _explain(self, op: Any, instances: dict, migrations: dict, by_op: dict,
                 events: list) -> str | None:
        """Why ``op`` failed, if it is a failure we caused on purpose; None otherwise."""
        injected = {tuple(f.split("@")) for f in self.cfg.fail_steps()}
        if (op.error or "").startswith("could not queue ") and not by_op.get(op.id) and (
                self.cfg.broker_failovers or self.cfg.partitions) and \
                BROKER_AWAY.search(op.error or ""):
            # Its first step never reached the broker (a fail-over or a partition of the
            # soak's): the submit raised BrokerUnavailable, nothing ran.
            return "refused by the broker at submit (abandoned)"
        reasons = []
        for part in (op.error or "").split("; then "):
            m = re.match(r"(\w+)@(\S+): (.*)$", part)
            if not m:
                return None
            step, host, message = m.groups()
            if message == f"injected failure: {step} on {host}" and (step, host) in injected:
                reasons.append("injected")
            elif message == "live migration aborted by request":
                mig = migrations.get(op.params.get("migration_id"))
                if mig is None or not mig.abort_requested:
                    return None
                reasons.append("abort requested")
            elif message.startswith("timed out waiting for network-vif-plugged"):
                why = self._lost_event(op, instances, by_op, events, host)
                if why is None:
                    return None
                reasons.append(why)
            else:
                return None
        return "; ".join(reasons)

    def _lost_event(self, op: Any, instances: dict, by_op: dict, events: list,
                    host: str) -> str | None:
        """A build whose network-vif-plugged never came: explained if the network service
        (a thread of the pool process that ran the build) died with a process we killed
        before it could send the event."""
        build = next((r for r in by_op[op.id] if r.step == "build_and_run_instance"), None)
        if build is None or build.started_at is None:
            return None
        got = [e for e in events if e.key == op.params["instance_id"]
               and e.name == "network-vif-plugged" and e.received_at >= build.started_at - 1]
        if got:
            return None  # it did arrive: then the build should not have timed out
        window = (build.started_at - 0.5, build.started_at + 5)
        for at, where, what, _ in self.stats.incidents:
            if where == host and window[0] <= at <= window[1]:
                return f"network event lost with {what} of {host}"
        return None

    def _check_instances(self, ops: list, instances: dict, migrations: dict,
                         by_op: dict) -> list[dict[str, Any]]:
        from nova_app.operations import NON_EXCLUSIVE

        last: dict[str, Any] = {}
        for op in ops:
            if op.kind not in NON_EXCLUSIVE:
                last[op.params["instance_id"]] = op
        out = []
        for iid, inst in instances.items():
            op = last.get(iid)
            actual = {"host": inst.host, "flavor": inst.flavor, "vm_state": inst.vm_state,
                      "task_state": inst.task_state}
            if op is None or op.status not in TERMINAL:
                continue  # reported as stuck
            mig = migrations.get(op.params.get("migration_id"))
            expected = _expected(op, mig, by_op[op.id])
            if mig is not None:
                actual["migration"] = mig.status
            wrong = {k: (actual.get(k), v) for k, v in expected.items()
                     if (actual.get(k) not in v if isinstance(v, tuple) else actual.get(k) != v)}
            if wrong:
                out.append({"instance": inst.name, "last_operation": op.id, "kind": op.kind,
                            "status": op.status, "error": op.error,
                            "wrong (actual, expected)": wrong})
        stuck = {op.params.get("migration_id") for op in ops if op.status not in TERMINAL}
        for mig in migrations.values():
            if mig.id not in stuck and mig.status in (
                    "pre-migrating", "migrating", "post-migrating", "reverting", "queued",
                    "preparing", "running"):
                out.append({"migration": mig.id, "instance": instances[mig.instance_id].name,
                            "status": mig.status, "problem": "migration left in progress"})
        return out

    def _received(self) -> set[str]:
        """Task ids that some worker logged as received (kombu had recorded them unacked)."""
        seen: set[str] = set()
        for path in (self.workdir / "logs").glob("*.log"):
            seen.update(RECEIVED_RE.findall(path.read_text(errors="replace")))
        return seen

    def _diagnose(self, op: Any, present: set[str], received: set[str]) -> str | None:
        """Why a stuck operation's step message is gone, when it is a known issue; else None.

        KNOWN_ISSUES[0]: published, never received by any worker, in no queue and not
        unacked, and the one host consuming its queue was SIGKILLed after it was published.
        KNOWN_ISSUES[2]: recorded, first step never published, and the process that submitted
        it (the simulated network service: a thread of the pool process that ran the build,
        on the instance's host) was killed right after the operation was recorded.
        """
        task_id = f"{op.id}.{op.position}"
        if (op.status == "queued" and op.position == 0 and not op.next_published
                and op.queue is None and task_id not in present and task_id not in received
                and op.kind == "external_event"
                and op.params.get("event") == "network-vif-plugged"):
            host = op.plan[0][1]
            for at, where, what, pid in self.stats.incidents:
                if where == host and op.created_at - 0.2 <= at <= op.created_at + 1.5:
                    return (f"{KNOWN_ISSUES[2]}: {op.kind} {op.params['event']} recorded at "
                            f"{_clock(op.created_at)}, {what} of {host} (pid {pid}) at "
                            f"{_clock(at)}; its first step was never sent")
            return None
        if (op.step_state != "queued" or not op.next_published or op.queue is None
                or task_id in present or task_id in received):
            return None
        host = op.queue.removesuffix("-alt")
        for at, where, what, pid in self.stats.incidents:
            if where == host and what == "SIGKILL" and at >= op.updated_at - 2:
                return (f"{KNOWN_ISSUES[0]}: {task_id} published to {op.queue} at "
                        f"{_clock(op.updated_at)} (marked published), {host} (pid {pid}) "
                        f"SIGKILLed at {_clock(at)}; no worker logged it as received; it is "
                        f"in no queue and not unacked")
        return None

    def _leftovers(self, ops_by_id: dict) -> list[dict[str, Any]]:
        """Every message still queued or unacked, with what it was for."""
        out: list[dict[str, Any]] = []
        if not self._redis_broker():
            from orchestrator.broker import queue_depth

            return [{"queue": q, "messages": n} for q in self._queues()
                    if (n := queue_depth(self.app, q))]
        client = self._redis()
        raw: list[tuple[str, Any]] = []
        for key in self._queue_keys(client):
            raw += [(key.decode(), m) for m in client.lrange(key, 0, -1)]
        for tag, value in client.hgetall("unacked").items():
            raw.append((f"unacked ({tag.decode()})", json.loads(value)[0]))
        for where, message in raw:
            payload = json.loads(message) if isinstance(message, (bytes, str)) else message
            headers = payload.get("headers", {})
            task_id = headers.get("id", "?")
            op = ops_by_id.get(task_id.rsplit(".", 1)[0])
            out.append({"where": where, "task": headers.get("task"), "id": task_id,
                        "operation_status": op.status if op else None,
                        "explained": "duplicate of a step of a finished operation"
                        if op is not None and op.status in TERMINAL else None,
                        "body": _body(payload)})
        return out

    # -- worker logs -----------------------------------------------------------------------
    def _orphan_waits(self, expired: list[str]) -> list[str]:
        """Drains that ran to their deadline waiting for a step recorded as running that no
        live process was running (its worker had been killed): KNOWN_ISSUES[1]. A finding,
        not a failure: nothing is lost, the drain just ends by its deadline (75)."""
        from sqlalchemy import select

        from orchestrator.ledger import engines as db
        from orchestrator.ledger.models import StepRecord

        out = []
        for line in expired:
            logged = _log_time(f"[{line.split(': ', 1)[1]}")
            waited = line.split("operation(s) in flight: ", 1)
            if logged is None or len(waited) < 2 or "deadline (" not in line:
                continue
            here = line.split("running here: ", 1)[1] if "running here: " in line else ""
            for op_id, step, host in re.findall(
                    r"\w+ ([0-9a-f-]{36}) at (\w+)@(\S+) \(running\)",
                    waited[1].split(" not waited for ")[0]):
                if op_id in here:
                    continue  # running in the draining worker itself: a real wait
                with db.read() as s:
                    rec = s.execute(select(StepRecord).where(
                        StepRecord.operation_id == op_id, StepRecord.step == step,
                        StepRecord.host == host)).scalars().first()
                if rec is not None and rec.attempts > 1 and (rec.started_at or 0) > logged:
                    out.append(
                        f"{KNOWN_ISSUES[1]}: {line.split(':', 1)[0]} waited until its deadline "
                        f"for {step}@{host} of {op_id}, recorded as running but re-run only "
                        f"at {_clock(rec.started_at)} (attempt {rec.attempts}), after the "
                        f"deadline at {_clock(logged)}")
        return out

    def _logs(self) -> dict[str, Any]:
        summaries: list[dict[str, Any]] = []
        expired: list[str] = []
        forced: list[str] = []
        tracebacks: Counter = Counter()
        counts: Counter = Counter()
        for path in sorted((self.workdir / "logs").glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()
            for n, line in enumerate(lines):
                if (m := SUMMARY_RE.search(line)) is not None:
                    summaries.append({"log": path.name, **m.groupdict()})
                if "drain: deadline" in line or "drain: second SIGTERM" in line:
                    expired.append(f"{path.name}: {line[1:24]} {line.split('drain: ', 1)[1]}")
                if "delivered again: already done, dropped" in line:
                    counts["duplicates dropped"] += 1
                if "next step was never sent; sending it" in line:
                    counts["next step republished"] += 1
                if RESENT_RE.search(line):
                    counts["steps resent"] += 1
                if "recorded, not sent" in line:
                    counts["steps recorded, not sent"] += 1
                if "drain: handed back" in line:
                    counts["handed back (log lines)"] += 1
                if "forcing the exit" in line:
                    forced.append(f"{path.name}: wedged in {_wedged_at(lines[n + 1:])}")
                if "event wait of" in line and "settled" in line:
                    counts["event waits settled"] += 1
                if line.startswith("Traceback"):
                    exc = next((x for x in lines[n + 1:] if x and not x.startswith(" ")), "?")
                    tracebacks[exc[:200]] += 1
        by_why = Counter("expired" if s["why"] != "done" else "done" for s in summaries)
        return {
            "drains": {
                "summaries": len(summaries),
                "ended_done": by_why["done"],
                "ended_deadline": by_why["expired"],
                "exit_0": self.stats.exits.get("drain: 0", 0),
                "exit_75": self.stats.exits.get(f"drain: {EX_DRAIN_EXPIRED}", 0),
                "handed_back": sum(int(s["back"]) for s in summaries),
                "completed_during_drains": sum(int(s["completed"]) for s in summaries
                                               if s["completed"].isdigit()),
                "left_in_alt_at_exit": sum(int(s["left"]) for s in summaries
                                           if s["left"].isdigit()),
            },
            "drains_expired": expired,
            "exits_forced": forced,
            "log_counts": dict(counts),
            "tracebacks": dict(tracebacks),
        }


def _wedged_at(dump: list[str]) -> str:
    """Where a forced exit wedged, from the faulthandler dumps after it (workers.deadline):
    the MainProcess's main thread (the first block that runs the celery command), then the top
    frame of each pool process's main thread."""
    blocks: list[list[str]] = []
    for line in dump:
        if line.startswith("[") and "forcing the exit" not in line and blocks:
            break  # the next log record: the dumps are over
        if line.startswith(("Thread 0x", "Current thread 0x")):
            blocks.append([])
        elif line.strip().startswith("File ") and blocks:
            blocks[-1].append(line.strip().removeprefix("File ").split("/")[-1])
    mains = [b for b in blocks if any("runpy" in f for f in b)]
    if not mains:
        return "?"
    where = " <- ".join(mains[0][:4])
    pool = [m[0] for m in mains[1:] if m]
    return where + (f"; pool processes at: {', '.join(pool)}" if pool else "")


def _expected(op: Any, mig: Any, recs: list[Any]) -> dict[str, Any]:
    """The instance (and migration) state the last operation on an instance implies."""
    failed_step = next((r.step for r in recs if r.status == "failed"), None)
    idle = {"task_state": None}
    if op.status == "failed" and not recs:  # abandoned at submit: nothing ran, and
        # nova_app.operations._abandoned put back what the submit had changed
        moved = mig is not None and op.kind in ("resize", "cross_cell_resize", "live_migration")
        return {**idle, **({"vm_state": "error"} if op.kind == "boot" else {}),
                **({"migration": "error"} if moved else {})}
    if op.kind == "boot":
        state = "active" if op.status == "completed" else "error"
        return {**idle, "host": op.hosts["source"], "vm_state": state}
    if mig is None:
        return {**idle, "vm_state": ("active", "resized", "error")}
    if op.kind == "live_migration":
        if op.status == "completed":
            return {**idle, "host": mig.dest, "vm_state": "active", "migration": "completed"}
        if failed_step == "post_live_migration_at_destination":
            return {**idle, "vm_state": "error"}
        return {**idle, "host": mig.source, "flavor": mig.old_flavor, "vm_state": "active",
                "migration": ("error", "cancelled")}
    if op.kind in ("resize", "cross_cell_resize"):
        if op.status == "completed":
            return {**idle, "host": mig.dest, "flavor": mig.new_flavor, "vm_state": "resized",
                    "migration": "finished"}
        if failed_step in ("prep_resize", "prep_snapshot_based_resize_at_dest"):
            return {**idle, "host": mig.source, "flavor": mig.old_flavor, "vm_state": "active",
                    "migration": "error"}
        return {**idle, "vm_state": "error", "migration": "error"}
    if op.kind in ("confirm_resize", "cross_cell_confirm"):
        if op.status == "completed":
            return {**idle, "host": mig.dest, "flavor": mig.new_flavor, "vm_state": "active",
                    "migration": "confirmed"}
        return {**idle, "vm_state": "error"}
    if op.kind in ("revert_resize", "cross_cell_revert"):
        if op.status == "completed":
            return {**idle, "host": mig.source, "flavor": mig.old_flavor, "vm_state": "active",
                    "migration": "reverted"}
        return {**idle, "vm_state": "error"}
    return idle


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]


def _log_time(line: str) -> float | None:
    """The wall-clock time of a Celery log line ``[2026-11-24 09:37:57,469: ...``."""
    try:
        return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def _body(payload: dict[str, Any]) -> Any:
    try:
        return json.loads(base64.b64decode(payload["body"]))
    except Exception:
        return payload.get("body")


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "min": min(values), "p50": round(statistics.median(values), 2),
            "max": max(values)}


def format_report(r: dict[str, Any], ok: bool, detail: bool = False) -> str:
    o, st, d = r["operations"], r["steps"], r.get("drains", {})
    lines = [
        f"SOAK {'PASSED' if ok else 'FAILED'} (seed {r['seed']}, "
        f"{r['config']['operations']} operations, {r['config']['hosts']} hosts)",
        f"  operations: submitted {o['submitted']} (+{o['internal (network events)']} network "
        f"events sent by workers), refused {o['refused_total']} "
        f"({', '.join(f'{k} x{v}' for k, v in sorted(o['refused'].items())) or 'none'})",
        f"  completed {o['completed']}, failed {o['failed']}, stuck {len(o['stuck'])}",
    ]
    for reason, info in r["failures"].items():
        lines.append(f"    failed x{info['count']}: {reason}")
    lines += [
        "  by kind: " + "; ".join(
            f"{k} {' '.join(f'{s}={n}' for s, n in v.items())}" for k, v in o["by_kind"].items()),
        f"  signals: {r['signals_total']} "
        f"({', '.join(f'{k} x{v}' for k, v in sorted(r['signals'].items()))}); "
        f"restarts {r['restarts']}; ledger outages " + (", ".join(
            f"{k} x{v}" for k, v in sorted(r.get("ledger_outages", {}).items())) or "none")
        + f" ({', '.join(f'{x:g}s' for x in r.get('ledger_outage_seconds', []))}); partitions "
        + (", ".join(f"from {k} x{v}" for k, v in sorted(r.get("partitions", {}).items()))
           or "none") + "; broker fail-overs " + (", ".join(
               f"{x:g}s" for x in r.get("broker_failover_seconds", []))
               or "none") + "; ledger failovers " + (", ".join(
               f"{x:g}s without a primary" for x in r.get("ledger_failover_seconds", []))
               or "none"),
        f"  exits: {', '.join(f'{k} x{v}' for k, v in sorted(r['exits'].items()))}",
        f"  drains: {d.get('summaries', 0)} summaries: ended done {d.get('ended_done', 0)}, "
        f"by deadline {d.get('ended_deadline', 0)} (exit 0 x{d.get('exit_0', 0)}, "
        f"75 x{d.get('exit_75', 0)}); steps completed during drains "
        f"{d.get('completed_during_drains', 0)}; messages handed back {d.get('handed_back', 0)}; "
        f"steps left in alt at exit {d.get('left_in_alt_at_exit', 0)}",
        f"  steps: {st['total']}, redelivered {st['redelivered']} "
        f"(max attempts {st['max_attempts']}; "
        f"{', '.join(f'{k} x{v}' for k, v in sorted(st['redelivered_by_step'].items()))}); "
        f"no step's effect happened twice: {st['no_effect_twice']}",
        f"  log: {', '.join(f'{k} {v}' for k, v in sorted(r.get('log_counts', {}).items()))}",
        f"  instances: {r['instances']['total']} "
        f"({', '.join(f'{k} x{v}' for k, v in sorted(r['instances']['by_state'].items()))}); "
        f"inconsistent {len(r['instances']['inconsistent'])}",
        f"  broker: {len(r['broker_leftovers'])} message(s) left",
        "  timings (s since start): " + ", ".join(f"{k} {v}" for k, v in r["timings"].items()),
        f"  worker startup {r['startup_seconds']}; SIGTERM to exit {r['drain_seconds']}",
    ]
    if r.get("tracebacks"):
        lines.append("  tracebacks in worker logs: " + "; ".join(
            f"{k} x{v}" for k, v in sorted(r["tracebacks"].items())))
    if detail:
        lines.append("  latency by kind (s): " + "; ".join(
            f"{k} n={v['n']} p50={v['p50']} max={v['max']}"
            for k, v in r["latency_seconds"].items()))
        for reason, info in r["failures"].items():
            lines.append(f"  failed ({reason}): {', '.join(info['operations'])}")
        lines.append("  drains ended by their deadline or a second SIGTERM:")
        lines += [f"    {e}" for e in r.get("drains_expired", [])]
        lines.append("  timeline:")
        lines += [f"    {e}" for e in r["timeline"]]
    for p in r.get("findings", []):
        lines.append(f"  FINDING: {p}")
    for p in r.get("known_issues", []):
        lines.append(f"  KNOWN ISSUE: {p}")
    for p in r["problems"]:
        lines.append(f"  PROBLEM: {p}")
    return "\n".join(lines)


def run_soak(config: SoakConfig) -> SoakResult:
    return Soak(config).run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n")[0])
    p.add_argument("--operations", type=int, default=100, help="operations to submit")
    p.add_argument("--hosts", type=int, default=3)
    p.add_argument("--signals", type=int, default=10, help="minimum signals to send")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--broker", default=os.environ.get("ORCHESTRATOR_BROKER_URL") or DEFAULT_BROKER)
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: a temporary SQLite file)")
    p.add_argument("--graceful-timeout", type=float, default=8.0)
    p.add_argument("--visibility-timeout", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=2.5, help="operations per second")
    p.add_argument("--concurrency", type=int, default=2, help="pool processes per host")
    p.add_argument("--max-down", type=int, default=2, help="hosts away at once, at most")
    p.add_argument("--no-inject", action="store_true", help="inject no failures")
    p.add_argument("--settle-timeout", type=float, default=240.0)
    p.add_argument("--workdir", type=Path, default=None, help="logs and database (kept)")
    p.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    p.add_argument("--report", action="store_true",
                   help="detailed report: latencies, failed operation ids, signal timeline")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--partitions", type=int, default=0,
                   help="partitions to inject (each host in a network namespace; needs root; "
                        "the soak runs its own broker and PostgreSQL on the bed's bridge)")
    p.add_argument("--broker-failovers", type=int, default=0,
                   help="broker fail-overs to inject (Redis: the soak runs its own Sentinel "
                        "set and kills its primary; RabbitMQ: its own three-node cluster with "
                        "quorum queues, a node stopped for a few seconds)")
    p.add_argument("--ledger-restarts", type=int, default=0,
                   help="ledger outages to inject (a PostgreSQL of the soak's own, stopped "
                        "and started; --db is then ignored)")
    p.add_argument("--ledger-failovers", type=int, default=0,
                   help="ledger failovers to inject (the soak's own primary and synchronous "
                        "standby, the URL naming both: the primary crashed, the standby "
                        "promoted, the old primary rebuilt as the standby; --db is then "
                        "ignored)")
    a = p.parse_args(argv)
    config = SoakConfig(
        operations=a.operations, hosts=a.hosts, signals=a.signals, seed=a.seed, broker=a.broker,
        db=a.db, graceful_timeout=a.graceful_timeout, visibility_timeout=a.visibility_timeout,
        rate=a.rate, concurrency=a.concurrency, max_down=min(a.max_down, max(1, a.hosts - 1)),
        inject_failures=not a.no_inject, settle_timeout=a.settle_timeout, workdir=a.workdir,
        keep=a.keep, progress=not a.quiet, ledger_restarts=a.ledger_restarts,
        partitions=a.partitions, broker_failovers=a.broker_failovers,
        ledger_failovers=a.ledger_failovers,
    )
    if a.ledger_restarts or a.partitions or a.ledger_failovers:
        config.db = None
    # orchestrator.app reads its settings at import: point it at the soak's broker first.
    os.environ["ORCHESTRATOR_BROKER_URL"] = config.broker
    os.environ.setdefault("ORCHESTRATOR_ROUTING_FILE", str(REPO_ROOT / "routing.yaml"))
    try:
        result = run_soak(config)
    except Exception as exc:
        print(f"soak: could not run: {exc}", file=sys.stderr)
        traceback.print_exc()
        return 2
    print(format_report(result.report, result.ok, detail=a.report))
    if a.json is not None:
        a.json.write_text(json.dumps(result.report, indent=2, default=str))
    if not result.ok:
        print(f"logs and database kept in {result.workdir}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
