"""What each step changes on the instance and its migration, on success and on failure.

An effect runs inside the ledger transaction that completes or fails the step (the
``effect``/``on_failure`` of ``orch.step``), so it is applied exactly once however often the
step's message is delivered. The states follow
Nova: ``vm_state`` active/resized/error, ``task_state`` migrating, resize_*, and migration
statuses per migration type.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from nova_app.app import orch
from nova_app.flows import STEP_NAMES
from nova_app.models import Instance, Migration

Effect = Callable[[Session, Any], None]
KEEP = object()


def instance_and_migration(s: Session, op: Any) -> tuple[Instance, Migration | None]:
    """The instance and migration an operation is about (ids in its params)."""
    instance = s.get(Instance, op.params["instance_id"])
    assert instance is not None
    mig_id = op.params.get("migration_id")
    return instance, s.get(Migration, mig_id) if mig_id is not None else None


def change(
    *, vm_state: object = KEEP, task_state: object = KEEP, migration: str | None = None,
    to_dest: bool = False, to_source: bool = False,
) -> Effect:
    """An effect that sets instance and migration fields (KEEP leaves a field as it is)."""

    def apply(s: Session, op: Any) -> None:
        instance, mig = instance_and_migration(s, op)
        if vm_state is not KEEP:
            instance.vm_state = vm_state  # type: ignore[assignment]
        if task_state is not KEEP:
            instance.task_state = task_state  # type: ignore[assignment]
        if mig is None:
            return
        if migration is not None:
            mig.status = "cancelled" if migration == "error" and mig.abort_requested else migration
        if to_dest:
            instance.host, instance.flavor = mig.dest, mig.new_flavor
        if to_source:
            instance.host, instance.flavor = mig.source, mig.old_flavor

    return apply


def _flag(name: str) -> Effect:
    def apply(s: Session, op: Any) -> None:
        _, mig = instance_and_migration(s, op)
        if mig is not None:
            setattr(mig, name, True)

    return apply


def _record_event(s: Session, op: Any) -> None:
    instance, _ = instance_and_migration(s, op)
    orch.record_event(s, instance.id, op.params["event"], operation_id=op.id,
                      host=op.plan[op.position][1])


def _console_output(s: Session, op: Any) -> None:
    instance, _ = instance_and_migration(s, op)
    host = op.plan[op.position][1]
    op.result = {"output": f"[    0.000000] Linux version 6.1.0 ({instance.name})\n"
                           f"{instance.name} login: (console of {instance.id} on {host})"}


def _vnc_url(s: Session, op: Any) -> None:
    host = op.plan[op.position][1]
    op.result = {"type": "novnc", "url": f"http://{host}:6080/vnc_auto.html?token="
                                         f"{secrets.token_hex(8)}", "validated": False}


def _validate_port(s: Session, op: Any) -> None:
    op.result = {**(op.result or {}), "validated": True}


def _nothing(s: Session, op: Any) -> None:
    return None


RESIZE_PREP = change(task_state="resize_migrating", migration="migrating")
RESIZE_MIGRATED = change(task_state="resize_finish", migration="post-migrating")
RESIZE_FINISHED = change(vm_state="resized", task_state=None, migration="finished", to_dest=True)
CONFIRMED = change(vm_state="active", task_state=None, migration="confirmed")
REVERTING = change(task_state="resize_reverting", migration="reverting")
REVERTED = change(vm_state="active", task_state=None, migration="reverted", to_source=True)

EFFECTS: dict[str, Effect] = {
    "build_and_run_instance": change(vm_state="active", task_state=None),
    "external_instance_event": _record_event,
    "check_can_live_migrate_destination": _nothing,
    "check_can_live_migrate_source": change(migration="preparing"),
    "pre_live_migration": change(migration="running"),
    "live_migration": _nothing,
    "post_live_migration_at_destination": change(
        vm_state="active", task_state=None, migration="completed", to_dest=True
    ),
    "remove_volume_connection": _nothing,
    "drop_move_claim_at_destination": _nothing,
    "rollback_live_migration_at_destination": change(vm_state="active", task_state=None),
    "live_migration_force_complete": _flag("force_complete"),
    "live_migration_abort": _flag("abort_requested"),
    "prep_resize": RESIZE_PREP,
    "resize_instance": RESIZE_MIGRATED,
    "finish_resize": RESIZE_FINISHED,
    "confirm_resize": CONFIRMED,
    "revert_resize": REVERTING,
    "check_instance_shared_storage": _nothing,
    "finish_revert_resize": REVERTED,
    "prep_snapshot_based_resize_at_dest": RESIZE_PREP,
    "prep_snapshot_based_resize_at_source": RESIZE_MIGRATED,
    "finish_snapshot_based_resize_at_dest": RESIZE_FINISHED,
    "confirm_snapshot_based_resize": CONFIRMED,
    "revert_snapshot_based_resize_at_dest": REVERTING,
    "finish_revert_snapshot_based_resize_at_source": REVERTED,
    "get_console_output": _console_output,
    "get_vnc_console": _vnc_url,
    "validate_console_port": _validate_port,
}
assert EFFECTS.keys() == STEP_NAMES, sorted(STEP_NAMES ^ EFFECTS.keys())

# -- failures ---------------------------------------------------------------------------------
#: Nothing has moved yet: the instance stays ACTIVE where it is, the migration is in error.
_NOT_STARTED = change(task_state=None, migration="error")
#: Something moved: as Nova, the instance goes to ERROR for an operator to look at.
_BROKEN = change(vm_state="error", task_state=None, migration="error")
#: A live migration that will be rolled back: the rollback steps restore the instance.
_ROLLING_BACK = change(migration="error")

FAILURES: dict[str, Effect] = {
    "check_can_live_migrate_destination": _NOT_STARTED,
    "check_can_live_migrate_source": _NOT_STARTED,
    "pre_live_migration": _ROLLING_BACK,
    "live_migration": _ROLLING_BACK,
    "prep_resize": _NOT_STARTED,
    "prep_snapshot_based_resize_at_dest": _NOT_STARTED,
    # Requests about an instance that change nothing on it when they fail.
    "external_instance_event": _nothing,
    "get_console_output": _nothing,
    "get_vnc_console": _nothing,
    "validate_console_port": _nothing,
    "live_migration_force_complete": _nothing,
    "live_migration_abort": _nothing,
}


def failure_effect(step: str) -> Effect:
    return FAILURES.get(step, _BROKEN)
