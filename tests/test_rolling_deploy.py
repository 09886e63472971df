"""A rolling deploy that changes the code under moves in flight (README, "Deploying new code").

The example application's release 2 (``VOLUMES_RELEASE=2``) renames ``copy_in`` to
``install`` (an alias keeps the old name only with ``VOLUMES_ALIASES=1``), removes
``retire_source`` and adds ``retire``. Two moves submitted with release 1 are at ``copy_out``
when the deploy starts: ``deploy check`` names them beforehand; node2 on release 2 holds their
``copy_in`` (recorded in the ledger, never discarded) and the operator sees why; node1 on
release 2 meanwhile runs a move of release 2's flow (the added steps); node2 redeployed with
the alias runs the held ``copy_in``; ``retire_source``, removed from release 2, is held on
node1 until node1 is rolled back to release 1. Every step's work is done once, no message is
left, and one routing.yaml serves both releases throughout. Real workers, on the suite's
broker (Redis, and RabbitMQ in CI's second stage).
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.volume_move.app import app, orch
from orchestrator.broker import queue_depths
from orchestrator.local.fleet import Fleet, WorkerProcess, wait_for
from orchestrator.status import wait_operation
from tests.conftest import BROKER_URL, fresh_db
from tests.volumes import APP, cli, make_volume, runs, submit_move, volume_fleet, wait_step

pytestmark = pytest.mark.shutdown

RELEASE_2 = {"VOLUMES_RELEASE": "2"}
RELEASE_2_ALIASED = {"VOLUMES_RELEASE": "2", "VOLUMES_ALIASES": "1"}
QUEUES = ["node1", "node1-alt", "node2", "node2-alt"]


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    # copy_out ends when the test creates this file: the deploy happens under it.
    with volume_fleet(tmp_path, monkeypatch, BROKER_URL, fresh_db(tmp_path),
                      VOLUMES_GATE=f"copy_out={tmp_path / 'copy_out.go'}") as workers:
        yield workers


def let_copy_out_end(tmp_path: Path) -> None:
    (tmp_path / "copy_out.go").touch()


def deploy_check(env: dict[str, str]) -> tuple[int, dict]:
    done = cli("deploy", "check", "--json", env=env)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def redeploy(fleet: Fleet, old: WorkerProcess, host: str, env: dict[str, str]) -> WorkerProcess:
    """One host of the rolling deploy: SIGTERM, its drain, then the new code."""
    old.signal(signal.SIGTERM)
    assert old.proc.wait(timeout=60) in (0, 75), old.log()[-3000:]
    return fleet.start(host, env=env, graceful_timeout=5)


def held(op: str, step: str) -> None:
    wait_step(op, step, state="held")


def flower_shows_held_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str,
                            what: str) -> None:
    """The Hosts tab (as headless Chromium renders it) and Flower's /metrics say why."""
    from tests.test_flower import FlowerProcess, chromium, render

    if chromium() is None:
        return  # .ci/run installs it; the CLI and JSON checks above still ran
    monkeypatch.setenv("ORCHESTRATOR_APP", APP)
    flower = FlowerProcess(tmp_path / "flower.log", unauthenticated_api=True)
    try:
        flower.wait_up()
        assert len(flower.hosts()[host]["steps_unserved"]) == 2
        status, metrics = flower.get("/metrics")
        assert f'orchestrator_steps_unserved{{host="{host}"}} 2.0' in metrics, metrics[-2000:]
        dom = render(f"{flower.base}/hosts", "flower-hosts-held-steps")
        assert f"{host}: 2 step(s) wait for a worker that serves them ({what})" in dom
    finally:
        flower.stop()


