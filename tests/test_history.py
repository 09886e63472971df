"""An operation's history and timeline without processes: each transition off the normal path
writes its entry in its own transaction, the normal path writes none, and the timeline puts
the step log, the history and the hosts' drains in order. On SQLite, and on PostgreSQL with
ORCHESTRATOR_TEST_DB_URL (CI's PostgreSQL stage)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from orchestrator import Orchestrator
from orchestrator.ledger.models import HistoryEntry
from orchestrator.ledger.states import Happening
from orchestrator.ledger.store import Attempt, OperationQuery
from orchestrator.ops.views import operations_page
from orchestrator.status import operation_dict
from tests.test_ledger import PLAN, _complete, _new, three_step_orchestrator


@pytest.fixture
def orch(tmp_path: Path) -> Orchestrator:
    return three_step_orchestrator(tmp_path)


def _kinds(orch: Orchestrator, op_id: str) -> list[str]:
    return [row[1] for row in orch.ledger.history(op_id)]


def _entries(orch: Orchestrator) -> int:
    with orch.db.read() as s:
        return s.execute(select(func.count()).select_from(HistoryEntry)).scalar_one()


def test_the_normal_path_writes_no_history_and_the_timeline_comes_from_the_step_log(
        orch: Orchestrator) -> None:
    op_id = _new(orch)
    for position, queue in ((0, "ha-alt"), (1, "hb-alt"), (2, None)):
        _complete(orch, op_id, position, queue=queue,
                  attempt=Attempt(f"w{position}@x", time.time(), queue=PLAN[position][1]))
    assert _entries(orch) == 0, "a step that runs and completes costs the step log's row only"
    data = operation_dict(orch, op_id, with_timeline=True)
    kinds = [e["kind"] for e in data["timeline"]]
    assert kinds == ["submitted"] + ["step-started", "step-completed"] * 3 + ["ended"]
    assert [s["queue"] for s in data["steps"]] == ["hb", "ha", "hb"]
    assert [e["worker"] for e in data["timeline"] if e["kind"] == "step-started"] == [
        "w0@x", "w1@x", "w2@x"]
    lanes = {lane["host"]: lane for lane in data["lanes"]["hosts"]}
    assert list(lanes) == ["hb", "ha"], "a lane per host, in the plan's order"
    assert [b["step"] for b in lanes["hb"]["bars"]] == ["prep", "finish"]
    assert all(b["queue_kind"] == "main" for b in lanes["hb"]["bars"])
    for bar in lanes["hb"]["bars"] + lanes["ha"]["bars"]:
        assert 0 <= bar["left"] <= 100 and bar["left"] + bar["width"] <= 100.5
    assert "timeline" not in operation_dict(orch, op_id), "only when asked: orch.wait reads less"


def test_each_transition_off_the_normal_path_writes_its_entry(orch: Orchestrator) -> None:
    ledger = orch.ledger
    held = _new(orch)
    assert ledger.hold_step(held, 0, "prep", "hb", worker="old@x", queue="hb") == "held"
    assert ledger.hold_step(held, 0, "prep", "hb") == "held", "held again: a second entry"
    assert _kinds(orch, held) == [Happening.HELD, Happening.HELD]
    at, kind, position, step, host, worker, queue, detail = ledger.history(held)[0]
    assert (kind, position, step, host, worker, queue) == ("held", 0, "prep", "hb", "old@x",
                                                           "hb")

    retried = _new(orch)
    ledger.record_attempt(retried, 0, Attempt("w@x", time.time(), queue="hb"), "prep", "hb",
                          "ValueError: boom; retry 1 of 3")
    assert ledger.history(retried)[0][1:] == (
        "retried", 0, "prep", "hb", "w@x", "hb", "ValueError: boom; retry 1 of 3")

    waited = _new(orch)
    assert ledger.wait_for_event(waited, 0, "plugged", "vm1", 0.0, {},
                                 attempt=Attempt("w@x", time.time(), queue="hb"))
    ledger.settle_waits("hb", lambda _: None, lambda _: None)
    assert _kinds(orch, waited) == [Happening.WAITING, Happening.WAIT_TIMED_OUT]
    assert ledger.history(waited)[1][7] == "prep@hb: timed out waiting for plugged"

    failed = _new(orch)
    ledger.fail_step(failed, 0, "prep@hb: boom")
    assert _kinds(orch, failed) == [Happening.FAILED]
    data = operation_dict(orch, failed, with_timeline=True)
    assert [e["kind"] for e in data["timeline"]] == ["submitted", "failed", "ended"]
    lane = {lane["host"]: lane for lane in data["lanes"]["hosts"]}["hb"]
    assert [m["kind"] for m in lane["marks"]] == ["failed"]

    abandoned = _new(orch)
    assert ledger.abandon(abandoned, "could not queue prep@hb: refused")
    assert _kinds(orch, abandoned) == [Happening.ABANDONED]


def test_a_rollback_started_is_in_the_failures_transaction(orch: Orchestrator) -> None:
    orch.step(name="undo")(lambda ctx: None)
    orch.flow("undone", [("prep", "b"), ("move", "a")], rollback=[("undo", "b")],
              rollback_on=["move"])
    op_id = orch.ledger.record_new("undone", [["prep", "hb"], ["move", "ha"]],
                                   {"a": "ha", "b": "hb"}, {}, None, "hb",
                                   {"on": ["move"], "plan": [["undo", "hb"]]})
    _complete(orch, op_id, 0, queue="ha-alt", attempt=Attempt("w@x", time.time()))
    orch.ledger.fail_step(op_id, 1, "move@ha: disk full")
    rows = orch.ledger.history(op_id)
    assert [r[1:5] for r in rows] == [("failed", 1, "move", "ha"),
                                      ("rollback-started", 2, "undo", "hb")]
    assert rows[1][7] == "undo@hb"


def test_a_drain_of_a_host_shows_in_the_timeline_of_the_operations_on_it(
        orch: Orchestrator) -> None:
    op_id = _new(orch)
    started = time.time()
    drain = orch.registry.drain_started("hb@x", "hb", "SIGTERM", started, started + 60, {})
    orch.ledger.note(Happening.HANDED_BACK, op_id, 0, "prep", "hb", worker="hb@x", queue="hb",
                     detail="draining (SIGTERM)")
    orch.registry.drain_progress(drain, 1, outcome="done")
    orch.registry.drain_started("hz@x", "hz", "SIGTERM", started, started + 60, {})
    data = operation_dict(orch, op_id, with_timeline=True)
    kinds = [(e["kind"], e["host"]) for e in data["timeline"]]
    assert ("drain-started", "hb") in kinds and ("drain-ended", "hb") in kinds
    assert ("handed-back", "hb") in kinds and not any(h == "hz" for _, h in kinds)
    lane = {lane["host"]: lane for lane in data["lanes"]["hosts"]}["hb"]
    assert [d["outcome"] for d in lane["drains"]] == ["done"]
    assert [m["kind"] for m in lane["marks"]] == ["handed-back"]
    assert [b["status"] for b in lane["bars"]] == ["queued"], "queued, not started yet"


def test_operations_are_listed_stuck_first_filtered_and_paged(orch: Orchestrator) -> None:
    ended = _new(orch)
    for position, queue in ((0, "ha-alt"), (1, "hb-alt"), (2, None)):
        _complete(orch, ended, position, queue=queue, attempt=Attempt("w@x", time.time()))
    fresh, stuck = _new(orch), _new(orch)
    with orch.db.session() as s:  # its step queued ten minutes ago
        from orchestrator.ledger.models import Operation

        s.get(Operation, stuck).step_since = time.time() - 600
    page = operations_page(orch, OperationQuery())
    assert [op["operation"] for op in page["operations"]] == [stuck, fresh, ended]
    assert page["operations"][0]["current_step"]["seconds"] >= 599
    assert page["total"] == 3
    only = operations_page(orch, OperationQuery(stuck_after=300))
    assert [op["operation"] for op in only["operations"]] == [stuck]
    done = operations_page(orch, OperationQuery(statuses=("completed",)))
    assert [op["operation"] for op in done["operations"]] == [ended]
    assert operations_page(orch, OperationQuery(host="ha"))["total"] == 3
    assert operations_page(orch, OperationQuery(host="nowhere"))["total"] == 0
    assert operations_page(orch, OperationQuery(flow="three", limit=2, offset=2))[
        "operations"][0]["operation"] == ended


@pytest.mark.parametrize("pattern, found", [("vm*", 2), ("vm_", 0), ("vm1", 1), ("*", 2)])
def test_a_subject_is_found_exactly_or_by_a_glob(orch: Orchestrator, pattern: str,
                                                 found: int) -> None:
    for subject in ("vm1", "vm2"):
        orch.ledger.record_new("three", [list(p) for p in PLAN], {"a": "ha", "b": "hb"}, {},
                               subject, "hb", None)
    assert operations_page(orch, OperationQuery(subject=pattern))["total"] == found
