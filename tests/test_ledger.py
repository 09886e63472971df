"""The ledger's step path without processes: the one completion (``Ledger.complete``:
statements built once per dialect, no ORM) writes what each case needs, a duplicate changes
nothing, an effect runs once in the completion's transaction. On SQLite, and on PostgreSQL
with ORCHESTRATOR_TEST_DB_URL."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select

from orchestrator import Orchestrator
from orchestrator.errors import SubjectBusy
from orchestrator.ledger.engines import reset
from orchestrator.ledger.models import Event, Operation, OperationHost, StepRecord
from orchestrator.ledger.states import ACTIVE, MOVES, OperationStatus, StepState
from orchestrator.ledger.store import Attempt, StepStart

PLAN = [("prep", "hb"), ("move", "ha"), ("finish", "hb")]
ROUTING = """steps:
  prep: {queue: main, reason: nothing started}
  move: {queue: alt, reason: started}
  finish: {queue: alt, reason: started}
"""


@pytest.fixture
def orch(tmp_path: Path) -> Orchestrator:
    return three_step_orchestrator(tmp_path)


def three_step_orchestrator(tmp_path: Path) -> Orchestrator:
    """An orchestrator of one flow, ``three`` (:data:`PLAN`), on a new ledger: SQLite, or
    ORCHESTRATOR_TEST_DB_URL's PostgreSQL emptied."""
    url = os.environ.get("ORCHESTRATOR_TEST_DB_URL") or f"sqlite:///{tmp_path / 'l.db'}"
    if not url.startswith("sqlite"):
        reset(url)
    (tmp_path / "routing.yaml").write_text(ROUTING)
    orch = Orchestrator(Celery("ledger-test"), routing=tmp_path / "routing.yaml", db_url=url)
    for name in ("prep", "move", "finish"):
        orch.step(name=name)(lambda ctx: None)
    orch.flow("three", [("prep", "b"), ("move", "a"), ("finish", "b")])
    return orch


def _new(orch: Orchestrator) -> str:
    return orch.ledger.record_new("three", [list(p) for p in PLAN], {"a": "ha", "b": "hb"},
                                  {}, None, "hb", None)


def _state(orch: Orchestrator, op_id: str) -> tuple:
    """Everything a completion writes, without ids and clocks."""
    with orch.db.read() as s:
        op = s.get(Operation, op_id)
        steps = s.execute(select(StepRecord).where(StepRecord.operation_id == op_id)
                          .order_by(StepRecord.position)).scalars().all()
        hosts = s.execute(select(OperationHost.host, OperationHost.last_position).where(
            OperationHost.operation_id == op_id).order_by(OperationHost.host)).all()
        return ((op.status, op.position, op.step_state, op.next_published, op.queue,
                 op.current_host, op.holds, op.wait, op.finished_at is not None),
                [(r.position, r.step, r.host, r.status, r.attempts, r.applied, r.worker,
                  r.started_at is not None, r.finished_at is not None) for r in steps],
                [tuple(h) for h in hosts])


def _complete(orch: Orchestrator, op_id: str, position: int, *, queue: str | None,
              attempt: Attempt | None, output: dict | None = None, effect: Any = None,
              start: Any = None):
    """Complete the step at ``position`` (``start``: what an earlier begin read, as a
    delivery that ran alongside another has)."""
    step, host = PLAN[position]
    start = start or orch.ledger.begin_step(op_id, position, step, host)
    return orch.ledger.complete(op_id, position, step, host, start, output=output,
                                effect=effect, next_queue=queue, attempt=attempt)


def _seen(s: Any, op: Any) -> None:
    """An effect: an event of its own per step (the application's row) and the result."""
    orch_events = Event(key=f"{op.id}:{op.position}", name=op.plan[op.position][0])
    s.add(orch_events)
    op.result = {"steps": [*(op.result or {}).get("steps", []), op.params.get("got")]}


CASES = ["sent", "not sent", "claimed", "no attempt", "failed plan", "output", "effect"]


