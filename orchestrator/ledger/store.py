"""The ledger: operation state transitions, written so that any step may be delivered twice.

A step runs in three moves: :meth:`Ledger.begin_step` (may it run? a read), the step's work (slow,
outside any transaction), then :meth:`Ledger.complete`, which records the attempt, applies the
step's effect, merges what the step returned into the operation's params, advances the operation and
records the next step as sent, in one transaction guarded by the operation's ``position``
(statements built once per dialect, no ORM; an effect's own rows through the application's ORM
session on the same connection): a second delivery of the same step finds the position moved on and
changes nothing. So an executed step costs one write transaction. A step that runs longer than a
moment is also recorded as running while it runs (:meth:`Ledger.claim_step`, from a timer in the
worker), so operators and drains see it; a short one is not worth that second write.

The next step's message is published after the commit; if that publish fails, or the process
dies before it, a redelivery of the step (or the stranded-step resend) publishes it again, so
nothing is stranded.

A step's message whose position is ahead of the operation's in the ledger can only follow a
ledger that went back in time: a failover to an asynchronous standby that had not received the
completion that sent it (docs/FAILOVER.md). Its outcome is "behind": nothing is recorded, and
the step the ledger is at is sent again by the stranded-step resend, then this one after it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import case, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestrator.errors import StepMismatch, SubjectBusy, UnknownOperation
from orchestrator.flows import Flow
from orchestrator.ledger.driver import Transaction
from orchestrator.ledger.engines import Database
from orchestrator.ledger.models import (
    Event,
    Operation,
    OperationHost,
    StepRecord,
    current_of,
    new_id,
)
from orchestrator.ledger.statements import StepStatements, statements_for
from orchestrator.ledger.states import (
    ACTIVE,
    Happening,
    OperationStatus,
    StepLogStatus,
    StepState,
)
from orchestrator.redact import error_text

logger = logging.getLogger("orchestrator")

#: (the name the rest of the engine knows the statuses in flight by)
ACTIVE_STATUSES = ACTIVE

__all__ = ["ACTIVE_STATUSES", "Attempt", "Effect", "Ledger", "StepMismatch", "StepStart",
           "UnknownOperation", "step_task_id"]

#: Applied in the transaction that completes (or fails) a step: exactly once. Its arguments
#: are the application's session and the operation as a :class:`StepOperation`.
Effect = Callable[[Session, Any], None]


def no_effect(s: Session, op: Any) -> None:
    return None


#: An entry's detail is a line: an error's first thousand characters are enough to say why.
MAX_DETAIL = 1000


def step_task_id(operation_id: str, position: int) -> str:
    """The Celery task id of a step's message: the same for every copy of it (redelivery,
    retry, resend), which is how a worker tells which steps it holds."""
    return f"{operation_id}.{position}"


class Settled(list):
    """The waits :meth:`Ledger.settle_waits` finished, as ``(operation_id, next)`` pairs;
    ``still_waiting``: how many of the host's steps still wait for their event."""

    still_waiting: int = 0


@dataclass(frozen=True)
class OperationQuery:
    """Which operations to list (``orchestrator operations``, Flower's Operations page):
    any of ``statuses``, of a flow, for a subject (``*`` a wildcard), that ran or will run
    on a host, in flight with their current step unmoved for ``stuck_after`` seconds; one
    page of them."""

    statuses: tuple[str, ...] = ()
    flow: str | None = None
    subject: str | None = None
    host: str | None = None
    stuck_after: float | None = None
    limit: int = 50
    offset: int = 0


def _like(glob: str) -> str:
    """A glob with ``*`` as a LIKE pattern (``%`` and ``_`` taken literally)."""
    escaped = glob.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


@dataclass(frozen=True)
class Attempt:
    """One delivery of a step as a worker ran it: by whom, since when, and whether it was
    already recorded as running (claimed) while it ran."""

    worker: str
    started_at: float
    claimed: bool = False
    #: The queue the delivery came from (``<host>`` or ``<host>-alt``), if known.
    queue: str | None = None


@dataclass(frozen=True)
class StepStart:
    #: run: do the work; duplicate: already done, drop it; republish: done, but the next step's
    #: message may never have been sent; behind: the ledger has the operation at an earlier
    #: step (it lost what came after: a failover), drop it. From a transition: run (the next
    #: step to send), ended (the operation ended with it), duplicate (nothing changed).
    outcome: Literal["run", "duplicate", "republish", "behind", "ended"]
    next_step: tuple[str, str] | None = None
    next_position: int | None = None
    #: With outcome "run": deliveries of this step so far, this one included.
    attempt: int = 0
    #: With outcome "run" from begin_step: what the step needs to know of its operation.
    kind: str = ""
    subject: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    hosts: dict[str, str] = field(default_factory=dict)
    #: With outcome "run" from begin_step: the plan's next step, if the step succeeds.
    following: tuple[str, str] | None = None
    #: The queue the next step was recorded as sent to, in the transaction that advanced the
    #: operation (the caller then publishes it there); None: publish and record it after.
    queue: str | None = None
    #: With outcome "behind": the position and step the ledger has the operation at.
    ledger_at: tuple[int, str] | None = None
    #: With outcome "run" from begin_step: the rest of what an effect sees
    #: (:class:`StepOperation`).
    plan: list = field(default_factory=list)
    result: dict | None = None
    error: str | None = None


