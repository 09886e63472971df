"""The ledger's database fails under running workers: a wait, never a verdict.

A private PostgreSQL (tests/pgserver.py) is the ledger of the example application; the test
stops it mid-step and starts it again, with real workers, a real broker and real signals. The
shared PostgreSQL on 5432 is never touched.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.volume_move.app import orch, volume_path
from orchestrator.broker import queue_depths
from orchestrator.errors import LedgerUnavailable
from orchestrator.local.fleet import Fleet, wait_for
from orchestrator.testing import pgserver
from tests.conftest import fresh_broker
from tests.volumes import cli, make_volume, runs, volume_fleet, wait_step

pytestmark = [
    pytest.mark.shutdown,
    pytest.mark.skipif(pgserver.available() is not None, reason=str(pgserver.available())),
]
NODES = ["node1", "node2", "node3"]


@pytest.fixture
def pg() -> Iterator[pgserver.PrivatePostgres]:
    with pgserver.PrivatePostgres().init().serving() as server:
        yield server


@pytest.fixture
def ledger_fleet(tmp_path: Path, pg: pgserver.PrivatePostgres,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    with volume_fleet(tmp_path, monkeypatch, fresh_broker(), pg.url) as fleet:
        yield fleet


def log_lines(worker, text: str) -> int:
    return sum(text in line for line in worker.log().splitlines())


def test_ledger_down_mid_step_the_move_completes_each_step_once(
        ledger_fleet: Fleet, pg: pgserver.PrivatePostgres, tmp_path: Path) -> None:
    """The issue's run: the ledger stops while copy_out runs on the source, the destination
    gets SIGTERM, copy_out ends while the ledger is down, the ledger comes back."""
    env = {"VOLUMES_STEP_SECONDS": "copy_out=6"}
    source = ledger_fleet.start("node1", env=env)
    dest = ledger_fleet.start("node2", graceful_timeout=90, env=env)
    make_volume("vol1")
    op = orch.submit("move", hosts={"source": "node1", "dest": "node2"},
                     params={"volume": "vol1"}, subject="vol1")
    wait_step(op, "copy_out")

    pg.stop("fast")
    dest.signal(signal.SIGTERM)
    # copy_out's work ends while the ledger is down: its result is kept, only its recording
    # waits (its message unacknowledged meanwhile).
    wait_for(lambda: "copy_out" in source.log() and "is done, waits to record it"
             in source.log(), 30, "copy_out to wait to record its outcome")

    # Meanwhile: the command line and the API say one line naming the database, and send
    # nothing; a worker started now waits for the ledger and consumes nothing.
    # No fleet of down hosts: the ledger's outage, and the workers answering over the broker
    # (asked again if one did not answer within the command's second: a loaded machine).
    said: list[subprocess.CompletedProcess] = []

    def both_answer() -> bool:
        said.append(cli("hosts"))
        return all(any(line.split()[:1] == [node] and "answers over the broker; ledger "
                       "unreachable since" in line for line in said[-1].stdout.splitlines())
                   for node in ("node1", "node2"))

    try:
        wait_for(both_answer, 30, "node1 and node2 to answer over the broker")
    finally:
        print(said[-1].stdout if said else "")
    hosts = said[-1]
    assert hosts.returncode == 2, hosts
    assert hosts.stderr.strip().count("\n") == 0, hosts.stderr
    assert f"cannot reach the ledger at postgresql+psycopg://postgres@127.0.0.1:{pg.port}" \
        in hosts.stderr and "Traceback" not in hosts.stderr, hosts.stderr
    assert hosts.stdout.startswith("ledger unreachable since"), hosts.stdout
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
    assert volume_path("node2", "vol1").exists() and not volume_path("node1", "vol1").exists()
    # Waiting is said once per change of state and every 10 s, not at every check.
    assert log_lines(dest, "cannot tell what is in flight") <= 3, dest.log()
    for worker in (source, dest):
        assert "raised unexpected" not in worker.log() and "Traceback" not in worker.log()
    assert "steps completed during drain: 1" in dest.log()


def test_ledger_killed_under_load_loses_no_operation_and_applies_no_effect_twice(
        ledger_fleet: Fleet, pg: pgserver.PrivatePostgres, tmp_path: Path) -> None:
    """PostgreSQL killed (``pg_ctl stop -m immediate``: no shutdown, as a crash) while two
    hosts run 24 moves, then started again: every move completes, every step's effect is
    applied exactly once, nothing is left in the queues."""
    from examples.volume_move.app import app
    from tests.volumes import each_effect_once, effects_applied

    env = {"VOLUMES_STEP_SECONDS": "copy_out=0.2,copy_in=0.2"}
    workers = [ledger_fleet.start("node1", env=env), ledger_fleet.start("node2", env=env)]
    names = [f"load{i}" for i in range(24)]
    for i, name in enumerate(names):
        make_volume(name, "node1" if i % 2 == 0 else "node2")
    ops = [orch.submit("move", hosts={"source": "node1", "dest": "node2"} if i % 2 == 0
                       else {"source": "node2", "dest": "node1"},
                       params={"volume": name}, subject=name) for i, name in enumerate(names)]

    def completed() -> int:
        return sum(orch.operation(op)["status"] == "completed" for op in ops)

    wait_for(lambda: completed() >= 4, 60, "the first moves to complete")
    assert completed() < len(ops), "the kill must land under load"
    pg.stop("immediate")
    wait_for(lambda: all("cannot reach the ledger" in w.log() for w in workers), 30,
             "both workers to find the ledger gone")
    pg.start()
    pg.wait_answering()
    for op in ops:
        assert orch.wait(op, timeout=120)["status"] == "completed", orch.operation(op)
    assert effects_applied(ops) == each_effect_once(ops)
    queues = [q for n in ("node1", "node2") for q in (n, f"{n}-alt")]
    wait_for(lambda: not any(queue_depths(app, queues).values()), 30, "empty queues")
    for worker in workers:
        assert worker.proc.poll() is None, worker.log()[-3000:]
        assert "Traceback" not in worker.log(), worker.log()[-3000:]