@pytest.mark.parametrize("case", CASES)
def test_each_completion_writes_its_case_and_a_duplicate_changes_nothing(
        orch: Orchestrator, case: str) -> None:
    op_id = _new(orch)
    if case == "failed plan":  # a rollback's last step ends the operation as failed
        with orch.db.session() as s:
            s.get(Operation, op_id).error = "prep@hb: broken"
    outcomes = []
    for position in range(len(PLAN)):
        attempt = None if case == "no attempt" else Attempt("w1", 1.0)
        if case == "claimed":
            assert orch.ledger.claim_step(op_id, position, attempt)
            attempt = Attempt("w1", 1.0, claimed=True)
        queue = None if case == "not sent" or position == 2 else f"{PLAN[position + 1][1]}-q"
        extra: dict[str, Any] = {}
        if case in ("output", "effect"):
            extra["output"] = {"got": position, f"from{position}": PLAN[position][0]}
        if case == "effect":
            extra["effect"] = _seen
        step, host = PLAN[position]
        start = orch.ledger.begin_step(op_id, position, step, host)
        nxt = _complete(orch, op_id, position, queue=queue, attempt=attempt, start=start,
                        **extra)
        outcomes.append((nxt.outcome, nxt.next_step, nxt.next_position, nxt.queue))
        # Delivered twice and run alongside: the second completion is a duplicate that
        # changes nothing and applies no effect.
        before = _state(orch, op_id)
        again = _complete(orch, op_id, position, queue=queue, attempt=attempt, start=start,
                          **extra)
        assert again.outcome == "duplicate"
        assert _state(orch, op_id) == before
    sent = case != "not sent"
    assert outcomes == [("run", tuple(PLAN[1]), 1, "ha-q" if sent else None),
                        ("run", tuple(PLAN[2]), 2, "hb-q" if sent else None),
                        ("ended", None, None, None)]
    counted = case != "no attempt"
    assert _state(orch, op_id) == (
        # (the step state an ended operation keeps is its last step's)
        ("failed" if case == "failed plan" else "completed", 3,
         "running" if case == "claimed" else "queued", True,
         "hb-q" if sent else "hb", None, None, None, True),
        [(position, step, host, "completed", 1 if counted else 0, 1,
          "w1" if counted else None, counted, True)
         for position, (step, host) in enumerate(PLAN)],
        [])  # its hosts forgotten
    with orch.db.read() as s:
        op = s.get(Operation, op_id)
        events = s.execute(select(Event.key).order_by(Event.key)).scalars().all()
    if case in ("output", "effect"):
        assert op.params == {"got": 2, "from0": "prep", "from1": "move", "from2": "finish"}
    else:
        assert op.params == {}
    if case == "effect":  # each effect once, seeing the params its step's output made
        assert events == [f"{op_id}:{position}" for position in range(3)]
        assert op.result == {"steps": [0, 1, 2]}
    else:
        assert events == [] and op.result is None


def test_an_effect_that_raises_leaves_nothing_recorded(orch: Orchestrator) -> None:
    """The effect and the completion are one transaction: an effect's error undoes the
    advance and the effect's own rows; the next delivery completes the step."""
    op_id = _new(orch)
    before = _state(orch, op_id)

    def broken(s: Any, op: Any) -> None:
        _seen(s, op)
        s.flush()
        raise RuntimeError("the application's table said no")

    with pytest.raises(RuntimeError, match="said no"):
        _complete(orch, op_id, 0, queue="ha-q", attempt=Attempt("w1", 1.0), effect=broken)
    assert _state(orch, op_id) == before
    with orch.db.read() as s:
        assert s.execute(select(Event)).first() is None
    assert _complete(orch, op_id, 0, queue="ha-q", attempt=Attempt("w1", 1.0),
                     effect=_seen).outcome == "run"
    with orch.db.read() as s:
        assert s.execute(select(Event.key)).scalars().all() == [f"{op_id}:0"]


