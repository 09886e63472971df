"""Nova's graceful-shutdown job (nova-graceful-shutdown), made deterministic, and more.

Each scenario sends SIGTERM when the operation is *observed* in its target step, and checks
afterwards that the step was still running when the signal arrived: a signal that came too
late fails the scenario instead of silently testing nothing. Then: the operation completed
with the instance where Nova would put it, the host exited 0 by itself long before its
deadline, a request sent to it while it drained did not run there and ran after a restart,
and every operation is accounted for.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from sqlalchemy import select

from nova_app import operations, views
from nova_app.app import app
from orchestrator.broker import queue_depth
from orchestrator.ledger import engines as db
from orchestrator.ledger.models import StepRecord
from orchestrator.local.fleet import Fleet
from tests.helpers import (
    assert_conserved,
    at_step,
    ended,
    queued_messages,
    resize_vm1_until,
    wait_draining,
    wait_op,
)

pytestmark = pytest.mark.shutdown
HOSTS = ["compute1", "compute2"]
GRACEFUL_TIMEOUT = 60
SLOW = "2"  # seconds the target step takes: the window in which the signal must land


@dataclass(frozen=True)
class Scenario:
    name: str
    start: Callable[[], operations.Operation]
    target_step: str
    victim: str
    expect: tuple[str, str]  # (host, vm_state) of the instance at the end
    slow: str = ""

    @property
    def delays(self) -> str:
        return f"{self.slow or self.target_step}={SLOW}"


def _booted_resized() -> operations.Operation:
    run_ok(operations.boot("vm1", "compute1"))
    run_ok(operations.resize("vm1", flavor="m1.large", dest="compute2"))
    return operations.revert("vm1")


def _booted(then: Callable[[], operations.Operation]) -> Callable[[], operations.Operation]:
    def start() -> operations.Operation:
        run_ok(operations.boot("vm1", "compute1"))
        return then()

    return start


SCENARIOS = [
    Scenario("live migration, SIGTERM to the source",
             _booted(lambda: operations.live_migrate("vm1", "compute2")),
             "live_migration", "compute1", ("compute2", "active")),
    Scenario("cold migration, SIGTERM to the source",
             _booted(lambda: operations.resize("vm1", dest="compute2")),
             "resize_instance", "compute1", ("compute2", "resized")),
    Scenario("live migration, SIGTERM to the destination",
             _booted(lambda: operations.live_migrate("vm1", "compute2")),
             "live_migration", "compute2", ("compute2", "active")),
    Scenario("cold migration, SIGTERM to the destination",
             _booted(lambda: operations.resize("vm1", dest="compute2")),
             "resize_instance", "compute2", ("compute2", "resized")),
    Scenario("build, SIGTERM once the instance is building",
             lambda: operations.boot("vm1", "compute1"),
             "build_and_run_instance", "compute1", ("compute1", "active")),
    Scenario("revert resize, SIGTERM to the destination once it is reverting",
             _booted_resized, "revert_resize", "compute2", ("compute1", "active")),
]


def run_ok(op: operations.Operation) -> str:
    assert wait_op(op.id, ended)["status"] == "completed"
    return op.id


def finished_at(operation_id: str, step: str) -> float:
    with db.read() as s:
        rec = s.execute(select(StepRecord).where(
            StepRecord.operation_id == operation_id, StepRecord.step == step
        )).scalar_one()
        return rec.finished_at or 0.0


def applied_counts(operation_ids: list[str]) -> list[int]:
    with db.read() as s:
        return [r.applied for r in s.execute(select(StepRecord).where(
            StepRecord.operation_id.in_(operation_ids), StepRecord.status == "completed"
        )).scalars()]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_nova_graceful_shutdown_scenario(fleet: Fleet, scenario: Scenario) -> None:
    env = {"ORCHESTRATOR_STEP_DELAYS": scenario.delays}
    workers = {h: fleet.start(h, graceful_timeout=GRACEFUL_TIMEOUT, env=env) for h in HOSTS}
    op = scenario.start()
    earlier = [o.id for o in _earlier_operations(op.id)]
    wait_op(op.id, at_step(scenario.target_step))

    victim = workers[scenario.victim]
    signalled = time.time()
    victim.signal(signal.SIGTERM)
    wait_draining(scenario.victim)
    late = operations.boot("late1", scenario.victim)
    assert victim.wait(timeout=GRACEFUL_TIMEOUT) == 0, victim.log()
    took = time.time() - signalled

    assert finished_at(op.id, scenario.target_step) > signalled, "the signal came too late"
    data = wait_op(op.id, ended)
    assert data["status"] == "completed", data
    vm = views.show_instance("vm1")
    assert (vm["host"], vm["vm_state"], vm["task_state"]) == (*scenario.expect, None)
    assert took < GRACEFUL_TIMEOUT / 4, f"exited by itself after {took:.1f}s, not at the deadline"
    assert views.operation_dict(late.id)["steps"] == [], "not run by the draining host"
    assert queue_depth(app, scenario.victim) == 1
    everything = [*earlier, op.id, late.id]
    assert_conserved(everything, HOSTS)

    fleet.start(scenario.victim, env=env)
    assert wait_op(late.id, ended)["status"] == "completed"
    assert_conserved(everything, HOSTS)
    assert set(applied_counts(everything)) == {1}


def _earlier_operations(operation_id: str) -> list:
    from orchestrator.ledger.models import Operation

    with db.read() as s:
        return [o for o in s.execute(select(Operation)).scalars() if o.id != operation_id]


def test_both_hosts_of_a_migration_drain_at_once(fleet: Fleet) -> None:
    env = {"ORCHESTRATOR_STEP_DELAYS": f"resize_instance={SLOW}"}
    source = fleet.start("compute1", graceful_timeout=GRACEFUL_TIMEOUT, env=env)
    dest = fleet.start("compute2", graceful_timeout=GRACEFUL_TIMEOUT, env=env)
    booted, op = resize_vm1_until("resize_instance")
    signalled = time.time()
    source.signal(signal.SIGTERM)
    dest.signal(signal.SIGTERM)
    assert source.wait(timeout=GRACEFUL_TIMEOUT) == 0, source.log()
    assert dest.wait(timeout=GRACEFUL_TIMEOUT) == 0, dest.log()
    assert finished_at(op.id, "finish_resize") > signalled
    assert views.operation_dict(op.id)["status"] == "completed"
    assert views.show_instance("vm1")["host"] == "compute2"
    assert_conserved([booted, op.id], HOSTS)


def test_sigkill_mid_step_loses_nothing(fleet: Fleet) -> None:
    """No drain at all: the step's message is unacknowledged, so the broker gives it back
    (Redis: after the visibility timeout; RabbitMQ: when the connection drops)."""
    env = {"ORCHESTRATOR_VISIBILITY_TIMEOUT": "3"}
    fleet.start("compute1", env=env)
    dest = fleet.start("compute2", env={**env, "ORCHESTRATOR_STEP_DELAYS": "finish_resize=30"})
    booted, op = resize_vm1_until("finish_resize")
    dest.signal(signal.SIGKILL)
    dest.wait(timeout=10)
    fleet.start("compute2", env={**env, "ORCHESTRATOR_STEP_DELAYS": "finish_resize=0.1"})
    data = wait_op(op.id, ended, timeout=60)
    assert data["status"] == "completed"
    assert next(s for s in data["steps"] if s["step"] == "finish_resize")["attempts"] == 2
    assert set(applied_counts([booted, op.id])) == {1}
    assert_conserved([booted, op.id], HOSTS)


def test_broker_restart_during_a_drain(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A persistent Redis of this test's own restarts while the destination drains: the
    workers reconnect, the drained host stays off its main queue, the resize completes."""
    from orchestrator.local.embedded import embedded_redis
    from tests.conftest import BROKER_URL, fresh_db, use_broker

    with embedded_redis(persistent=True) as redis_server:
        db_url = fresh_db(tmp_path)
        monkeypatch.setenv("ORCHESTRATOR_DB_URL", db_url)
        use_broker(redis_server.url)
        fleet = Fleet(env={
            "ORCHESTRATOR_BROKER_URL": redis_server.url, "ORCHESTRATOR_DB_URL": db_url,
            "ORCHESTRATOR_STEP_DELAY": "0.05", "ORCHESTRATOR_HEARTBEAT_INTERVAL": "1",
            "ORCHESTRATOR_STEP_DELAYS": "resize_instance=3",
            # The fleet's looks resend a lost step: whoever holds the lease (workers.fleet).
            "ORCHESTRATOR_RESEND_AFTER": "3",
        }, log_dir=tmp_path / "logs")
        try:
            source = fleet.start("compute1")
            dest = fleet.start("compute2", graceful_timeout=GRACEFUL_TIMEOUT)
            booted = run_ok(operations.boot("vm1", "compute1"))
            op = operations.resize("vm1", flavor="m1.large", dest="compute2")
            wait_op(op.id, at_step("resize_instance"))
            dest.signal(signal.SIGTERM)
            wait_draining("compute2")
            late = operations.boot("late1", "compute2")

            redis_server.restart()
            assert dest.wait(timeout=GRACEFUL_TIMEOUT) == 0, dest.log()
            assert wait_op(op.id, ended)["status"] == "completed", source.log()[-4000:]
            # The source finished resize_instance on a connection that was lost meanwhile:
            # the ack it could not send must not end the worker.
            assert source.proc.poll() is None, source.log()[-4000:]
            assert "Unrecoverable error" not in source.log()
            assert views.operation_dict(late.id)["steps"] == []
            assert set(applied_counts([booted, op.id])) == {1}
            # The late boot waits for compute2. Its message is in compute2's queue, unless the
            # BRPOP compute2 had in flight popped it just as the broker restarted and the
            # reply went down with the connection (Redis's known window: README, Nothing
            # lost); the ledger still has it as sent, and the fleet's looks send it again.
            if queued_messages(HOSTS) == 0:
                print("the late boot's message went down with the BRPOP in flight")
            fleet.start("compute2")
            assert wait_op(late.id, ended)["status"] == "completed"
            assert_conserved([booted, op.id, late.id], HOSTS)
        finally:
            fleet.kill_all()
            use_broker(BROKER_URL)