@dataclass
class StepOperation:
    """The operation as a step's effect sees it (``effect(session, operation)``), at the
    step's position, with what the step returned merged into ``params``. An effect may set
    ``result`` (what the operation returns to its caller): it is written with the
    completion. The rest is for reading: a step changes the params by what it returns."""

    id: str
    kind: str
    subject: str | None
    plan: list
    position: int
    params: dict[str, Any]
    hosts: dict[str, str]
    result: dict | None = None
    error: str | None = None

    @property
    def current(self) -> tuple[str, str] | None:
        return current_of(self.plan, self.position)


@dataclass(frozen=True)
class _Completion:
    """One completion's statements and parameters (:meth:`Ledger.complete`): the advance
    named ``name`` (writing the params when ``data``), the step log's record (counting the
    attempt when ``counted``), and at the end of the plan the operation's hosts forgotten."""

    statements: StepStatements
    name: str
    counted: bool
    data: bool
    where: dict[str, Any]
    record: dict[str, Any]

    @property
    def parameters(self) -> dict[str, Any]:
        return {**self.where, **self.record}

    def one_statement(self) -> Any:
        """PostgreSQL: all of it as one statement; None on SQLite."""
        return self.statements.completions.get((self.name, self.counted, self.data))

    def run(self, run: Any) -> bool:
        """In the caller's transaction (``run``): whether the operation advanced."""
        one = self.one_statement()
        if one is not None:
            rows = run(one, **self.parameters)
            return bool(rows and rows[0][0])
        if not run(self.statements.advanced[self.name, self.data], **self.where):
            return False
        statements = self.statements
        run(statements.record_counted if self.counted else statements.record, **self.record)
        if self.name == "end":
            run(statements.forget_hosts, op=self.where["op"])
        return True


def _last_positions(plan: list) -> dict[str, int]:
    """Each host a plan names, and the last position it has there (the host index)."""
    return {host: index for index, (_, host) in enumerate(plan)}


def _behind(at: int, plan: list) -> StepStart:
    return StepStart("behind", ledger_at=(at, plan[at][0]))


