"""Shutdown-test your own flows: real workers of your app, SIGTERM at every step.

The pytest plugin (``orchestrator.pytest_plugin``, active once the package is installed) gives
the ``orchestrator_fleet`` fixture::

    def test_rebalance_survives_shutdowns(orchestrator_fleet):
        fleet = orchestrator_fleet(myflows.orch, hosts=["node1", "node2"])
        report = fleet.shutdown_matrix("rebalance", hosts={"source": "node1", "dest": "node2"},
                                       params={"shard": "s1"})
        assert report.ok, report

:meth:`KitFleet.shutdown_matrix` runs the flow once for every step of its plan and every host
the flow uses: the step is held at its start (``orchestrator.runner.hold_at_gate``; however short
the step, its host is signalled while it runs), that host gets SIGTERM, the step is let go,
the host drains and exits, and is started again so that every run ends. A run is good when its
operation ended before that restart (completed, or failed with the flow's rollback run), no
step's effect was applied twice, and no message was left in any queue. ``str(report)`` is a
table of the runs; a bad one says why (``copy_in is routed to main but follows copy_out,
already started: node2's drain left it for the restart``).

Workers run your app's module (``celery -A``) on ``ORCHESTRATOR_BROKER_URL`` when it is set,
else on an embedded Redis, with a throw-away SQLite ledger; this process's ``orch`` is pointed
at both for the test.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from orchestrator.broker import queue_depths
from orchestrator.config import TESTKIT_GATE
from orchestrator.ledger.models import Operation, StepRecord
from orchestrator.local.embedded import RedisServer
from orchestrator.local.fleet import Fleet, WorkerProcess
from orchestrator.routing import alt_queue
from orchestrator.status import wait_for


@dataclass
class ShutdownRun:
    """One run of the matrix: SIGTERM to ``host`` while ``step`` (at ``position``) ran."""

    position: int
    step: str
    step_host: str
    host: str
    operation: str = ""
    #: completed, rolled back, failed, or not ended (at the deadline, after the restart).
    outcome: str = "not ended"
    #: The operation had ended when the signalled host exited (before it was restarted).
    before_restart: bool = False
    seconds: float = 0.0
    effects_twice: list[str] = field(default_factory=list)
    left_in_queues: dict[str, int] = field(default_factory=dict)
    why: str | None = None

    @property
    def ok(self) -> bool:
        return (self.outcome in ("completed", "rolled back") and self.before_restart
                and not self.effects_twice and not self.left_in_queues)


class ShutdownReport(str):
    """The matrix's outcome: a ``str`` (the table of the runs, so that ``assert report.ok,
    report`` prints all of it: pytest shortens any other object's repr) with the runs."""

    flow: str
    runs: list[ShutdownRun]

    def __new__(cls, flow: str, runs: list[ShutdownRun]) -> ShutdownReport:
        report = super().__new__(cls, _table(flow, runs))
        report.flow, report.runs = flow, runs
        return report

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(run.ok for run in self.runs)

    @property
    def failures(self) -> list[ShutdownRun]:
        return [run for run in self.runs if not run.ok]


