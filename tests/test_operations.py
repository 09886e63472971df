"""Every operation end to end, its failure path, redelivery, and the CLI contract.

One fleet of four real workers serves the whole module. Failures are injected by host:
compute3 cannot build and refuses resizes (prep_resize); compute4 fails live migrations it is
the source of and resizes it is the destination of (finish_resize), and its console step
crashes (an unexpected error, not a step failure) on its first delivery.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from nova_app import operations, views
from orchestrator.ledger import engines as db
from orchestrator.ledger.models import Operation, StepRecord
from orchestrator.local.fleet import Fleet, wait_for
from orchestrator.ops.cli import main as cli
from tests.conftest import running_fleet
from tests.helpers import at_step, ended, queued_messages, wait_op

HOSTS = ["compute1", "compute2", "compute3", "compute4"]
FAILS = ("build_and_run_instance@compute3,prep_resize@compute3,"
         "live_migration@compute4,finish_resize@compute4")


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(
        tmp_path_factory.mktemp("cloud"),
        ORCHESTRATOR_FAIL_STEPS=FAILS, ORCHESTRATOR_STEP_DELAYS="live_migration=3",
        ORCHESTRATOR_CRASH_STEPS="get_console_output@compute4",
    ) as fleet:
        for host in HOSTS:
            fleet.start(host, ready=False)
        for worker in fleet.workers:
            worker.wait_ready()
        yield fleet


def run(op: Operation, status: str = "completed") -> dict:
    data = wait_op(op.id, ended)
    assert data["status"] == status, data
    return data


def where(data: dict) -> list[str]:
    return [f"{s['step']}@{s['host']}:{s['status']}" for s in data["steps"]]


def state_of(name: str) -> tuple:
    vm = views.show_instance(name)
    mig = vm["migration"] or {}
    return vm["host"], vm["flavor"], vm["vm_state"], vm["task_state"], mig.get("status")


def booted(name: str, host: str = "compute1") -> str:
    run(operations.boot(name, host))
    return name


# -- happy paths -------------------------------------------------------------------------------
def test_boot_gets_its_vif_event_through_the_alt_queue(cloud: Fleet) -> None:
    data = run(operations.boot("b1", "compute1", flavor="m1.tiny"))
    assert where(data) == ["build_and_run_instance@compute1:completed"]
    assert state_of("b1") == ("compute1", "m1.tiny", "active", None, None)
    instance_id = views.show_instance("b1")["id"]
    with db.read() as s:
        events = [op for op in s.execute(select(Operation).where(
            Operation.kind == "external_event")).scalars()
            if op.params["instance_id"] == instance_id]
        sent = [(op.params["event"], op.queue, op.status) for op in events]
    assert sent == [("network-vif-plugged", "compute1-alt", "completed")]


def test_live_migration_with_force_complete(cloud: Fleet) -> None:
    booted("lm1")
    op = operations.live_migrate("lm1", "compute2")
    wait_op(op.id, at_step("live_migration"))
    assert state_of("lm1")[3:] == ("migrating", "running")
    run(operations.live_migration_force_complete("lm1"))
    data = run(op)
    assert where(data) == [
        "check_can_live_migrate_destination@compute2:completed",
        "check_can_live_migrate_source@compute1:completed",
        "pre_live_migration@compute2:completed",
        "live_migration@compute1:completed",
        "post_live_migration_at_destination@compute2:completed",
    ]
    assert state_of("lm1") == ("compute2", "m1.small", "active", None, "completed")


def test_cold_migration_then_confirm(cloud: Fleet) -> None:
    booted("cm1")
    data = run(operations.resize("cm1", dest="compute2"))
    assert where(data) == ["prep_resize@compute2:completed", "resize_instance@compute1:completed",
                           "finish_resize@compute2:completed"]
    assert state_of("cm1") == ("compute2", "m1.small", "resized", None, "finished")
    data = run(operations.confirm("cm1"))
    assert where(data) == ["confirm_resize@compute1:completed"]
    assert state_of("cm1") == ("compute2", "m1.small", "active", None, "confirmed")


def test_resize_on_the_same_host_then_revert(cloud: Fleet) -> None:
    booted("rs1")
    run(operations.resize("rs1", flavor="m1.large"))
    assert state_of("rs1") == ("compute1", "m1.large", "resized", None, "finished")
    data = run(operations.revert("rs1"))
    assert where(data) == ["revert_resize@compute1:completed",
                           "check_instance_shared_storage@compute1:completed",
                           "finish_revert_resize@compute1:completed"]
    assert state_of("rs1") == ("compute1", "m1.small", "active", None, "reverted")


def test_resize_to_another_host_then_revert(cloud: Fleet) -> None:
    booted("rs2")
    run(operations.resize("rs2", flavor="m1.large", dest="compute2"))
    data = run(operations.revert("rs2"))
    assert where(data) == ["revert_resize@compute2:completed",
                           "check_instance_shared_storage@compute1:completed",
                           "finish_revert_resize@compute1:completed"]
    assert state_of("rs2") == ("compute1", "m1.small", "active", None, "reverted")


def test_cross_cell_resize_confirm_and_revert(cloud: Fleet) -> None:
    booted("xc1")
    data = run(operations.resize("xc1", flavor="m1.large", dest="compute2", cross_cell=True))
    assert where(data) == ["prep_snapshot_based_resize_at_dest@compute2:completed",
                           "prep_snapshot_based_resize_at_source@compute1:completed",
                           "finish_snapshot_based_resize_at_dest@compute2:completed"]
    data = run(operations.revert("xc1"))
    assert where(data) == ["revert_snapshot_based_resize_at_dest@compute2:completed",
                           "finish_revert_snapshot_based_resize_at_source@compute1:completed"]
    assert state_of("xc1") == ("compute1", "m1.small", "active", None, "reverted")
    run(operations.resize("xc1", flavor="m1.large", dest="compute2", cross_cell=True))
    data = run(operations.confirm("xc1"))
    assert where(data) == ["confirm_snapshot_based_resize@compute1:completed"]
    assert state_of("xc1") == ("compute2", "m1.large", "active", None, "confirmed")


def test_consoles_and_events(cloud: Fleet) -> None:
    booted("con1", "compute2")
    data = run(operations.console("con1"))
    assert where(data) == ["get_console_output@compute2:completed"]
    assert "con1 login:" in data["result"]["output"]
    data = run(operations.console("con1", "vnc"))
    assert where(data) == ["get_vnc_console@compute2:completed",
                           "validate_console_port@compute2:completed"]
    assert data["result"]["url"].startswith("http://compute2:6080/") and data["result"]["validated"]
    data = run(operations.external_event("con1", "network-changed"))
    assert where(data) == ["external_instance_event@compute2:completed"]


def test_unexpected_error_is_retried_not_stranded(cloud: Fleet) -> None:
    booted("crash1", "compute4")
    data = run(operations.console("crash1"))
    assert data["steps"][0]["attempts"] == 2, "failed once, sent again, then ran"
    assert "injected crash: get_console_output on compute4" in "".join(
        w.log() for w in cloud.workers if w.host == "compute4")
    assert "crash1 login:" in data["result"]["output"]


# -- failure paths -----------------------------------------------------------------------------
def test_boot_failure_leaves_the_instance_in_error(cloud: Fleet) -> None:
    data = run(operations.boot("bad1", "compute3"), "failed")
    assert "injected failure: build_and_run_instance on compute3" in data["error"]
    assert state_of("bad1") == ("compute3", "m1.small", "error", None, None)


def test_failed_live_migration_rolls_back_to_active_on_source(cloud: Fleet) -> None:
    booted("lmf", "compute4")
    data = run(operations.live_migrate("lmf", "compute1"), "failed")
    assert where(data)[3:] == [
        "live_migration@compute4:failed",
        "remove_volume_connection@compute1:completed",
        "drop_move_claim_at_destination@compute1:completed",
        "rollback_live_migration_at_destination@compute1:completed",
    ]
    assert state_of("lmf") == ("compute4", "m1.small", "active", None, "error")


def test_aborted_live_migration_rolls_back(cloud: Fleet) -> None:
    booted("lma")
    op = operations.live_migrate("lma", "compute2")
    wait_op(op.id, at_step("live_migration"))
    run(operations.live_migration_abort("lma"))
    data = run(op, "failed")
    assert "aborted by request" in data["error"]
    assert where(data)[-1] == "rollback_live_migration_at_destination@compute2:completed"
    assert state_of("lma") == ("compute1", "m1.small", "active", None, "cancelled")


def test_resize_refused_by_destination_keeps_instance_active(cloud: Fleet) -> None:
    booted("rf1")
    data = run(operations.resize("rf1", flavor="m1.large", dest="compute3"), "failed")
    assert where(data) == ["prep_resize@compute3:failed"]
    assert state_of("rf1") == ("compute1", "m1.small", "active", None, "error")


def test_resize_failing_to_finish_puts_instance_in_error(cloud: Fleet) -> None:
    booted("rf2")
    data = run(operations.resize("rf2", flavor="m1.large", dest="compute4"), "failed")
    assert where(data)[-1] == "finish_resize@compute4:failed"
    assert state_of("rf2")[2:] == ("error", None, "error")


# -- rules ---------------------------------------------------------------------------------------
def test_busy_instance_is_refused_and_nothing_is_sent(cloud: Fleet) -> None:
    booted("busy1")
    op = operations.live_migrate("busy1", "compute2")
    wait_op(op.id, at_step("live_migration"))
    before = _operation_count()
    with pytest.raises(operations.InstanceBusy, match=f"busy: operation {op.id}"):
        operations.resize("busy1", flavor="m1.large")
    with pytest.raises(operations.InstanceBusy):
        operations.live_migrate("busy1", "compute2")
    assert _operation_count() == before
    run(operations.live_migration_force_complete("busy1"))
    run(op)


def _operation_count() -> int:
    with db.read() as s:
        return len(s.execute(select(Operation.id)).all())


def test_redelivered_steps_change_nothing(cloud: Fleet) -> None:
    booted("dup1")
    ops = [run(operations.resize("dup1", flavor="m1.large", dest="compute2")),
           run(operations.revert("dup1")),
           run(operations.console("dup1", "vnc"))]
    before = (state_of("dup1"), _step_log())
    logs_before = sum(w.log().count("delivered again") for w in cloud.workers)
    sent = 0
    for data in ops:
        for position, entry in enumerate(data["plan"]):
            operations.publish_step(data["operation"], position, entry["step"], entry["host"])
            sent += 1
    wait_for(lambda: sum(w.log().count("delivered again") for w in cloud.workers)
             - logs_before == sent, 30, f"{sent} duplicates to be dropped")
    assert queued_messages(HOSTS) == 0
    assert (state_of("dup1"), _step_log()) == before
    mine = {d["operation"] for d in ops}
    applied = [r["applied"] for (op_id, _), r in before[1].items() if op_id in mine]
    assert applied == [1] * sent, "each step's effect applied once, none twice"


def _step_log() -> dict:
    with db.read() as s:
        return {(r.operation_id, r.position): {"attempts": r.attempts, "applied": r.applied}
                for r in s.execute(select(StepRecord)).scalars()}


# -- the command line ------------------------------------------------------------------------
def invoke(*args: str) -> tuple[int, dict | list]:
    result = CliRunner().invoke(cli, [*args, "--json"])
    return result.exit_code, json.loads(result.output)


def test_cli_contract(cloud: Fleet) -> None:
    code, out = invoke("boot", "cli1", "--host", "compute2", "--flavor", "m1.tiny")
    assert code == 0 and set(out) == {"operation", "instance"} and out["instance"] == "cli1"
    assert re.fullmatch(r"[0-9a-f-]{36}", out["operation"])
    code, waited = invoke("wait", out["operation"], "--timeout", "30")
    assert code == 0 and waited["status"] == "completed"

    code, shown = invoke("show", "cli1")
    assert code == 0 and (shown["host"], shown["vm_state"]) == ("compute2", "active")
    assert invoke("show", shown["id"])[1]["name"] == "cli1", "by id as well as by name"
    code, listed = invoke("list")
    assert code == 0 and "cli1" in {i["name"] for i in listed}
    code, hosts = invoke("hosts")
    assert code == 0 and {h["host"] for h in hosts} >= set(HOSTS)
    assert all(h["state"] == "up" for h in hosts if h["host"] in HOSTS)

    # --wait returns once it ended (as openstack server create --wait): the next command
    # does not find the instance busy.
    code, out = invoke("resize", "cli1", "--flavor", "m1.large", "--to", "compute1", "--wait")
    assert code == 0 and (out["status"], out["error"]) == ("completed", None), out
    code, op = invoke("operation", out["operation"])
    assert [s["step"] for s in op["steps"]] == ["prep_resize", "resize_instance", "finish_resize"]
    code, out = invoke("confirm", "cli1")
    assert code == 0 and invoke("wait", out["operation"])[0] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("show", "nope"), "unknown instance 'nope'"),
        (("boot", "x1", "--host", "compute9"), "unknown host 'compute9'"),
        (("migrate", "nope", "--to", "compute1"), "unknown instance 'nope'"),
        (("live-migrate", "cli2", "--to", "compute9"), "unknown host 'compute9'"),
        (("confirm", "cli2"), "has no resize to confirm or revert"),
        (("revert", "cli2"), "has no resize to confirm or revert"),
        (("live-migration-abort", "cli2"), "has no live migration"),
        (("event", "cli2", "bogus-event"), "unknown event 'bogus-event'"),
        (("operation", "no-such-op"), "unknown operation 'no-such-op'"),
    ],
)
def test_cli_errors_exit_2_and_send_nothing(cloud: Fleet, args: tuple, message: str) -> None:
    if not views.list_instances() or "cli2" not in {i["name"] for i in views.list_instances()}:
        booted("cli2")
    before, queued = _operation_count(), queued_messages(HOSTS)
    code, out = invoke(*args)
    assert code == 2 and message in out["error"], out
    assert (_operation_count(), queued_messages(HOSTS)) == (before, queued)


def test_wait_exits_1_for_a_failed_operation(cloud: Fleet) -> None:
    code, out = invoke("boot", "cli3", "--host", "compute3")
    assert code == 0
    code, waited = invoke("wait", out["operation"])
    assert code == 1 and waited["status"] == "failed"


def test_routing_command_shows_the_table(cloud: Fleet) -> None:
    code, out = invoke("routing")
    assert code == 0 and out["steps"]["live_migration"]["queue"] == "alt"
    assert Path(out["file"]).name == "routing.yaml"
