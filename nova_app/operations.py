"""Nova's operations API: check a request, record it with its instance and migration rows,
and submit it to the orchestrator, which sends its first step once that transaction commits.

Every check happens before anything is sent: an unknown instance or host, a state that does
not allow the operation, or an instance already busy is a clear error and nothing is queued.
Requests *about* an operation in progress (external events, consoles, force-complete, abort)
do not hold the instance (no subject) and are not refused because it is busy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from nova_app.app import orch
from nova_app.flows import (
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
    FlowSpec,
)
from nova_app.models import Instance, Migration
from orchestrator import BrokerUnavailable, SubjectBusy, SubmitError

#: Operation kinds that do not hold the instance (requests about another operation).
NON_EXCLUSIVE = frozenset({
    EXTERNAL_EVENT.kind, CONSOLE_OUTPUT.kind, VNC_CONSOLE.kind,
    LIVE_MIGRATION_FORCE_COMPLETE.kind, LIVE_MIGRATION_ABORT.kind,
})
KNOWN_EVENTS = frozenset({
    "network-vif-plugged", "network-vif-unplugged", "network-changed", "volume-extended",
    "power-update", "accelerator-request-bound",
})

__all__ = ["BrokerUnavailable", "InstanceBusy", "InvalidState", "OperationError",
           "UnknownHost", "UnknownInstance"]


class OperationError(SubmitError):
    """A request that cannot be accepted; the message says why."""


class UnknownInstance(OperationError, LookupError):
    pass


class UnknownHost(OperationError, LookupError):
    pass


class InstanceBusy(OperationError, SubjectBusy):
    pass


class InvalidState(OperationError):
    pass


@dataclass(frozen=True)
class Accepted:
    """An operation accepted and its first step queued."""

    id: str
    kind: str


def publish_step(operation_id: str, position: int, step: str, host: str) -> str:
    """Send one step again (tests use it to deliver duplicates)."""
    return orch.publish_step(operation_id, position, step, host)


def find_instance(s: Session, ref: str, *, lock: bool = False) -> Instance:
    query = select(Instance).where(or_(Instance.id == ref, Instance.name == ref))
    instance = s.execute(query.with_for_update() if lock else query).scalar_one_or_none()
    if instance is None:
        raise UnknownInstance(f"unknown instance {ref!r}")
    return instance


def check_host(host: str) -> None:
    known = orch.registry.known_hosts()
    if host not in known:
        raise UnknownHost(
            f"unknown host {host!r} (known hosts: {', '.join(known) or 'none registered'})"
        )


def _in_flight(s: Session, instance: Instance, kinds: set[str] | None = None) -> Any:
    busy = orch.ledger.holder(s, instance.id)
    return busy if busy is not None and (kinds is None or busy.kind in kinds) else None


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


def _submit(
    s: Session, flow: FlowSpec, instance: Instance, source: str, dest: str | None = None,
    migration: Migration | None = None, **params: Any,
) -> Accepted:
    """Record the operation in ``s``; its first step is sent once ``s`` commits."""
    roles = {role for _, role in flow.steps + flow.rollback}
    hosts = {"source": source, "dest": dest or source}
    op_id = orch.submit(
        flow.name, hosts={role: host for role, host in hosts.items() if role in roles},
        params={"instance_id": instance.id,
                "migration_id": migration.id if migration is not None else None, **params},
        subject=None if flow.kind in NON_EXCLUSIVE else instance.id,
        session=s,
    )
    return Accepted(op_id, flow.kind)


def _abandoned(kind: str, instance_id: str, migration_id: int | None) -> None:
    """The first step could not be queued (the orchestrator failed the operation): put the
    instance and migration back as the operation found them, or in error for a boot."""
    with orch.transaction() as s:
        instance = s.get(Instance, instance_id)
        migration = s.get(Migration, migration_id) if migration_id is not None else None
        if instance is None:
            return
        if kind == "boot":  # Nova: a build that never reached a host is ERROR, no task
            instance.vm_state, instance.task_state = "error", None
        if migration is not None and kind in ("resize", "cross_cell_resize", "live_migration"):
            instance.task_state = None
            migration.status = "error"
        elif kind in ("revert_resize", "cross_cell_revert"):
            instance.task_state = None


def _migration(s: Session, instance: Instance, dest: str, flavor: str | None,
               migration_type: str, status: str, cross_cell: bool = False) -> Migration:
    mig = Migration(
        instance_id=instance.id, source=instance.host, dest=dest,
        old_flavor=instance.flavor, new_flavor=flavor or instance.flavor,
        migration_type=migration_type, status=status, cross_cell=cross_cell,
        force_complete=False, abort_requested=False,
    )
    s.add(mig)
    s.flush()
    return mig


def _run(record: Any) -> Accepted:
    """``record(s)`` returns (accepted, instance id, migration id) inside one transaction; the
    first step is sent when it commits. If it cannot be, the instance is put back."""
    accepted: Accepted | None = None
    instance_id = migration_id = None
    try:
        with orch.transaction() as s:
            accepted, instance_id, migration_id = record(s)
    except BrokerUnavailable:
        if accepted is not None and instance_id is not None:
            _abandoned(accepted.kind, instance_id, migration_id)
        raise
    assert accepted is not None
    return accepted


# -- the operations ----------------------------------------------------------------------------
def boot(name: str, host: str, flavor: str = "m1.small") -> Accepted:
    check_host(host)

    def record(s: Session) -> tuple:
        if s.execute(select(Instance.id).where(Instance.name == name)).first() is not None:
            raise OperationError(f"an instance named {name!r} already exists")
        instance = Instance(
            name=name, host=host, flavor=flavor, vm_state="building", task_state="spawning"
        )
        s.add(instance)
        s.flush()
        return _submit(s, BOOT, instance, host), instance.id, None

    return _run(record)


def live_migrate(ref: str, dest: str) -> Accepted:
    check_host(dest)

    def record(s: Session) -> tuple:
        instance = _exclusive(s, ref)
        _require(instance, "active")
        if dest == instance.host:
            raise InvalidState(f"instance {instance.name!r} is already on {dest}")
        mig = _migration(s, instance, dest, None, "live-migration", "queued")
        instance.task_state = "migrating"
        return _submit(s, LIVE_MIGRATION, instance, instance.host, dest, mig), instance.id, mig.id

    return _run(record)


def _live_migration_in_progress(s: Session, ref: str, statuses: tuple[str, ...]) -> tuple:
    instance = find_instance(s, ref, lock=True)
    op = _in_flight(s, instance, {LIVE_MIGRATION.kind})
    mig_id = op.params.get("migration_id") if op is not None else None
    mig = s.get(Migration, mig_id) if mig_id is not None else None
    if mig is None or mig.status not in statuses:
        state = mig.status if mig is not None else "none in progress"
        raise InvalidState(
            f"instance {instance.name!r} has no live migration in status "
            f"{'/'.join(statuses)} (migration: {state})"
        )
    return instance, mig


def live_migration_force_complete(ref: str) -> Accepted:
    def record(s: Session) -> tuple:
        instance, mig = _live_migration_in_progress(s, ref, ("running",))
        accepted = _submit(s, LIVE_MIGRATION_FORCE_COMPLETE, instance, mig.source, mig.dest, mig)
        return accepted, None, None

    return _run(record)


def live_migration_abort(ref: str) -> Accepted:
    def record(s: Session) -> tuple:
        instance, mig = _live_migration_in_progress(s, ref, ("queued", "preparing", "running"))
        return _submit(s, LIVE_MIGRATION_ABORT, instance, mig.source, mig.dest, mig), None, None

    return _run(record)


def resize(
    ref: str, flavor: str | None = None, dest: str | None = None, cross_cell: bool = False
) -> Accepted:
    """Resize (new flavor) and/or cold-migrate (new host) an active instance."""
    if dest is not None:
        check_host(dest)

    def record(s: Session) -> tuple:
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
        return _submit(s, flow, instance, instance.host, target, mig), instance.id, mig.id

    return _run(record)


def confirm(ref: str) -> Accepted:
    def record(s: Session) -> tuple:
        instance = _exclusive(s, ref)
        mig = _pending_resize(s, instance)
        flow = CROSS_CELL_CONFIRM if mig.cross_cell else CONFIRM_RESIZE
        return _submit(s, flow, instance, mig.source, mig.dest, mig), instance.id, mig.id

    return _run(record)


def revert(ref: str) -> Accepted:
    def record(s: Session) -> tuple:
        instance = _exclusive(s, ref)
        mig = _pending_resize(s, instance)
        instance.task_state = "resize_reverting"
        flow = CROSS_CELL_REVERT if mig.cross_cell else REVERT_RESIZE
        return _submit(s, flow, instance, mig.source, mig.dest, mig), instance.id, mig.id

    return _run(record)


def external_event(ref: str, name: str) -> Accepted:
    """Deliver an external event (as Neutron or Cinder would) to the instance's host."""
    if name not in KNOWN_EVENTS:
        raise OperationError(
            f"unknown event {name!r} (known: {', '.join(sorted(KNOWN_EVENTS))})"
        )

    def record(s: Session) -> tuple:
        instance = find_instance(s, ref)
        return _submit(s, EXTERNAL_EVENT, instance, instance.host, event=name), None, None

    return _run(record)


def console(ref: str, console_type: str = "output") -> Accepted:
    flows = {"output": CONSOLE_OUTPUT, "vnc": VNC_CONSOLE}
    if console_type not in flows:
        raise OperationError(f"unknown console type {console_type!r} (known: output, vnc)")

    def record(s: Session) -> tuple:
        instance = find_instance(s, ref)
        _require(instance, "active", "resized")
        return _submit(s, flows[console_type], instance, instance.host), None, None

    return _run(record)
