"""The ledger's hot statements, built once per dialect with bound parameters (the step path, the
submit, and what a host's worker looks for every few seconds): a step costs their execution and not
their construction. Those that stand alone run straight on the driver, compiled once
(:meth:`orchestrator.ledger.engines.Database.direct`): the step's read, the idle looks, and on
PostgreSQL the completion and the submit, each one statement of data-modifying CTEs that commits by
itself. SQLite has no data-modifying CTE: its completion and submit are a few of these statements in
one transaction. The ledger (:mod:`orchestrator.ledger.store`) says when each is used."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, case, delete, func, literal, or_, select, true, update

from orchestrator.ledger.models import HistoryEntry, Operation, OperationHost, StepRecord
from orchestrator.ledger.states import (
    ACTIVE,
    MOVES,
    OperationStatus,
    StepLogStatus,
    StepState,
)

#: The ways a completion moves an operation on: it ends (the plan is done), or its next step
#: is queued, recorded as sent to a queue in the same statement or not.
ADVANCES = ("end", "advance", "advance_sent")

#: The columns a submit writes (``Ledger.record_new``).
SUBMITTED = ("id", "kind", "subject", "holds", "plan", "hosts", "params", "status", "position",
             "step_state", "step_since", "next_published", "queue", "current_host", "rollback",
             "created_at", "updated_at", "trace")


def one_of(column: Any, values: tuple[str, ...]) -> Any:
    """``column IN (values)`` written as equalities: one bound parameter each, where ``IN``
    takes an expanding one."""
    return or_(*(column == value for value in values))


class StepStatements:
    """The step path's statements, built once per dialect with bound parameters, so that a
    step costs their execution and not their construction (SQLAlchemy then reuses their
    compiled form from its cache)."""

    def __init__(self, dialect: str) -> None:
        ops, log = Operation.__table__, StepRecord.__table__
        hosts = OperationHost.__table__
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        def moving(move: str) -> Any:
            """An UPDATE of the operation, guarded as :data:`MOVES` says for ``move``: the
            operation ``op`` in flight at position ``at``, its step in a state the move
            starts from. (Bound parameters are named after no column, "op", "at" and so on:
            an UPDATE's SET takes the column names for its own.)"""
            where = ((ops.c.id == bindparam("op")) & (ops.c.position == bindparam("at"))
                     & one_of(ops.c.status, ACTIVE))
            if MOVES[move].start != frozenset(StepState):
                where &= one_of(ops.c.step_state, tuple(sorted(MOVES[move].start)))
            return update(ops).where(where)

        self.may_run = select(
            ops.c.position, ops.c.status, ops.c.step_state, ops.c.next_published, ops.c.plan,
            ops.c.kind, ops.c.subject, ops.c.params, ops.c.hosts, log.c.attempts,
            ops.c.result, ops.c.error,
        ).select_from(ops.outerjoin(log, (log.c.operation_id == ops.c.id)
                                    & (log.c.position == bindparam("position")))
                      ).where(ops.c.id == bindparam("id"))
        guarded = moving("complete")
        moved = dict(position=bindparam("next_position"), wait=None,
                     updated_at=bindparam("now"))
        ended = dict(finished_at=bindparam("now"), next_published=True, holds=None,
                     current_host=None)
        self.end = guarded.values(
            status=case((ops.c.error.is_(None), OperationStatus.COMPLETED),
                        else_=OperationStatus.FAILED), **ended, **moved)
        queued = dict(status=OperationStatus.RUNNING, step_state=StepState.QUEUED,
                      step_since=bindparam("now"), current_host=bindparam("next_host"),
                      **moved)
        self.advance = guarded.values(next_published=False, **queued)
        self.advance_sent = guarded.values(next_published=True, queue=bindparam("queue"),
                                           **queued)
        #: Each advance by name and by whether it also writes the operation's params, with
        #: what the step returned merged in.
        data = dict(params=bindparam("new_params", type_=ops.c.params.type))
        self.advances: dict[tuple[str, bool], Any] = {}
        for name in ADVANCES:
            self.advances[name, False] = getattr(self, name)
            self.advances[name, True] = getattr(self, name).values(**data)
        row = dict(operation_id=bindparam("operation_id"), position=bindparam("position"),
                   step=bindparam("step"), host=bindparam("host"), status=StepLogStatus.COMPLETED,
                   applied=1, finished_at=bindparam("now"))
        done = dict(status=StepLogStatus.COMPLETED, finished_at=bindparam("now"),
                    applied=log.c.applied + 1)
        keys = ["operation_id", "position"]
        self.record = insert(log).values(attempts=0, **row).on_conflict_do_update(
            index_elements=keys, set_=done)
        # (the delivery's queue is "from_queue": "queue" is the next step's, in the same
        # statement on PostgreSQL)
        self.record_counted = insert(log).values(
            attempts=1, worker=bindparam("worker"), started_at=bindparam("started_at"),
            queue=bindparam("from_queue"), **row,
        ).on_conflict_do_update(index_elements=keys, set_=dict(
            attempts=log.c.attempts + 1, worker=bindparam("worker"),
            started_at=bindparam("started_at"), queue=bindparam("from_queue"), **done))
        self.forget_hosts = delete(hosts).where(hosts.c.operation_id == bindparam("op"))
        self.holder = select(ops.c.id, ops.c.kind).where(ops.c.holds == bindparam("subject"))
        # -- off the normal path: each transition's statements, guarded as MOVES says --------
        now = bindparam("now")
        #: A step taking a while recorded as running (its plan returned: no row, it moved on).
        self.claim = moving("claim_step").values(
            status=OperationStatus.RUNNING, step_state=StepState.RUNNING, step_since=now,
            updated_at=now).returning(ops.c.plan)
        #: An attempt that will be retried: the operation is running; its step's state stays.
        self.running = update(ops).where(
            (ops.c.id == bindparam("op")) & (ops.c.position == bindparam("at"))
            & one_of(ops.c.status, ACTIVE)
        ).values(status=OperationStatus.RUNNING, updated_at=now).returning(ops.c.plan)
        #: An attempt counted in the step log, its row's status and when it finished (None
        #: while it runs or waits).
        attempt_row = dict(operation_id=bindparam("operation_id"),
                           position=bindparam("position"), status=bindparam("log_status"),
                           worker=bindparam("worker"), started_at=bindparam("started_at"),
                           finished_at=bindparam("finished_at"), queue=bindparam("from_queue"))
        self.log_attempt = insert(log).values(
            step=bindparam("step"), host=bindparam("host"), attempts=1, applied=0,
            **attempt_row).on_conflict_do_update(
            index_elements=keys, set_=dict(attempts=log.c.attempts + 1, **{
                name: attempt_row[name]
                for name in ("status", "worker", "started_at", "finished_at", "queue")}))
        #: One entry of an operation's history (``Ledger.note``): off the normal path only.
        history = HistoryEntry.__table__
        self.note = insert(history).values(
            {name: bindparam(name, type_=history.c[name].type)
             for name in ("operation_id", "at", "kind", "position", "step", "host", "worker",
                          "queue", "detail")})
        #: An operation's history, oldest first (its view's timeline).
        self.view_history = select(
            history.c.at, history.c.kind, history.c.position, history.c.step, history.c.host,
            history.c.worker, history.c.queue, history.c.detail,
        ).where(history.c.operation_id == bindparam("id")).order_by(history.c.at, history.c.id)
        #: The traceparent stored with an operation (``Ledger.trace_of``): read only where
        #: no span of it is current, with tracing on.
        self.trace = select(ops.c.trace).where(ops.c.id == bindparam("id"))
        #: The step log's row of an attempt already counted (its claim), its status changed.
        self.log_status = update(log).where(
            (log.c.operation_id == bindparam("operation_id"))
            & (log.c.position == bindparam("position"))
        ).values(status=bindparam("log_status"), finished_at=bindparam("finished_at"))
        #: The operation as a transition off the normal path reads it first.
        self.operation = select(
            ops.c.position, ops.c.status, ops.c.step_state, ops.c.plan, ops.c.kind,
            ops.c.subject, ops.c.params, ops.c.hosts, ops.c.result, ops.c.error,
            ops.c.rollback,
        ).where(ops.c.id == bindparam("id"))
        if dialect == "postgresql":  # the row stays as read until the transaction ends
            self.operation = self.operation.with_for_update()
        self.wait = moving("wait_for_event").values(
            step_state=StepState.WAITING, step_since=now,
            wait=bindparam("new_wait", type_=ops.c.wait.type),
            params=bindparam("new_params", type_=ops.c.params.type),
            updated_at=now).returning(ops.c.id)
        self.hold = moving("hold_step").values(
            step_state=StepState.HELD, next_published=False, updated_at=now,
            # (held since it was first held: the resend counts from then)
            step_since=case((ops.c.step_state == StepState.HELD, ops.c.step_since),
                            else_=now)).returning(ops.c.id)
        self.resend = moving("claim_resend").where(
            (ops.c.step_state == bindparam("was")) & (ops.c.step_since == bindparam("since"))
        ).values(step_state=StepState.QUEUED, step_since=now,
                 updated_at=now).returning(ops.c.id)
        self.unpublish = update(ops).where(
            (ops.c.id == bindparam("op")) & (ops.c.position == bindparam("at"))
            & (ops.c.step_state == StepState.QUEUED)).values(next_published=False,
                                                             updated_at=now)
        self.published = update(ops).where(
            (ops.c.id == bindparam("op")) & (ops.c.position == bindparam("at"))
        ).values(next_published=True, queue=bindparam("queue"), step_since=now,
                 updated_at=now)
        failed = dict(error=bindparam("new_error"), wait=None, updated_at=now)
        self.abandon = moving("abandon").values(
            status=OperationStatus.FAILED, **failed, **ended).returning(ops.c.id)
        #: A failed step with no rollback to run: the operation ends failed.
        self.fail_end = moving("fail_step").values(
            status=OperationStatus.FAILED, **failed, **ended).returning(ops.c.id)
        #: A failed step whose flow rolls back: the plan gets the rollback steps, the first
        #: of which is queued (and sent after the commit).
        self.fail_rollback = moving("fail_step").values(
            plan=bindparam("new_plan", type_=ops.c.plan.type),
            position=bindparam("next_position"), step_state=StepState.QUEUED,
            next_published=False, step_since=now, current_host=bindparam("next_host"),
            **failed).returning(ops.c.id)
        #: What an effect sets as the operation's result, in the completion's transaction.
        self.set_result = update(ops).where(ops.c.id == bindparam("op")).values(
            result=bindparam("new_result", type_=ops.c.result.type),
            updated_at=bindparam("now"))
        #: An operation's view (``orchestrator.status.operation_dict``): its row, its steps.
        self.view_operation = select(*ops.c).where(ops.c.id == bindparam("id"))
        self.view_steps = select(
            log.c.position, log.c.step, log.c.host, log.c.status, log.c.attempts,
            log.c.worker, log.c.finished_at, log.c.started_at, log.c.queue,
        ).where(log.c.operation_id == bindparam("id")).order_by(log.c.position)
        #: The operations whose id starts with a prefix (the command line's short ids).
        self.prefixed = select(ops.c.id).where(ops.c.id.like(bindparam("pattern"))).order_by(
            ops.c.id).limit(4)
        #: What a waiter polls (``Orchestrator.wait``): one column of one row.
        self.status = select(ops.c.status).where(ops.c.id == bindparam("id"))
        self.insert_operation = insert(ops).values(
            {name: bindparam(name, type_=ops.c[name].type) for name in SUBMITTED})
        self.insert_hosts = insert(hosts).values(
            operation_id=bindparam("operation_id"), host=bindparam("host"),
            last_position=bindparam("last_position"))
        # What a host's worker with work in flight, and the fleet's looks, ask every few
        # seconds, through
        # Database.direct: no IN list, which SQLAlchemy expands at each execution and a
        # driver's own form of the statement cannot hold.
        # The fleet's looks (workers.fleet) are the same without the host.
        in_flight = one_of(ops.c.status, ACTIVE)
        where = {False: in_flight, True: (ops.c.current_host == bindparam("host")) & in_flight}
        #: Keyed by (whether running steps are looked at too, whether for one host).
        self.stranded = {
            (running, one_host): select(ops.c.id).where(
                where[one_host],
                one_of(ops.c.step_state, (StepState.QUEUED, StepState.HELD,
                                          StepState.RUNNING)[:2 + running]),
                (ops.c.step_since < bindparam("before")) | (ops.c.step_state == StepState.HELD))
            for running in (False, True) for one_host in (False, True)}
        #: Keyed by whether for one host.
        self.waiting = {one_host: select(ops.c.id).where(
            where[one_host], ops.c.step_state == StepState.WAITING) for one_host in (False, True)}
        #: PostgreSQL: each completion and the submit as one statement (data-modifying CTEs):
        #: outside a transaction one round trip where a transaction takes four or more, and
        #: inside a step's effect transaction one statement after the effect's own.
        #: SQLite has no data-modifying CTE, and its round trips are calls into a library.
        #: Keyed by (advance, counted, data).
        self.completions: dict[tuple[str, bool, bool], Any] = {}
        self.submit: Any = None
        #: SQLite: the advance that says whether it advanced (the id of the operation, or
        #: no row for a duplicate), in the completion's transaction; keyed as ``advances``.
        self.advanced: dict[tuple[str, bool], Any] = {}
        if dialect == "sqlite":
            self.advanced = {key: advance.returning(ops.c.id)
                             for key, advance in self.advances.items()}
        if dialect == "postgresql":
            for (name, data), advance in self.advances.items():
                for counted in (False, True):
                    self.completions[name, counted, data] = self._completion(
                        advance, counted, ending=name == "end")
            self.submit = self._submit()

    @staticmethod
    def _completion(advance: Any, counted: bool, ending: bool) -> Any:
        """``advance`` (guarded by the operation's position), then the step's record, only if
        it advanced (an insert from the advanced row: none for a duplicate); at the end of the
        plan also the operation's host index. Returns how many operations advanced (0 or 1)."""
        ops, log, hosts = Operation.__table__, StepRecord.__table__, OperationHost.__table__
        from sqlalchemy.dialects.postgresql import insert

        advanced = advance.returning(ops.c.id).cte("advanced")

        def typed(name: str, column: Any) -> Any:
            return bindparam(name, type_=column.type)

        row = {"operation_id": advanced.c.id,
               "position": typed("position", log.c.position),
               "step": typed("step", log.c.step), "host": typed("host", log.c.host),
               "status": literal(StepLogStatus.COMPLETED, log.c.status.type),
               "attempts": literal(1 if counted else 0, log.c.attempts.type),
               "applied": literal(1, log.c.applied.type),
               "finished_at": typed("now", log.c.finished_at)}
        done: dict[str, Any] = {"status": StepLogStatus.COMPLETED,
                                "applied": log.c.applied + 1,
                                "finished_at": typed("now", log.c.finished_at)}
        if counted:
            row["worker"] = typed("worker", log.c.worker)
            row["started_at"] = typed("started_at", log.c.started_at)
            row["queue"] = typed("from_queue", log.c.queue)
            done.update(attempts=log.c.attempts + 1, worker=row["worker"],
                        started_at=row["started_at"], queue=row["queue"])
        record = insert(log).from_select(list(row), select(*row.values())).on_conflict_do_update(
            index_elements=["operation_id", "position"], set_=done)
        statement = select(func.count()).select_from(advanced).add_cte(
            record.returning(log.c.id).cte("recorded"))
        if ending:
            statement = statement.add_cte(delete(hosts).where(
                hosts.c.operation_id.in_(select(advanced.c.id))
            ).returning(hosts.c.host).cte("forgotten"))
        return statement

    @staticmethod
    def _submit() -> Any:
        """The operation and its host index in one statement (``host_names`` and
        ``host_positions``: arrays, one element per host the plan names)."""
        ops, hosts = Operation.__table__, OperationHost.__table__
        from sqlalchemy import ARRAY
        from sqlalchemy.dialects.postgresql import insert

        recorded = insert(ops).values(
            {name: bindparam(name, type_=ops.c[name].type) for name in SUBMITTED}
        ).returning(ops.c.id).cte("recorded")
        each = func.unnest(bindparam("host_names", type_=ARRAY(hosts.c.host.type)),
                           bindparam("host_positions", type_=ARRAY(hosts.c.last_position.type))
                           ).table_valued("host", "last_position").render_derived()
        return insert(hosts).from_select(
            ["operation_id", "host", "last_position"],
            select(recorded.c.id, each.c.host, each.c.last_position).select_from(
                recorded.join(each, true())))


_statements: dict[str, StepStatements] = {}


def statements_for(url: str) -> StepStatements:
    dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
    found = _statements.get(dialect)
    if found is None:
        found = _statements[dialect] = StepStatements(dialect)
    return found
