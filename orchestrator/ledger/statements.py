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

from orchestrator.ledger.models import ACTIVE_STATUSES, Operation, OperationHost, StepRecord

#: The ways a completion moves an operation on: it ends (the plan is done), or its next step
#: is queued, recorded as sent to a queue in the same statement or not.
ADVANCES = ("end", "advance", "advance_sent")

#: The columns a submit writes (``Ledger.record_new``).
SUBMITTED = ("id", "kind", "subject", "holds", "plan", "hosts", "params", "status", "position",
             "step_state", "step_since", "next_published", "queue", "current_host", "rollback",
             "created_at", "updated_at")


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
        self.may_run = select(
            ops.c.position, ops.c.status, ops.c.step_state, ops.c.next_published, ops.c.plan,
            ops.c.kind, ops.c.subject, ops.c.params, ops.c.hosts, log.c.attempts,
            ops.c.result, ops.c.error,
        ).select_from(ops.outerjoin(log, (log.c.operation_id == ops.c.id)
                                    & (log.c.position == bindparam("position")))
                      ).where(ops.c.id == bindparam("id"))
        # Bound parameters named after no column ("op", "at", ...): an UPDATE's SET takes
        # the column names for its own.
        guarded = update(ops).where(
            (ops.c.id == bindparam("op")) & (ops.c.position == bindparam("at"))
            & one_of(ops.c.status, ACTIVE_STATUSES))
        moved = dict(position=bindparam("next_position"), wait=None,
                     updated_at=bindparam("now"))
        self.end = guarded.values(
            status=case((ops.c.error.is_(None), "completed"), else_="failed"),
            finished_at=bindparam("now"), next_published=True, holds=None,
            current_host=None, **moved)
        queued = dict(status="running", step_state="queued", step_since=bindparam("now"),
                      current_host=bindparam("next_host"), **moved)
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
                   step=bindparam("step"), host=bindparam("host"), status="completed",
                   applied=1, finished_at=bindparam("now"))
        done = dict(status="completed", finished_at=bindparam("now"),
                    applied=log.c.applied + 1)
        keys = ["operation_id", "position"]
        self.record = insert(log).values(attempts=0, **row).on_conflict_do_update(
            index_elements=keys, set_=done)
        self.record_counted = insert(log).values(
            attempts=1, worker=bindparam("worker"), started_at=bindparam("started_at"), **row,
        ).on_conflict_do_update(index_elements=keys, set_=dict(
            attempts=log.c.attempts + 1, worker=bindparam("worker"),
            started_at=bindparam("started_at"), **done))
        self.forget_hosts = delete(hosts).where(hosts.c.operation_id == bindparam("op"))
        self.holder = select(ops.c.id, ops.c.kind).where(ops.c.holds == bindparam("subject"))
        #: What an effect sets as the operation's result, in the completion's transaction.
        self.set_result = update(ops).where(ops.c.id == bindparam("op")).values(
            result=bindparam("new_result", type_=ops.c.result.type),
            updated_at=bindparam("now"))
        #: What a waiter polls (``Orchestrator.wait``): one column of one row.
        self.status = select(ops.c.status).where(ops.c.id == bindparam("id"))
        self.insert_operation = insert(ops).values(
            {name: bindparam(name, type_=ops.c[name].type) for name in SUBMITTED})
        self.insert_hosts = insert(hosts).values(
            operation_id=bindparam("operation_id"), host=bindparam("host"),
            last_position=bindparam("last_position"))
        # What a host's worker looks for every few seconds, idle or not, through
        # Database.direct: no IN list, which SQLAlchemy expands at each execution and a
        # driver's own form of the statement cannot hold.
        on_host = (ops.c.current_host == bindparam("host")) & one_of(ops.c.status,
                                                                      ACTIVE_STATUSES)
        #: Keyed by whether running steps are looked at too.
        self.stranded = {
            running: select(ops.c.id).where(
                on_host, one_of(ops.c.step_state, ("queued", "held", "running")[:2 + running]),
                (ops.c.step_since < bindparam("before")) | (ops.c.step_state == "held"))
            for running in (False, True)}
        self.waiting = select(ops.c.id).where(on_host, ops.c.step_state == "waiting")
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
               "status": literal("completed", log.c.status.type),
               "attempts": literal(1 if counted else 0, log.c.attempts.type),
               "applied": literal(1, log.c.applied.type),
               "finished_at": typed("now", log.c.finished_at)}
        done: dict[str, Any] = {"status": "completed", "applied": log.c.applied + 1,
                                "finished_at": typed("now", log.c.finished_at)}
        if counted:
            row["worker"] = typed("worker", log.c.worker)
            row["started_at"] = typed("started_at", log.c.started_at)
            done.update(attempts=log.c.attempts + 1, worker=row["worker"],
                        started_at=row["started_at"])
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
