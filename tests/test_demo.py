"""The README's main command, as a new user runs it: ``orchestrator demo`` from any directory
with no broker configured (an embedded Redis), and ``orchestrator up`` used from another shell.
Without a terminal both print plain event lines, which is what these tests read."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.local.fleet import wait_for
from tests.up import descendants, stop_up

pytestmark = pytest.mark.shutdown

CLI = [sys.executable, "-m", "orchestrator.ops.cli"]
REPO = Path(__file__).resolve().parent.parent


def _fresh_env(tmp_path: Path) -> dict[str, str]:
    """No broker, database or routing file configured: what a fresh machine has."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}


def _gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        if Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
            return False
    return True


@pytest.mark.timeout(180)
def test_demo_on_a_fresh_machine(tmp_path: Path) -> None:
    done = subprocess.run(
        # From the clone, as README says: its pyproject.toml names the application.
        [*CLI, "demo", "--step-delay", "2"], cwd=REPO, env=_fresh_env(tmp_path),
        capture_output=True, text=True, timeout=170,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "Traceback" not in out + done.stderr
    assert "started an embedded Redis" in out
    assert re.search(r"Flower: http://127\.0\.0\.1:\d+/", out)
    # The story, and the fleet's own events around it, in order.
    story = ["SIGTERM to compute2", "host compute2: up -> draining",
             "queue compute2: 1 message(s) waiting", "compute2 exited with status 0",
             "resize completed: vm1 is on compute2", "host compute2: down -> up",
             "boot vm2 completed on compute2 after the restart", "demo succeeded"]
    positions = [out.find(line) for line in story]
    assert -1 not in positions and positions == sorted(positions), out
    assert re.search(r"resize \w{8} \(vm1\): finish_resize@compute2", out), out
    # Then the resize's timeline: its last step ran from compute2-alt during the drain.
    told = out.split("the resize's timeline", 1)[1]
    assert re.search(r"drain-started +compute2 by compute2@", told), told
    assert re.search(r"step-completed +finish_resize@compute2 via compute2-alt", told), told


@pytest.mark.timeout(180)
def test_up_serves_the_cli_until_ctrl_c(tmp_path: Path) -> None:
    """From another directory, the application named (it exports it for the other shell)."""
    env = dict(_fresh_env(tmp_path), ORCHESTRATOR_APP="nova_app.app")
    log = tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen([*CLI, "up", "--no-flower", "--plain"], cwd=tmp_path, env=env,
                              stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        exports = wait_for(
            lambda: re.search(r"in another shell: export (.*)", log.read_text()), 90,
            "up to print its settings")
        shell = dict(_fresh_env(tmp_path),
                     **dict(pair.split("=", 1) for pair in exports.group(1).split()))
        boot = subprocess.run([*CLI, "boot", "vm1", "--host", "compute1", "--json"],
                              cwd=tmp_path, env=shell, capture_output=True, text=True,
                              timeout=60)
        assert boot.returncode == 0, boot.stdout + boot.stderr
        operation = re.search(r'"operation": "([0-9a-f-]+)"', boot.stdout).group(1)
        waited = subprocess.run([*CLI, "wait", operation], cwd=tmp_path, env=shell,
                                capture_output=True, text=True, timeout=60)
        assert waited.returncode == 0, waited.stdout + waited.stderr
        listed = subprocess.run([*CLI, "operations", "--flow", "boot", "--json"], cwd=tmp_path,
                                env=shell, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert [op["operation"] for op in json.loads(listed.stdout)["operations"]] == [operation]
        shown = subprocess.run([*CLI, "operation", operation[:8]], cwd=tmp_path, env=shell,
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        timeline = shown.stdout.split("timeline:\n", 1)[1].splitlines()
        assert "submitted" in timeline[0] and "ended" in timeline[-1], shown.stdout
        assert any("step-completed  build_and_run_instance@compute1 via compute1" in line
                   for line in timeline), shown.stdout
        wait_for(lambda: "(vm1) completed" in log.read_text(), 10, "up to show the boot")
        started = descendants(up.pid)
        assert len(started) >= 3, "a Redis and two workers"
    finally:
        code = stop_up(up, log)
    assert code == 0, log.read_text()
    wait_for(lambda: _gone(started), 10, "every process up started to be gone")
    assert "Traceback" not in log.read_text()
