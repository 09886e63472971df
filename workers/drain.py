"""The drain: on SIGTERM a host stops taking new work but finishes what has started.

Nova keeps a second RPC server (``compute-alt``) alive through ``graceful_shutdown_timeout`` so
an operation already in progress is not stranded. Here a worker consumes ``<host>`` and
``<host>-alt``; on SIGTERM (or the ``drain`` remote-control command) it:

1. **quiets**: cancels its ``<host>`` consumer at once, in the event loop;
2. **hands back** every message already fetched from ``<host>`` but not started: rejected with
   requeue, never acknowledged, never run (:class:`HandBackRequest`);
3. **waits**, still consuming ``<host>-alt``, until no step runs here and no operation that
   still needs this host can progress, then exits 0 at once;
4. **expires** at the deadline (or on a second SIGTERM): running steps are stopped and go back to
   their queue unacknowledged, unconsumed alt steps stay in ``<host>-alt``, and the worker exits
   with :data:`EX_DRAIN_EXPIRED` well before a supervisor's kill;
5. **is gone** by the deadline plus a few seconds whatever Celery's shutdown does
   (:class:`workers.deadline.ExitDeadline`).

SIGQUIT keeps Celery's cold shutdown. Verified against celery 5.7 / kombu 5.7 internals (see
``shared/NOTES-celery-internals.md``): the signal handler only schedules work on the event loop,
because broker I/O inside a signal handler is unsafe.
"""

from __future__ import annotations

import atexit
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from celery import bootsteps, platforms
from celery.exceptions import WorkerShutdown
from celery.utils.log import get_logger
from celery.worker import state as worker_state
from celery.worker.control import control_command
from celery.worker.request import Request

from orchestrator import registry
from orchestrator.broker import hand_back_mode, queue_depth, republish
from orchestrator.config import redact_url
from orchestrator.errors import LedgerUnavailable, OrchestratorError
from orchestrator.models import Operation
from orchestrator.routing import ALT_SUFFIX, split_queue
from orchestrator.state import step_task_id
from workers import status
from workers.deadline import EX_DRAIN_EXPIRED, ExitDeadline
from workers.heartbeat import Heartbeat
from workers.leftover import Waiting, what_is_left
from workers.poolstop import stop_idle_pool
from workers.wakeup import unblock_consumer

logger = get_logger(__name__)

TICK_SECONDS = 0.1
#: How often the drain asks the database what is still in flight.
CHECK_SECONDS = 0.1
LOG_EVERY_SECONDS = 5.0
#: How often a draining worker records what it waits for (table ``drains``), when it changed.
RECORD_EVERY_SECONDS = 1.0


def orchestrator_of(app: Any) -> Any:
    """The Orchestrator installed on ``app`` (``Orchestrator(app, ...)`` hangs it there)."""
    orch = getattr(app, "orchestrator", None)
    if orch is None:
        raise SystemExit(f"orchestrator: Celery app {app.main!r} has no Orchestrator")
    return orch


@dataclass(frozen=True)
class HostQueues:
    """The queues of one host that this worker consumes, told apart by the ``-alt`` suffix."""

    host: str
    main: str | None
    alt: str | None

    @classmethod
    def from_queue_names(cls, names: list[str], default_queue: str) -> HostQueues | None:
        hosts: dict[str, dict[str, str]] = {}
        for name in names:
            if name == default_queue:
                continue
            host, kind = split_queue(name)
            hosts.setdefault(host, {})[kind] = name
        if not hosts:
            return None
        if len(hosts) > 1:
            raise ValueError(
                "a worker serves one host; got queues of hosts " + ", ".join(sorted(hosts))
            )
        host, kinds = next(iter(hosts.items()))
        return cls(host=host, main=kinds.get("main"), alt=kinds.get("alt"))


