"""The drain, end to end: real ``celery worker`` processes, a real broker, real signals.

Every test waits on observed state (operation step, registry, queue depth), never on a fixed
sleep, and ends by counting every operation it submitted: completed, or waiting in the broker.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from nova_app import operations, views
from nova_app.app import app, orch
from orchestrator.broker import queue_depth
from orchestrator.local.fleet import Fleet, wait_for
from orchestrator.ops.cli import main as cli
from tests.helpers import (
    Gate,
    assert_conserved,
    at_step,
    boot_active,
    ended,
    resize_vm1_until,
    wait_draining,
    wait_op,
)
from workers.deadline import EXIT_GRACE_SECONDS
from workers.drain import EX_DRAIN_EXPIRED

pytestmark = pytest.mark.shutdown
HOSTS = ["compute1", "compute2"]
REPO = Path(__file__).resolve().parent.parent


def step_row(data: dict, step: str) -> dict:
    return next(s for s in data["steps"] if s["step"] == step)


def _sigterm_to_exit(worker) -> float:
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0, worker.log()
    return time.monotonic() - started


def test_idle_host_exits_zero_within_two_seconds(fleet: Fleet) -> None:
    """Most of the time is Celery's own prefork shutdown (billiard's children sleep 1 s before
    they exit), so a plain Celery worker is measured alongside: on a loaded machine both slow
    down, and the drain must add little to it."""
    worker = fleet.start("compute1", graceful_timeout=60)
    plain = fleet.spawn("plain", "baseline", [
        sys.executable, "-m", "celery", "-A", "tests.plain_app", "worker", "-c", "2", "-Q",
        "plain", "-l", "info", "--without-mingle", "--without-gossip"])
    took, baseline = _sigterm_to_exit(worker), _sigterm_to_exit(plain)
    print(f"idle host: SIGTERM to exit {took:.2f}s (plain Celery {baseline:.2f}s)")
    assert took < max(2.0, baseline + 0.5), worker.log()
    assert "messages handed back: 0" in worker.log()


def test_resize_finishes_on_draining_destination(fleet: Fleet) -> None:
    env = {"ORCHESTRATOR_STEP_DELAYS": "resize_instance=2"}
    fleet.start("compute1", env=env)
    dest = fleet.start("compute2", graceful_timeout=60, env=env)
    booted, op = resize_vm1_until("resize_instance")

    signalled = time.time()
    dest.signal(signal.SIGTERM)
    assert dest.wait(timeout=30) == 0, dest.log()
    exited = time.time()

    data = views.operation_dict(op.id)
    assert data["status"] == "completed"
    finish = step_row(data, "finish_resize")
    assert finish["host"] == "compute2" and finish["attempts"] == 1
    assert finish["worker"].startswith("compute2@")
    vm = views.show_instance("vm1")
    assert (vm["host"], vm["flavor"], vm["vm_state"]) == ("compute2", "m1.large", "resized")
    assert exited - signalled < 15, "exited on its own, long before the 60 s deadline"
    with_log = dest.log()
    assert "steps completed during drain: 1" in with_log
    finished_at = max(r["finished_at"] for r in _step_times(op.id))
    print(f"busy host: SIGTERM to exit {exited - signalled:.2f}s, "
          f"last step end to exit {exited - finished_at:.2f}s")
    assert_conserved([booted, op.id], HOSTS)


def _step_times(operation_id: str) -> list[dict]:
    from sqlalchemy import select

    from orchestrator.ledger import engines as db
    from orchestrator.ledger.models import StepRecord

    with db.session() as s:
        rows = s.execute(select(StepRecord).where(StepRecord.operation_id == operation_id))
        return [{"finished_at": r.finished_at} for r in rows.scalars()]


def test_new_request_to_draining_host_waits_for_restart(fleet: Fleet) -> None:
    env = {"ORCHESTRATOR_STEP_DELAYS": "resize_instance=3"}
    fleet.start("compute1", env=env)
    dest = fleet.start("compute2", graceful_timeout=60, env=env)
    booted, resize = resize_vm1_until("resize_instance")
    dest.signal(signal.SIGTERM)
    wait_draining("compute2")

    late = operations.boot("vm2", "compute2")
    assert dest.wait(timeout=30) == 0, dest.log()
    data = views.operation_dict(late.id)
    assert data["status"] == "queued" and data["steps"] == [], "not run on the draining host"
    assert queue_depth(app, "compute2") == 1
    assert_conserved([booted, resize.id, late.id], HOSTS)

    fleet.start("compute2")
    assert wait_op(late.id, ended)["status"] == "completed"
    assert_conserved([booted, resize.id, late.id], HOSTS)


def test_fetched_unstarted_main_messages_are_handed_back(fleet: Fleet, tmp_path: Path) -> None:
    # One process, prefetch 4: while resize_instance runs (held at its start until compute1
    # drains), three boots are fetched and wait.
    gate = Gate(tmp_path / "gate")
    source = fleet.start("compute1", concurrency=1, extra=("--prefetch-multiplier", "4"),
                         env=gate.env)
    fleet.start("compute2")
    booted, resize = resize_vm1_until("resize_instance", gate=gate)
    boots = [operations.boot(f"new{i}", "compute1").id for i in range(3)]
    try:
        wait_for(lambda: queue_depth(app, "compute1") == 0, 10, "the boots to be prefetched")
        source.signal(signal.SIGTERM)
        wait_draining("compute1")
    finally:
        gate.release()
    assert source.wait(timeout=30) == 0, source.log()

    for op_id in boots:
        data = views.operation_dict(op_id)
        assert data["status"] == "queued" and data["steps"] == [], data
    assert queue_depth(app, "compute1") == 3, "all three are back in compute1"
    assert "messages handed back: 3" in source.log()
    assert wait_op(resize.id, ended)["status"] == "completed"
    assert_conserved([booted, resize.id, *boots], HOSTS)

    fleet.start("compute1")
    for op_id in boots:
        assert wait_op(op_id, ended)["status"] == "completed"
    assert_conserved([booted, resize.id, *boots], HOSTS)
    # Each boot's timeline says so: handed back by the drained worker from compute1, then
    # run from compute1 by the next one (the command line's JSON, what Flower's page draws).
    for op_id in boots:
        data = json.loads(CliRunner().invoke(cli, ["operation", op_id, "--json"]).output)
        told = [(e["kind"], e["host"], e["queue"]) for e in data["timeline"]]
        back = told.index(("handed-back", "compute1", "compute1"))
        assert ("step-started", "compute1", "compute1") in told[back:], told
        (worker,) = {e["worker"] for e in data["timeline"] if e["kind"] == "handed-back"}
        assert worker.startswith("compute1@"), worker
        (lane,) = data["lanes"]["hosts"]
        assert [d["outcome"] for d in lane["drains"]] == ["done"], lane


def test_deadline_leaves_alt_step_queued_until_restart(fleet: Fleet, tmp_path: Path) -> None:
    # resize_instance, on compute1, is held until compute2 has drained and is down.
    gate = Gate(tmp_path / "gate")
    fleet.start("compute1", env=gate.env)
    dest = fleet.start("compute2", graceful_timeout=1.5)
    booted, resize = resize_vm1_until("resize_instance", gate=gate)

    signalled = time.monotonic()
    dest.signal(signal.SIGTERM)
    try:
        assert dest.wait(timeout=30) == EX_DRAIN_EXPIRED, dest.log()
        assert time.monotonic() - signalled < 1.5 + 5, "exits within a few seconds of the deadline"
        wait_for(lambda: all(v.state == "down" for v in orch.registry.services("compute2")), 10,
                 "compute2 down in the registry")
    finally:
        gate.release()

    # compute2 is down when compute1 sends finish_resize: with ORCHESTRATOR_ALT_ROUTING=auto
    # a down host gets its main queue, which whatever version starts there consumes.
    wait_for(lambda: queue_depth(app, "compute2") == 1, 10, "finish_resize in compute2")
    current = wait_op(resize.id, at_step("finish_resize", "queued"))["current_step"]
    assert (current["queue"], current["host_state"]) == ("compute2", "down"), current
    assert_conserved([booted, resize.id], HOSTS)

    fleet.start("compute2")
    assert wait_op(resize.id, ended)["status"] == "completed"
    assert_conserved([booted, resize.id], HOSTS)


def test_deadline_mid_step_requeues_the_running_step(fleet: Fleet) -> None:
    fleet.start("compute1")
    dest = fleet.start("compute2", graceful_timeout=1.5,
                       env={"ORCHESTRATOR_STEP_DELAYS": "finish_resize=30"})
    booted, resize = resize_vm1_until("finish_resize")

    dest.signal(signal.SIGTERM)
    assert dest.wait(timeout=30) == EX_DRAIN_EXPIRED, dest.log()
    wait_for(lambda: queue_depth(app, "compute2-alt") == 1, 10, "finish_resize requeued")
    assert views.operation_dict(resize.id)["status"] == "running"

    fleet.start("compute2")
    data = wait_op(resize.id, ended)
    assert data["status"] == "completed"
    assert step_row(data, "finish_resize")["attempts"] == 2
    assert _applied(resize.id) == {0: 1, 1: 1, 2: 1}, "each effect happened once"
    assert_conserved([booted, resize.id], HOSTS)
    # The timeline: requeued to compute2-alt at the deadline, run again from it after the
    # restart; compute2's lane has the drain, ended by its deadline.
    data = json.loads(CliRunner().invoke(cli, ["operation", resize.id, "--json"]).output)
    told = [(e["kind"], e["step"], e["queue"]) for e in data["timeline"]]
    again = told.index(("requeued", "finish_resize", "compute2-alt"))
    assert ("step-started", "finish_resize", "compute2-alt") in told[again:], told
    lanes = {lane["host"]: lane for lane in data["lanes"]["hosts"]}
    assert [d["outcome"] for d in lanes["compute2"]["drains"]] == ["deadline"]
    listed = json.loads(CliRunner().invoke(cli, ["operations", "--host", "compute2",
                                                 "--json"]).output)
    assert resize.id in {op["operation"] for op in listed["operations"]}


def _applied(operation_id: str) -> dict[int, int]:
    from sqlalchemy import select

    from orchestrator.ledger import engines as db
    from orchestrator.ledger.models import StepRecord

    with db.session() as s:
        rows = s.execute(select(StepRecord).where(StepRecord.operation_id == operation_id))
        return {r.position: r.applied for r in rows.scalars()}


def test_second_sigterm_ends_the_drain_at_once(fleet: Fleet, tmp_path: Path) -> None:
    # resize_instance, on compute1, is held: compute2's drain waits for the resize until the
    # second SIGTERM, however slow the machine.
    gate = Gate(tmp_path / "gate")
    fleet.start("compute1", env=gate.env)
    dest = fleet.start("compute2", graceful_timeout=60)
    booted, resize = resize_vm1_until("resize_instance", gate=gate)
    try:
        dest.signal(signal.SIGTERM)
        wait_draining("compute2")

        hurried = time.monotonic()
        dest.signal(signal.SIGTERM)
        assert dest.wait(timeout=30) == EX_DRAIN_EXPIRED, dest.log()
        assert time.monotonic() - hurried < 5
        assert "second SIGTERM" in dest.log()
    finally:
        gate.release()

    wait_op(resize.id, at_step("finish_resize", "queued"))
    fleet.start("compute2")
    assert wait_op(resize.id, ended)["status"] == "completed"
    assert_conserved([booted, resize.id], HOSTS)


def test_remote_drain_command(fleet: Fleet) -> None:
    """A reason from outside cannot write a line of its own into the worker's log."""
    worker = fleet.start("compute1", graceful_timeout=60)
    reason = "x\nFAKE LOG LINE\r\x1b[2Kspoofed\u2028too"
    result = CliRunner().invoke(cli, ["drain", "compute1", "--json", "--reason", reason])
    assert result.exit_code == 0, result.output
    assert "compute1 draining" in result.output
    assert worker.wait(timeout=15) == 0
    log = worker.log()
    assert "drain: x\\nFAKE LOG LINE\\r\\x1b[2Kspoofed\\u2028too: stopped consuming" in log, \
        log[-3000:]
    assert [line for line in log.splitlines() if "FAKE" in line or "spoofed" in line] == [
        line for line in log.splitlines() if "drain: x\\nFAKE LOG LINE" in line], log[-3000:]
    assert "\x1b" not in log and "\u2028" not in log

    unknown = CliRunner().invoke(cli, ["drain", "nosuchhost"])
    assert unknown.exit_code == 2
    assert "unknown host 'nosuchhost'" in unknown.output


