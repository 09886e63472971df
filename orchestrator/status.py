"""An operation's status as a plain dict (``orch.operation``, ``orch.wait``, the CLI's and
Flower's JSON), its timeline as text, and waiting on it: the engine's view of one operation.

The fleet's views (hosts, operations lists, outages) are the operator's, in
:mod:`orchestrator.ops.views`; this one stays beside the engine because ``orch.wait`` returns
it and the test kit waits on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from orchestrator import registry, timeline
from orchestrator.errors import UnknownOperation
from orchestrator.ledger.models import Operation


def operation_dict(orch: Any, operation_id: str, with_timeline: bool = False) -> dict[str, Any]:
    """The operation's status: its steps, where the current one waits, its params; with
    ``with_timeline``, its timeline too (``timeline``: entries oldest first; ``lanes``: the
    same per host, for a chart), which reads its history and its hosts' drains."""
    if not isinstance(operation_id, str) or not operation_id.isprintable() \
            or len(operation_id) > 64 or not operation_id.isascii():
        raise UnknownOperation(f"unknown operation {operation_id!r}")
    found = orch.ledger.view(operation_id)
    if found is None:
        raise UnknownOperation(f"unknown operation {operation_id!r}")
    op, rows = found
    steps = [timeline.StepRow(*row) for row in rows]
    current = op.current
    # (the fleet's registry only for an operation with a step to place: an ended one, what
    # orch.wait returns, reads its own rows alone)
    services = orch.registry.services() if current is not None else []
    data = {
        "operation": op.id, "kind": op.kind, "subject": op.subject,
        "status": op.status, "error": op.error, "result": op.result,
        "hosts": dict(op.hosts or {}), "params": dict(op.params or {}),
        "current_step": None if current is None else _current_step(op, *current, services),
        "plan": [{"step": step, "host": host} for step, host in op.plan],
        "steps": [asdict(row) for row in steps],
        "age_seconds": round(time.time() - op.created_at, 3),
        "created_at": op.created_at, "finished_at": op.finished_at,
    }
    if with_timeline:
        hosts = {host for _, host in op.plan}
        drains = orch.registry.drains(hosts, op.created_at, op.finished_at)
        entries = timeline.timeline(op, steps, orch.ledger.history(op.id), drains)
        data["timeline"] = entries
        data["lanes"] = timeline.lanes(op, steps, entries, drains, time.time())
    if orch.describers:  # the application's own fields, from its own tables
        with orch.db.read() as s:
            for describe in orch.describers:
                describe(s, op, data)
    return data


def timeline_lines(orch: Any, operation_id: str) -> list[str]:
    """The operation's timeline as text, a line per entry (``orchestrator operation ID``
    prints these): what an application shows of an operation's way."""
    data = operation_dict(orch, operation_id, with_timeline=True)
    return timeline.lines(data["timeline"], data["created_at"])


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
    if op.step_state in ("queued", "held"):
        waiting = registry.unserved(views, host, step, held=op.step_state == "held")
    if waiting is not None:
        pass
    elif op.step_state == "queued" and queue is not None and not consumed:
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
    elif op.step_state == "waiting" and op.wait:
        waiting = (f"for event {op.wait['event']} on {op.wait['key']} (until "
                   f"{max(0.0, op.wait['deadline'] - time.time()):.0f}s from now)")
    return {
        "step": step, "host": host, "state": op.step_state,
        "queue": queue, "host_state": host_state, "queue_consumed": consumed,
        "waiting": waiting,
    }


def ended(data: dict[str, Any]) -> bool:
    """The operation is in a terminal state."""
    return data["status"] in ("completed", "failed")


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05
) -> object:
    """Poll ``condition`` until it returns something truthy; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def wait_operation(
    orch: Any, operation_id: str, until: Callable[[dict[str, Any]], bool] = ended,
    timeout: float = 30.0, what: str = "",
    view: Callable[[str], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Poll the operation until ``until`` holds; its view then. TimeoutError after ``timeout``."""
    show = view or (lambda op_id: operation_dict(orch, op_id))

    def check() -> dict[str, Any] | None:
        data = show(operation_id)
        return data if until(data) else None

    return wait_for(check, timeout, what or f"operation {operation_id}")  # type: ignore[return-value]
