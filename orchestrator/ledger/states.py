"""An operation's statuses and its current step's states, and the moves between them, as data.

The ledger's statements are built from :data:`MOVES`: each transition's guard is the states it
may start from, so a step recorded as waiting for an event is never claimed, a step handed to
a worker that serves it is held only while queued, and so on. The statements
(:mod:`orchestrator.ledger.statements`) are the only writers of these columns; nothing outside
this package writes a state (the layout test checks it).

The values are the strings stored in the ``operations.status`` and ``operations.step_state``
columns; the enums are :class:`~enum.StrEnum`, so they compare equal to what a row holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class OperationStatus(StrEnum):
    #: Recorded, its first step sent, no attempt of it counted yet.
    QUEUED = "queued"
    #: Some step was started (or a rollback runs: then ``error`` says why).
    RUNNING = "running"
    COMPLETED = "completed"
    #: Ended by a step that failed (after the flow's rollback steps, if it has some).
    FAILED = "failed"


#: An operation in flight: its current step may still move.
ACTIVE = (OperationStatus.QUEUED, OperationStatus.RUNNING)
#: An operation that has ended.
ENDED = (OperationStatus.COMPLETED, OperationStatus.FAILED)


class StepState(StrEnum):
    """The state of the step at an operation's ``position``."""

    #: A message was sent for it (or, with ``next_published`` false, is about to be).
    QUEUED = "queued"
    #: Recorded as running: a step that took a while (its claim) or whose attempt failed and
    #: is retried.
    RUNNING = "running"
    #: Its work is done; it waits for an event, holding no worker.
    WAITING = "waiting"
    #: Delivered to a worker whose code does not run it: sent again by one whose code does.
    HELD = "held"


class StepLogStatus(StrEnum):
    """A step's row in the step log."""

    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class Move:
    """A transition of an operation in flight: the states its current step may be in for it
    to happen, and the state it leaves the step in (the next step's, after a completion; the
    first rollback step's, after a failure). ``ends``: it may end the operation instead."""

    start: frozenset[StepState]
    to: StepState
    ends: bool = False


_ALL = frozenset(StepState)
_Q, _R, _W, _H = StepState.QUEUED, StepState.RUNNING, StepState.WAITING, StepState.HELD

#: Every move of an operation in flight, by the ledger method that makes it. (Counting an
#: attempt that will be retried, ``record_attempt``, moves the operation to running and leaves
#: its step's state as it is: the retry is already on its way.)
MOVES: dict[str, Move] = {
    # A step that takes a while is recorded as running; never one waiting for its event.
    "claim_step": Move(frozenset({_Q, _R, _H}), _R),
    # The step is done: its operation's next step is queued, or the operation ends. From
    # waiting when its event arrived.
    "complete": Move(_ALL, _Q, ends=True),
    # Its work done, the step waits for an event.
    "wait_for_event": Move(frozenset({_Q, _R, _H}), _W),
    # The step failed: the first rollback step is queued, or the operation ends failed. From
    # waiting when its event did not come in time.
    "fail_step": Move(_ALL, _Q, ends=True),
    # Delivered to a worker whose code does not run it.
    "hold_step": Move(frozenset({_Q, _H}), _H),
    # Taken as lost and sent again (by the one process that claims the resend).
    "claim_resend": Move(frozenset({_Q, _R, _H}), _Q),
    # The first step could not even be queued: the operation ends failed.
    "abandon": Move(frozenset({_Q}), _Q, ends=True),
}
