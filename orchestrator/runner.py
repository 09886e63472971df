"""How a step runs in a worker, for any application's steps.

Every step message has the same shape (``operation_id``, ``position``, ``host``) and the same
life: ask the ledger whether it may run (a read), run the application's step function (slow,
outside any transaction), then complete it in one write, recording the attempt, applying its
effect and what it returned, and publish the next step of the plan. A step still running after
:data:`CLAIM_AFTER_SECONDS` is recorded as running meanwhile (:class:`Claim`), so that
operators and drains see it; a short step never pays for that second write.

A :class:`~orchestrator.errors.StepFailure` fails the operation (running the
flow's rollback when the step is in ``rollback_on``); any other exception is retried a few times,
then fails it, so an operation is never left "running" with no message anywhere.

The ledger unreachable is a wait, never a verdict: a delivery that cannot ask the ledger whether
it may run waits for it (nothing run, no attempt counted), and a step whose work is done keeps
its result and retries only the recording, with backoff, until the ledger answers
(:meth:`orchestrator.ledger.health.LedgerHealth.call`). The message stays unacknowledged meanwhile
(``task_acks_late``); if the worker must exit first (the drain's deadline, a second SIGTERM),
the pool process is ended and Celery's ``task_reject_on_worker_lost`` puts the message back, for
the ledger to judge on redelivery. Nothing is failed because the ledger was down.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from celery import Task
from celery.exceptions import Reject

from orchestrator.context import StepContext, running_step
from orchestrator.errors import LedgerUnavailable, StepFailure, StepMismatch, UnknownOperation
from orchestrator.ledger.states import Happening
from orchestrator.ledger.store import Attempt
from orchestrator.limits import json_size
from orchestrator.redact import error_text
from orchestrator.stepcall import check_step_call, reject

logger = logging.getLogger(__name__)

#: A step that has run this long is recorded as running (one more write) while it runs.
CLAIM_AFTER_SECONDS = 0.25
#: How long a step waits at the gate at most: a kit that died never leaves a worker stuck.
GATE_TIMEOUT_SECONDS = 120.0


def hold_at_gate(gate: Path, subject: str | None, position: int) -> None:
    """The test kit's hook (only with ``ORCHESTRATOR_TESTKIT_GATE``, read with the other
    settings: ``Settings.testkit_gate``): when the kit asked to
    hold the step at ``position`` of the operation on ``subject`` (a file
    ``<subject>.<position>.hold``), say it started (``.started``) and wait for ``.go``.
    However short the step, the kit can then signal its host while it runs."""
    stem = f"{subject}.{position}"
    if not (gate / f"{stem}.hold").exists():
        return
    (gate / f"{stem}.started").touch()
    deadline = time.monotonic() + GATE_TIMEOUT_SECONDS
    while not (gate / f"{stem}.go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


class Claim:
    """Records this delivery of a step as running once it has run CLAIM_AFTER_SECONDS (from
    the pool process's :class:`ClaimTimer`), and says at the end whether it did."""

    def __init__(self, ledger: Any, operation_id: str, position: int, worker: str,
                 queue: str | None) -> None:
        self.ledger, self.operation_id, self.position = ledger, operation_id, position
        self.worker, self.started_at, self.queue = worker, time.time(), queue
        self.due = time.monotonic() + CLAIM_AFTER_SECONDS
        self.claimed = False
        self.finished = threading.Event()
        ClaimTimer.of(ledger).add(self)

    def claim(self) -> None:
        try:
            self.claimed = self.ledger.claim_step(
                self.operation_id, self.position,
                Attempt(self.worker, self.started_at, queue=self.queue))
        except LedgerUnavailable as exc:  # the completion records the attempt anyway
            self.ledger.db.health.report(
                exc, f"step {self.operation_id}.{self.position}: not recorded as running")
        except Exception as exc:  # the completion records the attempt anyway
            logger.warning("step %s.%s: could not record it as running: %s",
                           self.operation_id, self.position, error_text(exc, kind=True))
        finally:
            self.finished.set()

    def done(self) -> Attempt:
        """Withdraw the claim if it is still to come, else wait for it; the attempt."""
        if ClaimTimer.of(self.ledger).withdraw(self):
            self.finished.set()
        self.finished.wait()
        return Attempt(self.worker, self.started_at, self.claimed, self.queue)


class ClaimTimer:
    """One thread per process, hung on the ledger, that makes the claims that come due: a
    thread started per step would cost more than the write it saves (Thread.start waits for
    the new thread to be scheduled).

    Every claim is due the same delay after it is added, so a new one is never due before
    the time the thread already waits for: it is woken only when it waits for nothing. While
    steps come, it ticks every CLAIM_AFTER_SECONDS instead (a claim is then made at most that
    much late), and once a tick finds nothing new it waits for nothing again: woken at every
    step, the thread cost a step more than the claim's own bookkeeping; ticking for ever, an
    idle pool process would wake four times a second."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._cond = threading.Condition()
        self._pending: dict[int, Claim] = {}
        #: When the thread wakes next (None: when notified); whether claims came since.
        self._wake_at: float | None = None
        self._added = False
        self._thread = threading.Thread(target=self._run, name="step-claims", daemon=True)
        self._thread.start()

    @classmethod
    def of(cls, ledger: Any) -> ClaimTimer:
        timer = getattr(ledger, "claim_timer", None)
        if timer is None or timer.pid != os.getpid():  # none yet, or the parent's (fork)
            timer = ledger.claim_timer = cls()
        return timer

    def add(self, claim: Claim) -> None:
        with self._cond:
            self._pending[id(claim)] = claim
            self._added = True
            if self._wake_at is None or claim.due < self._wake_at:
                self._cond.notify()

    def withdraw(self, claim: Claim) -> bool:
        """True if the claim had not been made (it will not be)."""
        with self._cond:
            return self._pending.pop(id(claim), None) is not None

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [c for c in self._pending.values() if c.due <= now]
                if not due:
                    nearest = min((c.due for c in self._pending.values()), default=None)
                    if nearest is None and self._added:
                        nearest = now + CLAIM_AFTER_SECONDS
                    self._wake_at, self._added = nearest, False
                    self._cond.wait(None if nearest is None else nearest - now)
                    continue
                for claim in due:
                    del self._pending[id(claim)]
            for claim in due:
                claim.claim()


class StepTask(Task):
    """Base of every step: a draining host hands back its main-queue messages instead of
    running them (workers.request.StepRequest)."""

    Request = "workers.request:StepRequest"
    typing = True
    #: Retries are sent at once (no ETA); run_step backs off before it retries.
    default_retry_delay = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Bad input (workers.validation): a malformed step, or one its operation's plan does
        # not have, is rejected with one logged line, never run and never requeued.
        check_step_call(self, args, kwargs)
        try:
            return super().__call__(*args, **kwargs)
        except (UnknownOperation, StepMismatch) as exc:
            raise reject(self, str(exc)) from None


def _output(step: str, value: Any, limit: int) -> dict[str, Any] | None:
    """What a step returned, checked: None, or a JSON mapping merged into the params, at most
    ``limit`` bytes (``ORCHESTRATOR_MAX_JSON_BYTES``)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise StepFailure(f"step {step!r} returned {type(value).__name__}, not a dict")
    size = json_size(value, f"step {step!r}: its outputs", StepFailure)
    if size > limit:
        raise StepFailure(f"step {step!r} returned {size} bytes of JSON, more than {limit} "
                          "(ORCHESTRATOR_MAX_JSON_BYTES)")
    return value


def run_step(orch: Any, spec: Any, task: Task, operation_id: str, position: int,
             host: str, as_name: str | None = None) -> str:
    """Run one delivery of a step. ``as_name``: the name the message was sent as, the one
    the operation's plan holds (an alias of ``spec``'s step after a rename).

    With tracing on, the delivery is a span in its operation's trace (the context its message
    carries), with its outcome; the next step is published inside it."""
    step = as_name or spec.name
    with orch.tracing.step(task.request, operation_id, position, step, host) as traced:
        return traced.outcome(_deliver(orch, spec, task, operation_id, position, host, step,
                                       traced))


def _deliver(orch: Any, spec: Any, task: Task, operation_id: str, position: int, host: str,
             step: str, traced: Any) -> str:
    """:func:`run_step`'s delivery, its span ``traced`` told its flow and attempt."""
    ledger = orch.ledger

    def recorded(what: str, fn: Any) -> Any:
        return orch.ledger_health.call(fn, f"step {step} of {operation_id} on {host} {what}")

    start = recorded("waits to start", lambda: ledger.begin_step(
        operation_id, position, step, host))
    if start.outcome == "duplicate":
        logger.info("step %s of %s delivered again: already done, dropped", step, operation_id)
        return "duplicate"
    if start.outcome == "behind":
        _say_behind(step, operation_id, host, start, "dropped")
        return "behind"
    if start.outcome == "republish":
        logger.warning("step %s of %s: next step was never sent; sending it", step, operation_id)
        orch.advance(operation_id, start)
        return "republished"
    traced.started(start.kind, start.attempt)
    ctx = StepContext(
        orchestrator=orch, step=step, host=host, operation_id=operation_id, position=position,
        attempt=start.attempt, params=start.params, hosts=start.hosts, flow=start.kind,
        subject=start.subject,
    )
    request = task.request
    queue = (request.delivery_info or {}).get("routing_key")
    if start.attempt - 1 > (request.retries or 0):
        # More deliveries counted than retries sent: one before ended without an outcome
        # (its worker stopped or died with it). Rare, and worth its own write.
        ledger.note_quietly(Happening.REDELIVERED, operation_id, position, step, host,
                            worker=request.hostname, queue=queue,
                            detail=f"attempt {start.attempt}: an earlier delivery did not end")
    claim = Claim(ledger, operation_id, position, request.hostname, queue)
    if orch.settings.testkit_gate is not None:  # read once, with the other settings
        hold_at_gate(orch.settings.testkit_gate, start.subject, position)
    try:
        try:
            token = running_step.set(operation_id)
            try:
                output = _output(step, spec.fn(ctx), orch.settings.max_json_bytes)
            finally:
                running_step.reset(token)
        finally:
            attempt = claim.done()
        if ctx.waiting is not None:  # completed by workers.waits.EventWaits once it arrives
            event_name, key, timeout = ctx.waiting
            recorded("is done, waits to record its event wait", lambda: ledger.wait_for_event(
                operation_id, position, event_name, key, timeout, output, attempt=attempt))
            return "waiting"
        # Where the next step goes is decided before the transaction that records it as sent
        # (from the registry as it is once the ledger answers); a fallback to <host> is
        # counted (a write of its own) once that step is sent.
        following = start.following

        def complete() -> tuple[Any, Any]:
            decision = (orch.router.decide(*following, record=False)
                        if following is not None else None)
            queue = decision.queue if decision else None
            return decision, ledger.complete(
                operation_id, position, step, host, start, output=output, effect=spec.effect,
                next_queue=queue, attempt=attempt)

        decision, nxt = recorded("is done, waits to record it", complete)
        if nxt.outcome == "behind":
            _say_behind(step, operation_id, host, nxt, "its outcome not recorded")
            return "behind"
        orch.advance(operation_id, nxt, decision)
        return "completed"
    except StepFailure as exc:
        logger.error("step %s of %s failed on %s: %s", step, operation_id, host,
                     error_text(exc))
        attempt, error = claim.done(), f"{step}@{host}: {exc}"
        orch.advance(operation_id, recorded("failed, waits to record it", lambda: ledger.fail_step(
            operation_id, position, error, spec.on_failure, attempt=attempt)))
        return "failed"
    except Exception as exc:
        _retry_or_fail(orch, spec, task, operation_id, position, host, exc, claim.done(),
                       retries=start.attempt - 1)
        raise


def _say_behind(step: str, operation_id: str, host: str, start: Any, what: str) -> None:
    """The ledger went back in time (a failover to a standby that had not received the
    completion that sent this step): say so, once per delivery, naming where it is."""
    at, earlier = start.ledger_at
    logger.warning("step %s of %s on %s: the ledger has the operation at step %d (%s), "
                   "before this one: it lost that step's completion (a failover to a standby "
                   "that had not received it?); %s, step %s is sent again once its delivery "
                   "is known gone", step, operation_id, host, at, earlier, what, earlier)


def _retry_or_fail(orch: Any, spec: Any, task: Task, operation_id: str, position: int,
                   host: str, exc: Exception, attempt: Attempt, retries: int) -> None:
    """An unexpected error (a bug, a dependency of the step): Celery would acknowledge the
    message and strand the operation. Send the step again, to the same queue, a few times with
    backoff; then fail the operation. The ledger unreachable from the step's own code is no
    reason to give up: such a step is sent again for as long as it lasts.

    ``retries``: the attempts before this one, as the ledger counts them. Celery's own count
    travels in the message (its ``retries`` header), which anyone who can publish can set: a
    copy of a pending step sent with ``retries: 0`` would start the count again."""
    step = spec.name
    waiting_for_ledger = isinstance(exc, LedgerUnavailable)
    if retries < orch.max_retries or waiting_for_ledger:
        why = error_text(exc, kind=not waiting_for_ledger)
        of = "" if waiting_for_ledger else f" of {orch.max_retries}"
        try:
            orch.ledger.record_attempt(operation_id, position, attempt, step, host,
                                       f"{why}; retry {retries + 1}{of}")
        except LedgerUnavailable as record_exc:  # the next delivery counts from the ledger
            orch.ledger_health.report(record_exc, f"step {step} of {operation_id}: attempt "
                                                  "not counted")
        except Exception as record_exc:
            logger.warning("step %s of %s: could not count the attempt: %s", step,
                           operation_id, error_text(record_exc, kind=True))
        logger.warning("step %s of %s on %s: %s; retry %d%s", step, operation_id, host, why,
                       retries + 1, of)
        queue = (task.request.delivery_info or {}).get("routing_key")
        # Back off here rather than with a countdown: a step message never carries an ETA
        # (workers.validation refuses them: the worker would hold it unacknowledged).
        time.sleep(min(10, 2 ** min(retries, 4)))
        try:
            raise task.retry(exc=exc, queue=queue)
        except Reject as rejected:
            # Celery rejects the message without requeue when the retry cannot be sent (the
            # broker is down too): it would be lost. Give it back instead; its redelivery is
            # judged by the ledger.
            raise Reject(rejected.reason, requeue=True) from None
    orch.advance(operation_id, orch.ledger_health.call(lambda: orch.ledger.fail_step(
        operation_id, position,
        f"{step}@{host}: gave up after {orch.max_retries} retries: {exc!r}", spec.on_failure,
        attempt=attempt,
    ), f"step {step} of {operation_id} on {host} failed, waits to record it"))