def test_a_submit_in_the_applications_transaction_records_what_a_submit_alone_does(
        orch: Orchestrator) -> None:
    """Ledger.record_new alone (one statement on PostgreSQL, one transaction on SQLite) and
    in an application's session (its connection, its transaction: nothing until it commits,
    nothing at all if it rolls back); then both complete alike."""
    plan, hosts = [list(p) for p in PLAN], {"a": "ha", "b": "hb"}
    alone = _new(orch)
    with pytest.raises(RuntimeError), orch.transaction() as s:
        dropped = orch.ledger.record_new("three", plan, hosts, {}, "vm9", "hb", None,
                                         session=s)
        raise RuntimeError("the application changed its mind")
    with orch.transaction() as s:
        inside = orch.ledger.record_new("three", plan, hosts, {}, None, "hb", None, session=s)
        with orch.db.read() as other:  # not seen before the application's commit
            assert other.get(Operation, inside) is None
    with orch.db.read() as s:
        assert s.get(Operation, dropped) is None
        assert s.execute(select(OperationHost).where(
            OperationHost.operation_id == dropped)).first() is None
    assert _state(orch, inside) == _state(orch, alone)
    assert _state(orch, alone)[2] == [("ha", 1), ("hb", 2)]  # every host, its last position
    for op_id in (alone, inside):
        for position in range(len(PLAN)):
            _complete(orch, op_id, position, queue="q", attempt=Attempt("w1", 1.0))
    assert _state(orch, inside) == _state(orch, alone)


def test_a_busy_subject_is_refused_naming_its_holder(orch: Orchestrator) -> None:
    plan, hosts = [list(p) for p in PLAN], {"a": "ha", "b": "hb"}
    first = orch.ledger.record_new("three", plan, hosts, {}, "vm1", "hb", None)
    with pytest.raises(SubjectBusy, match=f"subject 'vm1' is busy: operation {first} "
                                          r"\(three\) in progress"):
        orch.ledger.record_new("three", plan, hosts, {}, "vm1", "hb", None)
    with orch.db.read() as s:
        assert s.execute(select(Operation.id)).scalars().all() == [first]  # nothing half-made
        assert len(s.execute(select(OperationHost)).all()) == 2
    for position in range(len(PLAN)):  # the subject is free again once it is done
        _complete(orch, first, position, queue="q", attempt=None)
    orch.ledger.record_new("three", plan, hosts, {}, "vm1", "hb", None)


