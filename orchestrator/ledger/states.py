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


class Happening(StrEnum):
    """What happened to an operation off its normal path, as its history records it (the
    ``history`` table: :meth:`orchestrator.ledger.store.Ledger.note`). The normal path (a step
    delivered, run, completed, the next one sent) is the step log's and writes no history."""

    #: A draining worker gave a step it had not started back to the broker (for a worker
    #: that stays, or for its own restart).
    HANDED_BACK = "handed-back"
    #: A step running at a drain's deadline (or a second SIGTERM): its message goes back to
    #: the broker unacknowledged when the worker stops.
    REQUEUED = "requeued"
    #: Delivered to a worker whose code does not run it: held for one whose code does.
    HELD = "held"
    #: Taken as lost (its sender died, its worker is gone, or it was held) and sent again.
    RESENT = "resent"
    #: An attempt that raised an unexpected error: sent again after a backoff.
    RETRIED = "retried"
    #: Delivered again after an attempt that did not end (a crash, a lost worker, a stop).
    REDELIVERED = "redelivered"
    #: Its work done, the step waits for an event, holding no worker.
    WAITING = "waiting"
    #: The event a waiting step waited for arrived.
    EVENT_ARRIVED = "event-arrived"
    #: The event did not come in time: the step failed.
    WAIT_TIMED_OUT = "wait-timed-out"
    #: A step failed (its error recorded); the operation ends, or its rollback starts.
    FAILED = "failed"
    #: A step failed and the flow's rollback steps now run.
    ROLLBACK_STARTED = "rollback-started"
    #: The broker refused the first step: the operation ended before it began.
    ABANDONED = "abandoned"
    #: The broker refused a later step: it is sent again by the looks for stranded steps.
    NOT_SENT = "not-sent"
    #: An alt step sent to ``<host>``, not ``<host>-alt`` (the host's worker does not consume
    #: its alt queue, or is not known).
    ROUTED_TO_MAIN = "routed-to-main"