def test_two_processes_per_host_alt_only_drains_the_same_way(fleet: Fleet) -> None:
    env = {"ORCHESTRATOR_STEP_DELAYS": "resize_instance=2"}
    fleet.start("compute1", env=env)
    main_only = fleet.start("compute2", queues="main", graceful_timeout=60, env=env)
    alt_only = fleet.start("compute2", queues="alt", graceful_timeout=60, env=env)
    booted, resize = resize_vm1_until("resize_instance")

    main_only.signal(signal.SIGTERM)
    alt_only.signal(signal.SIGTERM)
    assert main_only.wait(timeout=15) == 0, main_only.log()
    assert "steps completed during drain: 0" in main_only.log()
    assert alt_only.wait(timeout=30) == 0, alt_only.log()

    data = views.operation_dict(resize.id)
    assert data["status"] == "completed"
    assert step_row(data, "finish_resize")["worker"].startswith("compute2-alt@")
    assert_conserved([booted, resize.id], HOSTS)


def test_build_caught_by_sigterm_finishes_because_events_use_alt(fleet: Fleet) -> None:
    host = fleet.start("compute1", graceful_timeout=60,
                       env={"ORCHESTRATOR_NETWORK_DELAY": "1.5"})
    op = operations.boot("vm1", "compute1")
    wait_op(op.id, at_step("build_and_run_instance"))
    host.signal(signal.SIGTERM)
    assert host.wait(timeout=30) == 0, host.log()
    assert views.operation_dict(op.id)["status"] == "completed"
    assert views.show_instance("vm1")["vm_state"] == "active"
    assert "steps completed during drain: 2" in host.log(), "the build and its event"
    assert_conserved([op.id], ["compute1"])


