"""What a draining host still waits for: a pure function of what the ledger, the registry and
this worker say, so that each case is a unit test (``tests/test_leftover.py``).

A drain waits for an operation in flight that still needs its host only while the operation
can progress: waiting for one that cannot only runs out the deadline. Whether it can depends
on where its current step is (running, waiting for an event, queued in a queue someone
consumes, not yet sent, held for a worker that serves it) and on who is alive to take it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from orchestrator import registry
from orchestrator.ledger.models import Operation
from orchestrator.looks import UNPUBLISHED_GRACE
from orchestrator.registry import ServiceView


@dataclass
class Waiting:
    """What keeps a draining host from exiting."""

    running: list[str] = field(default_factory=list)
    operations: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.running or self.operations)

    def as_dict(self) -> dict[str, list[str]]:
        return {"running": self.running, "operations": self.operations, "blocked": self.blocked}

    def describe(self) -> str:
        parts = []
        if self.running:
            parts.append(f"{len(self.running)} step(s) running here: {', '.join(self.running)}")
        if self.operations:
            parts.append(
                f"{len(self.operations)} operation(s) in flight: {'; '.join(self.operations)}"
            )
        if self.blocked:
            parts.append(
                f"{len(self.blocked)} not waited for (next step on a queue nobody consumes): "
                + "; ".join(self.blocked)
            )
        return ", ".join(parts) or "nothing"



def describe_operation(op: Operation) -> str:
    step, host = op.current or ("-", "-")
    return f"{op.kind} {op.id} at {step}@{host} ({op.step_state})"


def unserved_here(op: Operation, host: str, serves: Callable[[str], bool]) -> list[str]:
    """The steps the operation has left on ``host``, if this code registers none of them."""
    mine = [step for step, where in op.plan[op.position:] if where == host]
    if not mine or any(serves(step) for step in mine):
        return []
    return sorted(set(mine))


def what_is_left(
    needing: list[Operation], views: list[ServiceView], *, host: str,
    ran_here: Collection[str], serves: Callable[[str], bool], now: float,
) -> Waiting:
    """The operations a drain of ``host`` waits for, and those it does not (blocked).

    ``needing``: the operations in flight that still need ``host``; ``views``: the registry
    (silent workers already asked over the broker); ``ran_here``: operations whose current
    step this worker started but no longer holds (its pool process died); ``serves``: whether
    this worker's code registers a step."""
    waiting = Waiting()
    for op in needing:
        step, where = op.current or (None, None)
        if step is None or where is None:
            continue
        live = registry.consumers(views, where)
        unserved = unserved_here(op, host, serves)
        if unserved:
            # This code cannot run what the operation needs here (a deploy renamed or
            # removed it): waiting would only run out the deadline. workers.held.
            waiting.blocked.append(f"{describe_operation(op)}: this code does not register "
                                   + ", ".join(unserved))
            continue
        if op.step_state == "held":
            # Taken by a worker whose code does not register it (workers.held): it runs
            # once a worker of its host that serves it sends it again.
            progressing = any(v.host == where and v.state != "down" and v.serves(step)
                              for v in views)
        elif op.id in ran_here:
            # Started by this worker but no longer held here: its pool process died and
            # the message went back to its queue. It progresses only if that queue is
            # consumed (our alt queue: it comes straight back here; our main queue: not
            # while we drain, so waiting for it would only run out the deadline).
            progressing = live.consumes(op.queue) if op.queue else False
        elif op.step_state in ("running", "waiting"):
            # A live worker of that host will finish it, if one was alive when it began:
            # a step left "running" by a killed worker waits for its message to return.
            progressing = any(
                v.host == where and v.state != "down" and v.started_at <= op.step_since
                for v in views
            )
        elif op.queue is None or not op.next_published:
            # Not yet published: it soon will be, by its sender or, if that one died or
            # could not reach the broker, by the resend of its host (workers.resend), as
            # long as that host has a live worker (this one too). op.queue still names the
            # previous step's queue: it says nothing here.
            progressing = live.alive or now - op.step_since < UNPUBLISHED_GRACE
        else:
            # The queue the router actually chose: <host>-alt, or <host> when the target
            # is a legacy host or alt routing fell back; a legacy host consumes only the
            # latter, and only while it is up (not draining).
            progressing = live.consumes(op.queue)
        (waiting.operations if progressing else waiting.blocked).append(describe_operation(op))
    return waiting