class Ledger:
    """Operations and their steps in ``database``; ``flows`` gives each one's rollback."""

    def __init__(self, database: Database, flows: Mapping[str, Flow],
                 tracing: Any = None) -> None:
        self.db, self.flows = database, flows
        #: Told of every entry of an operation's history (orchestrator.tracing.Tracing.noted):
        #: a span event, or a short span in the operation's trace.
        self.tracing = tracing
        #: The thread that records long steps as running in this process (a pool process's
        #: orchestrator.runner.ClaimTimer, made by the first step it runs).
        self.claim_timer: Any = None

    # -- records ---------------------------------------------------------------------------
    @staticmethod
    def holder(s: Session, subject: str) -> Operation | None:
        """The operation in flight that holds ``subject``, if any."""
        return s.execute(select(Operation).where(Operation.holds == subject)).scalar_one_or_none()

    # -- a step's life ---------------------------------------------------------------------
    def begin_step(self, operation_id: str, position: int, step: str,
                   host: str) -> StepStart:
        """May this delivery of the step run? One read of the operation and its step's
        attempts; the completion records the attempt, so a step costs one write."""
        rows = self.db.direct(statements_for(self.db.url).may_run, id=operation_id,
                              position=position)
        if not rows:
            raise UnknownOperation(f"unknown operation {operation_id!r}")
        (at, status, step_state, next_published, plan, kind, subject, params, hosts,
         attempts, result, error) = rows[0]
        if not 0 <= position < len(plan) or tuple(plan[position]) != (step, host):
            raise StepMismatch(
                f"operation {operation_id} has no step {step}@{host} at position {position}")
        active = status in ACTIVE
        if at == position + 1 and active and not next_published:
            current = tuple(plan[at]) if at < len(plan) else None
            return StepStart("republish", current, at, kind=kind, subject=subject)
        if active and at < position:
            return _behind(at, plan)
        if at != position or not active or step_state == StepState.WAITING:
            return StepStart("duplicate")
        following = plan[position + 1] if position + 1 < len(plan) else None
        return StepStart("run", attempt=(attempts or 0) + 1, kind=kind, subject=subject,
                         params=dict(params or {}), hosts=dict(hosts or {}),
                         following=tuple(following) if following else None, plan=plan,
                         result=result, error=error)

    def complete(self, operation_id: str, position: int, step: str, host: str,
                 start: StepStart, *, output: Mapping[str, Any] | None = None,
                 effect: Effect | None = None, next_queue: str | None = None,
                 attempt: Attempt | None = None) -> StepStart:
        """Record the step done and move its operation on; returns what to publish next.

        One statement set per dialect, no ORM: advance the operation, guarded by its
        position (nothing advanced: a duplicate, or a ledger behind), with ``output`` merged
        into its params; record ``attempt`` in the step log (unless its claim did); at the
        end of the plan forget its hosts. On PostgreSQL that is one statement, on SQLite one
        ``BEGIN IMMEDIATE`` transaction. With ``effect``, the effect runs in the same
        transaction on the same connection, after the advance (so a duplicate never applies
        it), and a ``result`` it sets is written there too.

        With ``next_queue`` (where the router sends the plan's next step) the next step is
        recorded as sent there, and the caller publishes it after the commit: one write per
        executed step. If that publish fails, :meth:`unpublish` puts it back to "not sent"
        (the retried step sends it again); if the process dies in between, the stranded-step
        resend sends it. ``start``: what :meth:`begin_step` read (the plan changes only when
        this very step fails)."""
        statements, now = statements_for(self.db.url), time.time()
        following = start.following
        counted = attempt is not None and not attempt.claimed
        if effect is no_effect:
            effect = None
        where: dict[str, Any] = {"op": operation_id, "at": position,
                                 "next_position": position + 1, "now": now}
        if following is None:  # the plan is done; after a rollback the operation failed
            name = "end"
        else:
            # (an execute's parameter named after a column is also SET: "queue" only when sent)
            name = "advance" if next_queue is None else "advance_sent"
            where["next_host"] = following[1]
            if next_queue is not None:
                where["queue"] = next_queue
        params = {**start.params, **output} if output else start.params
        if output:
            where["new_params"] = params
        completion = _Completion(statements, name, counted, bool(output), where, {
            "operation_id": operation_id, "position": position, "step": step, "host": host,
            "now": now, "worker": attempt.worker if counted else None,
            "started_at": attempt.started_at if counted else None,
            "from_queue": attempt.queue if counted else None})
        if effect is None:
            if completion.one_statement() is not None:  # PostgreSQL: commits by itself
                advanced = completion.run(self.db.direct)
            else:
                with self.db.direct_transaction() as run:
                    advanced = completion.run(run)
        else:
            with self.db.effect_transaction() as (s, run):
                advanced = completion.run(run)
                if advanced:
                    self._apply(s, run, effect, StepOperation(
                        operation_id, start.kind, start.subject, start.plan, position,
                        dict(params), dict(start.hosts), start.result, start.error), now)
        if not advanced:
            return self._not_advanced(operation_id, position)
        if following is None:
            return StepStart("ended")
        return StepStart("run", following, position + 1, queue=next_queue, kind=start.kind,
                         subject=start.subject)

    def record_new(self, kind: str, plan: list, hosts: Mapping[str, str],
                   params: Mapping[str, Any], subject: str | None, queue: str | None,
                   rollback: dict | None, session: Session | None = None,
                   trace: str | None = None) -> str:
        """Record a submitted operation with its first step as sent to ``queue`` (None: not
        sent, for the stranded-step resend to send), and the traceparent of its submit's span
        (``trace``, when traced), with
        statements built once (no ORM); returns its id. On PostgreSQL one statement, on
        SQLite one transaction; with ``session`` (an application's, ``orch.transaction()``)
        in that session's transaction, on its connection. A busy subject raises SubjectBusy,
        naming the operation that holds it (or the race the unique index lost)."""
        statements, now, op_id = statements_for(self.db.url), time.time(), new_id()
        last = _last_positions(plan)
        row = {"id": op_id, "kind": kind, "subject": subject, "holds": subject, "plan": plan,
               "hosts": dict(hosts), "params": dict(params), "status": OperationStatus.QUEUED,
               "position": 0, "step_state": StepState.QUEUED, "step_since": now,
               "next_published": queue is not None, "queue": queue,
               "current_host": plan[0][1],
               "rollback": rollback, "created_at": now, "updated_at": now, "trace": trace}
        if statements.submit is not None and session is None:
            try:  # one statement; a busy subject breaks the index
                self.db.direct(statements.submit, **row, host_names=list(last),
                               host_positions=list(last.values()))
            except IntegrityError:
                raise self._busy(subject) from None
            return op_id
        with self._in(session) as run:
            # (looked for first: in an application's transaction a broken index would
            # leave its transaction unusable on PostgreSQL)
            if subject is not None and run(statements.holder, subject=subject):
                raise self._busy(subject, run)
            try:
                run(statements.insert_operation, **row)
            except IntegrityError:
                raise self._busy(subject) from None
            run.many(statements.insert_hosts, [
                {"operation_id": op_id, "host": host, "last_position": position}
                for host, position in last.items()])
        return op_id

    @contextmanager
    def _in(self, session: Session | None) -> Iterator[Transaction]:
        """Statements in ``session``'s transaction (the caller commits it), or in one of
        their own."""
        if session is not None:
            yield self.db.on_session(session)
            return
        with self.db.direct_transaction() as run:
            yield run

    @contextmanager
    def _moving(self, effect: Effect | None) -> Iterator[tuple[Session | None, Transaction]]:
        """A transition's transaction: with an effect, on the application's session (its
        rows and the ledger's commit together); otherwise statements alone."""
        if effect is None or effect is no_effect:
            with self.db.direct_transaction() as run:
                yield None, run
        else:
            with self.db.effect_transaction() as (s, run):
                yield s, run

    def _busy(self, subject: str | None, run: Any = None) -> SubjectBusy:
        """Why ``subject`` could not be taken: the operation that holds it, or the race a
        submit lost to another (gone again by the time it is read). ``run``: the submit's
        own transaction (SQLite)."""
        rows = (run or self.db.direct)(statements_for(self.db.url).holder, subject=subject)
        if not rows:
            return SubjectBusy(f"subject {subject!r} is busy: another operation was just "
                               "submitted for it")
        operation_id, kind = rows[0]
        return SubjectBusy(f"subject {subject!r} is busy: operation {operation_id} ({kind}) "
                           "in progress")

    def claim_step(self, operation_id: str, position: int, attempt: Attempt) -> bool:
        """Record a step that is taking a while as running (``attempt``: this delivery);
        False if the operation has moved on meanwhile (or its step waits for its event)."""
        statements = statements_for(self.db.url)
        with self.db.direct_transaction() as run:
            rows = run(statements.claim, op=operation_id, at=position, now=time.time())
            if not rows:
                return False
            self._count(run, operation_id, position, rows[0][0], attempt,
                        StepLogStatus.RUNNING)
            return True

    def record_attempt(self, operation_id: str, position: int, attempt: Attempt,
                       step: str, host: str, error: str) -> None:
        """Count an attempt that ended in ``error`` and will be retried (unless its claim
        counted it already), so the next delivery knows which attempt it is; its history
        says why."""
        statements = statements_for(self.db.url)
        with self.db.direct_transaction() as run:
            if not attempt.claimed:
                rows = run(statements.running, op=operation_id, at=position, now=time.time())
                if rows:
                    self._count(run, operation_id, position, rows[0][0], attempt,
                                StepLogStatus.RUNNING)
            self.note(Happening.RETRIED, operation_id, position, step, host,
                      worker=attempt.worker, queue=attempt.queue, detail=error, run=run)

    def _count(self, run: Transaction, operation_id: str, position: int, plan: list,
               attempt: Attempt | None, status: StepLogStatus,
               finished_at: float | None = None) -> None:
        """The step log's row for ``attempt``: counted (unless its claim counted it), with
        ``status``; without an attempt, the row's status alone."""
        statements = statements_for(self.db.url)
        where = {"operation_id": operation_id, "position": position, "log_status": status,
                 "finished_at": finished_at}
        if attempt is None or attempt.claimed:
            run(statements.log_status, **where)
            return
        step, host = plan[position]
        run(statements.log_attempt, **where, step=step, host=host, worker=attempt.worker,
            started_at=attempt.started_at, from_queue=attempt.queue)

    def _not_advanced(self, operation_id: str, position: int) -> StepStart:
        """Why a completion changed nothing (one read, only then): the operation moved past
        the step (a duplicate), or the ledger has it at an earlier step ("behind")."""
        rows = self.db.direct(statements_for(self.db.url).may_run, id=operation_id,
                              position=position)
        if rows:
            at, status, plan = rows[0][0], rows[0][1], rows[0][4]
            if status in ACTIVE and at < position:
                return _behind(at, plan)
        return StepStart("duplicate")

    def unpublish(self, operation_id: str, position: int) -> None:
        """The next step recorded as sent could not be published: mark it "not sent", so a
        redelivery of the step before it sends it again (the "republish" outcome)."""
        self.db.direct(statements_for(self.db.url).unpublish, op=operation_id, at=position,
                       now=time.time())

    def mark_published(self, operation_id: str, position: int, queue: str) -> None:
        self.db.direct(statements_for(self.db.url).published, op=operation_id, at=position,
                       queue=queue, now=time.time())

    def fail_step(
        self, operation_id: str, position: int, error: str, effect: Effect = no_effect,
        attempt: Attempt | None = None, why: Happening = Happening.FAILED,
    ) -> StepStart:
        """Record that the step failed: run the flow's rollback steps if it has some for this
        step, otherwise end the operation as failed. Returns the rollback step to publish.
        ``effect`` (the step's ``on_failure``) runs in the same transaction, after the move
        (a duplicate never applies it). The history says ``why`` (failed, or the event it
        waited for did not come) and whether a rollback started, in the same transaction."""
        statements, now = statements_for(self.db.url), time.time()
        rows = self.db.direct(statements.operation, id=operation_id)
        if not rows:
            return StepStart("duplicate")
        (at, status, _, plan, kind, subject, params, hosts, result, old_error,
         rollback) = rows[0]
        if at != position or status not in ACTIVE:
            return StepStart("duplicate")
        steps = self._rollback(kind, rollback, hosts, plan[position][0]) \
            if old_error is None else []
        new_error = error if old_error is None else f"{old_error}; then {error}"
        where = {"op": operation_id, "at": position, "now": now, "new_error": new_error}
        new_plan = plan[: position + 1] + steps
        with self._moving(effect) as (s, run):
            if steps:
                moved = run(statements.fail_rollback, **where, new_plan=new_plan,
                            next_position=position + 1, next_host=new_plan[position + 1][1])
            else:
                moved = run(statements.fail_end, **where)
            if not moved:
                return StepStart("duplicate")
            self._count(run, operation_id, position, plan, attempt, StepLogStatus.FAILED, now)
            step, host = plan[position]
            seen = {"worker": attempt.worker, "queue": attempt.queue} if attempt else {}
            self.note(why, operation_id, position, step, host, detail=error, run=run, at=now,
                      **seen)
            if steps:
                self.note(Happening.ROLLBACK_STARTED, operation_id, position + 1,
                          *new_plan[position + 1],
                          detail=", ".join(f"{name}@{where}" for name, where in steps),
                          run=run, at=now)
            run(statements.forget_hosts, op=operation_id)
            if steps:
                run.many(statements.insert_hosts, [
                    {"operation_id": operation_id, "host": host, "last_position": last}
                    for host, last in _last_positions(new_plan).items()])
            if s is not None:
                self._apply(s, run, effect, StepOperation(
                    operation_id, kind, subject, plan, position, dict(params or {}),
                    dict(hosts or {}), result, old_error), now)
        if not steps:
            return StepStart("ended")
        return StepStart("run", tuple(new_plan[position + 1]), position + 1, kind=kind,
                         subject=subject)

    def _apply(self, s: Session, run: Transaction, effect: Effect, operation: StepOperation,
               now: float) -> None:
        """Run ``effect`` on the application's session, in the transition's transaction;
        write the operation's result if it set one."""
        before = operation.result
        effect(s, operation)
        s.flush()
        if operation.result != before:
            run(statements_for(self.db.url).set_result, op=operation.id,
                new_result=operation.result, now=now)

    def _rollback(self, kind: str, recorded: dict | None, hosts: Mapping[str, str] | None,
                  failed_step: str) -> list:
        """The rollback steps for ``failed_step``: as ``recorded`` when the operation was
        submitted, whatever the flow says in the code running now."""
        if recorded is not None:
            return ([list(p) for p in recorded["plan"]]
                    if failed_step in recorded["on"] else [])
        flow = self.flows.get(kind)
        return flow.rollback_plan(failed_step, hosts or {}) if flow is not None else []

    # -- event waits -----------------------------------------------------------------------
    def wait_for_event(
        self, operation_id: str, position: int, event: str, key: str, timeout: float,
        output: Mapping[str, Any] | None = None, attempt: Attempt | None = None,
    ) -> bool:
        """Park the step until ``event`` is delivered for ``key`` (or ``timeout`` passes).

        The step's message is acknowledged and the wait lives in the operation, so a waiting
        step holds no pool process and no prefetch slot.
        """
        assert attempt is not None, "a wait for an attempt nobody recorded"
        statements, now = statements_for(self.db.url), time.time()
        with self.db.direct_transaction() as run:
            rows = run(statements.operation, id=operation_id)
            if not rows:
                return False
            plan, params = rows[0][3], rows[0][6]
            # The event answers what this attempt of the step asked for, so it counts from
            # the attempt's start (it often arrives before the step's own work is over).
            waited = run(statements.wait, op=operation_id, at=position, now=now,
                         new_params={**(params or {}), **(output or {})},
                         new_wait={"event": event, "key": key, "since": attempt.started_at,
                                   "deadline": now + timeout})
            if not waited:
                return False
            self._count(run, operation_id, position, plan, attempt, StepLogStatus.WAITING)
            self.note(Happening.WAITING, operation_id, position, *plan[position],
                      worker=attempt.worker, queue=attempt.queue,
                      detail=f"{event} for {key}, at most {timeout:g} s", run=run, at=now)
            return True

    def settle_waits(
        self, host: str | None, effect_of: Callable[[str], Effect],
        failure_of: Callable[[str], Effect], serves: Callable[[str], bool] = lambda _: True,
    ) -> Settled:
        """Finish the waiting steps of ``host`` (None: of every host) whose event arrived;
        fail those past their deadline; leave those whose step the caller's code does not
        ``serves`` to one that does. Returns ``(operation_id, next)`` for each, for the caller
        to publish, and how many still wait."""
        settled = Settled()
        candidates = self.db.direct(statements_for(self.db.url).waiting[host is not None],
                                    **({} if host is None else {"host": host}))
        for (operation_id,) in candidates:  # nearly always none: no ORM session for that
            with self.db.read() as s:
                op = s.get(Operation, operation_id)
                if (op is None or op.status not in ACTIVE
                        or op.step_state != StepState.WAITING or op.current is None or not op.wait):
                    continue
                step, position, wait = op.current[0], op.position, op.wait
                step_host = op.current[1]
                if not serves(step):
                    settled.still_waiting += 1
                    continue
                arrived = s.execute(select(Event.id).where(
                    Event.key == wait["key"], Event.name == wait["event"],
                    Event.received_at >= wait["since"],
                )).first()
            if arrived:
                following = op.plan[position + 1] if position + 1 < len(op.plan) else None
                start = StepStart("run", kind=op.kind, subject=op.subject,
                                  params=dict(op.params or {}), hosts=dict(op.hosts or {}),
                                  following=tuple(following) if following else None,
                                  plan=op.plan, result=op.result, error=op.error)
                seen = time.time()  # (before the completion it brings, in the timeline)
                done = self.complete(op.id, position, step, step_host, start,
                                     effect=effect_of(step))
                if done.outcome in ("run", "ended"):
                    self.note(Happening.EVENT_ARRIVED, op.id, position, step, step_host,
                              detail=f"{wait['event']} for {wait['key']}", at=seen)
                settled.append((op.id, done))
            elif time.time() >= wait["deadline"]:
                error = f"{step}@{step_host}: timed out waiting for {wait['event']}"
                settled.append((op.id, self.fail_step(op.id, position, error,
                                                      failure_of(step),
                                                      why=Happening.WAIT_TIMED_OUT)))
            else:
                settled.still_waiting += 1
        return settled

    @staticmethod
    def record_event(
        s: Session, key: str, name: str, operation_id: str | None = None,
        host: str | None = None,
    ) -> None:
        """Deliver ``name`` for ``key`` in transaction ``s`` (an effect's): once per operation."""
        s.add(Event(key=key, name=name, operation_id=operation_id, host=host))

    # -- recovery ----------------------------------------------------------------------------
    def stranded_steps(
        self, host: str | None, unpublished_after: float, queued_after: float,
        running_after: float | None = None,
    ) -> list[Operation]:
        """Operations whose current step, on ``host`` (None: on any host), may have no
        message in the broker.

        Either it was never sent (its sender died between commit and publish), or it has
        waited as ``queued`` for longer than ``queued_after`` seconds (on Redis a worker killed
        between BRPOP and recording the message as unacknowledged loses it), or (with
        ``running_after``) it has been recorded as ``running`` for longer than that: its worker
        may be gone, or its delivery lost; or it is ``held`` (delivered to a worker whose code
        does not register it). The caller (workers.resend) tells which, checks the queue and
        resends; a resent step that was not lost after all is a duplicate.
        """
        now = time.time()
        shortest = min(queued_after, unpublished_after,
                       running_after if running_after is not None else queued_after)
        # Asked every few seconds, and nearly always for nothing: the ids in one cheap look,
        # and an ORM session only when there are some.
        ids = [row[0] for row in self.db.direct(
            statements_for(self.db.url).stranded[running_after is not None, host is not None],
            before=now - shortest, **({} if host is None else {"host": host}))]
        if not ids:
            return []
        with self.db.read() as s:
            ops = s.execute(select(Operation).where(Operation.id.in_(ids))).scalars().all()

        def due(op: Operation) -> float:
            if op.step_state == StepState.HELD:  # sent by the first worker that serves it
                return 0.0
            if op.step_state == StepState.RUNNING:
                return running_after  # type: ignore[return-value]
            return queued_after if op.next_published else unpublished_after

        return [op for op in ops if now - op.step_since > due(op)]

    def claim_resend(self, operation_id: str, position: int, step_since: float,
                     step_state: str = StepState.QUEUED) -> bool:
        """Take the right to resend a step (one process wins when several look at once): it
        is queued again from now, whatever delivery it had is taken as lost."""
        return bool(self.db.direct(
            statements_for(self.db.url).resend, op=operation_id, at=position, was=step_state,
            since=step_since, now=time.time()))

    def hold_step(self, operation_id: str, position: int, step: str, host: str,
                  worker: str | None = None, queue: str | None = None) -> str:
        """A worker of ``host`` received ``step`` and its code does not register it: the step
        is recorded as ``held`` (not sent), for a worker that serves it to send it again
        (``workers.resend``). Returns ``held``; ``duplicate`` when the operation has moved on
        past it (nothing to hold); ``mismatch`` when no operation has that step there (not a
        step of an operation at all)."""
        statements = statements_for(self.db.url)
        with self.db.direct_transaction() as run:
            rows = run(statements.operation, id=operation_id)
            if not rows:
                return "mismatch"
            plan = rows[0][3]
            if not 0 <= position < len(plan) or tuple(plan[position]) != (step, host):
                return "mismatch"
            held = run(statements.hold, op=operation_id, at=position, now=time.time())
            if held:
                self.note(Happening.HELD, operation_id, position, step, host, worker=worker,
                          queue=queue, detail="its code does not run this step", run=run)
            return "held" if held else "duplicate"

    def held_steps(self) -> list[Operation]:
        """Operations whose current step waits for a worker that serves it."""
        with self.db.read() as s:
            return list(s.execute(select(Operation).where(
                Operation.status.in_(ACTIVE), Operation.step_state == StepState.HELD,
            ).order_by(Operation.created_at)).scalars().all())

    def abandon(self, operation_id: str, error: str, effect: Effect = no_effect) -> bool:
        """End an operation whose first step could not even be queued; frees its subject.
        ``effect`` (the first step's ``on_failure``) runs in the same transaction."""
        statements, now = statements_for(self.db.url), time.time()
        rows = self.db.direct(statements.operation, id=operation_id)
        if not rows:
            return False
        (_, _, _, plan, kind, subject, params, hosts, result, old_error, _) = rows[0]
        with self._moving(effect) as (s, run):
            if not run(statements.abandon, op=operation_id, at=0, now=now, new_error=error):
                return False
            self.note(Happening.ABANDONED, operation_id, 0, *plan[0], detail=error, run=run,
                      at=now)
            run(statements.forget_hosts, op=operation_id)
            if s is not None:
                self._apply(s, run, effect, StepOperation(
                    operation_id, kind, subject, plan, 0, dict(params or {}),
                    dict(hosts or {}), result, old_error), now)
            return True

    # -- history ---------------------------------------------------------------------------
    def note(self, kind: Happening, operation_id: str, position: int | None = None,
             step: str | None = None, host: str | None = None, *, worker: str | None = None,
             queue: str | None = None, detail: str | None = None,
             run: Transaction | None = None, at: float | None = None) -> None:
        """Record one entry of the operation's history (off its normal path only): in
        ``run``, the transition's own transaction, so that the move and its entry commit
        together (``at``: the transition's time); without it, by itself."""
        detail = detail[:MAX_DETAIL] if detail else detail
        (run or self.db.direct)(
            statements_for(self.db.url).note, operation_id=operation_id,
            at=time.time() if at is None else at,
            kind=str(kind), position=position, step=step, host=host, worker=worker,
            queue=queue, detail=detail)
        if self.tracing is not None:
            self.tracing.noted(str(kind), operation_id, position, step, host, worker=worker,
                               queue=queue, detail=detail,
                               stored=lambda: self.trace_of(operation_id, run))

    def trace_of(self, operation_id: str, run: Transaction | None = None) -> str | None:
        """The traceparent stored with the operation (None: not traced, or no such
        operation); in ``run``'s transaction when given."""
        rows = (run or self.db.direct)(statements_for(self.db.url).trace, id=operation_id)
        return rows[0][0] if rows else None

    def note_quietly(self, kind: Happening, operation_id: str, position: int | None = None,
                     step: str | None = None, host: str | None = None, **seen: Any) -> None:
        """:meth:`note` of what has already happened (a step sent again, handed back,
        delivered again): an entry the ledger cannot take now is said in the log, never
        an error of what happened."""
        try:
            self.note(kind, operation_id, position, step, host, **seen)
        except Exception as exc:
            logger.warning("%s of %s (%s@%s) not recorded in its history: %s", kind,
                           operation_id, step, host, error_text(exc, kind=True))

    def history(self, operation_id: str) -> list[tuple]:
        """The operation's history, oldest first: (at, kind, position, step, host, worker,
        queue, detail)."""
        return self.db.direct(statements_for(self.db.url).view_history, id=operation_id)

    # -- queries -----------------------------------------------------------------------------
    def status(self, operation_id: str) -> str | None:
        """The operation's status alone (None: no such operation): one indexed read of one
        column, for a waiter to poll instead of the whole view."""
        rows = self.db.direct(statements_for(self.db.url).status, id=operation_id)
        return rows[0][0] if rows else None

    def resolve(self, operation_id: str) -> str:
        """The operation a full id, or a unique prefix of one, names (the demo and the live
        view print 8 characters): its id; :class:`UnknownOperation` when none or several
        match, naming them. A prefix as a listing abbreviates one (``3c1f...``, ``3c1f…``) or
        in capitals names the same."""
        cut = operation_id.removesuffix("...").removesuffix("…")
        if cut != operation_id or re.fullmatch(r"[0-9A-Fa-f-]{4,35}", cut):
            operation_id = cut.lower()
        if len(operation_id) >= 36 or not re.fullmatch(r"[0-9a-f-]{4,35}", operation_id):
            return operation_id  # a whole id (or not an id: the view says it is unknown)
        found = [row[0] for row in self.db.direct(statements_for(self.db.url).prefixed,
                                                  pattern=operation_id + "%")]
        if len(found) == 1:
            return found[0]
        if not found:
            raise UnknownOperation(f"unknown operation {operation_id!r}")
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise UnknownOperation(f"operation {operation_id!r} is ambiguous: it starts {shown}; "
                               "give more of the id")

    def view(self, operation_id: str) -> tuple[Operation, list[tuple]] | None:
        """The operation (a row not attached to any session) and its steps' rows (position,
        step, host, status, attempts, worker, finished_at), in two statements straight on the
        driver: what a waiter reads once its operation ended. None: no such operation."""
        statements = statements_for(self.db.url)
        rows = self.db.direct(statements.view_operation, id=operation_id)
        if not rows:
            return None
        op = Operation(**dict(zip(statements.view_operation.selected_columns.keys(), rows[0],
                                  strict=True)))
        return op, self.db.direct(statements.view_steps, id=operation_id)

    def operations_needing(
        self, host: str, created_before: float | None = None
    ) -> list[Operation]:
        """Operations in flight with a step left to run on ``host`` (current one included)."""
        with self.db.read() as s:
            query = select(Operation).join(
                OperationHost, OperationHost.operation_id == Operation.id
            ).where(
                OperationHost.host == host, OperationHost.last_position >= Operation.position,
                Operation.status.in_(ACTIVE),
            )
            if created_before is not None:
                query = query.where(Operation.created_at <= created_before)
            return list(s.execute(query.order_by(Operation.created_at)).scalars().all())

    def recent_operations(self, since: float, limit: int = 20) -> list[Operation]:
        """Operations in flight, and those that ended after ``since``: newest first."""
        with self.db.read() as s:
            query = select(Operation).where(or_(
                Operation.status.in_(ACTIVE), Operation.finished_at >= since,
            )).order_by(Operation.created_at.desc()).limit(limit)
            return list(s.execute(query).scalars().all())

    def find_operations(self, find: OperationQuery) -> tuple[int, list[Operation]]:
        """The operations ``find`` asks for, in flight first (the longest in its current
        step first: the stuck ones), then the ended ones, newest first; how many match in
        all, and the page asked for."""
        now = time.time()
        where = []
        if find.statuses:
            where.append(Operation.status.in_(find.statuses))
        if find.flow:
            where.append(Operation.kind == find.flow)
        if find.subject:
            where.append(Operation.subject.like(_like(find.subject), escape="\\")
                         if "*" in find.subject else Operation.subject == find.subject)
        if find.host:
            # Where it ran (the step log), or still has a step to run (the host index).
            where.append(or_(
                Operation.current_host == find.host,
                select(StepRecord.id).where(StepRecord.operation_id == Operation.id,
                                            StepRecord.host == find.host).exists(),
                select(OperationHost.host).where(OperationHost.operation_id == Operation.id,
                                                 OperationHost.host == find.host).exists()))
        if find.stuck_after is not None:
            where += [Operation.status.in_(ACTIVE),
                      Operation.step_since < now - find.stuck_after]
        active = Operation.status.in_(ACTIVE)
        with self.db.read() as s:
            total = s.execute(select(func.count()).select_from(Operation).where(*where)
                              ).scalar_one()
            page = s.execute(select(Operation).where(*where).order_by(
                case((active, 0), else_=1),
                case((active, Operation.step_since), else_=-Operation.finished_at),
                Operation.created_at.desc(), Operation.id,
            ).offset(find.offset).limit(find.limit)).scalars().all()
        return total, list(page)

    def in_flight_by_host(self) -> dict[str, int]:
        """Operations in flight that still need each host (one grouped, indexed query)."""
        with self.db.read() as s:
            rows = s.execute(
                select(OperationHost.host, func.count()).join(
                    Operation, OperationHost.operation_id == Operation.id
                ).where(
                    OperationHost.last_position >= Operation.position,
                    Operation.status.in_(ACTIVE),
                ).group_by(OperationHost.host)
            ).all()
        return {host: count for host, count in rows}

    def step_workers(self, operations: list[Operation]) -> dict[str, str | None]:
        """The worker (Celery hostname) that last started each operation's current step."""
        return {op_id: worker for op_id, (worker, _) in self.step_attempts(operations).items()}

    def step_attempts(
        self, operations: list[Operation]
    ) -> dict[str, tuple[str | None, float | None]]:
        """Who last started each operation's current step (Celery hostname), and when."""
        if not operations:
            return {}
        wanted = {(op.id, op.position) for op in operations}
        with self.db.read() as s:
            rows = s.execute(
                select(StepRecord.operation_id, StepRecord.position, StepRecord.worker,
                       StepRecord.started_at).where(
                    StepRecord.operation_id.in_([op_id for op_id, _ in wanted])
                )
            ).all()
        return {op_id: (worker, started) for op_id, position, worker, started in rows
                if (op_id, position) in wanted}

    def steps_completed_on(self, host: str, since: float) -> int:
        with self.db.read() as s:
            rows = s.execute(
                select(StepRecord.id).where(
                    StepRecord.host == host,
                    StepRecord.status == StepLogStatus.COMPLETED,
                    StepRecord.finished_at >= since,
                )
            ).all()
            return len(rows)

    def get_operation(self, operation_id: str) -> Operation:
        with self.db.read() as s:
            op = s.get(Operation, operation_id)
            if op is None:
                raise UnknownOperation(f"unknown operation {operation_id!r}")
            return op
