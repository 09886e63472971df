"""The operations API: check a request, record the operation, send its first step.

Every check happens before anything is sent: an unknown instance or host, a state that does
not allow the operation, or an instance already busy is a clear error and nothing is queued.
Requests *about* an operation in progress (external events, consoles, force-complete, abort)
do not make the instance busy and are not refused because it is.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from orchestrator import db, registry
from orchestrator.flows import (
    BOOT,
    CONFIRM_RESIZE,
    CONSOLE_OUTPUT,
    CROSS_CELL_CONFIRM,
    CROSS_CELL_RESIZE,
    CROSS_CELL_REVERT,
    EXTERNAL_EVENT,
    LIVE_MIGRATION,
    LIVE_MIGRATION_ABORT,
    LIVE_MIGRATION_FORCE_COMPLETE,
    RESIZE,
    REVERT_RESIZE,
    VNC_CONSOLE,
    Flow,
    task_name,
)
from orchestrator.models import Instance, Migration, Operation

#: Operation kinds that do not hold the instance (requests about another operation).
NON_EXCLUSIVE = frozenset({
    EXTERNAL_EVENT.kind, CONSOLE_OUTPUT.kind, VNC_CONSOLE.kind,
    LIVE_MIGRATION_FORCE_COMPLETE.kind, LIVE_MIGRATION_ABORT.kind,
})
KNOWN_EVENTS = frozenset({
    "network-vif-plugged", "network-vif-unplugged", "network-changed", "volume-extended",
    "power-update", "accelerator-request-bound",
})


class OperationError(ValueError):
    """A request that cannot be accepted; the message says why."""


class UnknownInstance(OperationError, LookupError):
    pass


class UnknownHost(OperationError, LookupError):
    pass


class InstanceBusy(OperationError):
    pass


class InvalidState(OperationError):
    pass


class BrokerUnavailable(OperationError):
    pass


def step_task_id(operation_id: str, position: int) -> str:
    """The Celery task id of a step's message: the same for every copy of it (redelivery,
    retry, resend), which is how a worker tells which steps it holds."""
    return f"{operation_id}.{position}"


def publish_step(operation_id: str, position: int, step: str, host: str) -> str:
    """Send one step to the queue the router picks; returns that queue.

    The same router serves any other publisher through ``task_routes``; here its answer is
    also recorded on the operation, so the drain knows which queue the step waits in.
    """
    from orchestrator.app import app, step_router

    queue = step_router.queue(step, host)
    app.send_task(
        task_name(step),
        kwargs={"operation_id": operation_id, "position": position, "host": host},
        task_id=step_task_id(operation_id, position),
        queue=queue,
    )
    return queue


def find_instance(s: Session, ref: str, *, lock: bool = False) -> Instance:
    query = select(Instance).where(or_(Instance.id == ref, Instance.name == ref))
    instance = s.execute(query.with_for_update() if lock else query).scalar_one_or_none()
    if instance is None:
        raise UnknownInstance(f"unknown instance {ref!r}")
    return instance


def check_host(host: str) -> None:
    known = registry.known_hosts()
    if host not in known:
        raise UnknownHost(
            f"unknown host {host!r} (known hosts: {', '.join(known) or 'none registered'})"
        )


def _in_flight(s: Session, instance: Instance, kinds: set[str] | None = None) -> Operation | None:
    query = select(Operation).where(
        Operation.instance_id == instance.id, Operation.status.in_(("queued", "running"))
    )
    ops = [op for op in s.execute(query).scalars() if op.kind not in NON_EXCLUSIVE]
    return next((op for op in ops if kinds is None or op.kind in kinds), None)


def _exclusive(s: Session, ref: str) -> Instance:
    """The instance, locked, with no other operation holding it."""
    instance = find_instance(s, ref, lock=True)
    busy = _in_flight(s, instance)
    if busy is not None:
        raise InstanceBusy(
            f"instance {instance.name!r} is busy: operation {busy.id} ({busy.kind}) in progress"
        )
    return instance


def _require(instance: Instance, *vm_states: str) -> None:
    if instance.vm_state not in vm_states:
        raise InvalidState(
            f"instance {instance.name!r} is {instance.vm_state}; needs {' or '.join(vm_states)}"
        )


def _pending_resize(s: Session, instance: Instance) -> Migration:
    mig = s.execute(
        select(Migration)
        .where(Migration.instance_id == instance.id, Migration.status == "finished")
        .order_by(Migration.id.desc())
    ).scalars().first()
    if instance.vm_state != "resized" or mig is None:
        raise InvalidState(
            f"instance {instance.name!r} has no resize to confirm or revert "
            f"(vm_state {instance.vm_state})"
        )
    return mig


def _record(
    s: Session, flow: Flow, instance: Instance, source: str, dest: str | None = None,
    migration: Migration | None = None, **params: Any,
) -> Operation:
    op = Operation(
        kind=flow.kind, instance_id=instance.id,
        plan=[list(p) for p in flow.plan(source, dest)],
        params={"source": source, "dest": dest or source, **params},
        migration_id=migration.id if migration is not None else None,
    )
    s.add(op)
    s.flush()
    return op


def _send_first(op: Operation) -> Operation:
    """Queue the first step; if the broker refuses, the operation is abandoned, not stuck."""
    from orchestrator import state

    step, host = op.plan[0]
    try:
        queue = publish_step(op.id, 0, step, host)
    except Exception as exc:
        state.abandon(op.id, f"could not queue {step}@{host}: {exc}")
        raise BrokerUnavailable(
            f"could not queue {step} for {host} ({exc}); operation {op.id} abandoned"
        ) from exc
    state.mark_published(op.id, 0, queue)
    return op


def _migration(s: Session, instance: Instance, dest: str, flavor: str | None,
               migration_type: str, status: str, cross_cell: bool = False) -> Migration:
    mig = Migration(
        instance_id=instance.id, source=instance.host, dest=dest,
        old_flavor=instance.flavor, new_flavor=flavor or instance.flavor,
        migration_type=migration_type, status=status, cross_cell=cross_cell,
    )
    s.add(mig)
    s.flush()
    return mig


# -- the operations ----------------------------------------------------------------------------
def boot(name: str, host: str, flavor: str = "m1.small") -> Operation:
    check_host(host)
    with db.session() as s:
        if s.execute(select(Instance.id).where(Instance.name == name)).first() is not None:
            raise OperationError(f"an instance named {name!r} already exists")
        instance = Instance(
            name=name, host=host, flavor=flavor, vm_state="building", task_state="spawning"
        )
        s.add(instance)
        s.flush()
        op = _record(s, BOOT, instance, host)
    return _send_first(op)


def live_migrate(ref: str, dest: str) -> Operation:
    check_host(dest)
    with db.session() as s:
        instance = _exclusive(s, ref)
        _require(instance, "active")
        if dest == instance.host:
            raise InvalidState(f"instance {instance.name!r} is already on {dest}")
        mig = _migration(s, instance, dest, None, "live-migration", "queued")
        instance.task_state = "migrating"
        op = _record(s, LIVE_MIGRATION, instance, instance.host, dest, mig)
    return _send_first(op)


def _live_migration_in_progress(s: Session, ref: str, statuses: tuple[str, ...]) -> tuple:
    instance = find_instance(s, ref, lock=True)
    op = _in_flight(s, instance, {LIVE_MIGRATION.kind})
    mig = s.get(Migration, op.migration_id) if op is not None else None
    if mig is None or mig.status not in statuses:
        state = mig.status if mig is not None else "none in progress"
        raise InvalidState(
            f"instance {instance.name!r} has no live migration in status "
            f"{'/'.join(statuses)} (migration: {state})"
        )
    return instance, mig


def live_migration_force_complete(ref: str) -> Operation:
    with db.session() as s:
        instance, mig = _live_migration_in_progress(s, ref, ("running",))
        op = _record(s, LIVE_MIGRATION_FORCE_COMPLETE, instance, mig.source, mig.dest, mig)
    return _send_first(op)


def live_migration_abort(ref: str) -> Operation:
    with db.session() as s:
        instance, mig = _live_migration_in_progress(s, ref, ("queued", "preparing", "running"))
        op = _record(s, LIVE_MIGRATION_ABORT, instance, mig.source, mig.dest, mig)
    return _send_first(op)


def resize(
    ref: str, flavor: str | None = None, dest: str | None = None, cross_cell: bool = False
) -> Operation:
    """Resize (new flavor) and/or cold-migrate (new host) an active instance."""
    if dest is not None:
        check_host(dest)
    with db.session() as s:
        instance = _exclusive(s, ref)
        _require(instance, "active")
        target = dest or instance.host
        if cross_cell and target == instance.host:
            raise InvalidState("a cross-cell resize needs another host (--to)")
        kind = "resize" if flavor and flavor != instance.flavor else "migration"
        if kind == "migration" and target == instance.host:
            raise InvalidState(
                f"nothing to do: instance {instance.name!r} is already {instance.flavor} "
                f"on {target}"
            )
        mig = _migration(s, instance, target, flavor, kind, "pre-migrating", cross_cell)
        instance.task_state = "resize_prep"
        flow = CROSS_CELL_RESIZE if cross_cell else RESIZE
        op = _record(s, flow, instance, instance.host, target, mig)
    return _send_first(op)


def confirm(ref: str) -> Operation:
    with db.session() as s:
        instance = _exclusive(s, ref)
        mig = _pending_resize(s, instance)
        flow = CROSS_CELL_CONFIRM if mig.cross_cell else CONFIRM_RESIZE
        op = _record(s, flow, instance, mig.source, mig.dest, mig)
    return _send_first(op)


def revert(ref: str) -> Operation:
    with db.session() as s:
        instance = _exclusive(s, ref)
        mig = _pending_resize(s, instance)
        instance.task_state = "resize_reverting"
        flow = CROSS_CELL_REVERT if mig.cross_cell else REVERT_RESIZE
        op = _record(s, flow, instance, mig.source, mig.dest, mig)
    return _send_first(op)


def external_event(ref: str, name: str) -> Operation:
    """Deliver an external event (as Neutron or Cinder would) to the instance's host."""
    if name not in KNOWN_EVENTS:
        raise OperationError(
            f"unknown event {name!r} (known: {', '.join(sorted(KNOWN_EVENTS))})"
        )
    with db.session() as s:
        instance = find_instance(s, ref)
        op = _record(s, EXTERNAL_EVENT, instance, instance.host, event=name)
    return _send_first(op)


def console(ref: str, console_type: str = "output") -> Operation:
    flows = {"output": CONSOLE_OUTPUT, "vnc": VNC_CONSOLE}
    if console_type not in flows:
        raise OperationError(f"unknown console type {console_type!r} (known: output, vnc)")
    with db.session() as s:
        instance = find_instance(s, ref)
        _require(instance, "active", "resized")
        op = _record(s, flows[console_type], instance, instance.host)
    return _send_first(op)