def in_a_thread(call: Callable[[], Any]) -> Any:
    """What ``call`` returns, called from a thread of its own (not the main thread)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result(timeout=30)


def test_connections_the_server_closed_are_replaced_without_an_error(orch: Orchestrator) -> None:
    """PostgreSQL ends every backend of the ledger's pooled connections (as a restart does):
    the next submit and step find them closed at checkout and connect anew, with no error and
    no ping per checkout (driver.closed_by_server), also for the statements run straight on
    the driver (driver.Direct: the step's read and completion, the periodic looks)."""
    if orch.db.url.startswith("sqlite"):
        pytest.skip("PostgreSQL (ORCHESTRATOR_TEST_DB_URL): SQLite has no connections to lose")
    import psycopg
    from sqlalchemy import make_url

    plan, hosts = [list(p) for p in PLAN], {"a": "ha", "b": "hb"}
    first = orch.ledger.record_new("three", plan, hosts, {}, None, "hb", None)
    _complete(orch, first, 0, queue="q", attempt=None)  # pools hold connections now
    assert orch.ledger.stranded_steps("hb", 60, 60) == []  # and the direct statements' own one
    assert in_a_thread(lambda: orch.ledger.stranded_steps("hb", 60, 60)) == []  # pooled
    url = make_url(orch.db.url)
    with psycopg.connect(host=url.host, port=url.port or 5432, user=url.username,
                         dbname=url.database, autocommit=True) as admin:
        # Each backend waited for until it has exited (a timeout of 5 s), as a restart's
        # are by the time the server answers again: a signalled backend may still read one
        # more statement before it closes its socket.
        ended = admin.execute(
            "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]
    assert ended >= 1
    second = orch.ledger.record_new("three", plan, hosts, {}, None, "hb", None)
    for op_id, position in ((first, 1), (second, 0)):
        assert _complete(orch, op_id, position, queue="q", attempt=None).outcome == "run"
    assert orch.ledger.stranded_steps("hb", 60, 60) == []
    assert in_a_thread(lambda: orch.ledger.stranded_steps("hb", 60, 60)) == []
    assert orch.db.health.up


def _put(orch: Orchestrator, op_id: str, state: StepState) -> float:
    """Put the operation's first step in ``state`` (what the ledger's moves would have done
    by then); returns its ``step_since``."""
    with orch.db.session() as s:
        op = s.get(Operation, op_id)
        op.step_state, op.step_since = state, 5.0
        if state == StepState.WAITING:
            op.wait = {"event": "ev", "key": "k", "since": 1.0, "deadline": 1e12}
    return 5.0


#: Each move of MOVES made through the ledger's own method: whether it moved.
MAKE: dict[str, Callable[[Orchestrator, str, StepState], bool]] = {
    "claim_step": lambda orch, op_id, _: orch.ledger.claim_step(op_id, 0, Attempt("w1", 1.0)),
    "complete": lambda orch, op_id, _: orch.ledger.complete(
        op_id, 0, "prep", "hb", StepStart("run", following=tuple(PLAN[1]), plan=PLAN),
        next_queue="ha-q").outcome == "run",
    "wait_for_event": lambda orch, op_id, _: orch.ledger.wait_for_event(
        op_id, 0, "ev", "k", 60, attempt=Attempt("w1", 1.0)),
    "fail_step": lambda orch, op_id, _: orch.ledger.fail_step(op_id, 0, "prep@hb: boom")
    is not None and _status(orch, op_id) == OperationStatus.FAILED,
    "hold_step": lambda orch, op_id, _: orch.ledger.hold_step(op_id, 0, "prep", "hb")
    == "held",
    "claim_resend": lambda orch, op_id, state: orch.ledger.claim_resend(op_id, 0, 5.0, state),
    "abandon": lambda orch, op_id, _: orch.ledger.abandon(op_id, "could not queue prep"),
}


def _status(orch: Orchestrator, op_id: str) -> str:
    with orch.db.read() as s:
        return s.get(Operation, op_id).status


def test_every_move_of_the_table_happens_from_its_states_and_from_no_other(
        orch: Orchestrator) -> None:
    """MOVES is what the statements are built from: each move, tried from every state of the
    step, moves it (to the state the table says, or ends the operation) exactly from the
    states the table lists, and changes nothing from the others."""
    assert set(MAKE) == set(MOVES)
    for name, move in MOVES.items():
        for state in StepState:
            op_id = _new(orch)
            _put(orch, op_id, state)
            before = _state(orch, op_id)
            moved = MAKE[name](orch, op_id, state)
            assert moved == (state in move.start), (name, state)
            with orch.db.read() as s:
                op = s.get(Operation, op_id)
            if not moved:
                assert _state(orch, op_id) == before, (name, state)
            elif op.status in ACTIVE:
                assert op.step_state == move.to, (name, state)
            else:
                assert move.ends, (name, state)


def test_no_code_outside_the_ledger_writes_a_state() -> None:
    """The ledger's statements are the only writers of an operation's status and its step's
    state: no engine module outside orchestrator/ledger/ assigns them or passes them to a
    constructor or an UPDATE."""
    import ast

    repo = Path(__file__).resolve().parent.parent
    written = {"step_state", "next_published", "step_since"}
    offenders = []
    for package in ("orchestrator", "workers"):
        for path in (repo / package).rglob("*.py"):
            if "ledger" in path.relative_to(repo).parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                targets = []
                if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.attr for t in targets if isinstance(t, ast.Attribute)]
                if isinstance(node, ast.Call):
                    names += [k.arg for k in node.keywords if k.arg]
                for name in names:
                    if name in written or (name == "status" and package == "workers"):
                        offenders.append(f"{path.relative_to(repo)}:{node.lineno}: {name}")
    assert offenders == []


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_every_update_of_an_operation_says_when(dialect: str) -> None:
    """The statements run compiled once, without SQLAlchemy's column defaults: each UPDATE of
    an operation sets ``updated_at`` itself (a NULL there breaks the column's NOT NULL)."""
    from sqlalchemy.sql.dml import Update

    from orchestrator.ledger.statements import StepStatements

    statements = StepStatements(dialect)
    updates = {}
    for name, value in vars(statements).items():
        for key, one in (value.items() if isinstance(value, dict) else [(None, value)]):
            if isinstance(one, Update) and one.table.name == "operations":
                updates[name, key] = {getattr(c, "name", c) for c in one._values}
    assert len(updates) >= 20
    assert [where for where, columns in updates.items() if "updated_at" not in columns] == []
