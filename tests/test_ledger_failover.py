"""The ledger's PostgreSQL fails over under running workers: a primary and a streaming
standby (tests/pgfailover.py), one URL naming both with ``target_session_attrs=read-write``;
the primary crashes mid-step and the standby is promoted, with real workers, a real broker and
real signals.

What each setup loses (docs/FAILOVER.md): with a synchronous standby, nothing acknowledged; the
operation completes and each step's work is done once. With an asynchronous one, the commits
the standby had not received: a step whose completion is lost runs again (the stranded-step
resend), as does a step begun after it, and the ledger still applies each effect once.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from sqlalchemy import column, func, insert, select, table, text

from examples.volume_move.app import orch, volume_path
from orchestrator.errors import LedgerUnavailable
from orchestrator.ledger.engines import Database
from orchestrator.local.fleet import Fleet, wait_for
from orchestrator.testing import pgserver
from tests.conftest import fresh_broker
from tests.pgfailover import PostgresPair, query
from tests.volumes import (
    each_effect_once,
    effects_applied,
    make_volume,
    runs,
    volume_fleet,
    wait_step,
)

pytestmark = [
    pytest.mark.shutdown,
    pytest.mark.skipif(pgserver.available() is not None, reason=str(pgserver.available())),
]
ONCE = ["reserve@node2", "copy_out@node1", "copy_in@node2", "retire_source@node1"]


@pytest.fixture
def pair() -> Iterator[PostgresPair]:
    """A primary and a synchronous standby."""
    server = PostgresPair(synchronous=True)
    try:
        yield server.create()
    finally:
        server.destroy()


@pytest.fixture
def async_pair() -> Iterator[PostgresPair]:
    server = PostgresPair(synchronous=False)
    try:
        yield server.create()
    finally:
        server.destroy()


def gated_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str,
                *steps: str, **extra: str) -> tuple[AbstractContextManager[Fleet],
                                                    dict[str, Path]]:
    """The example's fleet on ``url`` (to enter), each of ``steps`` ending only once its
    gate file is made (``VOLUMES_GATE``): the test decides when a step's work is done."""
    gates = {step: tmp_path / f"{step}.go" for step in steps}
    env = {"VOLUMES_GATE": ",".join(f"{s}={p}" for s, p in gates.items()), **extra}
    return volume_fleet(tmp_path, monkeypatch, fresh_broker(), url, **env), gates


def assert_healthy(*workers) -> None:
    for worker in workers:
        assert worker.proc.poll() is None, worker.log()[-3000:]
        assert "Traceback" not in worker.log() and "raised unexpected" not in worker.log(), \
            worker.log()[-3000:]


def test_every_path_reconnects_to_the_promoted_server_and_never_writes_a_read_only_one(
        pair: PostgresPair) -> None:
    """The old primary fenced read-only (``default_transaction_read_only``, as a switchover
    does before it demotes it) while this process holds connections to it: each path's next
    write is refused with SQLSTATE 25006, which is the ledger unreachable (a wait), not an
    error of the statement; the connection is dropped and the one after lands on the
    promoted standby: an ORM session, a statement on the main thread's kept connection, one
    from another thread, a transaction of statements."""
    db = Database(pair.url)
    with db.session() as s:
        s.execute(text("CREATE TABLE marks (path text)"))
    marks = table("marks", column("path"))

    def session() -> None:
        with db.session() as s:
            s.execute(insert(marks), {"path": "session"})

    def transaction() -> None:
        with db.direct_transaction() as run:
            run(insert(marks), path="transaction")

    paths = {
        "session": session,
        "main thread": lambda: db.direct(insert(marks), path="main"),
        "another thread": lambda: _in_thread(lambda: db.direct(insert(marks), path="other")),
        "transaction": transaction,
    }
    for run in paths.values():  # every path holds a connection to the primary
        run()
    old = pair.primary
    query(old, "ALTER SYSTEM SET default_transaction_read_only = on")
    query(old, "SELECT pg_reload_conf()")
    wait_for(lambda: query(old, "SHOW default_transaction_read_only") == "on", 10, "the fence")
    pair.standby._run(pgserver.pg_bin("pg_ctl"), "-D", str(pair.standby.data), "-w", "promote")
    wait_for(lambda: query(pair.standby, "SELECT NOT pg_is_in_recovery()"), 30, "the promotion")
    new = pair.standby

    for name, run in paths.items():
        try:
            run()
        except LedgerUnavailable as exc:  # the connection on the fenced server: a wait
            assert "read-only transaction" in str(exc), (name, exc)
        run()  # the next one is on the promoted server
    assert db.health.errors >= 1 and db.health.up
    assert query(old, "SELECT count(*) FROM marks") == 4  # nothing written there since
    assert query(new, "SELECT count(*) FROM marks") >= 8