class Drain(bootsteps.StartStopStep):
    """Worker bootstep: register the host, and drain it on SIGTERM."""

    label = "Drain"
    requires = ("celery.worker.components:Timer", "celery.worker.components:Pool")

    def __init__(
        self, worker, graceful_timeout: float | None = None,
        service_version: int | None = None, **kwargs,
    ) -> None:
        self.orch = orch = orchestrator_of(worker.app)
        try:
            # A worker with a broken routing.yaml refuses to start, with file, line and key;
            # one whose database has an older schema, with the command to run.
            orch.routing  # noqa: B018
            orch.db.engine()
        except LedgerUnavailable:
            # Not a configuration error: start() waits for the ledger before it registers,
            # as Celery waits for its broker, and checks the schema then.
            pass
        except OrchestratorError as exc:
            raise SystemExit(f"orchestrator: {exc}") from None
        settings = orch.settings
        self.timeout = (
            settings.graceful_shutdown_timeout if graceful_timeout is None else graceful_timeout
        )
        #: What this worker registers: a legacy (version 1) worker consumes only ``<host>``.
        self.version = registry.SERVICE_VERSION if service_version is None else service_version
        self.heartbeat_interval = settings.heartbeat_interval
        self.queues: HostQueues | None = None
        self.worker = None
        self.pid = os.getpid()
        #: When this worker registered (set in start): steps it started began after this.
        self.started_at = 0.0
        self.requested: str | None = None
        self.since: float | None = None
        self.deadline: float | None = None
        self.handed_back = 0
        #: requeue or republish (orchestrator.broker.HAND_BACK), found at the first hand-back.
        self.hand_back_mode: str | None = None
        self.expired: str | None = None
        #: Set by a second SIGTERM: end the drain now.
        self.hurry: str | None = None
        self._timers: list = []
        self.heartbeat: Heartbeat | None = None
        self.exit_deadline = ExitDeadline()
        #: Asks a worker silent in the registry whether it is alive, over the broker.
        self.witness = status.Witness(worker.app)
        self._last_log = 0.0
        self._last_error = ""
        self._last_check = 0.0
        #: This drain's row in table ``drains`` and what was last written there.
        self.record_id: int | None = None
        self._recorded: tuple | None = None
        self._last_record = 0.0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, worker) -> None:
        app = worker.app
        names = list(app.amqp.queues.consume_from or {})
        self.queues = HostQueues.from_queue_names(names, app.conf.task_default_queue)
        if self.queues is None:
            logger.info("drain: no host queue among %s; plain Celery shutdown", names)
            return
        if self.queues.alt is not None and self.version < registry.ALT_SERVICE_VERSION:
            raise RuntimeError(
                f"service version {self.version} cannot consume {self.queues.alt}: a legacy "
                f"worker consumes only {self.queues.host} (orchestrator worker HOST --legacy)"
            )
        self.worker, self.pid = worker, os.getpid()
        self._register(worker)
        self.orch.drain = self
        _register_control_command()
        status.register()
        self.heartbeat = Heartbeat(self.orch, worker.hostname, self.heartbeat_interval,
                                   lambda: "draining" if self.since is not None else "up")
        self.heartbeat.start()
        # The signal handler only sets flags; this tick acts on them from the event loop (and
        # bounds how long the loop sleeps, so a drain starts within TICK_SECONDS of SIGTERM).
        self._timers.append(worker.timer.call_repeatedly(TICK_SECONDS, self.tick))
        self.exit_deadline.start()
        self._stop_idle_pool_at_once(worker)
        platforms.signals["SIGTERM"] = self._on_sigterm
        atexit.register(self._ignore_sigterm_at_exit)
        logger.info(
            "drain: host %s, service version %d, main queue %s, alt queue %s, "
            "graceful timeout %gs",
            self.queues.host, self.version, self.queues.main, self.queues.alt, self.timeout,
        )

    def _register(self, worker) -> None:
        """Register this worker's host, waiting for the ledger first, as Celery waits for its
        broker at start (``broker_connection_retry_on_startup``): the consumer starts after
        this step, so nothing is consumed until what runs can be recorded. A SIGTERM or
        SIGQUIT meanwhile ends the worker, exit 0, having taken nothing."""
        assert self.queues is not None
        queues, delay = self.queues, 1.0
        while True:
            try:
                self.orch.db.engine()  # the schema check that __init__ could not make
                self.started_at = time.time()
                self.orch.registry.register(
                    worker.hostname, queues.host, pid=self.pid, version=self.version,
                    consumes_main=queues.main is not None, consumes_alt=queues.alt is not None,
                    steps=self.orch.served_steps(), code_version=self.orch.code_fingerprint,
                )
                return
            except LedgerUnavailable as exc:
                logger.error("orchestrator: %s; trying again in %g s (consuming nothing until "
                             "then)", exc, delay)
            except OrchestratorError as exc:  # an older schema: the command to run
                raise SystemExit(f"orchestrator: {exc}") from None
            until = time.monotonic() + delay
            while time.monotonic() < until:
                if (worker_state.should_stop is not None
                        or worker_state.should_terminate is not None):
                    self.queues = None  # nothing registered: nothing to undo at stop
                    logger.warning("orchestrator: stopped while waiting for the ledger at %s",
                                   redact_url(self.orch.db.url))
                    raise WorkerShutdown(0)
                time.sleep(0.1)
            delay = min(10.0, delay * 2)

    def _stop_idle_pool_at_once(self, worker) -> None:
        """After a drain, a pool with nothing reserved is ended at once (workers.poolstop)
        instead of closed and joined: an idle worker, and a drained one after its last step,
        exit without billiard's two seconds of sleeps. A pool still holding a request (the
        deadline ended the drain) stops as Celery stops it."""
        pool = getattr(worker, "pool", None)
        if pool is None:
            return
        close_and_join = pool.stop

        def stop() -> None:
            if not (self.since is not None and not worker_state.reserved_requests
                    and stop_idle_pool(pool)):
                close_and_join()

        pool.stop = stop

    def stop(self, worker) -> None:
        if self.queues is None:
            return
        for tref in self._timers:
            tref.cancel()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        # Our SIGTERM handler stays until the interpreter exits (_ignore_sigterm_at_exit): set
        # SIG_IGN here and a pool process forked from now on (billiard replaces dead ones
        # until the pool is terminated) would ignore the pool's own SIGTERM, and the cold
        # shutdown would wait for it forever (seen in the soak: _terminate_pool joining it).
        if self.since is not None:
            handed_back = self._summary()
            if self.record_id is not None:
                try:
                    self.orch.registry.drain_progress(
                        self.record_id, handed_back, {"running": [], "operations": [],
                                                      "blocked": []}, outcome=self.outcome())
                except Exception as exc:
                    logger.warning("drain: could not record its end: %s", exc)
        try:
            self.orch.registry.set_state(worker.hostname, "down")
        except Exception as exc:  # the database may be what failed; exit anyway
            logger.warning("drain: could not mark %s down: %s", worker.hostname, exc)
        self.orch.drain = None

    def terminate(self, worker) -> None:
        """Cold shutdown (deadline, second SIGTERM, SIGQUIT): same bookkeeping as stop."""
        self.stop(worker)

    def info(self, worker) -> dict:
        if self.queues is None:
            return {}
        return {
            "drain": {
                "host": self.queues.host,
                "service_version": self.version,
                "main_queue": self.queues.main,
                "alt_queue": self.queues.alt,
                "state": "draining" if self.since is not None else "up",
                "graceful_timeout": self.timeout,
                "deadline_in": None if self.deadline is None
                else round(self.deadline - time.time(), 1),
                "handed_back": self.handed_back,
            },
            "ledger": self.orch.ledger_health.as_dict(),
        }

    def _ignore_sigterm_at_exit(self) -> None:
        """The worker is done and its pool gone: a late SIGTERM must not kill the exit half way
        (Python puts the default action back for Python-level handlers while it finalizes,
        but leaves an ignored signal ignored)."""
        if os.getpid() == self.pid:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    # -- triggers ----------------------------------------------------------------------------
    def _on_sigterm(self, signum=None, frame=None) -> None:
        """Signal handler: no broker or database I/O here, only schedule it on the loop."""
        if os.getpid() != self.pid:  # a forked child inherited us: behave as SIG_DFL
            os._exit(143)
        if self.requested is None:
            self.requested = "SIGTERM"
            # Bounds the exit even if the event loop never gets to start the drain.
            self.exit_deadline.set(time.time() + self.timeout)
        else:
            self.hurry = "second SIGTERM"

    def request(self, reason: str) -> bool:
        """Start the drain from the event loop (remote control); False if already draining."""
        if self.requested is not None:
            return False
        self.requested = reason
        self.exit_deadline.set(time.time() + self.timeout)
        return True

    # -- the drain ---------------------------------------------------------------------------
    def quiet(self, reason: str) -> Waiting | None:
        """Stop taking new work; keep the alt queue. Runs in the event loop. Returns what the
        drain waits for, which the first tick acts on (None: the ledger cannot tell yet)."""
        assert self.queues is not None and self.since is None
        if self.queues.main is not None:
            # Cancel before raising the flag: a message handed back while the consumer still
            # runs could be fetched straight back.
            self.worker.consumer.cancel_task_queue(self.queues.main)
        self.since = time.time()
        self.deadline = self.since + self.timeout
        try:
            if not self.orch.ledger_health.up:  # no stall of the loop: the heartbeat retries
                raise LedgerUnavailable(self.orch.ledger_health.last_error)
            self.orch.registry.set_state(self.worker.hostname, "draining",
                                         drain_started_at=self.since)
            waiting = self.waiting_for()
        except LedgerUnavailable as exc:  # the heartbeat records the state once it answers
            self.orch.ledger_health.report(exc, "drain: cannot tell what is in flight")
            logger.warning(
                "drain: %s: stopped consuming %s, still consuming %s until done or %gs; what "
                "is in flight is unknown until the ledger answers", reason, self.queues.main,
                self.queues.alt or "no alt queue (running steps only)", self.timeout)
            self._last_log = self._last_check = time.monotonic()
            return None
        logger.warning(
            "drain: %s: stopped consuming %s, still consuming %s until done or %gs; "
            "waiting for %s",
            reason, self.queues.main,
            self.queues.alt or "no alt queue (running steps only)", self.timeout,
            waiting.describe(),
        )
        self._last_log = self._last_check = time.monotonic()
        self._record(waiting)
        return waiting

    def tick(self) -> None:
        """Every TICK_SECONDS in the event loop: start, check and end the drain (and look at
        routing.yaml, at most once a second, so an edit is logged where it takes effect)."""
        try:
            self.orch.routing  # noqa: B018
        except Exception as exc:  # the file vanished: keep the table, say so
            logger.warning("drain: routing check failed: %s", exc)
        if self.requested is None or self.expired is not None:
            return
        waiting = self.quiet(self.requested) if self.since is None else None
        if worker_state.should_stop is not None or worker_state.should_terminate is not None:
            return
        assert self.deadline is not None
        if self.hurry is not None:
            self.expire(self.hurry)
            return
        if time.time() >= self.deadline:
            self.expire(f"deadline ({self.timeout:g}s) passed")
            return
        if waiting is None:
            if time.monotonic() - self._last_check < CHECK_SECONDS:
                return
            self._last_check = time.monotonic()
            health = self.orch.ledger_health
            if not health.up:  # the heartbeat thread finds it back; no stall of the loop here
                health.report(LedgerUnavailable(health.last_error),
                              "drain: cannot tell what is in flight")
                return
            try:
                waiting = self.waiting_for()
            except LedgerUnavailable as exc:  # keep waiting until the deadline; say so rarely
                self.orch.ledger_health.report(exc, "drain: cannot tell what is in flight")
                return
            except Exception as exc:
                self._cannot_tell(exc)
                return
        self._record(waiting)
        if not waiting:
            logger.warning("drain: nothing left in flight; exiting")
            worker_state.should_stop = 0
            unblock_consumer(self.worker.consumer)
            return
        if time.monotonic() - self._last_log >= LOG_EVERY_SECONDS:
            self._last_log = time.monotonic()
            logger.warning(
                "drain: %.0fs left; waiting for %s", self.deadline - time.time(),
                waiting.describe(),
            )

    def _cannot_tell(self, exc: Exception) -> None:
        """An unexpected error asking what is left: logged when it changes, or every
        LOG_EVERY_SECONDS, not at every check."""
        text = f"{type(exc).__name__}: {exc}"
        if text != self._last_error or time.monotonic() - self._last_log >= LOG_EVERY_SECONDS:
            self._last_error, self._last_log = text, time.monotonic()
            logger.error("drain: cannot tell what is in flight (%s); retrying", text)

    def _record(self, waiting: Waiting) -> None:
        """Refresh the drain's row (what it waits for, messages handed back): at most every
        RECORD_EVERY_SECONDS, and only when something changed."""
        if time.monotonic() - self._last_record < RECORD_EVERY_SECONDS:
            return
        state = (self.handed_back, waiting.as_dict())
        if state == self._recorded:
            return
        self._last_record = time.monotonic()
        assert self.queues is not None and self.since is not None and self.deadline is not None
        try:
            if self.record_id is None:  # first row: now, or once the ledger answers
                self.record_id = self.orch.registry.drain_started(
                    self.worker.hostname, self.queues.host, self.requested or "", self.since,
                    self.deadline, waiting.as_dict())
                self.orch.registry.drain_progress(self.record_id, self.handed_back)
            else:
                self.orch.registry.drain_progress(self.record_id, self.handed_back,
                                                  waiting.as_dict())
            self._recorded = state
        except LedgerUnavailable as exc:
            self.orch.ledger_health.report(exc, "drain: its progress is not recorded")
        except Exception as exc:
            logger.warning("drain: could not record its progress: %s", exc)

    def outcome(self) -> str:
        """done (nothing left), deadline, or second-sigterm."""
        if self.expired is None:
            return "done"
        return "second-sigterm" if self.hurry is not None else "deadline"

    def expire(self, reason: str) -> None:
        """Stop now: running steps are terminated and requeued, alt steps stay queued."""
        if self.expired is not None:
            return
        self.expired = reason
        logger.error(
            "drain: %s; stopping running steps (requeued, not acknowledged): %s",
            reason, self.waiting_for_safe().describe(),
        )
        self.worker.exitcode = EX_DRAIN_EXPIRED
        worker_state.should_terminate = EX_DRAIN_EXPIRED

    def hand_back(self, request: Request) -> bool:
        """Give an unstarted main-queue message back to the broker; True if we did.

        Called from ``StepRequest.revoked()`` just before the pool would get it. The base
        revoke path acknowledges the message (it would be lost), so it is rejected with
        requeue here and only then marked as done locally.
        """
        if self.since is None or self.queues is None or self.queues.main is None:
            return False
        if (request.delivery_info or {}).get("routing_key") != self.queues.main:
            return False
        self._give_back(request)
        worker_state.task_ready(request)
        request._already_revoked = True
        self.handed_back += 1
        logger.warning("drain: handed back %s %s (not started)", request.name, request.id)
        return True

    def _give_back(self, request: Request) -> None:
        """Back to its queue, in the way its broker and queue type allow without counting a
        return (orchestrator.broker.HAND_BACK); a republish that fails falls back to the
        requeue (counted, but nothing lost now)."""
        if self.hand_back_mode is None:
            self.hand_back_mode = hand_back_mode(self.worker.app, self.orch.settings.queue_type)
        if self.hand_back_mode == "republish":
            try:
                republish(self.worker.app, request.message)
            except Exception as exc:
                logger.warning("drain: could not republish %s (%s); requeued instead",
                               request.id, exc)
            else:
                request.acknowledge()
                return
        request.reject(requeue=True)

    # -- what is left ------------------------------------------------------------------------
    def waiting_for(self) -> Waiting:
        assert self.queues is not None and self.since is not None
        waiting = Waiting(
            running=[f"{r.name}[{r.id}]" for r in list(worker_state.reserved_requests)
                     if not self._unstarted_main(r)],
        )
        if self.queues.alt is None:
            # A main-only process, or a legacy (version 1) service: like an old Nova compute
            # it has no second server to keep serving, so it waits only for running steps.
            return waiting
        needing = self.orch.ledger.operations_needing(self.queues.host, created_before=self.since)
        # A worker silent in the registry may only be cut off from the ledger: ask it over
        # the broker before taking its steps for stranded.
        views = self.witness.revise(self.orch.registry.services(),
                                    {op.current[1] for op in needing if op.current})
        left = what_is_left(
            needing, views, host=self.queues.host, ran_here=self._run_by_me_not_held(needing),
            serves=lambda step: self.orch.spec(step) is not None, now=time.time())
        waiting.operations, waiting.blocked = left.operations, left.blocked
        return waiting

    def _run_by_me_not_held(self, operations: list[Operation]) -> set[str]:
        """Operations whose current step this worker started but holds no request for."""
        assert self.queues is not None and self.worker is not None
        running_here = [
            op for op in operations
            if op.step_state == "running" and op.current and op.current[1] == self.queues.host
        ]
        if not running_here:
            return set()
        held = {r.id for r in list(worker_state.reserved_requests)}
        workers = self.orch.ledger.step_workers(running_here)
        # Same hostname is not enough: a killed previous run of this worker had it too, and its
        # steps are judged like any other dead worker's (waiting_for).
        return {
            op.id for op in running_here
            if workers.get(op.id) == self.worker.hostname and op.step_since >= self.started_at
            and step_task_id(op.id, op.position) not in held
        }

    def waiting_for_safe(self) -> Waiting:
        try:
            return self.waiting_for()
        except Exception as exc:
            return Waiting(blocked=[f"unknown ({exc})"])

    def _unstarted_main(self, request: Request) -> bool:
        """Fetched from the main queue and not started: handed back, never waited for."""
        key = (request.delivery_info or {}).get("routing_key")
        return (
            self.queues is not None
            and key == self.queues.main
            and request not in worker_state.active_requests
        )

    def _summary(self) -> int:
        """Log what the drain did; returns the messages handed back."""
        assert self.queues is not None and self.since is not None
        left_main = [r for r in list(worker_state.reserved_requests) if self._unstarted_main(r)]
        try:
            completed = self.orch.ledger.steps_completed_on(self.queues.host, self.since)
        except Exception as exc:
            completed = f"unknown ({exc})"
        left_alt: int | str = 0
        if self.queues.alt is not None:
            try:
                left_alt = queue_depth(self.worker.app, self.queues.alt)
            except Exception as exc:
                left_alt = f"unknown ({exc})"
        logger.warning(
            "drain: summary for %s after %.1fs (%s): steps completed during drain: %s; "
            "messages handed back: %d; steps left in %s: %s",
            self.queues.host, time.time() - self.since, self.expired or "done",
            completed, self.handed_back + len(left_main),
            self.queues.alt or self.queues.host + ALT_SUFFIX, left_alt,
        )
        return self.handed_back + len(left_main)


def _drain_command(state, reason: str = "remote control") -> dict:
    """Start this worker's drain, as SIGTERM would (``orchestrator drain HOST``)."""
    orch = getattr(state.consumer.app, "orchestrator", None)
    d = orch.drain if orch is not None else None
    if d is None:
        return {"error": "this worker serves no host queue"}
    if not d.request(reason):
        return {"ok": f"{d.queues.host} already draining"}
    return {"ok": f"{d.queues.host} draining"}


def _register_control_command() -> None:
    """The ``drain`` remote-control command, registered when a drain starts (not at import)."""
    from celery.worker.control import Panel

    if "drain" not in Panel.data:
        _drain_command.__name__ = "drain"
        control_command(
            name="drain", signature="[reason]", args=[("reason", str)]
        )(_drain_command)
