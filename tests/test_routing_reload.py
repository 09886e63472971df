"""routing.yaml edits take effect without a restart, in publishers and in workers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from nova_app import operations, views
from nova_app.app import orch
from orchestrator.local.fleet import Fleet, wait_for
from orchestrator.ops.cli import main as cli
from orchestrator.routing import RELOAD_CHECK_SECONDS, RoutingSource
from tests.helpers import at_step, boot_active, ended, wait_op

REPO = Path(__file__).resolve().parent.parent
FINISH_ALT = "  finish_resize:\n    queue: alt\n"
FINISH_MAIN = "  finish_resize:\n    queue: main\n"


def write(path: Path, text: str) -> None:
    """As an editor that saves in place would (same inode, new size and mtime)."""
    path.write_text(text)


@pytest.fixture
def routing_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "routing.yaml"
    path.write_text((REPO / "routing.yaml").read_text())
    monkeypatch.setenv("ORCHESTRATOR_ROUTING_FILE", str(path))
    orch.use_routing(path)
    yield path
    orch.use_routing(REPO / "routing.yaml")


def invoke(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, [*args, "--json"])
    return result.exit_code, json.loads(result.output)


def test_source_swaps_only_a_valid_table_and_keeps_the_old_one_on_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    clock = [0.0]
    path = tmp_path / "routing.yaml"
    text = (REPO / "routing.yaml").read_text()
    path.write_text(text)
    from nova_app.flows import STEP_NAMES

    source = RoutingSource(path, lambda: STEP_NAMES, clock=lambda: clock[0])
    first = source.table
    write(path, text.replace(FINISH_ALT, FINISH_MAIN))
    assert source.check() is first, "no look before RELOAD_CHECK_SECONDS"
    clock[0] += RELOAD_CHECK_SECONDS
    assert source.check().routes["finish_resize"].queue == "main"
    assert "finish_resize alt->main" in caplog.text
    good = source.table
    bad = text.replace("  finish_resize:", "  finish_resise:")
    write(path, bad)
    clock[0] += RELOAD_CHECK_SECONDS
    assert source.check() is good, "an invalid edit keeps the table in force"
    line = bad.splitlines().index("  finish_resise:") + 1
    assert f"{path}:{line}: finish_resise: unknown step" in caplog.text
    assert str(source.error).startswith(f"{path}:{line}:")
    half = text[: len(text) // 2]  # a file caught half-written
    write(path, half)
    clock[0] += RELOAD_CHECK_SECONDS
    assert source.check() is good and source.error is not None
    latin1 = text.replace("# ", "# caf\u00e9 ", 1).encode("latin-1")  # saved as Latin-1
    path.write_bytes(latin1)
    clock[0] += RELOAD_CHECK_SECONDS
    assert source.check() is good, "a file that is not UTF-8 keeps the table too"
    offset = latin1.index(b"\xe9")
    line = latin1[:offset].count(b"\n") + 1
    assert str(source.error) == (f"{path}:{line}: not UTF-8 (byte 0xe9 at offset {offset}); "
                                 "save the file as UTF-8")
    path.write_bytes(b"steps:\n" + b"#" * (1024 * 1024))
    clock[0] += RELOAD_CHECK_SECONDS
    assert source.check() is good and "larger than 1048576 bytes" in str(source.error)
    path.unlink()
    clock[0] += RELOAD_CHECK_SECONDS
    assert source.check() is good, "a file that vanished keeps the table too"


def test_an_edit_moves_the_next_step_without_a_restart(fleet: Fleet, routing_copy: Path,
                                                       db_url: str) -> None:
    env = {"ORCHESTRATOR_STEP_DELAYS": "resize_instance=1"}
    fleet.start("compute1", env=env)
    fleet.start("compute2", env=env)
    boot_active("vm1", "compute1")
    boot_active("vm2", "compute1")

    first = operations.resize("vm1", flavor="m1.large", dest="compute2")
    assert wait_op(first.id, ended)["status"] == "completed"
    assert _queue_of(first.id, "finish_resize") == "compute2-alt"

    text = routing_copy.read_text()
    write(routing_copy, text.replace(FINISH_ALT, FINISH_MAIN))
    edited = time.monotonic()
    wait_for(lambda: invoke("routing", "show")[1]["steps"]["finish_resize"]["queue"] == "main",
             2.5, "the CLI to see the edit")
    # compute1's pool process publishes finish_resize: it must have seen the edit too.
    # A worker's timer looks every 2 s (workers.reload), its pool processes when they route.
    wait_for(lambda: all("finish_resize alt->main" in w.log() for w in fleet.workers), 5,
             "every worker to log the reload")
    print(f"edit in force everywhere {time.monotonic() - edited:.2f}s after the write")
    second = operations.resize("vm2", flavor="m1.large", dest="compute2")
    wait_op(second.id, at_step("resize_instance"))
    assert wait_op(second.id, ended)["status"] == "completed"
    assert _queue_of(second.id, "finish_resize") == "compute2"

    code, out = invoke("routing", "explain", "finish_resize", "--host", "compute2")
    assert code == 0 and out["queue"] == "compute2" and out["wanted"] == "main"

    # A broken edit: everyone keeps the table in force; `routing check` says why.
    write(routing_copy, routing_copy.read_text().replace("  confirm_resize:",
                                                         "  confirm_resise:"))
    code, out = invoke("routing", "check")
    assert code == 1 and "confirm_resise: unknown step; did you mean 'confirm_resize'?" in \
        out["error"]
    wait_for(lambda: all("confirm_resise: unknown step" in w.log() for w in fleet.workers), 5,
             "every worker to log the rejected edit")
    third = operations.confirm("vm1")
    assert wait_op(third.id, ended)["status"] == "completed", "routing goes on"
    code, out = invoke("routing", "show")
    assert out["steps"]["finish_resize"]["queue"] == "main" and out["pending_error"]


def _queue_of(operation_id: str, step: str) -> str:
    """The queue the operation's last step was sent to (it stays recorded once it ran)."""
    data = views.operation_dict(operation_id)
    assert data["plan"][-1]["step"] == step
    return orch.ledger.get_operation(operation_id).queue
