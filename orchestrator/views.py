"""Read-only views of instances, operations and hosts, as plain dicts (the CLI's JSON)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from orchestrator import db, registry
from orchestrator.broker import queue_depths
from orchestrator.models import Instance, Migration, Operation, StepRecord
from orchestrator.operations import find_instance
from orchestrator.routing import alt_queue
from orchestrator.state import ACTIVE_STATUSES, UnknownOperation


def instance_dict(instance: Instance) -> dict[str, Any]:
    return {
        "id": instance.id, "name": instance.name, "host": instance.host,
        "flavor": instance.flavor, "vm_state": instance.vm_state,
        "task_state": instance.task_state,
    }


def show_instance(ref: str) -> dict[str, Any]:
    with db.read() as s:
        instance = find_instance(s, ref)
        out = instance_dict(instance)
        mig = s.execute(
            select(Migration).where(Migration.instance_id == instance.id)
            .order_by(Migration.id.desc())
        ).scalars().first()
        out["migration"] = None if mig is None else {
            "id": mig.id, "source": mig.source, "dest": mig.dest, "status": mig.status,
            "old_flavor": mig.old_flavor, "new_flavor": mig.new_flavor,
        }
        return out


def list_instances() -> list[dict[str, Any]]:
    with db.read() as s:
        rows = s.execute(select(Instance).order_by(Instance.name)).scalars().all()
        return [instance_dict(i) for i in rows]


def operation_dict(operation_id: str) -> dict[str, Any]:
    services = registry.services()
    with db.read() as s:
        op = s.get(Operation, operation_id)
        if op is None:
            raise UnknownOperation(f"unknown operation {operation_id!r}")
        instance = s.get(Instance, op.instance_id)
        steps = s.execute(
            select(StepRecord).where(StepRecord.operation_id == op.id)
            .order_by(StepRecord.position)
        ).scalars().all()
        current = op.current
        return {
            "operation": op.id, "kind": op.kind,
            "instance": instance.name if instance else op.instance_id,
            "status": op.status, "error": op.error, "result": op.result,
            "current_step": None if current is None else _current_step(op, *current, services),
            "plan": [{"step": step, "host": host} for step, host in op.plan],
            "steps": [
                {"position": r.position, "step": r.step, "host": r.host, "status": r.status,
                 "attempts": r.attempts, "worker": r.worker}
                for r in steps
            ],
            "age_seconds": round(time.time() - op.created_at, 3),
        }


def _current_step(
    op: Operation, step: str, host: str, views: list[registry.ServiceView],
) -> dict[str, Any]:
    """The step at the operation's position: where it waits, and whether anyone takes it.

    A request sent to a draining or down host is accepted and waits in that host's queue, as
    in Nova; this says so instead of showing a bare "queued".
    """
    # op.queue names this step's queue once it is published (before that, the previous one's).
    queue = op.queue if op.next_published else None
    host_state = registry.host_state(views, host)
    consumed = None if queue is None else registry.consumers(views, host).consumes(queue)
    waiting = None
    if op.step_state == "queued" and queue is not None and not consumed:
        if host_state == "draining":
            waiting = (f"in {queue}: host {host} is draining and takes no new work from it; "
                       f"the step runs when {host} restarts")
        elif host_state in ("down", "unknown"):
            waiting = (f"in {queue}: host {host} is {host_state}; the step runs when a worker "
                       f"for {host} starts")
        else:
            waiting = (f"in {queue}, which no running service of {host} consumes; the step "
                       f"runs when one does (a version-{registry.ALT_SERVICE_VERSION} worker "
                       f"for {queue})")
    return {
        "step": step, "host": host, "state": op.step_state,
        "queue": queue, "host_state": host_state, "queue_consumed": consumed,
        "waiting": waiting,
    }


def alt_routing_mode() -> str:
    from orchestrator.app import step_router

    return step_router.mode


def _alt_steps_to(mode: str, status: str, host: str) -> str:
    if mode == "always" or (mode == "auto" and status == "alt"):
        return alt_queue(host)
    return host


def _host_notes(
    host: str, state: str, queued: dict[str, int], alt_consumed: bool,
) -> list[str]:
    notes = []
    waiting_main = queued.get(host, 0)
    if waiting_main and state != "up":
        notes.append(
            f"{waiting_main} message(s) wait in {host}: the host is {state} and takes no new "
            "work; they run when it (re)starts"
        )
    waiting_alt = queued.get(alt_queue(host), 0)
    if waiting_alt and not alt_consumed:
        notes.append(
            f"{waiting_alt} message(s) wait in {alt_queue(host)}, which no running "
            f"version-{registry.ALT_SERVICE_VERSION} service consumes; they run when one does "
            f"(orchestrator worker {host}, or --alt-only)"
        )
    return notes


def hosts(app: Any | None = None) -> list[dict[str, Any]]:
    """Each known host: its services, state, where alt steps go, queue depths and operations
    in flight, and notes on work waiting in a queue nobody consumes."""
    views = registry.services()
    mode = alt_routing_mode()
    snapshot = registry.alt_snapshot(views)
    fallbacks = registry.fallback_counts()
    with db.read() as s:
        active = s.execute(
            select(Operation).where(Operation.status.in_(ACTIVE_STATUSES))
        ).scalars().all()
        in_flight: dict[str, int] = {}
        for op in active:
            for host in op.remaining_hosts():
                in_flight[host] = in_flight.get(host, 0) + 1
    known = sorted({v.host for v in views})
    depths = queue_depths(app, [q for h in known for q in (h, alt_queue(h))]) if app else {}
    out = []
    for host in known:
        mine = [v for v in views if v.host == host]
        live = [v for v in mine if v.state != "down"]
        state = registry.host_state(views, host)
        status = snapshot.status(host)
        entry: dict[str, Any] = {
            "host": host, "state": state,
            # The running services' version (the last one known when all are down).
            "version": max(v.version for v in (live or mine)),
            "queues": sorted({host for v in live if v.consumes_main}
                             | {alt_queue(host) for v in live if v.consumes_alt}),
            "alt_routing": mode,
            "alt_support": status,
            "alt_steps_to": _alt_steps_to(mode, status, host),
            "alt_fallbacks": fallbacks.get(host, {}),
            "operations_in_flight": in_flight.get(host, 0),
            "services": [
                {"nodename": v.nodename, "state": v.state, "version": v.version,
                 "consumes_main": v.consumes_main, "consumes_alt": v.consumes_alt,
                 "heartbeat_age": round(v.heartbeat_age, 1)}
                for v in mine
            ],
            "notes": [],
        }
        if app is not None:
            entry["queued"] = {q: depths[q] for q in (host, alt_queue(host))}
            entry["notes"] = _host_notes(
                host, state, entry["queued"], registry.consumers(views, host).alt
            )
        out.append(entry)
    return out


def ended(data: dict[str, Any]) -> bool:
    """The operation is in a terminal state."""
    return data["status"] in ("completed", "failed")


def wait_operation(
    operation_id: str, until: Callable[[dict[str, Any]], bool] = ended, timeout: float = 30.0,
    what: str = "",
) -> dict[str, Any]:
    """Poll the operation until ``until`` holds; its view then. TimeoutError after ``timeout``."""
    from orchestrator.fleet import wait_for

    def check() -> dict[str, Any] | None:
        data = operation_dict(operation_id)
        return data if until(data) else None

    return wait_for(check, timeout, what or f"operation {operation_id}")  # type: ignore[return-value]
