"""The ledger unreachable, piece by piece: the error, the log rhythm, the liveness judgement,
and the rule that finds a running step whose delivery is gone.

The database that does not answer is real (a PostgreSQL URL on a port nothing listens on, or a
private cluster stopped); nothing here mocks an exception.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from orchestrator.errors import LedgerUnavailable
from orchestrator.ledger.engines import Database, unreachable
from orchestrator.ledger.health import QUIET_SECONDS, LedgerHealth
from orchestrator.local.embedded import free_port
from orchestrator.registry import ServiceView
from workers.resend import delivery_gone


def dead_url(password: str = "s3cret-pw") -> str:
    return f"postgresql+psycopg://orch:{password}@127.0.0.1:{free_port()}/ledger"


def test_an_unreachable_database_is_one_line_naming_it_without_its_password() -> None:
    db = Database(dead_url())
    with pytest.raises(LedgerUnavailable) as info, db.read():
        pass
    message = str(info.value)
    assert message.startswith("cannot reach the ledger at postgresql+psycopg://orch:***@127.0.0.1:")
    assert "s3cret-pw" not in message and "\n" not in message
    assert unreachable(info.value) and not db.health.up and db.health.errors == 1


def test_a_wrong_statement_is_not_taken_for_an_outage(tmp_path) -> None:
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(OperationalError) as info, db.read() as s:
        s.execute(text("SELECT * FROM no_such_table"))
    assert not unreachable(info.value) and db.health.up


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_waiting_is_said_once_then_every_ten_seconds(caplog) -> None:
    clock = Clock()
    health = LedgerHealth(clock)
    error = LedgerUnavailable("cannot reach the ledger at sqlite:///x.db: locked")
    caplog.set_level(logging.WARNING, logger="orchestrator.ledger")
    for _ in range(50):  # five seconds of a drain checking ten times a second
        health.note_failure(error)
        health.report(error, "drain: cannot tell what is in flight")
        clock.now += 0.1
    assert len(caplog.records) == 1
    assert "drain: cannot tell what is in flight: cannot reach" in caplog.records[0].message
    clock.now += QUIET_SECONDS
    health.report(error, "heartbeat")
    assert len(caplog.records) == 2 and "still" in caplog.records[1].message
    health.note_success()
    assert health.up and len(caplog.records) == 3
    assert "answers again after 15.0s" in caplog.records[2].message
    # A new outage is said at once.
    health.note_failure(error)
    health.report(error, "heartbeat")
    assert len(caplog.records) == 4


def test_a_stale_heartbeat_is_excused_while_and_just_after_the_ledger_is_out() -> None:
    clock = Clock()
    health = LedgerHealth(clock)
    assert not health.excuses_silence(3.0)
    health.note_failure(LedgerUnavailable("x"))
    assert health.excuses_silence(3.0)
    clock.now += 20
    health.note_success()
    assert health.excuses_silence(3.0)  # every live worker writes within the stale window
    clock.now += 3.1
    assert not health.excuses_silence(3.0)


def test_call_retries_until_the_database_answers(tmp_path) -> None:
    """A private PostgreSQL started after the first attempts: the call goes through."""
    from orchestrator.testing import pgserver

    if pgserver.available() is not None:
        pytest.skip(pgserver.available())
    import threading

    server = pgserver.PrivatePostgres().init()
    try:
        db = Database(server.url)
        attempts = []

        def ping() -> None:
            attempts.append(1)
            if len(attempts) == 2:  # the database comes up between two attempts
                threading.Thread(target=server.start).start()
            db.ping()

        db.health.call(ping, "test")
        assert len(attempts) >= 3 and db.health.up and db.health.errors >= 2
    finally:
        server.destroy()


def view(nodename: str, state: str = "up", started_at: float = 0.0) -> ServiceView:
    return ServiceView(nodename=nodename, host=nodename.split("@")[0], version=2,
                       consumes_main=True, consumes_alt=True, state=state, heartbeat_age=1.0,
                       started_at=started_at)


@pytest.mark.parametrize(("worker", "started", "held", "views", "expected"), [
    # This worker ran it and still holds its message: it runs.
    ("node1@a", 100.0, {"op.2"}, [], None),
    # This worker ran it and holds nothing for it: the delivery was lost.
    ("node1@a", 100.0, set(), [], "this worker no longer holds its message"),
    # Run by this worker's previous life (same name, before this one registered).
    ("node1@a", 40.0, {"op.2"}, [], "the worker that ran it restarted since"),
    # Another process of the host, alive: it runs there.
    ("node1-alt@a", 100.0, set(), [view("node1-alt@a", started_at=10)], None),
    # Another process, down (stale heartbeat confirmed, or exited).
    ("node1-alt@a", 100.0, set(), [view("node1-alt@a", "down", 10)], "node1-alt@a is down"),
    # Another process restarted since it began the step.
    ("node1-alt@a", 100.0, set(), [view("node1-alt@a", started_at=150)],
     "node1-alt@a restarted since"),
    # Nothing known of who ran it: no verdict.
    (None, None, set(), [], None),
    ("ghost@a", 100.0, set(), [], None),
])
def test_when_a_running_step_is_known_to_have_no_delivery(worker, started, held, views,
                                                          expected) -> None:
    assert delivery_gone("op", 2, worker, started, me="node1@a", registered_at=50.0,
                         held=held, views=views) == expected


def test_the_command_line_says_one_line_and_exits_2_when_the_ledger_is_down() -> None:
    url = dead_url()
    for args in (["hosts"], ["operation", "x"],
                 ["submit", "move", "--host", "source=n1", "--host", "dest=n2",
                  "--param", "volume=v"]):
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator.ops.cli", "--app", "examples.volume_move.app",
             *args], capture_output=True, text=True, timeout=60,
            env={**__import__("os").environ, "ORCHESTRATOR_DB_URL": url})
        assert done.returncode == 2, (args, done)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot reach the ledger at "), \
            (args, done.stderr)
        assert "s3cret-pw" not in done.stderr + done.stdout
