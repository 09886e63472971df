"""The ledger's database fails under running workers: a wait, never a verdict.

A private PostgreSQL (tests/pgserver.py) is the ledger of the example application; the test
stops it mid-step and starts it again, with real workers, a real broker and real signals. The
shared PostgreSQL on 5432 is never touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.volume_move.app import orch, volume_path
from orchestrator.broker import queue_depths
from orchestrator.errors import LedgerUnavailable
from orchestrator.fleet import Fleet, wait_for
from orchestrator.views import wait_operation
from tests import pgserver
from tests.conftest import fresh_broker

pytestmark = [
    pytest.mark.shutdown,
    pytest.mark.skipif(pgserver.available() is not None, reason=str(pgserver.available())),
]
APP = "examples.volume_move.app"
NODES = ["node1", "node2", "node3"]


@pytest.fixture
def pg() -> Iterator[pgserver.PrivatePostgres]:
    server = pgserver.PrivatePostgres().init()
    try:
        server.start()
        server.wait_answering()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def ledger_fleet(tmp_path: Path, pg: pgserver.PrivatePostgres,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    broker = fresh_broker()
    root = tmp_path / "volumes"
    env = {
        "ORCHESTRATOR_BROKER_URL": broker,
        "ORCHESTRATOR_DB_URL": pg.url,
        "ORCHESTRATOR_HEARTBEAT_INTERVAL": os.environ["ORCHESTRATOR_HEARTBEAT_INTERVAL"],
        "VOLUMES_ROOT": str(root),
        "VOLUMES_RUN_LOG": str(tmp_path / "runs.log"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    orch.db.engine()  # the schema, before any worker starts
    fleet = Fleet(env=env, log_dir=tmp_path / "logs", app=APP)
    try:
        yield fleet
    finally:
        fleet.stop_all()


def runs(tmp_path: Path) -> list[str]:
    path = tmp_path / "runs.log"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "--app", APP, *args],
                          capture_output=True, text=True, timeout=60)


def log_lines(worker, text: str) -> int:
    return sum(text in line for line in worker.log().splitlines())


def test_ledger_down_mid_step_the_move_completes_each_step_once(
        ledger_fleet: Fleet, pg: pgserver.PrivatePostgres, tmp_path: Path) -> None:
    """The issue's run: the ledger stops while copy_out runs on the source, the destination
    gets SIGTERM, copy_out ends while the ledger is down, the ledger comes back."""
    env = {"VOLUMES_STEP_SECONDS": "copy_out=6"}
    source = ledger_fleet.start("node1", env=env)
    dest = ledger_fleet.start("node2", graceful_timeout=90, env=env)
    volume = volume_path("node1", "vol1")
    volume.parent.mkdir(parents=True)
    volume.write_bytes(os.urandom(4096))
    op = orch.submit("move", hosts={"source": "node1", "dest": "node2"},
                     params={"volume": "vol1"}, subject="vol1")
    wait_operation(orch, op, lambda d: (d["current_step"] or {}).get("step") == "copy_out"
                   and d["current_step"]["state"] == "running", timeout=30, what="copy_out")

    pg.stop("fast")
    dest.signal(signal.SIGTERM)
    # copy_out's work ends while the ledger is down: its result is kept, only its recording
    # waits (its message unacknowledged meanwhile).
    wait_for(lambda: "copy_out" in source.log() and "is done, waits to record it"
             in source.log(), 30, "copy_out to wait to record its outcome")

    # Meanwhile: the command line and the API say one line naming the database, and send
    # nothing; a worker started now waits for the ledger and consumes nothing.
    hosts = cli("hosts")
    assert hosts.returncode == 2, hosts
    assert hosts.stderr.strip().count("\n") == 0, hosts.stderr
    assert f"cannot reach the ledger at postgresql+psycopg://postgres@127.0.0.1:{pg.port}" \
        in hosts.stderr and "Traceback" not in hosts.stderr, hosts.stderr
    # No fleet of down hosts: the ledger's outage, and the workers answering over the broker.
    assert hosts.stdout.startswith("ledger unreachable since"), hosts.stdout
    for node in ("node1", "node2"):
        assert any(line.split()[:1] == [node] and "answers over the broker; ledger "
                   "unreachable since" in line for line in hosts.stdout.splitlines()), \
            hosts.stdout
    before = queue_depths(orch.app, [q for n in NODES for q in (n, f"{n}-alt")])
    with pytest.raises(LedgerUnavailable, match="cannot reach the ledger at"):
        orch.submit("move", hosts={"source": "node1", "dest": "node3"},
                    params={"volume": "vol9"}, subject="vol9")
    submitted = cli("submit", "move", "--host", "source=node1", "--host", "dest=node3",
                    "--param", "volume=vol9")
    assert submitted.returncode == 2 and "cannot reach the ledger" in submitted.stderr, submitted
    assert queue_depths(orch.app, [q for n in NODES for q in (n, f"{n}-alt")]) == before
    late = ledger_fleet.start("node3", ready=False)
    wait_for(lambda: "trying again in" in late.log(), 30, "node3 to wait for the ledger")
    assert " ready." not in late.log() and late.proc.poll() is None

    pg.start()
    late.wait_ready(timeout=60)
    done = orch.wait(op, timeout=60)
    assert done["status"] == "completed", done
    assert dest.wait(timeout=60) == 0, dest.log()[-3000:]
    assert source.proc.poll() is None, "the source worker must survive the outage"

    # Each step's work done exactly once, copy_in on the draining destination.
    assert sorted(runs(tmp_path)) == sorted(
        ["reserve@node2", "copy_out@node1", "copy_in@node2", "retire_source@node1"])
    steps = {s["step"]: s for s in done["steps"]}
    assert steps["copy_out"]["attempts"] == 1 and steps["copy_in"]["attempts"] == 1, steps
    assert steps["copy_in"]["worker"].startswith("node2@")
    assert volume_path("node2", "vol1").exists() and not volume.exists()
    # Waiting is said once per change of state and every 10 s, not at every check.
    assert log_lines(dest, "cannot tell what is in flight") <= 3, dest.log()
    for worker in (source, dest):
        assert "raised unexpected" not in worker.log() and "Traceback" not in worker.log()
    assert "steps completed during drain: 1" in dest.log()