def test_build_times_out_if_events_go_to_main(fleet: Fleet, tmp_path) -> None:
    routing = tmp_path / "routing.yaml"
    text = (REPO / "routing.yaml").read_text()
    marker = "  external_instance_event:\n    queue: alt"
    assert marker in text
    routing.write_text(text.replace(marker, "  external_instance_event:\n    queue: main"))
    host = fleet.start("compute1", graceful_timeout=60, env={
        "ORCHESTRATOR_NETWORK_DELAY": "1.5", "ORCHESTRATOR_VIF_PLUGGING_TIMEOUT": "3",
        "ORCHESTRATOR_ROUTING_FILE": str(routing),
    })
    op = operations.boot("vm1", "compute1")
    wait_op(op.id, at_step("build_and_run_instance"))
    host.signal(signal.SIGTERM)
    assert host.wait(timeout=30) == 0, host.log()
    data = views.operation_dict(op.id)
    assert data["status"] == "failed" and "network-vif-plugged" in data["error"]
    assert views.show_instance("vm1")["vm_state"] == "error"
    assert queue_depth(app, "compute1") == 1, "the event waits in the main queue"


def test_steps_with_no_message_are_sent_again(fleet: Fleet) -> None:
    """A step whose message was lost (Redis: a worker killed between BRPOP and recording it
    unacknowledged) and one never sent (its sender died after the commit) both run."""
    from nova_app.models import Instance

    # Whichever worker holds the fleet's lease finds them (workers.fleet).
    fleet.start("compute1", env={"ORCHESTRATOR_RESEND_AFTER": "1"})
    gone = fleet.start("compute2")
    gone.signal(signal.SIGTERM)
    assert gone.wait(timeout=15) == 0
    booted = boot_active("vm1", "compute1")
    lost = operations.resize("vm1", flavor="m1.large", dest="compute2")
    assert queue_depth(app, "compute2") == 1
    from orchestrator.broker import delete_queues

    delete_queues(app, ["compute2"])  # the message is lost
    with orch.transaction() as s:  # an operation whose sender died before publishing
        instance = Instance(name="vm2", host="compute2", flavor="m1.small",
                           vm_state="building", task_state="spawning")
        s.add(instance)
        s.flush()
        unsent = orch._record(s, orch.flows["boot"], {"source": "compute2"},
                              {"instance_id": instance.id}, instance.id)

    fleet.start("compute2", env={"ORCHESTRATOR_RESEND_AFTER": "1"})
    assert wait_op(lost.id, ended, timeout=30)["status"] == "completed"
    assert wait_op(unsent, ended, timeout=30)["status"] == "completed"
    # Sent by compute2's worker, or by the fleet's looks (the lease's holder).
    log = "".join(worker.log() for worker in fleet.workers)
    assert f"resent prep_resize of {lost.id} to compute2: no message for it" in log
    assert f"resent build_and_run_instance of {unsent} to compute2: it was never sent" in log
    assert_conserved([booted, lost.id, unsent], HOSTS)


