"""Operation state transitions, written so that any step may be delivered more than once.

A step runs in three moves: ``begin_step`` (claim it), the hypervisor's work (slow, outside any
transaction), then ``complete_step``, which applies the step's effect and advances the
operation in one transaction guarded by the operation's ``position``: a second delivery of the
same step finds the position moved on and changes nothing. The next step's message is published
after that commit and recorded by ``mark_published``; a redelivered step that finds the next one
not yet recorded publishes it again, so a crash between the commit and the publish strands
nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator import db
from orchestrator.flows import FLOWS
from orchestrator.models import Instance, InstanceEvent, Migration, Operation, StepRecord

ACTIVE_STATUSES = ("queued", "running")
Effect = Callable[[Session, Operation], None]


class UnknownOperation(LookupError):
    pass


class StepMismatch(ValueError):
    """A step message that contradicts the operation's plan (wrong step name or host)."""


@dataclass(frozen=True)
class StepStart:
    #: run: do the work; duplicate: already done, drop it; republish: done, but the next step's
    #: message may never have been sent.
    outcome: Literal["run", "duplicate", "republish"]
    next_step: tuple[str, str] | None = None
    next_position: int | None = None
    #: With outcome "run": deliveries of this step so far, this one included.
    attempt: int = 0


def _locked_operation(s: Session, operation_id: str) -> Operation:
    op = s.execute(
        select(Operation).where(Operation.id == operation_id).with_for_update()
    ).scalar_one_or_none()
    if op is None:
        raise UnknownOperation(f"unknown operation {operation_id!r}")
    return op


def _record(s: Session, op: Operation, position: int) -> StepRecord | None:
    return s.execute(
        select(StepRecord).where(
            StepRecord.operation_id == op.id, StepRecord.position == position
        )
    ).scalar_one_or_none()


def begin_step(operation_id: str, position: int, step: str, host: str, worker: str) -> StepStart:
    with db.session() as s:
        op = _locked_operation(s, operation_id)
        if not 0 <= position < len(op.plan) or tuple(op.plan[position]) != (step, host):
            raise StepMismatch(
                f"operation {operation_id} has no step {step}@{host} at position {position}"
            )
        if op.position == position + 1 and op.status in ACTIVE_STATUSES and not op.next_published:
            return StepStart("republish", op.current, op.position)
        if op.position != position or op.status not in ACTIVE_STATUSES:
            return StepStart("duplicate")
        if op.step_state == "waiting":  # its work is done; the event will finish it
            return StepStart("duplicate")
        op.status, op.step_state, op.step_since = "running", "running", time.time()
        rec = _record(s, op, position)
        if rec is None:
            rec = StepRecord(operation_id=op.id, position=position, step=step, host=host)
            s.add(rec)
        rec.status, rec.worker, rec.started_at = "running", worker, time.time()
        rec.attempts = (rec.attempts or 0) + 1
        return StepStart("run", attempt=rec.attempts)


def complete_step(operation_id: str, position: int, effect: Effect) -> StepStart:
    """Apply the step's effect and advance; returns what to publish next (if anything)."""
    with db.session() as s:
        op = _locked_operation(s, operation_id)
        if op.position != position or op.status not in ACTIVE_STATUSES:
            return StepStart("duplicate")
        return _complete(s, op, position, effect)


def _complete(s: Session, op: Operation, position: int, effect: Effect) -> StepStart:
    effect(s, op)
    rec = _record(s, op, position)
    assert rec is not None, "complete_step without begin_step"
    rec.status, rec.finished_at = "completed", time.time()
    rec.applied = (rec.applied or 0) + 1
    op.position = position + 1
    op.next_published = False
    if op.current is None:  # the plan is done; after a rollback the operation failed
        op.status = "failed" if op.error else "completed"
        op.finished_at, op.next_published = time.time(), True
        return StepStart("duplicate")
    op.step_state, op.step_since = "queued", time.time()
    return StepStart("run", op.current, op.position)


def mark_published(operation_id: str, position: int, queue: str) -> None:
    with db.session() as s:
        op = _locked_operation(s, operation_id)
        if op.position == position:
            op.next_published, op.queue, op.step_since = True, queue, time.time()


def fail_step(operation_id: str, position: int, error: str, effect: Effect) -> StepStart:
    """Record that the step failed: run the flow's rollback steps if it has some for this
    step, otherwise end the operation as failed. Returns the rollback step to publish."""
    with db.session() as s:
        op = _locked_operation(s, operation_id)
        if op.position != position or op.status not in ACTIVE_STATUSES:
            return StepStart("duplicate")
        return _fail(s, op, position, error, effect)


def _fail(s: Session, op: Operation, position: int, error: str, effect: Effect) -> StepStart:
    effect(s, op)
    rec = _record(s, op, position)
    if rec is not None:
        rec.status, rec.finished_at = "failed", time.time()
    step = op.plan[position][0]
    rollback = FLOWS[op.kind].rollback_plan(
        step, op.params["source"], op.params.get("dest")
    ) if op.error is None else []
    op.error = error if op.error is None else f"{op.error}; then {error}"
    if not rollback:
        op.status, op.finished_at = "failed", time.time()
        return StepStart("duplicate")
    op.plan = op.plan[: position + 1] + [list(p) for p in rollback]
    op.position, op.step_state, op.next_published = position + 1, "queued", False
    op.step_since = time.time()
    return StepStart("run", op.current, op.position)