def test_a_statement_in_flight_when_the_primary_crashes_is_a_wait_then_the_next_reconnects(
        pair: PostgresPair) -> None:
    """The main thread's kept connection loses its server mid-statement (the primary crashed
    while it ran): the ledger unreachable, the connection dropped, and the next statement
    runs on the promoted standby."""
    db = Database(pair.url)
    with db.session() as s:
        s.execute(text("CREATE TABLE marks (path text)"))
    marks = table("marks", column("path"))
    db.direct(insert(marks), path="before")  # the kept connection, to the primary

    def crash_once_it_runs() -> None:
        wait_for(lambda: query(pair.primary, "SELECT count(*) FROM pg_stat_activity "
                                             "WHERE query LIKE 'SELECT pg_sleep%'"), 10,
                 "the statement to run")
        pair.fail_over()

    crasher = threading.Thread(target=crash_once_it_runs)
    crasher.start()
    with pytest.raises(LedgerUnavailable):
        db.direct(select(func.pg_sleep(10)))
    crasher.join(30)
    db.direct(insert(marks), path="after")
    assert query(pair.primary, "SELECT count(*) FROM marks") == 2
    assert db.health.up


def _in_thread(fn) -> None:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the statement in another thread did not end"
    if errors:
        raise errors[0]



def test_synchronous_standby_promoted_mid_step_the_move_completes_each_step_once(
        pair: PostgresPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The primary crashes while copy_out runs on the source; the standby, which had flushed
    every acknowledged commit, is promoted; copy_out ends after that and records its outcome
    on the new primary: nothing was lost, each step's work is done once, no worker exits."""
    fleet_cm, gates = gated_fleet(tmp_path, monkeypatch, pair.url, "copy_out")
    with fleet_cm as fleet:
        source, dest = fleet.start("node1"), fleet.start("node2")
        make_volume("vol1")
        op = orch.submit("move", hosts={"source": "node1", "dest": "node2"},
                         params={"volume": "vol1"}, subject="vol1")
        wait_step(op, "copy_out")
        before = orch.operation(op)
        pair.fail_over()
        # What the old primary acknowledged, the new one has: copy_out recorded as running.
        after = orch.operation(op)
        assert after["current_step"] == before["current_step"], (before, after)
        gates["copy_out"].touch()
        done = orch.wait(op, timeout=60)
        assert done["status"] == "completed", done
        assert sorted(runs(tmp_path)) == sorted(ONCE)
        assert effects_applied([op]) == each_effect_once([op])
        assert {s["step"]: s["attempts"] for s in done["steps"]} == dict.fromkeys(
            ["reserve", "copy_out", "copy_in", "retire_source"], 1), done["steps"]
        assert volume_path("node2", "vol1").exists() and not volume_path("node1", "vol1").exists()
        assert_healthy(source, dest)


def test_failover_while_the_destination_drains(
        pair: PostgresPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same failover while the destination drains (SIGTERM mid-operation): the drain
    waits for the ledger through the failover, copy_in runs on the draining host, which then
    exits cleanly."""
    fleet_cm, gates = gated_fleet(tmp_path, monkeypatch, pair.url, "copy_out")
    with fleet_cm as fleet:
        source = fleet.start("node1")
        dest = fleet.start("node2", graceful_timeout=90)
        make_volume("vol1")
        op = orch.submit("move", hosts={"source": "node1", "dest": "node2"},
                         params={"volume": "vol1"}, subject="vol1")
        wait_step(op, "copy_out")
        dest.signal(signal.SIGTERM)
        wait_for(lambda: any(v.state == "draining" for v in orch.registry.services("node2")),
                 10, "node2 to drain")
        pair.fail_over()
        gates["copy_out"].touch()
        done = orch.wait(op, timeout=60)
        assert done["status"] == "completed", done
        assert dest.wait(timeout=60) == 0, dest.log()[-3000:]
        assert "steps completed during drain: 1" in dest.log()
        steps = {s["step"]: s for s in done["steps"]}
        assert steps["copy_in"]["worker"].startswith("node2@"), steps
        assert sorted(runs(tmp_path)) == sorted(ONCE)
        assert effects_applied([op]) == each_effect_once([op])
        assert_healthy(source)
        assert "Traceback" not in dest.log(), dest.log()[-3000:]


@pytest.mark.parametrize("next_step", ["running", "not delivered"])
def test_asynchronous_standby_loses_a_completion_the_step_runs_again_effects_once(
        async_pair: PostgresPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        next_step: str) -> None:
    """What an asynchronous standby can lose, made deterministic: the standby stops
    receiving WAL once copy_out is recorded as running; copy_out completes on the primary
    and copy_in is sent (``running``: it begins on the destination; ``not delivered``: the
    destination is down, its message waits); the primary crashes and the standby, which
    never saw that completion, is promoted. The ledger is back at copy_out, running, with no
    message for it: copy_in's completion, or its delivery, finds the ledger behind and
    records nothing; copy_out is sent again once its delivery is known gone
    (workers.resend), runs again, then copy_in. Each effect is applied once in the surviving
    ledger, the move completes; copy_out's work is done twice, and copy_in's too if it had
    begun (steps are idempotent)."""
    pair = async_pair
    fleet_cm, gates = gated_fleet(tmp_path, monkeypatch, pair.url, "copy_out", "copy_in",
                                  ORCHESTRATOR_RESEND_AFTER="2")
    with fleet_cm as fleet:
        source, dest = fleet.start("node1"), fleet.start("node2")
        make_volume("vol1")
        op = orch.submit("move", hosts={"source": "node1", "dest": "node2"},
                         params={"volume": "vol1"}, subject="vol1")
        wait_step(op, "copy_out")
        if next_step == "not delivered":  # reserve is done; copy_in's message will wait
            os.killpg(dest.pid, signal.SIGKILL)
            dest.wait(10)
        wait_for(pair.caught_up, 30, "the standby to replay copy_out's claim")
        pair.cut_replication()
        gates["copy_out"].touch()
        # copy_out's completion, on the primary only: copy_in sent (and begun, if it can).
        wait_step(op, "copy_in", "running" if next_step == "running" else "queued")
        pair.fail_over()
        lost = orch.operation(op)
        assert lost["current_step"]["step"] == "copy_out", lost  # the completion is gone
        gates["copy_in"].touch()
        if next_step == "not delivered":
            dest = fleet.start("node2")
        done = orch.wait(op, timeout=60)
        assert done["status"] == "completed", done
        assert effects_applied([op]) == each_effect_once([op])
        twice = ["copy_out@node1"] + (["copy_in@node2"] if next_step == "running" else [])
        assert sorted(runs(tmp_path)) == sorted(ONCE + twice), runs(tmp_path)
        everyone = "".join(worker.log() for worker in fleet.workers)  # the fleet's looks too
        assert "resent copy_out of" in everyone, source.log()[-3000:]
        # What found the ledger behind says so, once, naming where it is.
        behind = [line for line in dest.log().splitlines()
                  if "the ledger has the operation at step 1 (copy_out)" in line]
        assert len(behind) == 1, dest.log()[-3000:]
        assert ("its outcome not recorded" if next_step == "running" else "dropped") \
            in behind[0], behind
        assert volume_path("node2", "vol1").exists() and not volume_path("node1", "vol1").exists()
        assert_healthy(source, dest)


def test_asynchronous_standby_loses_a_submit_its_message_is_refused_nothing_runs(
        async_pair: PostgresPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other thing an asynchronous standby can lose: a submit acknowledged by the old
    primary (its id returned, its first step sent) and never received. After the failover
    the operation is unknown to the ledger: its first step's message is refused with one
    line and nothing runs; its subject is free, so the caller can submit it again."""
    from orchestrator.errors import UnknownOperation

    pair = async_pair
    fleet_cm, _ = gated_fleet(tmp_path, monkeypatch, pair.url)
    with fleet_cm as fleet:
        make_volume("vol1")
        pair.cut_replication()
        op = orch.submit("move", hosts={"source": "node1", "dest": "node2"},
                         params={"volume": "vol1"}, subject="vol1")
        pair.fail_over()
        with pytest.raises(UnknownOperation):
            orch.operation(op)
        dest = fleet.start("node2")
        wait_for(lambda: f"unknown operation '{op}'" in dest.log(), 30,
                 "the lost operation's first step to be refused")
        assert runs(tmp_path) == []
        again = orch.submit("move", hosts={"source": "node1", "dest": "node2"},
                            params={"volume": "vol1"}, subject="vol1")
        source = fleet.start("node1")
        assert orch.wait(again, timeout=60)["status"] == "completed"
        assert sorted(runs(tmp_path)) == sorted(ONCE)
        assert_healthy(source, dest)
