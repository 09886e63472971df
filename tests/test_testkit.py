"""The test kit for users' own flows, as README's "Test your own flows" gives it: its three
files written in an empty directory, ``pytest`` run there (the plugin is active because the
package is installed; nothing configured: an embedded Redis, a throw-away ledger). It passes
with the README's routing.yaml and reports the stranded step with ``copy_in`` on ``main``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.shutdown

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_files() -> dict[str, str]:
    section = README.read_text().split("## Test your own flows", 1)[1].split("\n## ", 1)[0]
    files = dict(re.findall(r"^`([\w.]+)`:\n\n```\w*\n(.*?)^```", section, re.S | re.M))
    assert set(files) == {"myflows.py", "routing.yaml", "test_myflows.py"}, files.keys()
    return files


def run_pytest(where: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ORCHESTRATOR_", "PYTEST_"))}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *args], cwd=where, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_readme_example_passes_and_reports_a_stranded_step(tmp_path: Path) -> None:
    for name, text in readme_files().items():
        (tmp_path / name).write_text(text)
    good = run_pytest(tmp_path)
    assert good.returncode == 0, good.stdout[-4000:] + good.stderr[-2000:]
    assert "1 passed" in good.stdout

    routing = tmp_path / "routing.yaml"
    routing.write_text(routing.read_text().replace(
        "  copy_in:\n    queue: alt", "  copy_in:\n    queue: main"))
    bad = run_pytest(tmp_path)
    assert bad.returncode == 1, bad.stdout[-4000:] + bad.stderr[-2000:]
    assert "shutdown matrix of rebalance: 4 of 6 runs ok" in bad.stdout, bad.stdout[-4000:]
    assert ("node2       copy_out@node1  completed  no" in bad.stdout
            and "FAILED: copy_in is routed to main but follows copy_out, already started: "
                "node2's drain left it for the restart" in bad.stdout), bad.stdout[-4000:]


def test_a_users_suite_runs_two_tests_at_a_time(tmp_path: Path) -> None:
    """The README's example twice, under pytest-xdist (``pytest -n 2``): each test's fleet has
    an embedded Redis and a ledger of its own, so two shutdown matrices of the same hosts run
    side by side without taking each other's steps."""
    files = readme_files()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "test_again.py").write_text(files["test_myflows.py"].replace(
        "def test_rebalance_survives_shutdowns", "def test_rebalance_again"))
    both = run_pytest(tmp_path, "-n", "2")
    assert both.returncode == 0, both.stdout[-4000:] + both.stderr[-2000:]
    assert "2 passed" in both.stdout, both.stdout[-4000:]


def test_an_embedded_redis_never_answers_for_another_on_its_port(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kit's (and the suite's) embedded Redis picks a free port and binds it a moment
    later; a test beside it may have bound it meanwhile. Its PONG must not pass for ours (two
    runs would share, and empty, one broker): a first start moves to another port, and a
    restart, whose clients know the port, says the port was taken."""
    from orchestrator.local import embedded

    def server(name: str) -> embedded.RedisServer:
        (tmp_path / name).mkdir()
        return embedded.RedisServer(tmp_path / name)

    other = server("other")
    other.start()
    started: list[embedded.RedisServer] = [other]
    try:
        taken = [other.port]
        real = embedded.free_port
        monkeypatch.setattr(embedded, "free_port",
                            lambda address="127.0.0.1": taken.pop() if taken else real(address))
        ours = server("ours")
        started.append(ours)
        assert ours.port == other.port, "picked while another held it"
        ours.start()
        assert ours.port != other.port and ours.proc is not None
        assert embedded._server_pid(ours.port) == ours.proc.pid

        ours.stop()
        taken.append(ours.port)
        thief = server("thief")  # binds ours' port while ours is down
        started.append(thief)
        thief.start()
        with pytest.raises(RuntimeError, match=f"cannot restart on 127.0.0.1:{ours.port}: "
                                               "another process took the port"):
            ours.start()
        assert ours.proc is not None and ours.proc.poll() is not None
    finally:
        for each in started:
            each.stop()
