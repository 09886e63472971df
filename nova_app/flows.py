"""Nova's operations as flows: which step runs on which host's role, and their rollbacks.

Plain data, registered on the orchestrator by :mod:`nova_app.steps`. The roles are the
instance's ``source`` host and the migration's ``dest``.
"""

from __future__ import annotations

from typing import NamedTuple


class FlowSpec(NamedTuple):
    name: str
    steps: tuple[tuple[str, str], ...]
    rollback: tuple[tuple[str, str], ...] = ()
    rollback_on: frozenset[str] = frozenset()

    @property
    def kind(self) -> str:
        return self.name

    def step_names(self) -> set[str]:
        return {step for step, _ in self.steps + self.rollback}


BOOT = FlowSpec("boot", (("build_and_run_instance", "source"),))

LIVE_MIGRATION = FlowSpec(
    "live_migration",
    (
        ("check_can_live_migrate_destination", "dest"),
        ("check_can_live_migrate_source", "source"),
        ("pre_live_migration", "dest"),
        ("live_migration", "source"),
        ("post_live_migration_at_destination", "dest"),
    ),
    rollback=(
        ("remove_volume_connection", "dest"),
        ("drop_move_claim_at_destination", "dest"),
        ("rollback_live_migration_at_destination", "dest"),
    ),
    rollback_on=frozenset({"pre_live_migration", "live_migration"}),
)
LIVE_MIGRATION_FORCE_COMPLETE = FlowSpec(
    "live_migration_force_complete", (("live_migration_force_complete", "source"),)
)
LIVE_MIGRATION_ABORT = FlowSpec("live_migration_abort", (("live_migration_abort", "source"),))

# Resize and cold migration (a resize to another host keeping the flavor): prep on the
# destination (not started yet: main), then the source sends the disk and the destination
# finishes (both alt).
RESIZE = FlowSpec(
    "resize",
    (("prep_resize", "dest"), ("resize_instance", "source"), ("finish_resize", "dest")),
)
CONFIRM_RESIZE = FlowSpec("confirm_resize", (("confirm_resize", "source"),))
REVERT_RESIZE = FlowSpec(
    "revert_resize",
    (
        ("revert_resize", "dest"),
        ("check_instance_shared_storage", "source"),
        ("finish_revert_resize", "source"),
    ),
)

# Cross-cell (snapshot-based) resize and its confirm / revert.
CROSS_CELL_RESIZE = FlowSpec(
    "cross_cell_resize",
    (
        ("prep_snapshot_based_resize_at_dest", "dest"),
        ("prep_snapshot_based_resize_at_source", "source"),
        ("finish_snapshot_based_resize_at_dest", "dest"),
    ),
)
CROSS_CELL_CONFIRM = FlowSpec(
    "cross_cell_confirm", (("confirm_snapshot_based_resize", "source"),)
)
CROSS_CELL_REVERT = FlowSpec(
    "cross_cell_revert",
    (
        ("revert_snapshot_based_resize_at_dest", "dest"),
        ("finish_revert_snapshot_based_resize_at_source", "source"),
    ),
)

EXTERNAL_EVENT = FlowSpec("external_event", (("external_instance_event", "source"),))
CONSOLE_OUTPUT = FlowSpec("console_output", (("get_console_output", "source"),))
# A graphical console: the URL is made on the host (a getter: main); the console proxy then
# asks the host to validate the port as the client connects (alt, like Nova).
VNC_CONSOLE = FlowSpec(
    "vnc_console", (("get_vnc_console", "source"), ("validate_console_port", "source"))
)

FLOWS: dict[str, FlowSpec] = {
    f.name: f
    for f in (
        BOOT, LIVE_MIGRATION, LIVE_MIGRATION_FORCE_COMPLETE, LIVE_MIGRATION_ABORT, RESIZE,
        CONFIRM_RESIZE, REVERT_RESIZE, CROSS_CELL_RESIZE, CROSS_CELL_CONFIRM, CROSS_CELL_REVERT,
        EXTERNAL_EVENT, CONSOLE_OUTPUT, VNC_CONSOLE,
    )
}

#: Every step name any flow uses: Nova's steps, which routing.yaml lists.
STEP_NAMES: frozenset[str] = frozenset(s for f in FLOWS.values() for s in f.step_names())

#: Nova's Celery task names are the step names under this prefix (``compute.resize_instance``).
TASK_PREFIX = "compute."

