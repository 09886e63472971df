"""The ``orchestrator`` command line.

Operation commands check the request, record it and return once its first step is queued,
printing the operation id; ``wait`` follows it. Every command takes ``--json``. Errors go to
stderr (or as ``{"error": ...}`` with ``--json``) with exit status 2, and nothing is sent.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from orchestrator import operations, registry, views
from orchestrator.app import app, routing_table
from orchestrator.fleet import worker_command
from orchestrator.models import Operation
from orchestrator.state import UnknownOperation

EXIT_ERROR = 2
EXIT_NOT_COMPLETED = 1
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _emit(as_json: bool, data: Any, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the domain's errors into a message and exit status 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (operations.OperationError, UnknownOperation, TimeoutError) as exc:
            if kwargs.get("as_json"):
                click.echo(json.dumps({"error": str(exc)}))
            else:
                click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_ERROR)

    return wrapper


def _accepted(as_json: bool, op: Operation, instance: str) -> None:
    _emit(
        as_json, {"operation": op.id, "instance": instance},
        f"operation {op.id} ({op.kind}) accepted for {instance}",
    )


@click.group()
def main() -> None:
    """Celery task orchestration with shutdown-aware (alt queue) routing."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("host")
@click.option("--main-only", "queues", flag_value="main", help="Consume only <host>.")
@click.option("--alt-only", "queues", flag_value="alt", help="Consume only <host>-alt.")
@click.option(
    "--legacy", is_flag=True,
    help=f"Run the previous service version ({registry.LEGACY_SERVICE_VERSION}): consumes only "
    "<host>, as a host not yet upgraded.",
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(host: str, queues: str | None, legacy: bool, celery_args: tuple[str, ...]) -> None:
    """Run the worker of HOST: celery worker -n HOST@%h -Q HOST,HOST-alt [CELERY_ARGS]."""
    if legacy and queues == "alt":
        raise click.UsageError("--legacy consumes only <host>; it cannot be --alt-only")
    command = worker_command(
        host, queues or "both", celery_args, legacy=legacy  # type: ignore[arg-type]
    )
    os.execv(command[0], command)


@main.command()
@click.argument("host")
@json_option
@handles_errors
def drain(host: str, as_json: bool) -> None:
    """Start HOST's drain remotely, as SIGTERM would."""
    operations.check_host(host)
    nodes = [v.nodename for v in registry.services(host) if v.state != "down"]
    if not nodes:
        raise operations.UnknownHost(f"host {host!r} has no running worker")
    replies = app.control.broadcast("drain", destination=nodes, reply=True, timeout=5)
    answered = {name: reply for r in replies for name, reply in r.items()}
    _emit(
        as_json, {"host": host, "replies": answered},
        "\n".join(f"{name}: {reply}" for name, reply in answered.items()) or "no reply",
    )
    if not answered:
        sys.exit(EXIT_NOT_COMPLETED)


@main.command()
@json_option
@handles_errors
def hosts(as_json: bool) -> None:
    """Hosts: service version, up/draining/down, where alt steps go, queues, operations in
    flight, and what waits on a queue nobody consumes."""
    data = views.hosts(app)
    lines = [
        f"{'HOST':<14}{'STATE':<10}{'VERSION':<9}{'ALT STEPS TO':<18}{'FALLBACKS':<11}"
        f"{'IN FLIGHT':<11}QUEUED"
    ]
    notes = []
    for h in data:
        queued = ", ".join(f"{q}={n}" for q, n in h["queued"].items())
        lines.append(
            f"{h['host']:<14}{h['state']:<10}{h['version']:<9}{h['alt_steps_to']:<18}"
            f"{sum(h['alt_fallbacks'].values()):<11}{h['operations_in_flight']:<11}{queued}"
        )
        notes += [f"{h['host']}: {note}" for note in h["notes"]]
    mode = data[0]["alt_routing"] if data else views.alt_routing_mode()
    lines.append(f"alt routing: {mode} (ORCHESTRATOR_ALT_ROUTING)")
    _emit(as_json, data, "\n".join(lines + notes))


@main.command()
@click.argument("name")
@click.option("--host", required=True, help="Compute host to build on.")
@click.option("--flavor", default="m1.small", show_default=True)
@json_option
@handles_errors
def boot(name: str, host: str, flavor: str, as_json: bool) -> None:
    """Boot instance NAME on HOST."""
    _accepted(as_json, operations.boot(name, host, flavor), name)


@main.command(name="live-migrate")
@click.argument("instance")
@click.option("--to", "dest", required=True, help="Destination host.")
@json_option
@handles_errors
def live_migrate(instance: str, dest: str, as_json: bool) -> None:
    """Live-migrate INSTANCE to another host."""
    _accepted(as_json, operations.live_migrate(instance, dest), instance)


@main.command(name="live-migration-force-complete")
@click.argument("instance")
@json_option
@handles_errors
def live_migration_force_complete(instance: str, as_json: bool) -> None:
    """Force INSTANCE's running live migration to complete now."""
    _accepted(as_json, operations.live_migration_force_complete(instance), instance)


@main.command(name="live-migration-abort")
@click.argument("instance")
@json_option
@handles_errors
def live_migration_abort(instance: str, as_json: bool) -> None:
    """Abort INSTANCE's live migration (it is rolled back; the instance stays on its host)."""
    _accepted(as_json, operations.live_migration_abort(instance), instance)


@main.command()
@click.argument("instance")
@click.option("--flavor", required=True)
@click.option("--to", "dest", default=None, help="Destination host (default: same host).")
@click.option("--cross-cell", is_flag=True, help="Snapshot-based resize to another cell.")
@json_option
@handles_errors
def resize(
    instance: str, flavor: str, dest: str | None, cross_cell: bool, as_json: bool
) -> None:
    """Resize INSTANCE to FLAVOR (on another host with --to)."""
    op = operations.resize(instance, flavor=flavor, dest=dest, cross_cell=cross_cell)
    _accepted(as_json, op, instance)


@main.command()
@click.argument("instance")
@click.option("--to", "dest", required=True, help="Destination host.")
@json_option
@handles_errors
def migrate(instance: str, dest: str, as_json: bool) -> None:
    """Cold-migrate INSTANCE to another host (a resize that keeps the flavor)."""
    _accepted(as_json, operations.resize(instance, dest=dest), instance)


@main.command()
@click.argument("instance")
@json_option
@handles_errors
def confirm(instance: str, as_json: bool) -> None:
    """Confirm INSTANCE's pending resize or migration."""
    _accepted(as_json, operations.confirm(instance), instance)


@main.command()
@click.argument("instance")
@json_option
@handles_errors
def revert(instance: str, as_json: bool) -> None:
    """Revert INSTANCE's pending resize or migration."""
    _accepted(as_json, operations.revert(instance), instance)


@main.command()
@click.argument("instance")
@click.argument("name")
@json_option
@handles_errors
def event(instance: str, name: str, as_json: bool) -> None:
    """Deliver external event NAME (e.g. network-vif-plugged) to INSTANCE's host."""
    _accepted(as_json, operations.external_event(instance, name), instance)


@main.command()
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
    data = _wait_until_ended(op.id, wait_s)
    result = data["result"] or {}
    _emit(as_json, {"operation": op.id, "instance": instance, "status": data["status"],
                    **result}, result.get("output") or result.get("url") or data["status"])
    if data["status"] != "completed":
        sys.exit(EXIT_NOT_COMPLETED)


@main.command()
@click.argument("instance")
@json_option
@handles_errors
def show(instance: str, as_json: bool) -> None:
    """Show an instance (by name or id)."""
    data = views.show_instance(instance)
    _emit(as_json, data, "\n".join(f"{k}: {v}" for k, v in data.items()))


@main.command(name="list")
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
    _emit(as_json, data, "\n".join(lines) or "no instances")


@main.command()
@click.argument("operation_id")
@json_option
@handles_errors
def operation(operation_id: str, as_json: bool) -> None:
    """Show an operation and where each of its steps ran."""
    data = views.operation_dict(operation_id)
    lines = [f"{data['kind']} {data['operation']} on {data['instance']}: {data['status']}"]
    lines += [
        f"  {s['position']}. {s['step']}@{s['host']}: {s['status']} (attempts {s['attempts']})"
        for s in data["steps"]
    ]
    current = data["current_step"]
    if current is not None:
        lines.append(
            f"  now: {current['step']}@{current['host']} {current['state']}"
            f"{' in ' + current['queue'] if current['queue'] else ''}"
            f" (host {current['host_state']})"
        )
        if current["waiting"]:
            lines.append(f"  waiting: {current['waiting']}")
    if data["error"]:
        lines.append(f"  error: {data['error']}")
    _emit(as_json, data, "\n".join(lines))


def _wait_until_ended(operation_id: str, timeout: float) -> dict[str, Any]:
    """The operation once ended, or as it stands when ``timeout`` passes."""
    try:
        return views.wait_operation(operation_id, timeout=timeout)
    except TimeoutError:
        return views.operation_dict(operation_id)


@main.command()
@click.argument("operation_id")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait.")
@json_option
@handles_errors
def wait(operation_id: str, timeout: float, as_json: bool) -> None:
    """Wait for an operation to end: exit 0 if it completed, 1 otherwise."""
    data = _wait_until_ended(operation_id, timeout)
    _emit(as_json, data, f"{data['kind']} {data['operation']}: {data['status']}")
    if data["status"] != "completed":
        sys.exit(EXIT_NOT_COMPLETED)


@main.command()
@json_option
def routing(as_json: bool) -> None:
    """Show the routing table loaded from routing.yaml (it was validated to get here)."""
    data = {
        "file": str(routing_table.path),
        "steps": {s: {"queue": r.queue, "reason": r.reason}
                  for s, r in sorted(routing_table.routes.items())},
    }
    lines = [f"{step:<32}{r['queue']:<6}{r['reason']}" for step, r in data["steps"].items()]
    _emit(as_json, data, "\n".join(lines))


@main.command()
@click.option("--step-delay", default=3.0, show_default=True,
              help="Seconds resize_instance takes, so the drain happens mid-operation.")
def demo(step_delay: float) -> None:
    """Show a host draining mid-resize (embedded Redis when no broker is configured)."""
    from orchestrator.demo import run_demo

    sys.exit(run_demo(step_delay))
