"""How a step runs in a worker, for any application's steps.

Every step message has the same shape (``operation_id``, ``position``, ``host``) and the same
life: claim the step in the ledger, run the application's step function (slow, outside any
transaction), then complete it, applying its effect and what it returned, and publish the next
step of the plan. A :class:`~orchestrator.errors.StepFailure` fails the operation (running the
flow's rollback when the step is in ``rollback_on``); any other exception is retried a few times,
then fails it, so an operation is never left "running" with no message anywhere.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery import Task

from orchestrator.errors import StepFailure, StepMismatch, UnknownOperation
from workers.validation import check_step_call, reject

logger = logging.getLogger(__name__)


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


def _output(step: str, value: Any) -> dict[str, Any] | None:
    """What a step returned, checked: None, or a JSON mapping merged into the params."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise StepFailure(f"step {step!r} returned {type(value).__name__}, not a dict")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StepFailure(f"step {step!r} returned what is not JSON: {exc}") from None
    return value


def run_step(orch: Any, spec: Any, task: Task, operation_id: str, position: int,
             host: str) -> str:
    from orchestrator.api import StepContext

    ledger, step = orch.ledger, spec.name
    start = ledger.begin_step(operation_id, position, step, host, worker=task.request.hostname)
    if start.outcome == "duplicate":
        logger.info("step %s of %s delivered again: already done, dropped", step, operation_id)
        return "duplicate"
    if start.outcome == "republish":
        logger.warning("step %s of %s: next step was never sent; sending it", step, operation_id)
        orch.advance(operation_id, start)
        return "republished"
    ctx = StepContext(
        orchestrator=orch, step=step, host=host, operation_id=operation_id, position=position,
        attempt=start.attempt, params=start.params, hosts=start.hosts, flow=start.kind,
        subject=start.subject,
    )
    try:
        output = _output(step, spec.fn(ctx))
        if ctx.waiting is not None:  # completed by workers.waits.EventWaits once it arrives
            event_name, key, timeout = ctx.waiting
            ledger.wait_for_event(operation_id, position, event_name, key, timeout, output)
            return "waiting"
        # Where the next step goes is decided before the transaction that records it as sent;
        # a fallback to <host> is counted (a write of its own) once that step is sent.
        following = start.following
        decision = (orch.router.decide(*following, record=False)
                    if following is not None else None)
        nxt = ledger.complete_step(operation_id, position, spec.effect, output,
                                   next_queue=decision.queue if decision else None)
        orch.advance(operation_id, nxt, decision)
        return "completed"
    except StepFailure as exc:
        logger.error("step %s of %s failed on %s: %s", step, operation_id, host, exc)
        orch.advance(operation_id, ledger.fail_step(
            operation_id, position, f"{step}@{host}: {exc}", spec.on_failure
        ))
        return "failed"
    except Exception as exc:
        _retry_or_fail(orch, spec, task, operation_id, position, host, exc)
        raise


def _retry_or_fail(orch: Any, spec: Any, task: Task, operation_id: str, position: int,
                   host: str, exc: Exception) -> None:
    """An unexpected error (database, broker, bug): Celery would acknowledge the message and
    strand the operation. Send the step again, to the same queue, a few times with backoff;
    then fail the operation."""
    retries, step = task.request.retries, spec.name
    if retries < orch.max_retries:
        logger.warning("step %s of %s on %s: %r; retry %d of %d", step, operation_id, host,
                       exc, retries + 1, orch.max_retries)
        queue = (task.request.delivery_info or {}).get("routing_key")
        # Back off here rather than with a countdown: a step message never carries an ETA
        # (workers.validation refuses them: the worker would hold it unacknowledged).
        time.sleep(min(10, 2 ** retries))
        raise task.retry(exc=exc, queue=queue)
    orch.advance(operation_id, orch.ledger.fail_step(
        operation_id, position,
        f"{step}@{host}: gave up after {orch.max_retries} retries: {exc!r}", spec.on_failure,
    ))
