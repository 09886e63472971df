"""Stopping ``orchestrator up`` in a test, and saying where it waited when it does not stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from orchestrator.local.fleet import wait_for


def descendants(pid: int) -> list[int]:
    """Every process ``pid`` started, and theirs."""
    found, todo = [], [pid]
    while todo:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(todo.pop())],
                             capture_output=True, text=True).stdout
        for child in map(int, out.split()):
            found.append(child)
            todo.append(child)
    return found


def stop_up(up: subprocess.Popen, log: Path, timeout: float = 60.0) -> int:
    """Ctrl-C to ``orchestrator up``; its exit status. One still running after ``timeout``
    (its workers get 30 s to stop, then are killed) writes every thread's stack into its log
    (SIGUSR1), is killed with every process it started, and fails the test with that log."""
    up.send_signal(signal.SIGINT)
    try:
        return up.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        up.send_signal(signal.SIGUSR1)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: "most recent call first" in log.read_text(), 5, "its stacks")
        started = descendants(up.pid)  # its broker, workers and their pools: killed too
        up.kill()
        up.wait(timeout=10)
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"orchestrator up did not stop within {timeout:g} s of Ctrl-C; its log:\n"
                    + log.read_text(errors="replace")[-8000:])
