"""``orchestrator --app NEW deploy check``: what the new code would not serve, before it rolls out.

A rolling deploy replaces a host's workers with new code while operations are in flight. Each
operation keeps the plan (and the rollback) it was submitted with, so a step the new code no
longer registers (renamed without an alias, or removed) can only wait, held, for a worker that
serves it (``workers.held``). This check loads the new code, reads the ledger's operations in
flight and the step messages waiting in the host queues, and names what would wait that way,
and routing.yaml entries the new code would refuse. Temporal pins an execution to the build
that started it, DBOS recovers a workflow only on its own application version; here the
operator is told beforehand, and can wait for those operations, add an alias, or keep a host
on the old code until they are done.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from orchestrator.broker import peek_task_names
from orchestrator.ledger.models import Operation
from orchestrator.ledger.store import ACTIVE_STATUSES
from orchestrator.routing import RoutingError, alt_queue, load_routing


def steps_left(op: Operation) -> list[tuple[str, str]]:
    """The (step, host) pairs the operation may still run: the rest of its plan, and its
    recorded rollback while a step that would trigger it is still ahead."""
    left = [(str(step), str(host)) for step, host in op.plan[op.position:]]
    rollback = op.rollback or {}
    if any(step in rollback.get("on", ()) for step, _ in left):
        left += [(str(step), str(host)) for step, host in rollback.get("plan", ())]
    return left


def check(orch: Any) -> dict[str, Any]:
    """What the code ``orch`` belongs to would strand; ``ok`` is False if anything."""
    orch.load_steps()
    served = orch.served_steps()
    stranded: dict[tuple[str, str], list[str]] = {}
    with orch.db.read() as s:
        ops = s.execute(select(Operation).where(Operation.status.in_(ACTIVE_STATUSES))
                        .order_by(Operation.created_at)).scalars().all()
    for op in ops:
        for step, host in dict.fromkeys(steps_left(op)):
            if step not in served:
                stranded.setdefault((step, host), []).append(op.id)
    hosts = sorted({v.host for v in orch.registry.services()}
                   | {host for _, host in stranded}
                   | {str(h) for op in ops for _, h in op.plan})
    peeked = peek_task_names(orch.app, [q for h in hosts for q in (h, alt_queue(h))])
    messages: dict[str, dict[str, int]] = {}
    for queue, names in (peeked or {}).items():
        for name in names:
            step = name[len(orch.task_prefix):] if name.startswith(orch.task_prefix) else name
            if step not in served:
                messages.setdefault(queue, {}).setdefault(step, 0)
                messages[queue][step] += 1
    try:
        load_routing(orch.routing_file, served, orch.code_version, orch.routing_origin)
        routing_error = None
    except RoutingError as exc:
        routing_error = str(exc)
    return {
        "ok": not stranded and not messages and routing_error is None,
        "code_version": orch.code_fingerprint,
        "operations_in_flight": len(ops),
        "stranded": [{"step": step, "host": host, "operations": ids}
                     for (step, host), ids in sorted(stranded.items())],
        "messages": messages,
        "messages_inspected": peeked is not None,
        "routing": {"file": str(orch.routing_file), "error": routing_error},
    }


def describe(result: dict[str, Any]) -> list[str]:
    lines = [f"deploy check: code {result['code_version']}, "
             f"{result['operations_in_flight']} operation(s) in flight"]
    for item in result["stranded"]:
        n = len(item["operations"])
        lines.append(f"  {n} operation(s) need {item['step']} on {item['host']}; this code "
                     f"does not register it: {', '.join(item['operations'])}")
    for queue, steps in sorted(result["messages"].items()):
        for step, n in sorted(steps.items()):
            lines.append(f"  {n} message(s) for {step} wait in {queue}; this code does not "
                         "register it")
    if not result["messages_inspected"]:
        lines.append("  queues not inspected (this broker cannot look at a message without "
                     "taking it); the ledger's queued steps stand for them")
    routing = result["routing"]
    lines.append(f"  routing: {routing['error']}" if routing["error"]
                 else f"  routing: {routing['file']} accepted")
    strands = bool(result["stranded"] or result["messages"])
    if strands:
        lines.append("this code would strand the above: wait for those operations, add an "
                     "alias (@orch.step(aliases=[...])), or keep their hosts on the old code")
    else:
        lines.append("nothing would be stranded")
    if routing["error"]:
        lines.append("this code's routing.yaml would be refused: every worker of it would stop "
                     "at start; fix the file (or the steps it names) before the rollout")
    return lines
