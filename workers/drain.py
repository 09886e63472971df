"""The drain: on SIGTERM a host stops taking new work but finishes what has started.

Nova keeps a second RPC server (``compute-alt``) alive through ``graceful_shutdown_timeout`` so
an operation already in progress is not stranded. Here a worker consumes ``<host>`` and
``<host>-alt``; on SIGTERM (or the ``drain`` remote-control command) its drain moves through
:class:`DrainState`::

    up --SIGTERM--> quiet --what is left known--> draining --nothing left--> done
                      |                              |
                      +------------------------------+--deadline------> deadline
                      +------------------------------+--second SIGTERM-> second-sigterm

- **quiet** (:meth:`Drain.quiet`, as Sidekiq's launcher quiets): the ``<host>`` consumer is
  cancelled at once, in the event loop; every message already fetched from it but not started
  is handed back (:mod:`workers.handback`), never acknowledged, never run;
- **draining**: still consuming ``<host>-alt``, it waits until no step runs here and no
  operation that still needs this host can progress (:func:`workers.leftover.what_is_left`);
- **done**: nothing left; Celery's warm shutdown, exit 0 at once;
- **deadline** / **second-sigterm** (:meth:`Drain.stop_now`, Sidekiq's ``stop(deadline)``):
  running steps are stopped and go back to their queue unacknowledged, unconsumed alt steps
  stay in ``<host>-alt``, and the worker exits with :data:`EX_DRAIN_EXPIRED` well before a
  supervisor's kill; it is gone by the deadline plus a few seconds whatever Celery's shutdown
  does (:class:`workers.deadline.ExitDeadline`).

SIGQUIT keeps Celery's cold shutdown. The signal handler only sets flags that the drain's tick
acts on from the event loop, because broker I/O inside a signal handler is unsafe: the handler
runs between two bytecodes of whatever the main thread was doing, maybe inside kombu's own
socket read, and Celery's own handler only sets ``should_stop`` for the same reason. Celery's
internals it uses are in
:mod:`orchestrator.seams.celery_internals`.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import os
import signal
import time
from typing import Any

from celery import bootsteps
from celery.utils.log import get_logger

from orchestrator.broker import queue_depth
from orchestrator.errors import LedgerUnavailable
from orchestrator.ledger.models import Operation
from orchestrator.ledger.states import Happening
from orchestrator.ledger.store import step_task_id
from orchestrator.redact import error_text, printable
from orchestrator.routing import ALT_SUFFIX
from orchestrator.seams import billiard_internals, kombu_internals
from orchestrator.seams import celery_internals as celery_seam
from workers.deadline import EX_DRAIN_EXPIRED, ExitDeadline
from workers.drainrecord import DrainRecord
from workers.handback import HandBack
from workers.host import host_service_of
from workers.hoststep import IDLE_PERIOD_SECONDS, on_grid
from workers.leftover import Waiting, what_is_left
from workers.offline import OfflineStop

logger = get_logger(__name__)

#: How often the drain's tick runs in the event loop while it drains.
TICK_SECONDS = 0.1
#: How often it runs while the host is up: a SIGTERM wakes the loop at once through a pipe
#: (:meth:`Drain._on_sigterm`); this tick is the fallback where the loop has no hub, or lost
#: the pipe's registration with a broker reconnect (kombu's ``Hub.reset``). With the
#: worker's other periodic jobs, in the same wake-up.
IDLE_TICK_SECONDS = IDLE_PERIOD_SECONDS
LOG_EVERY_SECONDS = 5.0


class DrainState(enum.Enum):
    UP = "up"
    #: New work refused; what is left not known yet (the ledger has not answered).
    QUIET = "quiet"
    #: Waiting for what is left, still consuming ``<host>-alt``.
    DRAINING = "draining"
    DONE = "done"
    DEADLINE = "deadline"
    SECOND_SIGTERM = "second-sigterm"

    @property
    def reported(self) -> str:
        """What the registry, the heartbeat and ``orchestrator_status`` say: up or draining."""
        return "up" if self is DrainState.UP else "draining"

    @property
    def over(self) -> bool:
        return self in (DrainState.DONE, DrainState.DEADLINE, DrainState.SECOND_SIGTERM)


#: The moves a drain can make; any other is a bug (:meth:`Drain._move` refuses it).
MOVES: dict[DrainState, frozenset[DrainState]] = {
    DrainState.UP: frozenset({DrainState.QUIET}),
    DrainState.QUIET: frozenset({DrainState.DRAINING, DrainState.DONE, DrainState.DEADLINE,
                                 DrainState.SECOND_SIGTERM}),
    DrainState.DRAINING: frozenset({DrainState.DONE, DrainState.DEADLINE,
                                    DrainState.SECOND_SIGTERM}),
    DrainState.DONE: frozenset(),
    DrainState.DEADLINE: frozenset(),
    DrainState.SECOND_SIGTERM: frozenset(),
}


class Drain(bootsteps.StartStopStep):
    """Worker bootstep: drain the host on SIGTERM (or ``orchestrator drain HOST``)."""

    label = "Drain"
    requires = ("workers.host:HostService",)
    #: The drain's span (orchestrator.tracing): a trace of the worker's own, from the drain's
    #: start to its end, each hand-back an event of it; None while the host is up.
    traced: Any = None

    def __init__(self, worker, graceful_timeout: float | None = None, **kwargs) -> None:
        self.service = worker.host_service
        self.orch = self.service.orch
        settings = self.orch.settings
        self.timeout = (
            settings.graceful_shutdown_timeout if graceful_timeout is None else graceful_timeout
        )
        self.state = DrainState.UP
        #: Why the drain was asked for (SIGTERM, remote control), set by the trigger.
        self.requested: str | None = None
        #: Set by a second SIGTERM: end the drain now.
        self.hurry = False
        self.since: float | None = None
        self.deadline: float | None = None
        self.worker = None
        self.queues = None
        self.hand_back: HandBack | None = None
        self.record: DrainRecord | None = None
        self.exit_deadline = ExitDeadline()
        self.traced = None
        #: Drains through the ledger alone when SIGTERM finds no event loop running.
        self.offline = OfflineStop(self)
        self._tref = None
        self._fast = False
        #: The SIGTERM handler writes here; the event loop reads (worker.hub, if any).
        self._wake: tuple[int, int] | None = None
        self._hub = None
        self._last_log = 0.0
        self._last_error = ""
        worker.host_drain = self

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, worker) -> None:
        service = host_service_of(worker)
        if service is None:
            return
        self.worker, self.queues = worker, service.queues
        self.hand_back = HandBack(worker.app, self.orch.settings.queue_type, self.queues.main)
        self.record = DrainRecord(self.orch, worker.hostname, self.queues.host)
        self._wake = os.pipe()
        for fd in self._wake:
            os.set_blocking(fd, False)
        self._hub = getattr(worker, "hub", None)
        self._listen()
        self._schedule_idle_tick()
        self.exit_deadline.start()
        self.offline.start()
        # A drained worker's idle pool ends at once, unless its processes batch spans that
        # only their own exit flushes (OTLP tracing: orchestrator.tracing).
        batched = self.orch.tracing.batched
        billiard_internals.stop_at_once_when(
            worker.pool, lambda: self.since is not None and celery_seam.nothing_reserved()
            and not batched)
        celery_seam.handle_sigterm(self._on_sigterm)
        atexit.register(self._ignore_sigterm_at_exit)
        logger.info(
            "drain: host %s, service version %d, main queue %s, alt queue %s, "
            "graceful timeout %gs",
            self.queues.host, service.version, self.queues.main, self.queues.alt, self.timeout,
        )

    def stop(self, worker) -> None:
        if self.queues is None:
            return
        if self._tref is not None:
            self._tref.cancel()
        if self._hub is not None and self._wake is not None:
            self._hub.remove_reader(self._wake[0])
        # Our SIGTERM handler stays until the interpreter exits (_ignore_sigterm_at_exit): set
        # SIG_IGN here and a pool process forked from now on (billiard replaces dead ones
        # until the pool is terminated) would ignore the pool's own SIGTERM, and the cold
        # shutdown would wait for it forever (seen in the soak: _terminate_pool joining it).
        if self.since is not None:
            handed_back = self._summary()
            self.record.end(handed_back, self.outcome())
            if self.traced is not None:
                self.traced.end(**{"orchestrator.drain.outcome": self.outcome(),
                                   "orchestrator.drain.handed_back": handed_back})
                self.traced = None

    def terminate(self, worker) -> None:
        """Cold shutdown (deadline, second SIGTERM, SIGQUIT): same bookkeeping as stop."""
        self.stop(worker)

    def info(self, worker) -> dict:
        if self.queues is None:
            return {}
        return {
            "drain": {
                "host": self.queues.host,
                "service_version": self.service.version,
                "main_queue": self.queues.main,
                "alt_queue": self.queues.alt,
                "state": self.state.reported,
                "graceful_timeout": self.timeout,
                "deadline_in": None if self.deadline is None
                else round(self.deadline - time.time(), 1),
                "handed_back": self.hand_back.count,
            },
        }

    def _ignore_sigterm_at_exit(self) -> None:
        """The worker is done and its pool gone: a late SIGTERM must not kill the exit half way
        (Python puts the default action back for Python-level handlers while it finalizes,
        but leaves an ignored signal ignored)."""
        if os.getpid() == self.service.pid:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    # -- triggers ----------------------------------------------------------------------------
    def _on_sigterm(self, signum=None, frame=None) -> None:
        """Signal handler: no broker or database I/O here, only flags for the tick."""
        if os.getpid() != self.service.pid:  # a forked child inherited us: behave as SIG_DFL
            os._exit(143)
        if self.requested is None:
            self.requested = "SIGTERM"
            # Bounds the exit even if the event loop never gets to start the drain.
            self.exit_deadline.set(time.time() + self.timeout)
        else:
            self.hurry = True
        if self._wake is not None:
            with contextlib.suppress(OSError):  # full: the loop is waking anyway
                os.write(self._wake[1], b"t")
        self.offline.asked()

    def request(self, reason: str) -> bool:
        """Start the drain from the event loop (remote control); False if already asked."""
        if self.requested is not None:
            return False
        self.requested = printable(reason)  # logged, recorded, shown: one line
        self.exit_deadline.set(time.time() + self.timeout)
        self._tick_fast()
        return True

    # -- waking the loop ---------------------------------------------------------------------
    def _listen(self) -> None:
        """Have the event loop read the wake pipe (again, after a hub reset)."""
        if self._hub is not None and self._wake is not None \
                and self._wake[0] not in self._hub.readers:
            self._hub.add_reader(self._wake[0], self._woken)

    def _woken(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._wake[0], 64)
        self._tick_fast()

    def _schedule_idle_tick(self) -> None:
        self._tref = self.worker.timer.call_at(on_grid(IDLE_TICK_SECONDS), self._idle_tick)

    def _idle_tick(self) -> None:
        """The safety net under the wake pipe, with the worker's other periodic jobs."""
        self._listen()
        if self.requested is not None:
            self._tick_fast()
        else:
            self._schedule_idle_tick()

    def _tick_fast(self) -> None:
        """Asked to drain: tick now, then every TICK_SECONDS until the drain is over."""
        if not self._fast:
            self._fast = True
            if self._tref is not None:
                self._tref.cancel()
            self._tref = self.worker.timer.call_repeatedly(TICK_SECONDS, self.tick)
        self.tick()

    # -- the state machine -------------------------------------------------------------------
    def _move(self, to: DrainState) -> None:
        if to is self.state:
            return
        if to not in MOVES[self.state]:
            raise RuntimeError(f"drain: no move from {self.state.value} to {to.value}")
        self.state = to
        if self.traced is not None:
            self.traced.event(f"drain.{to.value}")

    def tick(self) -> None:
        """Every TICK_SECONDS in the event loop: quiet once asked, then check what is left
        until done, the deadline or a second SIGTERM."""
        if self.requested is None or self.state.over:
            return
        if self.state is DrainState.UP:
            self.quiet(self.requested)
        if celery_seam.shutdown_requested():  # Celery is already stopping (SIGQUIT, ...)
            return
        if self.hurry:
            self.stop_now(DrainState.SECOND_SIGTERM, "second SIGTERM")
            return
        if time.time() >= self.deadline:
            self.stop_now(DrainState.DEADLINE, f"deadline ({self.timeout:g}s) passed")
            return
        waiting = self._what_is_left()
        if waiting is None:  # cannot tell yet: keep waiting until the deadline
            return
        self.record.update(self.requested, self.since, self.deadline, waiting,
                           self.hand_back.count)
        if not waiting:
            self._move(DrainState.DONE)
            logger.warning("drain: nothing left in flight%s; exiting",
                           f" ({waiting.describe()})" if waiting.blocked else "")
            celery_seam.stop_warm()
            kombu_internals.unblock_consumer(self.worker.consumer)
            return
        first = self.state is DrainState.QUIET
        self._move(DrainState.DRAINING)
        if first or time.monotonic() - self._last_log >= LOG_EVERY_SECONDS:
            self._last_log = time.monotonic()
            logger.warning("drain: %.0fs left; waiting for %s", self.deadline - time.time(),
                           waiting.describe())

    def quiet(self, reason: str) -> None:
        """Stop taking new work; keep the alt queue."""
        if self.queues.main is not None:
            # Cancel before raising the flag: a message handed back while the consumer still
            # runs could be fetched straight back.
            self.worker.consumer.cancel_task_queue(self.queues.main)
        self.since = time.time()
        self.deadline = self.since + self.timeout
        self.traced = self.orch.tracing.drain(self.queues.host, self.worker.hostname,
                                              printable(reason), self.deadline)
        self._move(DrainState.QUIET)
        self.service.state = self.state.reported
        try:
            if self.orch.ledger_health.up:  # no stall of the loop: the heartbeat retries
                self.orch.registry.set_state(self.worker.hostname, "draining",
                                             drain_started_at=self.since)
        except LedgerUnavailable as exc:  # the heartbeat records the state once it answers
            self.orch.ledger_health.report(exc, "drain: cannot tell what is in flight")
        logger.warning(
            "drain: %s: stopped consuming %s, still consuming %s until done or %gs",
            printable(reason), self.queues.main,
            self.queues.alt or "no alt queue (running steps only)",
            self.timeout)

    def stop_now(self, why: DrainState, reason: str) -> None:
        """Stop by the deadline: running steps are terminated and requeued, alt steps stay
        queued."""
        self._move(why)
        logger.error(
            "drain: %s; stopping running steps (requeued, not acknowledged): %s",
            reason, self._waiting_or_unknown().describe(),
        )
        for request in celery_seam.reserved_requests():
            if not self.hand_back.unstarted(request):
                self._note(Happening.REQUEUED, request, f"{reason} ({self.requested})")
        self.worker.exitcode = EX_DRAIN_EXPIRED
        celery_seam.stop_cold(EX_DRAIN_EXPIRED)

    def outcome(self) -> str:
        """done (nothing left), deadline, or second-sigterm (how a drain's row ends)."""
        return self.state.value if self.state.over else "done"

    # -- hand-back (from StepRequest.revoked) ------------------------------------------------
    def take_back(self, request: Any) -> bool:
        """Give an unstarted main-queue message back to the broker while draining; True if
        this did (the request is then neither run nor acknowledged)."""
        if self.since is None or self.hand_back is None:
            return False
        if not self.hand_back.fetched_from_main(request):
            return False
        self.hand_back.give_back(request)
        self._note(Happening.HANDED_BACK, request, f"draining ({self.requested})")
        return True

    def _note(self, kind: Happening, request: Any, detail: str) -> None:
        """A step's history entry (best effort, and only with the ledger up: the drain's
        loop never waits for it)."""
        kwargs = request.kwargs if isinstance(request.kwargs, dict) else {}
        operation_id, position = kwargs.get("operation_id"), kwargs.get("position")
        if not isinstance(operation_id, str) or not self.orch.ledger_health.up:
            return
        step = request.name[len(self.orch.task_prefix):] if request.name else None
        # (within the drain's span: an event of it, and the operation's span links to it)
        with self.traced.current() if self.traced is not None else contextlib.nullcontext():
            self.orch.ledger.note_quietly(
                kind, operation_id, position, step, kwargs.get("host"),
                worker=self.worker.hostname,
                queue=(request.delivery_info or {}).get("routing_key"), detail=detail)

    # -- what is left ------------------------------------------------------------------------
    def _what_is_left(self) -> Waiting | None:
        """What the drain waits for, or None if the ledger cannot tell now (said rarely)."""
        health = self.orch.ledger_health
        if not health.up:  # the heartbeat thread finds it back; no stall of the loop here
            health.report(LedgerUnavailable(health.last_error),
                          "drain: cannot tell what is in flight")
            return None
        try:
            return self.waiting_for()
        except LedgerUnavailable as exc:
            health.report(exc, "drain: cannot tell what is in flight")
        except Exception as exc:
            self._cannot_tell(exc)
        return None

    def waiting_for(self) -> Waiting:
        assert self.queues is not None and self.since is not None
        waiting = Waiting(
            running=[f"{r.name}[{r.id}]" for r in celery_seam.reserved_requests()
                     if not self.hand_back.unstarted(r)],
        )
        if self.queues.alt is None:
            # A main-only process, or a legacy (version 1) service: like an old Nova compute
            # it has no second server to keep serving, so it waits only for running steps.
            return waiting
        needing = self.orch.ledger.operations_needing(self.queues.host, created_before=self.since)
        # A worker silent in the registry may only be cut off from the ledger: ask it over
        # the broker before taking its steps for stranded.
        views = self.service.witness.revise(self.orch.registry.services(),
                                            {op.current[1] for op in needing if op.current})
        left = what_is_left(
            needing, views, host=self.queues.host, ran_here=self._run_by_me_not_held(needing),
            serves=lambda step: self.orch.spec(step) is not None, now=time.time())
        waiting.operations, waiting.blocked = left.operations, left.blocked
        return waiting

    def _run_by_me_not_held(self, operations: list[Operation]) -> set[str]:
        """Operations whose current step this worker started but holds no request for."""
        running_here = [
            op for op in operations
            if op.step_state == "running" and op.current and op.current[1] == self.queues.host
        ]
        if not running_here:
            return set()
        held = {r.id for r in celery_seam.reserved_requests()}
        workers = self.orch.ledger.step_workers(running_here)
        # Same hostname is not enough: a killed previous run of this worker had it too, and its
        # steps are judged like any other dead worker's (waiting_for).
        return {
            op.id for op in running_here
            if workers.get(op.id) == self.worker.hostname
            and op.step_since >= self.service.started_at
            and step_task_id(op.id, op.position) not in held
        }

    def _waiting_or_unknown(self) -> Waiting:
        try:
            return self.waiting_for()
        except Exception as exc:
            return Waiting(blocked=[f"unknown ({exc})"])

    def _cannot_tell(self, exc: Exception) -> None:
        """An unexpected error asking what is left: logged when it changes, or every
        LOG_EVERY_SECONDS, not at every check."""
        text = error_text(exc, kind=True)
        if text != self._last_error or time.monotonic() - self._last_log >= LOG_EVERY_SECONDS:
            self._last_error, self._last_log = text, time.monotonic()
            logger.error("drain: cannot tell what is in flight (%s); retrying", text)

    def _summary(self) -> int:
        """Log what the drain did; returns the messages handed back."""
        left_main = [r for r in celery_seam.reserved_requests() if self.hand_back.unstarted(r)]
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
        handed_back = self.hand_back.count + len(left_main)
        logger.warning(
            "drain: summary for %s after %.1fs (%s): steps completed during drain: %s; "
            "messages handed back: %d; steps left in %s: %s",
            self.queues.host, time.time() - self.since,
            "done" if self.state is DrainState.DONE else self._expired_reason(),
            completed, handed_back, self.queues.alt or self.queues.host + ALT_SUFFIX, left_alt,
        )
        return handed_back

    def _expired_reason(self) -> str:
        if self.state is DrainState.SECOND_SIGTERM:
            return "second SIGTERM"
        if self.state is DrainState.DEADLINE:
            return f"deadline ({self.timeout:g}s) passed"
        return "done"