def test_wedged_exit_is_forced_at_the_deadline_and_loses_nothing(fleet: Fleet) -> None:
    """Celery's own shutdown wedges after the drain (tests.wedge_app): the exit deadline ends
    the process at graceful timeout + grace with 75, says where it wedged, kills the pool
    process mid-step, and the step's unacknowledged message runs again after a restart."""
    env = {"ORCHESTRATOR_VISIBILITY_TIMEOUT": "3"}
    fleet.start("compute1", env=env)
    timeout = 1.5
    dest = fleet.spawn("compute2", "wedged", [
        sys.executable, "-m", "celery", "-A", "tests.wedge_app", "worker", "-n", "compute2@%h",
        "-Q", "compute2,compute2-alt", "-c", "1", "-l", "info", "--without-mingle",
        "--without-gossip", "--graceful-timeout", str(timeout),
    ], env={**env, "ORCHESTRATOR_STEP_DELAYS": "finish_resize=30"})
    booted, resize = resize_vm1_until("finish_resize")
    pool = dest.pool_pids()
    assert pool, "the wedged worker has a pool process"

    signalled = time.monotonic()
    dest.signal(signal.SIGTERM)
    assert dest.wait(timeout=30) == EX_DRAIN_EXPIRED, dest.log()
    took = time.monotonic() - signalled
    assert timeout + EXIT_GRACE_SECONDS - 0.5 < took < timeout + EXIT_GRACE_SECONDS + 3, took
    log = dest.log()
    assert "forcing the exit" in log and "wedged_stop_waits_forever" in log, log
    assert "in perform" in log, "the pool process, mid-step, wrote its stack too"
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pool), 5,
             "the pool process killed with its worker")
    assert views.operation_dict(resize.id)["status"] == "running"

    fleet.start("compute2", env=env)
    data = wait_op(resize.id, ended)
    assert data["status"] == "completed"
    assert step_row(data, "finish_resize")["attempts"] == 2
    assert _applied(resize.id) == {0: 1, 1: 1, 2: 1}, "each effect happened once"
    assert_conserved([booted, resize.id], HOSTS)