def wait_for_event(operation_id: str, position: int, event: str, timeout: float) -> bool:
    """Park the step until ``event`` reaches the instance's host (or ``timeout`` passes).

    Nova's build waits for ``network-vif-plugged`` in a green thread; here the step's message
    is acknowledged and the wait lives in the operation, so a waiting build holds no pool
    process and no prefetch slot (the event it waits for must still be fetched).
    """
    with db.session() as s:
        op = _locked_operation(s, operation_id)
        if op.position != position or op.status not in ACTIVE_STATUSES:
            return False
        rec = _record(s, op, position)
        assert rec is not None and rec.started_at is not None, "wait_for_event before begin_step"
        rec.status = "waiting"
        op.step_state, op.step_since = "waiting", time.time()
        # The event answers what this attempt of the step asked for, so it counts from the
        # attempt's start (it often arrives before the step's own work is over).
        op.params = {**op.params, "waiting_for": event, "wait_since": rec.started_at,
                     "wait_deadline": time.time() + timeout}
        return True


def settle_waits(
    host: str, effect_of: Callable[[str], Effect], failure_of: Callable[[str], Effect]
) -> list[tuple[str, StepStart]]:
    """Finish the waiting steps of ``host`` whose event arrived; fail those past their deadline.

    Returns ``(operation_id, next)`` for each, for the caller to publish the next step.
    """
    settled: list[tuple[str, StepStart]] = []
    with db.read() as s:
        candidates = [
            op.id for op in s.execute(select(Operation).where(
                Operation.step_state == "waiting", Operation.status.in_(ACTIVE_STATUSES)
            )).scalars()
            if op.current is not None and op.current[1] == host
        ]
    for operation_id in candidates:
        with db.session() as s:
            op = _locked_operation(s, operation_id)
            if op.step_state != "waiting" or op.current is None:
                continue
            step, position = op.current[0], op.position
            arrived = s.execute(select(InstanceEvent.id).where(
                InstanceEvent.instance_id == op.instance_id,
                InstanceEvent.name == op.params["waiting_for"],
                InstanceEvent.received_at >= op.params["wait_since"],
            )).first()
            if arrived:
                settled.append((op.id, _complete(s, op, position, effect_of(step))))
            elif time.time() >= op.params["wait_deadline"]:
                error = f"{step}@{host}: timed out waiting for {op.params['waiting_for']}"
                settled.append((op.id, _fail(s, op, position, error, failure_of(step))))
    return settled


def stranded_steps(host: str, unpublished_after: float, queued_after: float) -> list[Operation]:
    """Operations whose current step, on ``host``, may have no message in the broker.

    Either it was never sent (its sender died between commit and publish), or it has waited
    as ``queued`` for longer than ``queued_after`` seconds: on Redis a worker killed between
    BRPOP and recording the message as unacknowledged loses it. The caller checks the queue
    and resends; a resent step that was not lost after all is dropped as a duplicate.
    """
    now = time.time()
    with db.read() as s:
        ops = s.execute(select(Operation).where(
            Operation.status.in_(ACTIVE_STATUSES), Operation.step_state == "queued"
        )).scalars().all()
    return [
        op for op in ops
        if op.current is not None and op.current[1] == host
        and now - op.step_since > (queued_after if op.next_published else unpublished_after)
    ]


def claim_resend(operation_id: str, position: int, step_since: float) -> bool:
    """Take the right to resend a step (one process wins when several look at once)."""
    with db.session() as s:
        op = _locked_operation(s, operation_id)
        if (op.position, op.step_state, op.step_since) != (position, "queued", step_since):
            return False
        op.step_since = time.time()
        return True


def abandon(operation_id: str, error: str) -> None:
    """End an operation whose first step could not even be queued; free its instance."""
    with db.session() as s:
        op = _locked_operation(s, operation_id)
        if op.status not in ACTIVE_STATUSES or op.position != 0:
            return
        instance, migration = instance_and_migration(s, op)
        if op.kind == "boot":
            instance.vm_state = "error"
        if op.migration_id is not None and migration is not None and op.kind in (
            "resize", "cross_cell_resize", "live_migration"
        ):
            instance.task_state = None
            migration.status = "error"
        elif op.kind in ("revert_resize", "cross_cell_revert"):
            instance.task_state = None
        op.status, op.error, op.finished_at = "failed", error, time.time()


def operations_needing(host: str, created_before: float | None = None) -> list[Operation]:
    """Operations still in flight with a step left to run on ``host`` (current one included)."""
    with db.read() as s:
        query = select(Operation).where(Operation.status.in_(ACTIVE_STATUSES))
        if created_before is not None:
            query = query.where(Operation.created_at <= created_before)
        ops = s.execute(query.order_by(Operation.created_at)).scalars().all()
        return [op for op in ops if host in op.remaining_hosts()]


def step_workers(operations: list[Operation]) -> dict[str, str | None]:
    """The worker (Celery hostname) that last started each operation's current step."""
    if not operations:
        return {}
    wanted = {(op.id, op.position) for op in operations}
    with db.read() as s:
        rows = s.execute(
            select(StepRecord.operation_id, StepRecord.position, StepRecord.worker).where(
                StepRecord.operation_id.in_([op_id for op_id, _ in wanted])
            )
        ).all()
    return {op_id: worker for op_id, position, worker in rows if (op_id, position) in wanted}


def steps_completed_on(host: str, since: float) -> int:
    with db.read() as s:
        rows = s.execute(
            select(StepRecord.id).where(
                StepRecord.host == host,
                StepRecord.status == "completed",
                StepRecord.finished_at >= since,
            )
        ).all()
        return len(rows)


def get_operation(operation_id: str) -> Operation:
    with db.read() as s:
        op = s.get(Operation, operation_id)
        if op is None:
            raise UnknownOperation(f"unknown operation {operation_id!r}")
        return op


def instance_and_migration(s: Session, op: Operation) -> tuple[Instance, Migration | None]:
    instance = s.get(Instance, op.instance_id)
    assert instance is not None
    migration = s.get(Migration, op.migration_id) if op.migration_id is not None else None
    return instance, migration
