"""The ledger's step path without processes: the completion of a step with no effect and no
output (two statements, no ORM: ``Ledger.complete_plain``) leaves the ledger exactly as the
general completion (``Ledger.complete_step``) does, case by case. On SQLite, and on
PostgreSQL with ORCHESTRATOR_TEST_DB_URL."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select

from orchestrator import Orchestrator
from orchestrator.db import reset
from orchestrator.errors import SubjectBusy
from orchestrator.models import Operation, OperationHost, StepRecord
from orchestrator.state import Attempt

PLAN = [("prep", "hb"), ("move", "ha"), ("finish", "hb")]
ROUTING = """steps:
  prep: {queue: main, reason: nothing started}
  move: {queue: alt, reason: started}
  finish: {queue: alt, reason: started}
"""


@pytest.fixture
def orch(tmp_path: Path) -> Iterator[Orchestrator]:
    url = os.environ.get("ORCHESTRATOR_TEST_DB_URL") or f"sqlite:///{tmp_path / 'l.db'}"
    if not url.startswith("sqlite"):
        reset(url)
    (tmp_path / "routing.yaml").write_text(ROUTING)
    orch = Orchestrator(Celery("ledger-test"), routing=tmp_path / "routing.yaml", db_url=url)
    for name in ("prep", "move", "finish"):
        orch.step(name=name)(lambda ctx: None)
    orch.flow("three", [("prep", "b"), ("move", "a"), ("finish", "b")])
    yield orch


def _new(orch: Orchestrator) -> str:
    with orch.db.session() as s:
        op = Operation(kind="three", plan=[list(p) for p in PLAN], hosts={"a": "ha", "b": "hb"},
                       params={}, status="queued", position=0, step_state="queued",
                       step_since=0.0, next_published=True, queue="hb", current_host="hb")
        s.add(op)
        s.flush()
        orch.ledger.index_hosts(s, op, new=True)
        return op.id


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


def _complete(orch: Orchestrator, op_id: str, position: int, plain: bool, *,
              queue: str | None, attempt: Attempt | None):
    step, host = PLAN[position]
    if plain:
        start = orch.ledger.begin_step(op_id, position, step, host, "w1", claim=False)
        return orch.ledger.complete_plain(op_id, position, step, host, start, queue, attempt)
    return orch.ledger.complete_step(op_id, position, next_queue=queue, attempt=attempt)


@pytest.mark.parametrize("case", ["sent", "not sent", "claimed", "no attempt", "failed plan"])
def test_the_plain_completion_writes_what_the_general_one_writes(orch: Orchestrator,
                                                                 case: str) -> None:
    results = {}
    for plain in (False, True):
        op_id = _new(orch)
        if case == "failed plan":  # a rollback's last step ends the operation as failed
            with orch.db.session() as s:
                s.get(Operation, op_id).error = "prep@hb: broken"
        outcomes = []
        for position in range(len(PLAN)):
            attempt = None if case == "no attempt" else Attempt("w1", 1.0)
            if case == "claimed":
                orch.ledger.claim_step(op_id, position, attempt)
                attempt = Attempt("w1", 1.0, claimed=True)
            queue = None if case == "not sent" or position == 2 else f"{PLAN[position + 1][1]}-q"
            nxt = _complete(orch, op_id, position, plain, queue=queue, attempt=attempt)
            outcomes.append((nxt.outcome, nxt.next_step, nxt.next_position, nxt.queue))
            # Delivered again: a duplicate that changes nothing.
            again = _complete(orch, op_id, position, plain, queue=queue, attempt=attempt)
            assert again.outcome == "duplicate"
        results[plain] = (outcomes, _state(orch, op_id))
    assert results[True] == results[False]
    status = results[True][1][0][0]
    assert status == ("failed" if case == "failed plan" else "completed")


def test_a_submit_records_what_the_general_path_records(orch: Orchestrator) -> None:
    """Ledger.record_new (one statement on PostgreSQL, one transaction on SQLite) against the
    ORM's record of the same operation; then both complete alike."""
    ids = {"orm": _new(orch),
           "new": orch.ledger.record_new("three", [list(p) for p in PLAN],
                                         {"a": "ha", "b": "hb"}, {}, None, "hb", None)}
    states = {name: _state(orch, op_id) for name, op_id in ids.items()}
    assert states["new"] == states["orm"]
    assert states["new"][2] == [("ha", 1), ("hb", 2)]  # every host, with its last position
    for op_id in ids.values():
        for position in range(len(PLAN)):
            _complete(orch, op_id, position, True, queue="q", attempt=Attempt("w1", 1.0))
    assert _state(orch, ids["new"]) == _state(orch, ids["orm"])


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
        _complete(orch, first, position, True, queue="q", attempt=None)
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
    _complete(orch, first, 0, True, queue="q", attempt=None)  # pools hold connections now
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
        assert _complete(orch, op_id, position, True, queue="q", attempt=None).outcome == "run"
    assert orch.ledger.stranded_steps("hb", 60, 60) == []
    assert in_a_thread(lambda: orch.ledger.stranded_steps("hb", 60, 60)) == []
    assert orch.db.health.up
