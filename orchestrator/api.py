"""The public API: put shutdown-aware routing on your own Celery app.

::

    app = Celery("rebalance")
    orch = Orchestrator(app, routing="routing.yaml")

    @orch.step
    def copy_out(ctx):
        ...
        return {"bytes": 42}

    orch.flow("rebalance", [("prepare", "dest"), ("copy_out", "source"), ("copy_in", "dest")],
              rollback=[("cleanup", "dest")], rollback_on=["copy_out"])
    op_id = orch.submit("rebalance", hosts={"source": "node1", "dest": "node2"},
                        params={"volume": "v1"}, subject="v1")
    orch.wait(op_id, timeout=60)

Constructing :class:`Orchestrator` installs everything on that app: the routing.yaml router
with per-host alt fallback, no-loss settings, JSON only, the malformed-message guard, optional
signing, and the worker bootsteps (drain with its exit deadline and remote ``drain`` command,
the service registry, event waits, the resend of stranded steps). Worker bootsteps are named,
not imported, so this module imports nothing that runs in a worker.
"""

from __future__ import annotations

import difflib
import gc
import inspect
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import click
from celery import Celery, signals
from sqlalchemy import event
from sqlalchemy.orm import Session, configure_mappers

from orchestrator import notices, policy, signing
from orchestrator import registry as registry_mod
from orchestrator.config import Settings
from orchestrator.context import StepContext, StepSpec
from orchestrator.dispatch import Dispatcher, StepMessage
from orchestrator.errors import (
    DefinitionError,
    LedgerUnavailable,
    SubmitError,
    UnknownFlow,
)
from orchestrator.flows import Flow
from orchestrator.ledger.engines import Database
from orchestrator.ledger.lease import Leases
from orchestrator.ledger.models import Operation
from orchestrator.ledger.states import ENDED
from orchestrator.ledger.store import Effect, Ledger, no_effect
from orchestrator.limits import json_size, utf8
from orchestrator.names import check_host_name
from orchestrator.redact import check_passwords, printable, redact_url
from orchestrator.registry import Registry
from orchestrator.routing import (
    AltCapability,
    RoutingSource,
    RoutingTable,
    StepRouter,
)
from orchestrator.seams import kombu_internals
from orchestrator.status import operation_dict
from orchestrator.tracing import Tracing
from orchestrator.witness import Witness

#: Retries of a step after an unexpected error, before its operation fails.
DEFAULT_MAX_RETRIES = 3
#: The worker bootsteps, by name (resolved by Celery when a worker starts).
#: Each hangs itself on the worker, as Celery's own components do: ``worker.host_service``,
#: ``worker.host_drain``, ``worker.event_waits``, ``worker.stranded_steps``,
#: ``worker.fleet_looks``.
WORKER_STEPS = (
    "workers.diagnostics:Diagnostics",  # pool processes' stacks on SIGUSR2, one line a reject
    "workers.host:HostService",      # registration and heartbeat
    "workers.drain:Drain",           # SIGTERM: quiet, drain, stop by the deadline
    "workers.control:RemoteControl", # the drain and orchestrator_status commands
    "workers.reload:RoutingReload",  # routing.yaml read again when it changes
    "workers.waits:EventWaits",      # steps waiting for an external event
    "workers.resend:StrandedSteps",  # steps with no message left in the broker
    "workers.fleet:FleetLooks",      # the looks of every host, by the lease's holder
)


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _beside(path: str | Path, module_file: str | None) -> Path:
    """``path`` as an application gives it: a relative one is read from the directory of its
    module, ``module_file``, wherever the process was started."""
    path = Path(path)
    if not path.is_absolute() and module_file:
        return Path(module_file).resolve().parent / path
    return path


