"""Nova's compute steps, registered on the orchestrator, and its flows.

Every step has the same life (``orchestrator.runner.run_step``): the simulated hypervisor does the
slow part, then the step's effect (:mod:`nova_app.effects`) changes the instance and its
migration, once, in the transaction that advances the operation. A few steps do more than wait:
the build asks the network service for its VIFs and waits for ``network-vif-plugged``, and the
live migration watches for force-complete and abort requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cache
from typing import Any

from nova_app import network
from nova_app.app import orch
from nova_app.effects import EFFECTS, failure_effect
from nova_app.flows import FLOWS, STEP_NAMES
from nova_app.hypervisor import Hypervisor
from nova_app.models import Migration
from orchestrator import StepContext, StepFailure

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


def _migration_flags(ctx: StepContext) -> tuple[bool, bool]:
    """(force_complete, abort_requested) of the operation's migration."""
    migration_id = ctx.params.get("migration_id")
    if migration_id is None:
        return False, False
    with orch.read() as s:
        mig = s.get(Migration, migration_id)
        return (mig.force_complete, mig.abort_requested) if mig else (False, False)


def _live_migration_poll(ctx: StepContext) -> Callable[[], bool]:
    def poll() -> bool:
        force, abort = _migration_flags(ctx)
        if abort:
            raise StepFailure("live migration aborted by request")
        return force

    return poll


def compute_step(ctx: StepContext) -> None:
    """The slow part of a step, outside any transaction."""
    step = ctx.step
    if step in ABORTABLE and _migration_flags(ctx)[1]:
        raise StepFailure("live migration aborted by request")
    started = time.time()
    poll = _live_migration_poll(ctx) if step == "live_migration" else None
    hypervisor().perform(step, ctx.host, poll, ctx.attempt)
    if step in EVENT_WAITS:
        instance_id = ctx.params["instance_id"]
        network.plug_vifs(instance_id, started)
        ctx.wait_for(EVENT_WAITS[step], network.vif_timeout(), key=instance_id)


def _register(step: str) -> Any:
    def run(ctx: StepContext) -> None:
        compute_step(ctx)

    run.__name__ = run.__qualname__ = step
    run.__doc__ = f"Compute step {step!r}: run on ``host``, then publish the next step."
    return orch.step(run, name=step, effect=EFFECTS[step], on_failure=failure_effect(step))


TASKS: dict[str, Any] = {step: _register(step) for step in sorted(STEP_NAMES)}
for _flow in FLOWS.values():
    orch.flow(_flow.name, _flow.steps, rollback=_flow.rollback, rollback_on=_flow.rollback_on)
