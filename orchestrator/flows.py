"""Operations as ordered plans of steps, each step run on one host.

A flow names its steps and, for each, the *role* of the host that runs it (the instance's
``source`` host or the migration's ``dest``). Submitting an operation resolves the roles to
hosts and stores the resulting plan, so every process (and the drain in particular) can tell
which hosts an operation still needs without knowing the flow's code.

A flow may also name rollback steps, run instead of the rest of the plan when one of the steps
in its rollback window fails (as Nova's ``_rollback_live_migration`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["source", "dest"]
Plan = list[tuple[str, str]]


@dataclass(frozen=True)
class Flow:
    kind: str
    steps: tuple[tuple[str, Role], ...]
    rollback: tuple[tuple[str, Role], ...] = ()
    #: Names of the steps whose failure runs ``rollback``; a failure elsewhere just fails.
    rollback_on: frozenset[str] = frozenset()

    @staticmethod
    def _resolve(steps: tuple[tuple[str, Role], ...], source: str, dest: str | None) -> Plan:
        hosts = {"source": source, "dest": dest or source}
        return [(step, hosts[role]) for step, role in steps]

    def plan(self, source: str, dest: str | None = None) -> Plan:
        """Resolve roles to hosts: ``[(step, host), ...]``."""
        return self._resolve(self.steps, source, dest)

    def rollback_plan(self, failed_step: str, source: str, dest: str | None) -> Plan:
        """The steps to run after ``failed_step`` failed (empty: the operation just fails)."""
        if failed_step not in self.rollback_on:
            return []
        return self._resolve(self.rollback, source, dest)

    def step_names(self) -> set[str]:
        return {step for step, _ in self.steps + self.rollback}


BOOT = Flow("boot", (("build_and_run_instance", "source"),))

LIVE_MIGRATION = Flow(
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
LIVE_MIGRATION_FORCE_COMPLETE = Flow(
    "live_migration_force_complete", (("live_migration_force_complete", "source"),)
)
LIVE_MIGRATION_ABORT = Flow("live_migration_abort", (("live_migration_abort", "source"),))

# Resize and cold migration (a resize to another host keeping the flavor): prep on the
# destination (not started yet: main), then the source sends the disk and the destination
# finishes (both alt).
RESIZE = Flow(
    "resize",
    (("prep_resize", "dest"), ("resize_instance", "source"), ("finish_resize", "dest")),
)
CONFIRM_RESIZE = Flow("confirm_resize", (("confirm_resize", "source"),))
REVERT_RESIZE = Flow(
    "revert_resize",
    (
        ("revert_resize", "dest"),
        ("check_instance_shared_storage", "source"),
        ("finish_revert_resize", "source"),
    ),
)

# Cross-cell (snapshot-based) resize and its confirm / revert.
CROSS_CELL_RESIZE = Flow(
    "cross_cell_resize",
    (
        ("prep_snapshot_based_resize_at_dest", "dest"),
        ("prep_snapshot_based_resize_at_source", "source"),
        ("finish_snapshot_based_resize_at_dest", "dest"),
    ),
)
CROSS_CELL_CONFIRM = Flow(
    "cross_cell_confirm", (("confirm_snapshot_based_resize", "source"),)
)
CROSS_CELL_REVERT = Flow(
    "cross_cell_revert",
    (
        ("revert_snapshot_based_resize_at_dest", "dest"),
        ("finish_revert_snapshot_based_resize_at_source", "source"),
    ),
)

EXTERNAL_EVENT = Flow("external_event", (("external_instance_event", "source"),))
CONSOLE_OUTPUT = Flow("console_output", (("get_console_output", "source"),))
# A graphical console: the URL is made on the host (a getter: main); the console proxy then
# asks the host to validate the port as the client connects (alt, like Nova).
VNC_CONSOLE = Flow(
    "vnc_console", (("get_vnc_console", "source"), ("validate_console_port", "source"))
)

FLOWS: dict[str, Flow] = {
    f.kind: f
    for f in (
        BOOT, LIVE_MIGRATION, LIVE_MIGRATION_FORCE_COMPLETE, LIVE_MIGRATION_ABORT, RESIZE,
        CONFIRM_RESIZE, REVERT_RESIZE, CROSS_CELL_RESIZE, CROSS_CELL_CONFIRM, CROSS_CELL_REVERT,
        EXTERNAL_EVENT, CONSOLE_OUTPUT, VNC_CONSOLE,
    )
}

#: Every step name any flow uses: the keys routing.yaml must list, no more, no less.
STEP_NAMES: frozenset[str] = frozenset(s for f in FLOWS.values() for s in f.step_names())

#: Celery task names are the step names under this prefix (``compute.resize_instance``).
TASK_PREFIX = "compute."


def task_name(step: str) -> str:
    return TASK_PREFIX + step


def step_of_task(name: str) -> str | None:
    """The step name of a Celery task name, or None for a task that is not a compute step."""
    if name.startswith(TASK_PREFIX):
        return name[len(TASK_PREFIX) :]
    return None