def test_step_whose_pool_process_died_is_not_waited_for(fleet: Fleet) -> None:
    """A pool process dies mid-step during the drain: the step's message goes back to the main
    queue, which the draining host no longer consumes. The drain must not wait for it until the
    deadline: it exits 0, and the step runs once the host is back."""
    worker = fleet.start("compute1", concurrency=1, graceful_timeout=60,
                         env={"ORCHESTRATOR_STEP_DELAYS": "get_console_output=30"})
    booted = boot_active("vm1", "compute1")
    console = operations.console("vm1")
    wait_op(console.id, at_step("get_console_output"))

    worker.signal(signal.SIGTERM)
    wait_draining("compute1")
    (pool,) = worker.pool_pids()
    killed = time.monotonic()
    os.kill(pool, signal.SIGKILL)
    assert worker.wait(timeout=30) == 0, worker.log()
    assert time.monotonic() - killed < 10, "exits soon after the step went back, not at 60 s"
    wait_for(lambda: queue_depth(app, "compute1") == 1, 10, "get_console_output in compute1")
    assert_conserved([booted, console.id], ["compute1"])

    fleet.start("compute1")
    data = wait_op(console.id, ended)
    assert data["status"] == "completed"
    assert step_row(data, "get_console_output")["attempts"] == 2
    assert_conserved([booted, console.id], ["compute1"])