class Orchestrator:
    """Shutdown-aware routing for the steps of ``app``.

    - ``routing``: the routing.yaml file (default ``ORCHESTRATOR_ROUTING_FILE``, else
      ``./routing.yaml``, else ``default_routing``), read and validated against the registered
      steps on first use, and read again when it changes;
    - ``db_url``: the ledger's SQLAlchemy URL (default ``ORCHESTRATOR_DB_URL``);
    - ``migrations``: a folder of Alembic revisions for the application's own tables (a
      relative one, as a relative ``routing``, from the directory of the application's module);
    - ``task_prefix``: Celery task names are ``task_prefix + step name``;
    - ``commands``: ``"module:attribute"``, a list of click commands ``orchestrator --app``
      adds to its own.
    """

    def __init__(
        self, app: Celery, routing: str | Path | None = None, db_url: str | None = None, *,
        migrations: str | Path | None = None, task_prefix: str = "",
        max_retries: int = DEFAULT_MAX_RETRIES, commands: str | None = None,
        default_routing: str | Path | None = None, code_version: str | None = None,
    ) -> None:
        if getattr(app, "orchestrator", None) is not None:
            raise DefinitionError(f"Celery app {app.main!r} already has an Orchestrator")
        self.app = app
        self.settings = Settings.from_env()
        #: Where routing_file came from: application, environment or default.
        self.routing_origin = "default"
        # (the module that constructs this: the application's, whose directory a relative
        # ``routing`` is read from)
        frame = inspect.currentframe()
        caller = frame.f_back.f_globals.get("__file__") if frame and frame.f_back else None
        del frame
        self.routing_file = self._routing_file(routing, default_routing, caller)
        self.db = Database(db_url, [_beside(migrations, caller)] if migrations is not None
                           else [])
        self.flows: dict[str, Flow] = {}
        self.steps: dict[str, StepSpec] = {}
        #: Older names a step still answers to (``@orch.step(aliases=...)``): alias -> step.
        self.aliases: dict[str, str] = {}
        #: This code's version (routing.yaml's ``versions``; the registry's record of what a
        #: worker serves): ``code_version``, else ORCHESTRATOR_CODE_VERSION, else None.
        self.code_version = code_version or self.settings.code_version
        #: OpenTelemetry spans, one trace per operation (orchestrator.tracing): off unless
        #: OTEL_TRACES_EXPORTER names an exporter or the application installed a provider.
        self.tracing = Tracing(self.settings)
        self.ledger = Ledger(self.db, self.flows, self.tracing)
        self.task_prefix = task_prefix
        #: The one way a step is sent (orchestrator.dispatch).
        self.dispatch = Dispatcher(app, self.ledger, lambda: self.router, task_prefix,
                                   self.tracing)
        #: This process's view of the ledger's reachability (orchestrator.ledger.health).
        self.ledger_health = self.db.health
        self.registry = Registry(self.db, self.settings.heartbeat_interval, self.db.health)
        #: The fleet-wide jobs one worker does for all (workers.fleet).
        self.leases = Leases(self.db)
        self.max_retries = max_retries
        self.commands = commands
        self.signing = signing.Signing.from_env()
        #: The worker this process runs (its MainProcess), once its host service started
        #: (workers.host): a step's request reaches its worker's bootsteps through it.
        self.worker: Any = None
        self._source: RoutingSource | None = None
        self._router: StepRouter | None = None
        self._modules_loaded = False
        #: ``fn(session, operation, data)`` hooks that add the application's own fields to an
        #: operation's view (:meth:`describe`).
        self.describers: list[Callable[[Session, Operation, dict[str, Any]], None]] = []
        #: This process's subscription to the ends of operations (made at its first wait).
        self._notices: notices.EndedNotices | None = None
        #: Asks a silent worker over the broker (made when the router first needs it).
        self._witness: Witness | None = None
        self._install()

    def _routing_file(self, routing: str | Path | None, default: str | Path | None,
                      module_file: str | None) -> Path:
        """``routing`` (a relative path: from the directory of the application's module,
        ``module_file``, the one that constructs this, wherever the process was started),
        else ORCHESTRATOR_ROUTING_FILE, else ``./routing.yaml``, else the application's own
        ``default_routing`` (the file it ships, found from any directory). Where it came from
        is kept (``routing_origin``): an error reading it says what to fix."""
        if routing is not None:
            self.routing_origin = "application"
            return _beside(routing, module_file)
        self.routing_origin = "environment" if self.settings.routing_file_set else "default"
        if self.settings.routing_file_set or default is None:
            return self.settings.routing_file
        here = self.settings.routing_file
        return here if here.exists() else Path(default)

    # -- installation ------------------------------------------------------------------------
    def _install(self) -> None:
        app = self.app
        app.orchestrator = self
        kombu_internals.guard_redis()
        broker_url = app.conf.broker_url or self.settings.broker_url
        check_passwords(broker_url, self.db.url)
        existing = app.conf.task_routes
        routes = (
            () if not existing
            else tuple(existing) if isinstance(existing, list | tuple) else (existing,)
        )
        app.conf.update(policy.orchestrator_settings(
            broker_url, self.settings, app.conf.broker_transport_options,
            (self._route, *routes)))
        if self.signing is not None:
            signing.enable(app, self.signing)
        app.steps["worker"].update(WORKER_STEPS)
        self._worker_options()
        signals.celeryd_after_setup.connect(
            self._log_settings, weak=False, dispatch_uid=f"orchestrator.settings.{id(self)}"
        )
        signals.celeryd_after_setup.connect(
            self._before_fork, weak=False, dispatch_uid=f"orchestrator.before-fork.{id(self)}"
        )
        # The spans a worker's process still batches are exported as it exits (a pool
        # process ends with os._exit: no atexit there).
        for exiting in (signals.worker_process_shutdown, signals.worker_shutdown):
            exiting.connect(self._flush_traces, weak=False,
                            dispatch_uid=f"orchestrator.traces.{exiting.name}.{id(self)}")

    def _worker_options(self) -> None:
        self.app.user_options["worker"].add(click.Option(
            ["--graceful-timeout"], type=float, default=None,
            help="Seconds a draining host keeps serving its alt queue after SIGTERM "
                 "(default: ORCHESTRATOR_GRACEFUL_SHUTDOWN_TIMEOUT or 180).",
        ))
        self.app.user_options["worker"].add(click.Option(
            ["--service-version"],
            type=click.IntRange(min(registry_mod.SERVICE_VERSIONS),
                                max(registry_mod.SERVICE_VERSIONS)),
            default=None,
            help=f"Service version this worker registers (default "
                 f"{registry_mod.SERVICE_VERSION}); {registry_mod.LEGACY_SERVICE_VERSION} is the "
                 "legacy service of a rolling upgrade, which consumes only <host>.",
        ))

    def _before_fork(self, sender: str, instance: Any, conf: Any, **kwargs: Any) -> None:
        """Before the pool forks (``celeryd_after_setup``): what every pool process needs is
        made once in the parent and shared, and the parent's garbage collector leaves it
        alone. A pool process shares the parent's pages until one of them writes to a page;
        the ORM's mappers configured in each process, and a full collection in the parent
        (it writes a header of every object it visits), made those pages private in every
        process (``gc.freeze``, as the gc module's documentation advises before a fork)."""
        if getattr(instance, "app", None) is not self.app:
            return
        configure_mappers()
        gc.freeze()

    def _flush_traces(self, sender: Any = None, **kwargs: Any) -> None:
        self.tracing.flush()

    def _log_settings(self, sender: str, instance: Any, conf: Any, **kwargs: Any) -> None:
        """One line at worker start: where it connects, passwords redacted."""
        if getattr(instance, "app", None) is not self.app:
            return
        from celery.utils.log import get_logger

        get_logger("orchestrator").info(
            "orchestrator: broker %s, database %s, %s queues, message signing %s, routing %s",
            redact_url(conf.broker_url or ""), redact_url(self.db.url),
            self.settings.queue_type,
            self.signing.describe() if self.signing is not None else "off",
            printable(self.routing_file),
        )

    # -- definitions -------------------------------------------------------------------------
    def step(
        self, fn: Callable[[StepContext], Any] | None = None, *, name: str | None = None,
        effect: Effect | None = None, on_failure: Effect | None = None,
        aliases: Iterable[str] = (), **task_options: Any,
    ) -> Any:
        """Register ``fn(ctx)`` as a step: a Celery task named ``task_prefix + name``.

        ``effect(session, operation)`` and ``on_failure(session, operation)`` run inside the
        ledger transaction that completes or fails the step: applied exactly once however often
        the step's message is delivered (the place to change the application's own tables).

        ``aliases``: older names the step still answers to, so that a rename ships in one
        deploy. Operations in flight keep the plan they were submitted with, old names and
        all; a message sent under an old name runs this step (a Celery task of that name).
        """
        new_aliases = tuple(aliases)

        def register(fn: Callable[[StepContext], Any]) -> Any:
            step_name = name or fn.__name__
            for one in (step_name, *new_aliases):
                if not isinstance(one, str) or not re.fullmatch(r"[A-Za-z_][\w.-]*", one):
                    raise DefinitionError(f"step name {one!r} is not a usable task name")
                if one in self.steps or one in self.aliases:
                    raise DefinitionError(f"step {one!r} is registered twice")
            from orchestrator.runner import StepTask, run_step

            orch = self

            def runner(as_name: str) -> Callable[..., str]:
                """The task body for messages sent as ``as_name`` (the plan's name)."""

                def run(task: Any, *, operation_id: str, position: int, host: str) -> str:
                    return run_step(orch, orch.steps[step_name], task, operation_id, position,
                                    host, as_name)

                run.__name__, run.__qualname__ = fn.__name__, fn.__qualname__
                run.__module__, run.__doc__ = fn.__module__, fn.__doc__
                return run

            task = None
            for one in (step_name, *new_aliases):
                made = self.app.task(
                    name=self.task_prefix + one, bind=True, base=StepTask, shared=False,
                    **task_options,
                )(runner(one))
                task = task or made
                if one != step_name:
                    self.aliases[one] = step_name
            self.steps[step_name] = StepSpec(
                step_name, fn, task, effect or no_effect, on_failure or no_effect
            )
            self._source = self._router = None  # validated again, with this step, on next use
            return task

        return register(fn) if fn is not None else register

    def served_steps(self) -> dict[str, str]:
        """Every step name this code runs, each with the step it stands for (an alias its
        step, a step itself)."""
        return {**{name: name for name in self.steps}, **self.aliases}

    def spec(self, name: str) -> StepSpec | None:
        """The step ``name`` runs (through an alias, too), None if this code has none."""
        return self.steps.get(self.aliases.get(name, name))

    @property
    def code_fingerprint(self) -> str:
        """This code's version if it has one, else a digest of the step names it serves:
        two workers with the same fingerprint serve the same steps."""
        if self.code_version:
            return self.code_version
        import hashlib

        names = ",".join(sorted(f"{a}={b}" for a, b in self.served_steps().items()))
        return "steps:" + hashlib.sha256(names.encode()).hexdigest()[:10]

    def flow(
        self, name: str, steps: Sequence[tuple[str, str]], *,
        rollback: Sequence[tuple[str, str]] = (), rollback_on: Iterable[str] = (),
    ) -> Flow:
        """Define a flow: ``steps`` and ``rollback`` are ``(step, role)`` pairs."""
        if not isinstance(name, str) or not name.strip():
            raise DefinitionError(f"flow name {name!r} must be a non-empty string")
        if name in self.flows:
            raise DefinitionError(f"flow {name!r} is defined twice")
        if not steps:
            raise DefinitionError(f"flow {name!r} has no steps")
        pairs = [self._pair(name, p) for p in steps]
        back = [self._pair(name, p) for p in rollback]
        names = {s for s, _ in pairs}
        on = frozenset(rollback_on)
        for step in sorted(on - names):
            raise DefinitionError(
                f"flow {name!r}: rollback_on names {step!r}, which is not one of its steps"
                + _suggest(step, names)
            )
        if on and not back:
            raise DefinitionError(f"flow {name!r}: rollback_on without rollback steps")
        flow = Flow(name, tuple(pairs), tuple(back), on)
        self.flows[name] = flow
        return flow

    def describe(
        self, fn: Callable[[Session, Operation, dict[str, Any]], None]
    ) -> Callable[[Session, Operation, dict[str, Any]], None]:
        """Register ``fn(session, operation, data)``: it adds fields of the application's own
        to the view of an operation (``orch.operation``, ``orchestrator operation``)."""
        self.describers.append(fn)
        return fn

    def _pair(self, flow: str, pair: Any) -> tuple[str, str]:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise DefinitionError(f"flow {flow!r}: {pair!r} is not a (step, role) pair")
        step, role = pair
        if step not in self.steps:
            raise DefinitionError(
                f"flow {flow!r}: step {step!r} is not registered (@orch.step)"
                + _suggest(str(step), self.steps)
            )
        if not isinstance(role, str) or not role.strip():
            raise DefinitionError(f"flow {flow!r}: step {step!r} has no role")
        return step, role

    # -- routing -------------------------------------------------------------------------------
    def load_steps(self) -> None:
        """Import the app's task modules (``include``/``imports``), where steps and flows are
        defined, so the registered steps are all there before routing.yaml is checked."""
        if not self._modules_loaded:
            self._modules_loaded = True
            self.app.loader.import_default_modules()

    @property
    def routing_source(self) -> RoutingSource:
        """routing.yaml as loaded (read and validated against the registered steps on first
        use), with its load time and the error of an edit that could not be used."""
        if self._source is None:
            self.load_steps()
            source = RoutingSource(self.routing_file, self.served_steps,
                                   code_version=self.code_version, origin=self.routing_origin)
            source.on_change.append(self._routing_changed)
            self._source = source
        return self._source

    @property
    def routing(self) -> RoutingTable:
        """The routing table in force, read again if routing.yaml changed (checked at most
        once a second): an edit is in force within two seconds, with no restart."""
        return self.routing_source.check()

    def _routing_changed(self, table: RoutingTable) -> None:
        if self._router is not None:
            self._router.table = table

    def use_routing(self, path: str | Path) -> None:
        """Read the routing table from ``path`` from now on (validated on next use)."""
        self.routing_file = Path(path)
        self._source = self._router = None

    @property
    def router(self) -> StepRouter:
        self.routing  # noqa: B018  (the table in force, reloaded if the file changed)
        if self._router is None:
            self._router = StepRouter(
                self.routing,
                mode=self.settings.alt_routing,  # type: ignore[arg-type]
                capability=AltCapability(
                    self.registry.alt_snapshot, self.settings.alt_cache_seconds,
                    witness=self._heard,
                ),
                on_fallback=self.registry.count_fallback,
                task_prefix=self.task_prefix,
            )
        return self._router

    def _route(
        self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
    ) -> dict[str, str] | None:
        if not name.startswith(self.task_prefix):
            return None
        self.load_steps()
        if self.spec(name[len(self.task_prefix):]) is None:
            return None
        return self.router(name, args, kwargs, options, task, **kw)

    def task_name(self, step: str) -> str:
        return self.task_prefix + step

    def step_of_task(self, name: str) -> str | None:
        """The step a Celery task name stands for, None for any other task."""
        if not name.startswith(self.task_prefix):
            return None
        step = name[len(self.task_prefix):]
        return step if self.spec(step) is not None else None

    # -- operations ----------------------------------------------------------------------------
    def submit(
        self, flow: str, hosts: Mapping[str, str], params: Mapping[str, Any] | None = None,
        subject: str | None = None, *, session: Session | None = None,
    ) -> str:
        """Record an operation and queue its first step; returns the operation id.

        Every check comes first, and nothing is recorded or sent if one fails. With
        ``session`` (from :meth:`transaction`) the operation is recorded in that transaction,
        with the application's own rows, and its first step is sent once it commits.
        """
        spec = self._check_submit(flow, hosts, params, subject)
        first = spec.plan(hosts)[0]
        # A submit writes: the ledger's schema first (once per process), so that routing's
        # read of the registry finds one even in a process whose reads create nothing.
        self.db.engine()
        with self.tracing.submit(spec.name) as traced:
            if session is None:
                # Route first, then one transaction records the operation with its first step
                # as sent, and one publish sends it. A fallback to <host> is counted (a write
                # of its own, never inside the ledger's transaction) only once the step is
                # sent.
                decision = self.dispatch.route(*first)
                op_id = self.ledger.record_new(
                    spec.name, spec.plan(hosts), hosts, params or {}, subject, decision.queue,
                    spec.recorded_rollback(hosts), trace=traced.traceparent)
                traced.operation(op_id, first[1], decision.queue)
                self.dispatch.first(StepMessage(op_id, 0, *first, spec.name, subject),
                                    decision)
                return op_id
            # The same in the caller's transaction: the operation is recorded with its first
            # step as sent to the queue routed now, and that step is published once it
            # commits (its trace then read back with it).
            decision = self.dispatch.route(*first)
            op_id = self._record(session, spec, hosts, params, subject, queue=decision.queue,
                                 trace=traced.traceparent)
            traced.operation(op_id, first[1], decision.queue)
        message = StepMessage(op_id, 0, *first, spec.name, subject)
        event.listen(session, "after_commit",
                     lambda _s: self.dispatch.first(message, decision), once=True)
        return op_id

    def _check_submit(
        self, flow: str, hosts: Mapping[str, str], params: Mapping[str, Any] | None,
        subject: str | None,
    ) -> Flow:
        self.load_steps()
        spec = self.flows.get(flow) if isinstance(flow, str) else None
        if spec is None:
            raise UnknownFlow(
                f"unknown flow {flow!r} (known: {', '.join(sorted(self.flows)) or 'none'})"
                + _suggest(str(flow), self.flows)
            )
        if not isinstance(hosts, Mapping):
            raise SubmitError(f"flow {flow!r}: hosts must map each role to a host")
        for role in spec.roles:
            if role not in hosts:
                raise SubmitError(
                    f"flow {flow!r}: role {role!r} has no host (given: "
                    f"{', '.join(sorted(hosts)) or 'none'})"
                )
        for role, host in hosts.items():
            if role not in spec.roles:
                raise SubmitError(
                    f"flow {flow!r} has no role {role!r} (roles: {', '.join(spec.roles)})"
                    + _suggest(str(role), spec.roles)
                )
            check_host_name(host, f"flow {flow!r}: role {role!r}",
                            self.app.conf.task_default_queue)
        if params is not None and not isinstance(params, Mapping):
            raise SubmitError(f"flow {flow!r}: params must be a mapping, not "
                              f"{type(params).__name__}")
        size = json_size(dict(params or {}), f"flow {flow!r}: params", SubmitError)
        if size > self.settings.max_json_bytes:
            raise SubmitError(f"flow {flow!r}: params are {size} bytes of JSON, more than "
                              f"{self.settings.max_json_bytes} (ORCHESTRATOR_MAX_JSON_BYTES)")
        if subject is not None and (not isinstance(subject, str) or not subject.strip()):
            raise SubmitError(f"flow {flow!r}: subject must be a non-empty string or None")
        if subject is not None:
            if not utf8(subject):
                raise SubmitError(f"flow {flow!r}: subject {subject!r} is not UTF-8 text")
            if len(subject) > self.settings.max_subject_chars:
                raise SubmitError(
                    f"flow {flow!r}: subject is {len(subject)} characters, more than "
                    f"{self.settings.max_subject_chars} (ORCHESTRATOR_MAX_SUBJECT_CHARS)")
        return spec

    def _record(
        self, s: Session, spec: Flow, hosts: Mapping[str, str],
        params: Mapping[str, Any] | None, subject: str | None, queue: str | None = None,
        trace: str | None = None,
    ) -> str:
        """The operation recorded in the application's transaction ``s``."""
        return self.ledger.record_new(spec.name, spec.plan(hosts), hosts, params or {},
                                      subject, queue, spec.recorded_rollback(hosts), session=s,
                                      trace=trace)

    def publish_step(self, operation_id: str, position: int, step: str, host: str,
                     kind: str = "", subject: str | None = None) -> str:
        """Send one step to the queue the router picks, recording nothing (a duplicate, on
        purpose: tests deliver them so); returns that queue."""
        return self.dispatch.send(StepMessage(operation_id, position, step, host, kind,
                                              subject))

    def advance(self, operation_id: str, nxt: Any, decision: Any = None) -> None:
        """Send the step a recorded ledger transition returned, if any
        (:meth:`orchestrator.dispatch.Dispatcher.next`): to ``nxt.queue`` when the transition
        recorded where it goes (the router's ``decision``), else where the router says now."""
        if nxt.outcome == "ended":
            self.dispatch.ended(operation_id)
            return
        if nxt.next_step is None or nxt.next_position is None:
            return
        self.dispatch.next(StepMessage(operation_id, nxt.next_position, *nxt.next_step,
                                       nxt.kind, nxt.subject), nxt.queue, decision)

    def operation(self, operation_id: str) -> dict[str, Any]:
        """The operation's status: its steps, where the current one waits, its params."""
        return operation_dict(self, operation_id)

    def wait(self, operation_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the operation ends (completed or failed); its status then.
        ``TimeoutError`` if it is still in flight after ``timeout`` seconds.

        It is told: the worker that records the end announces it through the broker
        (:mod:`orchestrator.notices`), and this process's one subscription wakes the waiter,
        which then reads the operation's status alone (one indexed read of one column) to
        confirm. Without notices it reads the status again every second. The whole view is
        built once, at the end: waiters that polled it every 50 ms took the CPU the workers
        needed on a small machine."""
        if self._notices is None:
            self._notices = notices.EndedNotices(self.app)
        self._notices.start()  # subscribed before the first look: no end is missed
        status = self._status_or_none(operation_id)
        if status is None:
            operation_dict(self, operation_id)  # an unknown or malformed id: said at once
        deadline = time.monotonic() + timeout
        while status not in ENDED:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout:.1f}s waiting for operation "
                                   f"{operation_id}")
            self._notices.wait_for(operation_id, min(left, self._notices.look_again))
            status = self._status_or_none(operation_id)
        return operation_dict(self, operation_id)

    def _heard(self, nodename: str) -> bool:
        """Whether worker ``nodename`` answers over the broker (the router's second witness
        of a host whose heartbeat went stale)."""
        if self._witness is None:
            self._witness = Witness(self.app)
        said = self._witness.hear(nodename)
        return said is not None and not said.get("unconfirmed")

    def _status_or_none(self, operation_id: str) -> str | None:
        """The operation's status; None while the ledger does not answer (a reason to wait)."""
        try:
            return self.ledger.status(operation_id)
        except LedgerUnavailable:
            return None

    # -- events and the database -----------------------------------------------------------
    def transaction(self) -> AbstractContextManager[Session]:
        """A writing transaction on the ledger's database (also the app's own tables)."""
        return self.db.session()

    def read(self) -> AbstractContextManager[Session]:
        return self.db.read()

    def record_event(
        self, session: Session, key: str, name: str, operation_id: str | None = None,
        host: str | None = None,
    ) -> None:
        """Deliver event ``name`` for ``key`` inside ``session`` (an effect's transaction)."""
        self.ledger.record_event(session, key, name, operation_id, host)

    def deliver_event(self, key: str, name: str) -> None:
        """Deliver event ``name`` for ``key`` now, in a transaction of its own."""
        with self.db.session() as s:
            self.ledger.record_event(s, key, name)
