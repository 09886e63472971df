"""The broker fails over: Redis Sentinel, the primary lost during a drain.

A private Sentinel set (tests/sentinel.py): a primary, a replica, three sentinels. Redis
replicates asynchronously, so a fail-over loses what the primary had not yet passed on: the
test makes that happen for real (the replica is stopped, SIGSTOP, while the source finishes
its step and publishes the next; then the primary is killed and the replica resumes and is
promoted), and the ledger's resend sends the lost step again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from examples.volume_move.app import orch, volume_path
from orchestrator.fleet import Fleet, wait_for
from orchestrator.models import StepRecord
from orchestrator.views import wait_operation
from tests import sentinel

pytestmark = [
    pytest.mark.shutdown,
    pytest.mark.skipif(sentinel.available() is not None, reason=str(sentinel.available())),
]
APP = "examples.volume_move.app"


@pytest.fixture
def sentinels() -> Iterator[sentinel.SentinelSet]:
    servers = sentinel.SentinelSet()
    try:
        yield servers.start()
    finally:
        servers.destroy()


@pytest.fixture
def fleet(sentinels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    env = {
        "ORCHESTRATOR_BROKER_URL": sentinels.url,
        "ORCHESTRATOR_SENTINEL_MASTER": sentinel.MASTER,
        "ORCHESTRATOR_DB_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "ORCHESTRATOR_HEARTBEAT_INTERVAL": os.environ["ORCHESTRATOR_HEARTBEAT_INTERVAL"],
        # A step queued this long with an empty queue is sent again (what a fail-over lost).
        "ORCHESTRATOR_RESEND_AFTER": "5",
        "VOLUMES_ROOT": str(tmp_path / "volumes"),
        "VOLUMES_RUN_LOG": str(tmp_path / "runs.log"),
        "VOLUMES_STEP_SECONDS": "copy_out=4",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    orch.db.engine()
    workers = Fleet(env=env, log_dir=tmp_path / "logs", app=APP)
    try:
        yield workers
    finally:
        workers.stop_all()


def submit(volume: str) -> str:
    """Through the command line: a process of its own, on the Sentinel URL like the workers."""
    path = volume_path("node1", volume)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(2048))
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "--app", APP, "submit", "move",
         "--host", "source=node1", "--host", "dest=node2", "--param", f"volume={volume}",
         "--subject", volume, "--json"], capture_output=True, text=True, timeout=60,
        check=True)
    return json.loads(done.stdout)["operation"]


def test_primary_lost_during_a_drain_the_ledger_resends_what_replication_lost(
        sentinels, fleet: Fleet, tmp_path: Path) -> None:
    source = fleet.start("node1")
    dest = fleet.start("node2", graceful_timeout=90)
    op = submit("vol1")
    wait_operation(orch, op, lambda d: (d["current_step"] or {}).get("step") == "copy_out"
                   and d["current_step"]["state"] == "running", timeout=30, what="copy_out")
    dest.signal(signal.SIGTERM)
    wait_for(lambda: any(v.state == "draining" for v in orch.registry.services("node2")), 10,
             "node2 to drain")

    # The replica lags (stopped, its link to the primary cut): a move submitted now has its
    # first step, for the draining node2's main queue, on the primary only. Then the primary
    # dies and the replica, which never received that step, is promoted.
    sentinels.signal("replica", signal.SIGSTOP)
    sentinels.client("primary").client_kill_filter(_type="replica")  # its link is cut
    late = submit("vol2")
    assert sentinels.client("primary").llen("node2") == 1
    sentinels.kill("primary")
    sentinels.signal("replica", signal.SIGCONT)
    wait_for(lambda: sentinels.primary_port() == sentinels.ports["replica"], 60,
             "the sentinels to promote the replica")
    assert sentinels.client("replica").llen("node2") == 0  # lost with the primary

    # The workers follow the new primary: the first move completes, node2 drains and exits.
    assert orch.wait(op, timeout=90)["status"] == "completed"
    assert dest.wait(timeout=90) == 0, dest.log()[-3000:]
    assert source.proc.poll() is None, source.log()[-3000:]

    # The ledger knows the late move's first step was sent; node2's resend (the draining
    # one's, or the restarted one's) finds its queue empty and sends it again.
    restarted = fleet.start("node2")
    assert orch.wait(late, timeout=60)["status"] == "completed"
    assert f"resent reserve of {late} to node2: no message for it in the broker" \
        in dest.log() + restarted.log(), restarted.log()[-3000:]
    with orch.read() as s:
        records = s.execute(select(StepRecord).where(
            StepRecord.operation_id.in_([op, late]))).scalars().all()
    assert sorted((r.step, r.applied) for r in records) == sorted(
        (step, 1) for step in ("reserve", "copy_out", "copy_in", "retire_source")
        for _ in (op, late))
