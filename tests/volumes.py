"""The example application (examples/volume_move) on a broker and a ledger of a fault test's
own: the workers' environment, the fleet, and what a test asks of a move.

Fault tests (ledger outage, partitions, RabbitMQ cluster, Redis Sentinel) each bring their own
broker or database; the rest is the same and lives here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from examples.volume_move.app import orch, volume_path
from orchestrator.local.fleet import Fleet, WorkerProcess, wait_for
from orchestrator.status import wait_operation

APP = "examples.volume_move.app"
STEPS = ("reserve", "copy_out", "copy_in", "retire_source")


@contextmanager
def volume_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broker: str, db: str,
                 **extra: str) -> Iterator[Fleet]:
    """Workers of the example app on ``broker`` and ``db`` (this process pointed at both,
    the schema made first), each step's work logged to ``tmp_path/runs.log``; every worker
    still running is stopped at the end."""
    env = {
        "ORCHESTRATOR_BROKER_URL": broker,
        "ORCHESTRATOR_DB_URL": db,
        "ORCHESTRATOR_HEARTBEAT_INTERVAL": os.environ["ORCHESTRATOR_HEARTBEAT_INTERVAL"],
        "VOLUMES_ROOT": str(tmp_path / "volumes"),
        "VOLUMES_RUN_LOG": str(tmp_path / "runs.log"),
        **extra,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    orch.db.engine()
    fleet = Fleet(env=env, log_dir=tmp_path / "logs", app=APP)
    try:
        yield fleet
    finally:
        fleet.kill_all()


def make_volume(name: str, node: str = "node1") -> None:
    path = volume_path(node, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(2048))


def runs(tmp_path: Path) -> list[str]:
    """``step@host`` for each time a step's work began, in order."""
    path = tmp_path / "runs.log"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def cli(*args: str, check: bool = False,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``orchestrator --app`` the example, in a process of its own (its Celery app built from
    this environment, as the workers' is; ``env`` on top: another release of its code)."""
    return subprocess.run([sys.executable, "-m", "orchestrator.ops.cli", "--app", APP, *args],
                          capture_output=True, text=True, timeout=60, check=check,
                          env={**os.environ, **(env or {})})


def submit_move(volume: str, source: str = "node1", dest: str = "node2") -> str:
    """A move of a new volume, submitted through the command line; its operation id."""
    make_volume(volume, source)
    done = cli("submit", "move", "--host", f"source={source}", "--host", f"dest={dest}",
               "--param", f"volume={volume}", "--subject", volume, "--json", check=True)
    return json.loads(done.stdout)["operation"]


def wait_step(op: str, step: str, state: str | None = "running", timeout: float = 30) -> None:
    """Until the operation's current step is ``step`` (in ``state``, unless None)."""
    def at(data: dict) -> bool:
        current = data["current_step"] or {}
        return current.get("step") == step and (state is None or current.get("state") == state)

    wait_operation(orch, op, at, timeout=timeout, what=f"{op} at {step}")


def effects_applied(operations: list[str]) -> list[tuple[str, int]]:
    """(step, times its effect was applied) for every step record of ``operations``."""
    from sqlalchemy import select

    from orchestrator.ledger.models import StepRecord

    with orch.read() as s:
        records = s.execute(select(StepRecord).where(
            StepRecord.operation_id.in_(operations))).scalars().all()
        return sorted((r.step, r.applied) for r in records)


def each_effect_once(operations: list[str]) -> list[tuple[str, int]]:
    return sorted((step, 1) for step in STEPS for _ in operations)


def move_with_destination_draining(fleet: Fleet) -> tuple[WorkerProcess, WorkerProcess, str]:
    """node1 (source) and node2 (destination) started, a move of ``vol1`` at ``copy_out``, and
    node2 sent SIGTERM and draining: (source, destination, the move's id)."""
    source = fleet.start("node1")
    dest = fleet.start("node2", graceful_timeout=90)
    op = submit_move("vol1")
    wait_step(op, "copy_out")
    dest.signal(signal.SIGTERM)
    wait_for(lambda: any(v.state == "draining" for v in orch.registry.services("node2")), 10,
             "node2 to drain")
    return source, dest, op