def test_an_event_the_broker_refuses_mid_step_is_sent_later(tmp_path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A build sends its network-vif-plugged event from inside the step (nova_app.network): a
    submit from a worker's task. The broker is stopped under it for longer than the publish
    retry (about 6.5 s). The event's operation is left queued and "not sent", never failed
    (nobody could act on the error), and the build does not fail; once the broker is back,
    compute1's resend sends it and the boot completes."""
    from orchestrator.ledger.models import Operation
    from orchestrator.local.embedded import embedded_redis
    from orchestrator.status import wait_for
    from tests.conftest import BROKER_URL, fresh_db, use_broker

    def kinds() -> list[tuple[str, str]]:
        with db.read() as s:
            return sorted((o.kind, o.status) for o in s.execute(select(Operation)).scalars())

    with embedded_redis(persistent=True) as redis_server:
        db_url = fresh_db(tmp_path)
        monkeypatch.setenv("ORCHESTRATOR_DB_URL", db_url)
        use_broker(redis_server.url)
        fleet = Fleet(env={
            "ORCHESTRATOR_BROKER_URL": redis_server.url, "ORCHESTRATOR_DB_URL": db_url,
            "ORCHESTRATOR_STEP_DELAY": "0.05", "ORCHESTRATOR_HEARTBEAT_INTERVAL": "1",
            # The build runs 3 s before it sends its event: the broker is stopped meanwhile.
            "ORCHESTRATOR_STEP_DELAYS": "build_and_run_instance=3",
        }, log_dir=tmp_path / "logs")
        try:
            worker = fleet.start("compute1")
            op = operations.boot("vm1", "compute1")
            wait_op(op.id, at_step("build_and_run_instance"))
            redis_server.stop()
            refused = "external_instance_event@compute1 recorded, not sent"
            wait_for(lambda: refused in worker.log() or ("external_event", "failed") in kinds(),
                     60, "the event's publish to be refused")
            assert kinds() == [("boot", "running"), ("external_event", "queued")], \
                f"{kinds()}\n{worker.log()[-3000:]}"
            redis_server.start()
            assert wait_op(op.id, ended, timeout=90)["status"] == "completed", \
                worker.log()[-4000:]
            assert kinds() == [("boot", "completed"), ("external_event", "completed")]
            assert "resent external_instance_event of" in worker.log()
        finally:
            fleet.kill_all()
            use_broker(BROKER_URL)
