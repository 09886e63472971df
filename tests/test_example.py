"""The example application (examples/volume_move), end to end, with real workers and signals.

Nothing of Nova here: the app, its steps, its flow and its routing.yaml are the example's own,
built on the public API. Each test sends SIGTERM to one host mid-flow and checks that the
move completes, that the host exits 0 by itself, and that a move sent to it meanwhile runs
after its restart; one test takes the rollback path.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.volume_move.app import app, orch, volume_path
from orchestrator.broker import queue_depth, queue_depths
from orchestrator.local.fleet import Fleet, wait_for
from orchestrator.status import ended, wait_operation
from tests.conftest import running_fleet

pytestmark = pytest.mark.shutdown
NODES = ["node1", "node2"]
APP = "examples.volume_move.app"


@pytest.fixture
def volumes(tmp_path: Path) -> Iterator[tuple[Fleet, Path]]:
    root = tmp_path / "volumes"
    with running_fleet(tmp_path, VOLUMES_ROOT=str(root)) as fleet:
        fleet.app = APP
        os.environ["VOLUMES_ROOT"] = str(root)
        try:
            yield fleet, root
        finally:
            os.environ.pop("VOLUMES_ROOT", None)


def make_volume(node: str, name: str, size: int = 64 * 1024) -> bytes:
    data = os.urandom(size)
    path = volume_path(node, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def move(volume: str, source: str, dest: str) -> str:
    return orch.submit("move", hosts={"source": source, "dest": dest},
                       params={"volume": volume}, subject=volume)


def at_step(op_id: str, step: str, state: str = "running") -> dict:
    def check(data: dict) -> bool:
        current = data["current_step"] or {}
        return current.get("step") == step and current.get("state") == state

    return wait_operation(orch, op_id, check, timeout=30, what=f"{op_id} at {step}")


def wait_draining(host: str) -> None:
    wait_for(lambda: any(v.state == "draining" for v in orch.registry.services(host)), 10,
             f"{host} to report draining")


def step_rows(data: dict) -> dict[str, dict]:
    return {s["step"]: s for s in data["steps"]}


def assert_moved(volume: str, data: bytes, source: str, dest: str) -> None:
    assert volume_path(dest, volume).read_bytes() == data
    assert not volume_path(source, volume).exists()
    assert not volume_path(dest, volume, ".reserved").exists()


def broker_empty() -> bool:
    return sum(queue_depths(app, [q for n in NODES for q in (n, f"{n}-alt")]).values()) == 0


def test_destination_drains_mid_copy_and_the_move_completes(volumes) -> None:
    fleet, _ = volumes
    env = {"VOLUMES_STEP_SECONDS": "copy_out=2"}
    fleet.start("node1", env=env)
    dest = fleet.start("node2", graceful_timeout=60, env=env)
    data = make_volume("node1", "vol1")
    make_volume("node1", "vol2")
    op = move("vol1", "node1", "node2")
    at_step(op, "copy_out")

    dest.signal(signal.SIGTERM)
    wait_draining("node2")
    late = move("vol2", "node1", "node2")  # a new move to the draining node: waits for it
    assert dest.wait(timeout=30) == 0, dest.log()

    done = orch.wait(op, timeout=30)
    assert done["status"] == "completed", done
    rows = step_rows(done)
    assert rows["copy_in"]["worker"].startswith("node2@") and rows["copy_in"]["attempts"] == 1
    assert done["params"]["verified"] is True and done["params"]["bytes"] == len(data)
    assert_moved("vol1", data, "node1", "node2")
    assert "steps completed during drain: 1" in dest.log()
    waiting = orch.operation(late)
    assert waiting["status"] == "queued" and waiting["steps"] == []
    assert queue_depth(app, "node2") == 1

    fleet.start("node2")
    assert orch.wait(late, timeout=30)["status"] == "completed"
    assert broker_empty()


def test_source_drains_mid_reserve_and_the_move_completes(volumes) -> None:
    fleet, _ = volumes
    env = {"VOLUMES_STEP_SECONDS": "reserve=2"}
    source = fleet.start("node1", graceful_timeout=60, env=env)
    fleet.start("node2", env=env)
    data = make_volume("node1", "vol1")
    make_volume("node2", "vol3")
    op = move("vol1", "node1", "node2")
    at_step(op, "reserve")

    source.signal(signal.SIGTERM)
    wait_draining("node1")
    late = move("vol3", "node2", "node1")  # its first step, reserve, is for node1's main queue
    assert source.wait(timeout=30) == 0, source.log()

    done = orch.wait(op, timeout=30)
    assert done["status"] == "completed", done
    rows = step_rows(done)
    for step in ("copy_out", "retire_source"):  # both ran on node1 while it drained
        assert rows[step]["worker"].startswith("node1@"), rows
    assert_moved("vol1", data, "node1", "node2")
    assert orch.operation(late)["status"] == "queued"
    assert queue_depth(app, "node1") == 1

    fleet.start("node1")
    assert orch.wait(late, timeout=30)["status"] == "completed"
    assert broker_empty()


def test_a_waiter_is_told_when_its_operation_ends(volumes, monkeypatch) -> None:
    """orch.wait sleeps until the worker that records the end announces it through the
    broker: it reads the operation's status once before and once when told, however long the
    operation takes (a waiter that polled read it every second: four times here or more)."""
    fleet, _ = volumes
    for node in NODES:
        fleet.start(node, env={"VOLUMES_STEP_SECONDS": "copy_out=3"})
    make_volume("node1", "told")
    # Subscribed before the clock starts: orch.wait gives a subscription 2 s, and looks every
    # second meanwhile (a loaded machine may take longer to subscribe).
    from orchestrator import notices

    orch._notices = orch._notices or notices.EndedNotices(orch.app)
    orch._notices.start(timeout=30)
    assert orch._notices.ready.is_set() and not orch._notices.last_error
    looks: list[str] = []
    status = orch.ledger.status
    monkeypatch.setattr(orch.ledger, "status",
                        lambda operation_id: looks.append(operation_id) or status(operation_id))
    op = move("told", "node1", "node2")
    done = orch.wait(op, timeout=60)
    assert done["status"] == "completed", done["error"]
    assert len(looks) == 2, looks
    assert op in orch._notices.ended  # woken by the worker's notice, not by a look again


def test_failed_copy_rolls_back_and_frees_the_volume(volumes) -> None:
    fleet, _ = volumes
    env = {"VOLUMES_FAIL": "copy_in@node2"}
    fleet.start("node1", env=env)
    fleet.start("node2", env=env)
    data = make_volume("node1", "vol1")
    op = move("vol1", "node1", "node2")
    done = wait_operation(orch, op, ended, timeout=30)
    assert done["status"] == "failed"
    assert "copy_in@node2: injected failure" in done["error"]
    assert [(s["step"], s["status"]) for s in done["steps"]] == [
        ("reserve", "completed"), ("copy_out", "completed"), ("copy_in", "failed"),
        ("release", "completed")]
    assert volume_path("node1", "vol1").read_bytes() == data, "the source keeps its volume"
    assert not volume_path("node2", "vol1").exists()
    assert not volume_path("node2", "vol1", ".reserved").exists()
    # The subject is free again: the volume can be moved elsewhere.
    again = orch.submit("move", hosts={"source": "node1", "dest": "node1x"},
                        params={"volume": "vol1"}, subject="vol1")
    assert orch.operation(again)["status"] == "queued"
    assert queue_depth(app, "node1x") == 1  # its reserve waits for node1x, which nobody serves
