"""The compute steps: one Celery task per step, each run on the host named in its message.

Every task has the same shape (``operation_id``, ``position``, ``host``) and the same life:
claim the step, let the hypervisor do the slow part, then apply the step's effect on instance
and migration and publish the next step of the plan. Effects are small functions in
:mod:`workers.effects`, applied once however often a message is delivered (see
:mod:`orchestrator.state`). A few steps do more than wait: the build asks the network service
for its VIFs and waits for the event, and the live migration watches for force-complete and
abort requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import cache

from celery import Task

from orchestrator import db, state
from orchestrator.app import app
from orchestrator.flows import STEP_NAMES, task_name
from orchestrator.models import Migration, Operation
from orchestrator.operations import publish_step
from workers import network
from workers.effects import EFFECTS, failure_effect
from workers.hypervisor import Hypervisor, StepFailure
from workers.validation import check_step_call, reject

logger = logging.getLogger(__name__)

#: Retries of a step after an unexpected error, before its operation fails.
MAX_RETRIES = 3
#: Steps that, once their work is done, wait for an external event before they complete.
EVENT_WAITS = {"build_and_run_instance": network.VIF_PLUGGED}
#: Live-migration steps that stop when the migration is aborted.
ABORTABLE = frozenset({
    "check_can_live_migrate_destination", "check_can_live_migrate_source",
    "pre_live_migration", "live_migration",
})


@cache
def hypervisor() -> Hypervisor:
    return Hypervisor.from_env()


class StepTask(Task):
    """Base of every step: a draining host hands back its main-queue messages instead of
    running them (workers.request.StepRequest)."""

    Request = "workers.request:StepRequest"
    typing = True
    #: Retries are sent at once (no ETA); run_step backs off before it retries.
    default_retry_delay = None

    def __call__(self, *args, **kwargs):
        # Bad input (workers.validation): a malformed step, or one its operation's plan does
        # not have, is rejected with one logged line, never run and never requeued.
        check_step_call(self, args, kwargs)
        try:
            return super().__call__(*args, **kwargs)
        except (state.UnknownOperation, state.StepMismatch) as exc:
            raise reject(self, str(exc)) from None


def advance(operation_id: str, nxt: state.StepStart) -> None:
    if nxt.next_step is not None and nxt.next_position is not None:
        step, host = nxt.next_step
        queue = publish_step(operation_id, nxt.next_position, step, host)
        state.mark_published(operation_id, nxt.next_position, queue)


def _migration_flags(operation_id: str) -> tuple[bool, bool]:
    """(force_complete, abort_requested) of the operation's migration."""
    with db.read() as s:
        op = s.get(Operation, operation_id)
        mig = s.get(Migration, op.migration_id) if op and op.migration_id else None
        return (mig.force_complete, mig.abort_requested) if mig else (False, False)


def _live_migration_poll(operation_id: str) -> Callable[[], bool]:
    def poll() -> bool:
        force, abort = _migration_flags(operation_id)
        if abort:
            raise StepFailure("live migration aborted by request")
        return force

    return poll


def _work(step: str, operation_id: str, host: str, attempt: int) -> None:
    """The slow part of a step, outside any transaction."""
    if step in ABORTABLE and _migration_flags(operation_id)[1]:
        raise StepFailure("live migration aborted by request")
    started = time.time()
    poll = _live_migration_poll(operation_id) if step == "live_migration" else None
    hypervisor().perform(step, host, poll, attempt)
    if step in EVENT_WAITS:
        network.plug_vifs(state.get_operation(operation_id).instance_id, started)


def run_step(task: Task, step: str, operation_id: str, position: int, host: str) -> str:
    start = state.begin_step(operation_id, position, step, host, worker=task.request.hostname)
    if start.outcome == "duplicate":
        logger.info("step %s of %s delivered again: already done, dropped", step, operation_id)
        return "duplicate"
    if start.outcome == "republish":
        logger.warning("step %s of %s: next step was never sent; sending it", step, operation_id)
        advance(operation_id, start)
        return "republished"
    try:
        _work(step, operation_id, host, start.attempt)
        if step in EVENT_WAITS:  # completed by workers.waits.EventWaits once the event is in
            state.wait_for_event(operation_id, position, EVENT_WAITS[step], network.vif_timeout())
            return "waiting"
        advance(operation_id, state.complete_step(operation_id, position, EFFECTS[step]))
        return "completed"
    except StepFailure as exc:
        logger.error("step %s of %s failed on %s: %s", step, operation_id, host, exc)
        advance(operation_id, state.fail_step(
            operation_id, position, f"{step}@{host}: {exc}", failure_effect(step)
        ))
        return "failed"
    except Exception as exc:
        _retry_or_fail(task, step, operation_id, position, host, exc)
        raise


def _retry_or_fail(
    task: Task, step: str, operation_id: str, position: int, host: str, exc: Exception
) -> None:
    """An unexpected error (database, broker, bug): Celery would acknowledge the message and
    strand the operation. Send the step again, to the same queue, a few times with backoff;
    then fail the operation, so it is never left "running" with no message anywhere."""
    retries = task.request.retries
    if retries < MAX_RETRIES:
        logger.warning("step %s of %s on %s: %r; retry %d of %d", step, operation_id, host,
                       exc, retries + 1, MAX_RETRIES)
        queue = (task.request.delivery_info or {}).get("routing_key")
        # Back off here rather than with a countdown: a step message never carries an ETA
        # (workers.validation refuses them: the worker would hold it unacknowledged).
        time.sleep(min(10, 2 ** retries))
        raise task.retry(exc=exc, queue=queue)
    advance(operation_id, state.fail_step(
        operation_id, position, f"{step}@{host}: gave up after {MAX_RETRIES} retries: {exc!r}",
        failure_effect(step),
    ))


def _make_task(step: str) -> Task:
    def step_task(self: Task, *, operation_id: str, position: int, host: str) -> str:
        return run_step(self, step, operation_id, position, host)

    step_task.__doc__ = f"Compute step {step!r}: run on ``host``, then publish the next step."
    return app.task(name=task_name(step), bind=True, base=StepTask)(step_task)


TASKS: dict[str, Task] = {step: _make_task(step) for step in sorted(STEP_NAMES)}
