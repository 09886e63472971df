"""What an executed step costs the ledger, counted by the database itself: a trigger counts
every UPDATE of an operation's row. Each executed step updates it once (the completion
records the attempt, the effect, the advance and the next step's queue together); a step
that runs longer than the claim delay is also recorded as running while it runs: once more.
SQLite only (the trigger's dialect); the other tests cover PostgreSQL's behaviour."""

from __future__ import annotations

import sqlite3

import pytest

from nova_app import operations
from orchestrator.local.fleet import Fleet
from orchestrator.runner import CLAIM_AFTER_SECONDS
from tests.helpers import ended, wait_op

pytestmark = pytest.mark.shutdown

TRIGGER = """
CREATE TABLE IF NOT EXISTS test_operation_updates (operation_id TEXT, position INTEGER,
                                                   step_state TEXT, status TEXT);
CREATE TRIGGER IF NOT EXISTS test_count_operation_updates AFTER UPDATE ON operations
BEGIN INSERT INTO test_operation_updates
      VALUES (NEW.id, NEW.position, NEW.step_state, NEW.status); END;
"""


def _updates(path: str, operation_id: str) -> int:
    with sqlite3.connect(path, timeout=30) as conn:
        return conn.execute("SELECT count(*) FROM test_operation_updates WHERE operation_id = ?",
                            (operation_id,)).fetchone()[0]


def _rows(path: str, operation_id: str) -> list:
    with sqlite3.connect(path, timeout=30) as conn:
        return conn.execute("SELECT position, step_state, status FROM test_operation_updates "
                            "WHERE operation_id = ? ORDER BY rowid", (operation_id,)).fetchall()


def test_one_ledger_write_per_executed_step(fleet: Fleet, db_url: str) -> None:
    if not db_url.startswith("sqlite:///"):
        pytest.skip("counted with a SQLite trigger")
    path = db_url.removeprefix("sqlite:///")
    slow = CLAIM_AFTER_SECONDS + 1.0
    env = {"ORCHESTRATOR_STEP_DELAY": "0", "ORCHESTRATOR_STEP_DELAYS": f"resize_instance={slow}"}
    fleet.start("compute1", env=env)
    fleet.start("compute2", env=env)
    booted = operations.boot("vm1", "compute1")
    assert wait_op(booted.id, ended)["status"] == "completed"
    with sqlite3.connect(path, timeout=30) as conn:
        conn.executescript(TRIGGER)

    # A cold migration: prep_resize (dest), resize_instance (source, slow), finish_resize.
    op = operations.resize("vm1", flavor="m1.small", dest="compute2")
    data = wait_op(op.id, ended)
    assert data["status"] == "completed", data
    assert [s["attempts"] for s in data["steps"]] == [1, 1, 1]
    # prep_resize and finish_resize: one write each; resize_instance: its claim, then its
    # completion.
    assert _updates(path, op.id) == 4, _rows(path, op.id)