def test_rename_removal_and_addition_during_a_rolling_deploy(
        fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node1 = fleet.start("node1", graceful_timeout=30)
    node2 = fleet.start("node2", graceful_timeout=2)
    first, second = submit_move("vol1"), submit_move("vol2")
    for op in (first, second):
        wait_step(op, "copy_out")

    # Before the rollout: release 2 would strand both moves' copy_in on node2 and
    # retire_source on node1; with the alias, only retire_source.
    code, report = deploy_check(RELEASE_2)
    assert code == 1, report
    assert {(s["step"], s["host"]): sorted(s["operations"]) for s in report["stranded"]} == {
        ("copy_in", "node2"): sorted([first, second]),
        ("retire_source", "node1"): sorted([first, second]),
    }
    assert report["routing"]["error"] is None  # one routing.yaml for both releases
    code, report = deploy_check(RELEASE_2_ALIASED)
    assert code == 1 and [(s["step"], s["host"]) for s in report["stranded"]] == [
        ("retire_source", "node1")]
    text = cli("deploy", "check", env=RELEASE_2).stdout
    assert "2 operation(s) need copy_in on node2; this code does not register it" in text

    # node2 on release 2, without the alias: copy_in is held, not discarded.
    node2 = redeploy(fleet, node2, "node2", RELEASE_2)
    let_copy_out_end(tmp_path)
    for op in (first, second):
        held(op, "copy_in")
    shown = cli("operation", first).stdout
    assert "waiting: for a worker that serves copy_in (node2 runs code that does not " \
           "register it: 2)" in shown, shown
    hosts = json.loads(cli("hosts", "--json").stdout)
    node2_row = next(h for h in hosts if h["host"] == "node2")
    assert sorted(s["operation"] for s in node2_row["steps_unserved"]) == sorted(
        [first, second])
    assert any("2 step(s) wait for a worker that serves them (copy_in x2)" in n
               for n in node2_row["notes"]), node2_row["notes"]
    assert "ignored and discarded" not in node2.log()
    flower_shows_held_steps(tmp_path, monkeypatch, "node2", "copy_in x2")

    # node1 on release 2 too; a move of release 2's flow (its added steps) runs on it.
    node1 = redeploy(fleet, node1, "node1", RELEASE_2)
    make_volume("vol3")
    added = json.loads(cli("submit", "move", "--host", "source=node1", "--host", "dest=node2",
                           "--param", "volume=vol3", "--subject", "vol3", "--json",
                           env=RELEASE_2).stdout)["operation"]
    assert orch.wait(added, timeout=60)["status"] == "completed"

    # node2 redeployed with the alias: the held copy_in runs; retire_source, which release 2
    # removed, is held on node1 until node1 runs release 1 again.
    node2 = redeploy(fleet, node2, "node2", RELEASE_2_ALIASED)
    for op in (first, second):
        held(op, "retire_source")
    node1 = redeploy(fleet, node1, "node1", {"VOLUMES_RELEASE": "1"})
    for op in (first, second):
        assert orch.wait(op, timeout=60)["status"] == "completed"

    # Each operation kept its plan; each step's work was done once; nothing left behind.
    for op in (first, second):
        assert [s["step"] for s in orch.operation(op)["plan"]] == [
            "reserve", "copy_out", "copy_in", "retire_source"]
    assert [s["step"] for s in orch.operation(added)["plan"]] == [
        "reserve", "copy_out", "install", "retire"]
    work = Counter(runs(tmp_path))
    assert work == Counter({"reserve@node2": 3, "copy_out@node1": 3, "copy_in@node2": 2,
                            "install@node2": 1, "retire_source@node1": 2,
                            "retire@node1": 1}), work
    wait_for(lambda: not any(queue_depths(app, QUEUES).values()), 10, "empty queues")
    for worker in fleet.workers:
        assert "ignored and discarded" not in worker.log(), worker.log_path


def test_a_drain_does_not_wait_for_a_step_its_code_cannot_run(fleet: Fleet,
                                                              tmp_path: Path) -> None:
    """node2 runs release 2 (no alias) while a move of release 1 is at copy_out: its drain
    lists the move as not waited for and ends at once, where it would have waited for
    copy_in."""
    fleet.start("node1")
    node2 = fleet.start("node2", env=RELEASE_2, graceful_timeout=60)
    op = submit_move("vol1")
    wait_step(op, "copy_out")
    node2.signal(signal.SIGTERM)
    assert node2.proc.wait(timeout=20) == 0, node2.log()[-3000:]
    assert f"move {op} at copy_out@node1 (running): this code does not register copy_in" \
        in node2.log(), node2.log()[-3000:]
    let_copy_out_end(tmp_path)
    wait_operation(orch, op, lambda d: d["current_step"]["step"] == "copy_in", timeout=30,
                   what="copy_in sent")


def test_an_operation_keeps_the_rollback_it_was_submitted_with(fleet: Fleet,
                                                              tmp_path: Path) -> None:
    """A move submitted with release 1, whose flow rolls back (``release``) when copy_in
    fails; its copy_in runs on release 2 (through the alias) and fails there. Release 2's
    flow rolls back on ``install`` only, but the move keeps the rollback it was submitted
    with: ``release`` runs, and the reservation is gone."""
    fleet.start("node1")
    fleet.start("node2", env={**RELEASE_2_ALIASED, "VOLUMES_FAIL": "copy_in@node2"})
    op = submit_move("vol1")
    let_copy_out_end(tmp_path)
    data = orch.wait(op, timeout=60)
    assert data["status"] == "failed", data
    assert [(s["step"], s["host"]) for s in data["plan"]] == [
        ("reserve", "node2"), ("copy_out", "node1"), ("copy_in", "node2"),
        ("release", "node2")]
    assert runs(tmp_path).count("release@node2") == 1
    assert not (tmp_path / "volumes" / "node2" / "vol1.reserved").exists()