def _table(flow: str, runs: list[ShutdownRun]) -> str:
    rows = [("#", "SIGTERM TO", "WHILE", "OUTCOME", "BEFORE RESTART", "SECONDS", "")]
    for i, run in enumerate(runs, 1):
        rows.append((str(i), run.host, f"{run.step}@{run.step_host}", run.outcome,
                     "yes" if run.before_restart else "no", f"{run.seconds:.1f}",
                     "ok" if run.ok else f"FAILED: {run.why}"))
    widths = [max(len(row[c]) for row in rows) for c in range(6)]
    good = sum(run.ok for run in runs)
    lines = [f"shutdown matrix of {flow}: {good} of {len(runs)} runs ok"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
              + f"  {row[6]}" for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def app_module(orch: Any) -> str:
    """The module that holds the app (``celery -A`` of the workers)."""
    for name, module in list(sys.modules.items()):
        if name == "__main__" or module is None:
            continue
        # vars(), not getattr(): a module's lazy __getattr__ (``orchestrator.app``) would load
        # an application to answer.
        names = getattr(module, "__dict__", {})
        if any(names.get(attr) is orch.app for attr in ("app", "celery")):
            return name
    raise LookupError(f"no imported module has {orch.app!r} as 'app' or 'celery': import "
                      "your app's module, or pass module= to orchestrator_fleet")


class Gate:
    """The kit's side of the engine's hold of a step at its start
    (:func:`orchestrator.runner.hold_at_gate`, on in workers whose environment has ``env``):
    a step held runs only once released, however short it is and however long the holder
    takes to act on it (signal its host, look at a drain)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.env = {TESTKIT_GATE: str(folder)}
        self.held: list[Path] = []

    def hold(self, subject: str, position: int) -> Path:
        """Hold the step at ``position`` of the next operation on ``subject`` at its start."""
        stem = self.folder / f"{subject}.{position}"
        Path(f"{stem}.hold").touch()
        self.held.append(stem)
        return stem

    @staticmethod
    def started(stem: Path) -> bool:
        """The step held as ``stem`` has started, and waits at the gate."""
        return Path(f"{stem}.started").exists()

    def wait_started(self, timeout: float = 30.0) -> None:
        """Until every step held has started."""
        wait_for(lambda: all(map(self.started, self.held)), timeout,
                 "the held steps to start")

    def release(self, stem: Path | None = None) -> None:
        """Let the step held as ``stem`` run (None: every step held)."""
        for each in self.held if stem is None else [stem]:
            Path(f"{each}.go").touch()


class KitFleet:
    """Real workers of one app, one per host, on the kit's broker and ledger."""

    def __init__(self, orch: Any, hosts: Iterable[str], workdir: Path, broker: str,
                 module: str | None = None, graceful_timeout: float = 30.0) -> None:
        self.orch, self.hosts, self.workdir = orch, list(hosts), workdir
        self.graceful_timeout = graceful_timeout
        self.gate = Gate(workdir / "gate")
        module = module or app_module(orch)
        source = Path(sys.modules[module].__file__ or ".").resolve().parent
        root = source
        for _ in module.split(".")[1:]:
            root = root.parent
        self.env = {
            "ORCHESTRATOR_BROKER_URL": broker,
            "ORCHESTRATOR_DB_URL": f"sqlite:///{workdir / 'ledger.db'}",
            "ORCHESTRATOR_ROUTING_FILE": str(Path(orch.routing_file).resolve()),
            "ORCHESTRATOR_HEARTBEAT_INTERVAL": "1",
            **self.gate.env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root),
                                                        os.environ.get("PYTHONPATH")])),
        }
        self.fleet = Fleet(env=self.env, log_dir=workdir / "logs", app=module, cwd=root)
        self.workers: dict[str, WorkerProcess] = {}
        self._runs = 0

    def start(self) -> KitFleet:
        for host in self.hosts:
            self._start(host, ready=False)
        for worker in self.workers.values():
            worker.wait_ready()
        return self

    def _start(self, host: str, ready: bool = True) -> WorkerProcess:
        self.workers[host] = self.fleet.start(host, graceful_timeout=self.graceful_timeout,
                                              ready=ready)
        return self.workers[host]

    def stop(self) -> None:
        self.fleet.stop_all(timeout=15)

    # -- the matrix --------------------------------------------------------------------------
    def shutdown_matrix(self, flow: str, hosts: Mapping[str, str],
                        params: Mapping[str, Any] | None = None,
                        timeout: float = 60.0) -> ShutdownReport:
        """Run ``flow`` once per (step of its plan, host it uses), SIGTERM to that host while
        that step runs; see the module's docstring."""
        spec = self.orch.flows[flow]
        plan = spec.plan(hosts)
        targets = list(dict.fromkeys(hosts.values()))
        runs = [ShutdownRun(position, step, step_host, host)
                for position, (step, step_host) in enumerate(plan) for host in targets]
        for run in runs:
            self._run(flow, hosts, params, run, timeout)
        return ShutdownReport(flow, runs)

    def _run(self, flow: str, hosts: Mapping[str, str], params: Mapping[str, Any] | None,
             run: ShutdownRun, timeout: float) -> None:
        self._runs += 1
        subject = f"kit-{uuid.uuid4().hex[:8]}-{self._runs}"
        stem = self.gate.hold(subject, run.position)
        began = time.monotonic()
        run.operation = self.orch.submit(flow, hosts=hosts, params=params, subject=subject)
        try:
            wait_for(lambda: self.gate.started(stem) or self._ended(run.operation),
                     timeout, f"{run.step}@{run.step_host} to start")
        except TimeoutError:
            run.why = f"{run.step}@{run.step_host} never started: {self._where(run.operation)}"
            self.gate.release(stem)
            self._finish(run, timeout, began)
            return
        worker = self.workers[run.host]
        worker.signal(signal.SIGTERM)
        wait_for(lambda: self._draining(run.host), 15, f"{run.host} to drain")
        self.gate.release(stem)
        worker.wait(self.graceful_timeout + 30)
        # Ended, or waiting on the host that is gone: nothing else can move it now.
        wait_for(lambda: self._ended(run.operation) or self._current_host(run.operation)
                 == run.host, timeout, f"{run.operation} to end or wait for {run.host}")
        run.before_restart = self._ended(run.operation)
        if not run.before_restart:
            run.why = self._why_not(run)
        self._start(run.host)
        self._finish(run, timeout, began)

    def _finish(self, run: ShutdownRun, timeout: float, began: float) -> None:
        try:
            wait_for(lambda: self._ended(run.operation), timeout, f"{run.operation} to end")
        except TimeoutError:
            run.why = run.why or f"did not end: {self._where(run.operation)}"
        run.seconds = time.monotonic() - began
        run.outcome = self._outcome(run.operation)
        if run.outcome == "failed" and run.why is None:
            run.why = f"failed without a rollback: {self._error(run.operation)}"
        with self.orch.read() as s:
            records = s.execute(select(StepRecord).where(
                StepRecord.operation_id == run.operation)).scalars().all()
            run.effects_twice = [f"{r.step}@{r.host} x{r.applied}" for r in records
                                 if r.applied > 1]
        if run.effects_twice and run.why is None:
            run.why = "effect applied twice: " + ", ".join(run.effects_twice)
        queues = [q for h in self.hosts for q in (h, alt_queue(h))]
        try:
            wait_for(lambda: not any(queue_depths(self.orch.app, queues).values()), 10,
                     "empty queues")
        except TimeoutError:
            run.left_in_queues = {q: n for q, n in queue_depths(self.orch.app, queues).items()
                                  if n}
            run.why = run.why or f"messages left: {run.left_in_queues}"

    # -- what the ledger says ----------------------------------------------------------------
    def _op(self, operation_id: str) -> Operation:
        with self.orch.read() as s:
            op = s.get(Operation, operation_id)
            s.expunge(op)
            return op

    def _ended(self, operation_id: str) -> bool:
        return self._op(operation_id).status in ("completed", "failed")

    def _current_host(self, operation_id: str) -> str | None:
        op = self._op(operation_id)
        return op.current[1] if op.current and op.status not in ("completed", "failed") \
            else None

    def _where(self, operation_id: str) -> str:
        op = self._op(operation_id)
        if op.current is None:
            return op.status
        step, host = op.current
        return f"{step}@{host} {op.step_state} in {op.queue or 'no queue'}"

    def _error(self, operation_id: str) -> str:
        return self._op(operation_id).error or "?"

    def _outcome(self, operation_id: str) -> str:
        op = self._op(operation_id)
        if op.status == "failed":
            rollback = (op.rollback or {}).get("plan") or []
            ran_rollback = rollback and [list(p) for p in op.plan[-len(rollback):]] == [
                list(p) for p in rollback] and op.position >= len(op.plan)
            return "rolled back" if ran_rollback else "failed"
        return op.status if op.status == "completed" else "not ended"

    def _draining(self, host: str) -> bool:
        return any(v.state in ("draining", "down") for v in self.orch.registry.services()
                   if v.host == host)

    def _why_not(self, run: ShutdownRun) -> str:
        op = self._op(run.operation)
        step, host = op.current or ("?", run.host)
        route = self.orch.routing.route(step)
        if route is not None and route.queue == "main" and op.position > run.position:
            return (f"{step} is routed to main but follows {run.step}, already started: "
                    f"{host}'s drain left it for the restart")
        return (f"{step}@{host} was {op.step_state} in {op.queue or 'no queue'} when {host} "
                "exited; it ran only after the restart")


def kit_broker(workdir: Path) -> tuple[str, RedisServer | None]:
    """``ORCHESTRATOR_BROKER_URL`` if set, else an embedded Redis of the kit's own."""
    url = os.environ.get("ORCHESTRATOR_BROKER_URL")
    if url:
        return url, None
    server = RedisServer(workdir)
    server.start()
    return server.url, server
