"""Nova's verbs on the ``orchestrator`` command line (boot, live-migrate, resize, ...).

They join the engine's commands (``Orchestrator(commands="nova_app.cli:COMMANDS")``) and keep
their arguments, output and exit codes: scripts and the docker files depend on them.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from nova_app import operations, views
from orchestrator.ops.cli import (
    EXIT_NOT_COMPLETED,
    emit,
    fail,
    handles_errors,
    json_option,
    wait_until_ended,
)

#: How long ``--wait`` waits for an operation to end.
WAIT_SECONDS = 300.0

#: ``--wait``, as ``openstack server create --wait``: the command returns once the operation
#: ended, so that the next one does not find the instance busy.
wait_option = click.option(
    "--wait", "wait", is_flag=True,
    help=f"Wait for the operation to end (up to {WAIT_SECONDS:.0f} s): exit 0 if it "
         "completed, 1 otherwise.")


def _accepted(as_json: bool, op: operations.Accepted, instance: str,
              wait: bool = False) -> None:
    if not wait:
        emit(as_json, {"operation": op.id, "instance": instance},
             f"operation {op.id} ({op.kind}) accepted for {instance}")
        return
    if not as_json:
        click.echo(f"operation {op.id} ({op.kind}) accepted for {instance}; waiting")
    data = wait_until_ended(op.id, WAIT_SECONDS)
    emit(as_json, {"operation": op.id, "instance": instance, "status": data["status"],
                   "error": data["error"]},
         f"{op.kind} {op.id}: {data['status']}"
         + (f" ({data['error']})" if data["error"] else ""))
    if data["status"] != "completed":
        sys.exit(EXIT_NOT_COMPLETED)


@click.command()
@click.argument("name")
@click.option("--host", required=True, help="Compute host to build on.")
@click.option("--flavor", default="m1.small", show_default=True)
@wait_option
@json_option
@handles_errors
def boot(name: str, host: str, flavor: str, as_json: bool, wait: bool) -> None:
    """Boot instance NAME on HOST."""
    _accepted(as_json, operations.boot(name, host, flavor), name, wait)


@click.command(name="live-migrate")
@click.argument("instance")
@click.option("--to", "dest", required=True, help="Destination host.")
@wait_option
@json_option
@handles_errors
def live_migrate(instance: str, dest: str, as_json: bool, wait: bool) -> None:
    """Live-migrate INSTANCE to another host."""
    _accepted(as_json, operations.live_migrate(instance, dest), instance, wait)


@click.command(name="live-migration-force-complete")
@click.argument("instance")
@json_option
@handles_errors
def live_migration_force_complete(instance: str, as_json: bool) -> None:
    """Force INSTANCE's running live migration to complete now."""
    _accepted(as_json, operations.live_migration_force_complete(instance), instance)


@click.command(name="live-migration-abort")
@click.argument("instance")
@json_option
@handles_errors
def live_migration_abort(instance: str, as_json: bool) -> None:
    """Abort INSTANCE's live migration (it is rolled back; the instance stays on its host)."""
    _accepted(as_json, operations.live_migration_abort(instance), instance)


@click.command()
@click.argument("instance")
@click.option("--flavor", required=True)
@click.option("--to", "dest", default=None, help="Destination host (default: same host).")
@click.option("--cross-cell", is_flag=True, help="Snapshot-based resize to another cell.")
@wait_option
@json_option
@handles_errors
def resize(
    instance: str, flavor: str, dest: str | None, cross_cell: bool, as_json: bool, wait: bool
) -> None:
    """Resize INSTANCE to FLAVOR (on another host with --to)."""
    op = operations.resize(instance, flavor=flavor, dest=dest, cross_cell=cross_cell)
    _accepted(as_json, op, instance, wait)


@click.command()
@click.argument("instance")
@click.option("--to", "dest", required=True, help="Destination host.")
@wait_option
@json_option
@handles_errors
def migrate(instance: str, dest: str, as_json: bool, wait: bool) -> None:
    """Cold-migrate INSTANCE to another host (a resize that keeps the flavor)."""
    _accepted(as_json, operations.resize(instance, dest=dest), instance, wait)


@click.command()
@click.argument("instance")
@wait_option
@json_option
@handles_errors
def confirm(instance: str, as_json: bool, wait: bool) -> None:
    """Confirm INSTANCE's pending resize or migration."""
    _accepted(as_json, operations.confirm(instance), instance, wait)


@click.command()
@click.argument("instance")
@wait_option
@json_option
@handles_errors
def revert(instance: str, as_json: bool, wait: bool) -> None:
    """Revert INSTANCE's pending resize or migration."""
    _accepted(as_json, operations.revert(instance), instance, wait)


@click.command()
@click.argument("instance")
@click.argument("name")
@json_option
@handles_errors
def event(instance: str, name: str, as_json: bool) -> None:
    """Deliver external event NAME (e.g. network-vif-plugged) to INSTANCE's host."""
    _accepted(as_json, operations.external_event(instance, name), instance)


@click.command()
@click.argument("instance")
@click.option("--type", "console_type", type=click.Choice(["output", "vnc"]),
              default="output", show_default=True)
@click.option("--wait", "wait_s", type=float, default=None,
              help="Wait up to this many seconds and print the console.")
@json_option
@handles_errors
def console(instance: str, console_type: str, wait_s: float | None, as_json: bool) -> None:
    """Get INSTANCE's console output (or a VNC console URL)."""
    op = operations.console(instance, console_type)
    if wait_s is None:
        _accepted(as_json, op, instance)
        return
    data = wait_until_ended(op.id, wait_s)
    result: dict[str, Any] = data["result"] or {}
    emit(as_json, {"operation": op.id, "instance": instance, "status": data["status"],
                   **result}, result.get("output") or result.get("url") or data["status"])
    if data["status"] != "completed":
        sys.exit(EXIT_NOT_COMPLETED)


@click.command()
@click.argument("instance")
@json_option
@handles_errors
def show(instance: str, as_json: bool) -> None:
    """Show an instance (by name or id)."""
    data = views.show_instance(instance)
    emit(as_json, data, "\n".join(f"{k}: {v}" for k, v in data.items()))


@click.command(name="list")
@json_option
@handles_errors
def list_(as_json: bool) -> None:
    """List instances."""
    data = views.list_instances()
    lines = [
        f"{i['name']:<20}{i['host']:<14}{i['flavor']:<10}{i['vm_state']:<10}"
        f"{i['task_state'] or '-'}"
        for i in data
    ]
    emit(as_json, data, "\n".join(lines) or "no instances")


@click.command()
@click.option("--step-delay", default=3.0, show_default=True,
              help="Seconds resize_instance takes, so the drain happens mid-operation.")
@click.option("--flower/--no-flower", default=True, show_default=True,
              help="Start Flower (orchestrator flower) beside the workers.")
@click.option("--flower-port", default=5555, show_default=True,
              help="Flower's port (a free one if it is taken).")
def demo(step_delay: float, flower: bool, flower_port: int) -> None:
    """Show a host draining mid-resize, live (embedded Redis when no broker is configured)."""
    from nova_app.demo import run_demo

    try:
        code = run_demo(step_delay, flower=flower, flower_port=flower_port)
    except (RuntimeError, OSError, TimeoutError) as exc:  # no broker to embed, a port taken...
        fail(False, str(exc))
    sys.exit(code)


COMMANDS = [boot, live_migrate, live_migration_force_complete, live_migration_abort, resize,
            migrate, confirm, revert, event, console, show, list_, demo]
