"""Rolling upgrades: per-host service versions, alt routing only to hosts that consume it.

Unit tests drive the router and its registry cache with a fake clock; the end-to-end tests run
real ``celery worker`` processes (some of them legacy, version 1: ``<host>`` only) on a real
broker, wait on observed state with deadlines and count every operation they submit.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from nova_app import operations, views
from nova_app.app import app, orch
from orchestrator import registry
from orchestrator.broker import queue_depth
from orchestrator.config import ConfigError, Settings
from orchestrator.ledger import engines as db
from orchestrator.ledger.models import Service, StepRecord
from orchestrator.ledger.store import ACTIVE_STATUSES
from orchestrator.local.fleet import Fleet, WorkerProcess, wait_for, worker_command
from orchestrator.ops.cli import main as cli
from orchestrator.routing import AltCapability, AltSnapshot, Decision, StepRouter
from tests.helpers import assert_conserved, at_step, ended, queued_messages, wait_op

REPO = Path(__file__).resolve().parent.parent
#: Short registry-cache window for the workers of these tests (the default is 3 s).
CACHE_SECONDS = 0.5
BASE_ENV = {"ORCHESTRATOR_ALT_CACHE_SECONDS": str(CACHE_SECONDS)}


# -- the router and its cache, without workers ------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRegistry:
    """A loader that counts its queries and whose answer the test changes."""

    def __init__(self, snapshot: AltSnapshot) -> None:
        self.snapshot, self.queries, self.fail = snapshot, 0, False

    def __call__(self, host: str) -> AltSnapshot:
        self.queries += 1
        if self.fail:
            raise RuntimeError("database is down")
        return self.snapshot


def snap(alt: set[str], live: set[str], known: set[str]) -> AltSnapshot:
    return AltSnapshot(known=frozenset(known), live=frozenset(live), alt=frozenset(alt))


MIXED = snap(alt={"current"}, live={"current", "legacy"}, known={"current", "legacy", "dead"})


def make_router(mode: str, loader: FakeRegistry, clock: FakeClock, ttl: float = 3.0):
    recorded: list[Decision] = []
    router = StepRouter(
        orch.routing, mode=mode,  # type: ignore[arg-type]
        capability=AltCapability(loader, ttl, clock=clock), on_fallback=recorded.append,
        task_prefix="compute.",
    )
    return router, recorded


def test_auto_routes_alt_steps_per_host_from_what_the_registry_said_of_it() -> None:
    clock, loader = FakeClock(), FakeRegistry(MIXED)
    router, recorded = make_router("auto", loader, clock)
    for _ in range(100):  # many messages, one registry query per host
        assert router.queue("resize_instance", "current") == "current-alt"
        assert router.queue("resize_instance", "legacy") == "legacy"
        assert router.queue("finish_resize", "dead") == "dead"
        assert router.queue("finish_resize", "newcomer") == "newcomer"
        assert router.queue("prep_resize", "current") == "current"  # main steps: always main
    assert loader.queries == 4
    assert router.counts == {("legacy", "no-alt"): 100, ("dead", "down"): 100,
                             ("newcomer", "unknown"): 100}
    assert [(d.host, d.queue, d.reason) for d in recorded[:3]] == [
        ("legacy", "legacy", "no-alt"), ("dead", "dead", "down"),
        ("newcomer", "newcomer", "unknown"),
    ]
    assert all(d.fallback for d in recorded)
    assert router.stats()["alt_to_main"]["legacy"] == {"no-alt": 100}


def test_cache_staleness_is_bounded_by_its_window() -> None:
    clock, loader = FakeClock(), FakeRegistry(MIXED)
    router, _ = make_router("auto", loader, clock, ttl=3.0)
    assert router.queue("finish_resize", "legacy") == "legacy"
    # legacy is upgraded: the registry says so at once, this process sees it within 3 s.
    loader.snapshot = snap(alt={"current", "legacy"}, live={"current", "legacy"},
                           known={"current", "legacy"})
    clock.now += 2.9
    assert router.queue("finish_resize", "legacy") == "legacy", "still the old snapshot"
    clock.now += 0.1
    assert router.queue("finish_resize", "legacy") == "legacy-alt"
    assert loader.queries == 2
    # The registry cannot be read: the last snapshot is kept, and retried one window later.
    loader.fail = True
    clock.now += 3.0
    assert router.queue("finish_resize", "legacy") == "legacy-alt"
    clock.now += 1.0
    router.queue("finish_resize", "legacy")
    assert loader.queries == 3
    # With no snapshot at all, every host is unknown: main, the queue every version consumes.
    router.capability.invalidate()
    assert router.decide("finish_resize", "current").reason == "unknown"


@pytest.mark.parametrize(
    ("mode", "current", "legacy", "unknown", "fallbacks"),
    [
        ("auto", "current-alt", "legacy", "newcomer", {("legacy", "no-alt"), ("newcomer",
                                                                               "unknown")}),
        ("always", "current-alt", "legacy-alt", "newcomer-alt", set()),
        ("never", "current", "legacy", "newcomer",
         {("current", "forced-main"), ("legacy", "forced-main"), ("newcomer", "forced-main")}),
    ],
)
def test_override_modes(mode: str, current: str, legacy: str, unknown: str,
                        fallbacks: set) -> None:
    clock, loader = FakeClock(), FakeRegistry(MIXED)
    router, _ = make_router(mode, loader, clock)
    assert router.queue("finish_revert_resize", "current") == current
    assert router.queue("finish_revert_resize", "legacy") == legacy
    assert router.queue("finish_revert_resize", "newcomer") == unknown
    assert router.queue("revert_resize", "legacy") == "legacy"
    assert set(router.counts) == fallbacks
    # auto: once for each of the three hosts; forced modes never ask the registry.
    assert loader.queries == (3 if mode == "auto" else 0)


def test_bad_override_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_ALT_ROUTING", "sometimes")
    with pytest.raises(ConfigError, match="ORCHESTRATOR_ALT_ROUTING='sometimes': must be one of "
                                          "auto, always, never"):
        Settings.from_env()
    monkeypatch.setenv("ORCHESTRATOR_ALT_ROUTING", " Never ")
    assert Settings.from_env().alt_routing == "never"
    proc = subprocess.run(
        [sys.executable, "-c", "import nova_app.app"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "ORCHESTRATOR_ALT_ROUTING": "sometimes"}, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(
        "error: ORCHESTRATOR_ALT_ROUTING='sometimes': must be one of auto, always, never"
    ), proc.stderr


def test_explicit_queue_is_not_routed_twice() -> None:
    clock, loader = FakeClock(), FakeRegistry(MIXED)
    router, recorded = make_router("auto", loader, clock)
    # publish_step decides, then passes queue=...; Celery still calls task_routes.
    assert router("compute.finish_resize", (), {"host": "legacy"}, {"queue": "legacy"}) is None
    assert router("compute.finish_resize", (), {"host": "legacy"}, {}) == {"queue": "legacy"}
    assert len(recorded) == 1


def test_legacy_worker_command() -> None:
    command = worker_command("compute1", legacy=True, extra=("-c", "1"))
    assert command[command.index("-n") + 1] == "compute1@%h"
    assert command[command.index("-Q") + 1] == "compute1"
    assert command[command.index("--service-version") + 1] == "1"
    assert command[-2:] == ["-c", "1"]
    with pytest.raises(ValueError, match="no alt queue"):
        worker_command("compute1", "alt", legacy=True)
    result = CliRunner().invoke(cli, ["worker", "compute1", "--legacy", "--alt-only"])
    assert result.exit_code == 2 and "cannot be --alt-only" in result.output


def test_registry_snapshot_and_fallback_counter(db_url: str) -> None:
    orch.registry.register("legacy@h", "legacy", consumes_main=True, consumes_alt=False, pid=1,
                      version=registry.LEGACY_SERVICE_VERSION)
    orch.registry.register("current@h", "current", consumes_main=True, consumes_alt=True, pid=2)
    orch.registry.register("draining@h", "draining", consumes_main=True, consumes_alt=True, pid=3)
    orch.registry.set_state("draining@h", "draining", drain_started_at=time.time())
    orch.registry.register("split-main@h", "split", consumes_main=True, consumes_alt=False, pid=4)
    orch.registry.register("stale@h", "stale", consumes_main=True, consumes_alt=True, pid=5)
    with db.session() as s:  # a SIGKILLed worker: its heartbeat stops
        s.get(Service, "stale@h").heartbeat_at -= 10 * Settings.from_env().heartbeat_interval
    views_ = orch.registry.services()
    status = {h: registry.alt_status(views_, h)
              for h in ("legacy", "current", "draining", "split", "stale", "nobody")}
    assert status == {"legacy": "no-alt", "current": "alt", "draining": "alt",
                      "split": "no-alt", "stale": "down", "nobody": "unknown"}
    assert [registry.host_state(views_, h) for h in ("draining", "stale", "nobody")] == [
        "draining", "down", "unknown"]
    for _ in range(3):
        orch.registry.count_fallback(Decision("finish_resize", "legacy", "legacy", "alt", "no-alt"))
    orch.registry.count_fallback(Decision("finish_resize", "stale", "stale", "alt", "down"))
    assert orch.registry.fallback_counts() == {"legacy": {"no-alt": 3}, "stale": {"down": 1}}


# -- end to end ---------------------------------------------------------------------------
@pytest.fixture
def short_cache() -> Iterator[None]:
    """This (API) process's router uses the same short window as the workers."""
    capability = orch.router.capability
    assert capability is not None
    ttl, capability.ttl = capability.ttl, CACHE_SECONDS
    capability.invalidate()
    yield
    capability.ttl = ttl


def start(fleet: Fleet, specs: list[tuple[str, dict]]) -> list[WorkerProcess]:
    """Start several workers at once (their imports overlap), then wait until all are ready."""
    workers = [
        fleet.start(host, ready=False, **{**kw, "env": {**BASE_ENV, **kw.get("env", {})}})
        for host, kw in specs
    ]
    for worker in workers:
        worker.wait_ready()
    return workers


def boot_active(name: str, host: str) -> str:
    op = operations.boot(name, host)
    assert wait_op(op.id, ended)["status"] == "completed"
    return op.id


def step_row(data: dict, step: str) -> dict:
    return next(s for s in data["steps"] if s["step"] == step)


def hosts_json() -> dict[str, dict]:
    result = CliRunner().invoke(cli, ["hosts", "--json"])
    assert result.exit_code == 0, result.output
    return {h["host"]: h for h in json.loads(result.output)}


def published_queue(operation_id: str, step: str) -> str:
    """The queue the router chose for the operation's ``step``: while it waits or runs, once
    it is published, and after, as the step log recorded the queue it ran from (a step of a
    moment may be over between two looks)."""
    def check() -> str | None:
        data = views.operation_dict(operation_id)
        current = data["current_step"] or {}
        if current.get("step") == step and current.get("queue"):
            return current["queue"]
        ran = [row["queue"] for row in data["steps"] if row["step"] == step and row["queue"]]
        return ran[-1] if ran else None

    return wait_for(check, 30, f"{step} of {operation_id} to be published")  # type: ignore


def test_mixed_fleet_resize_and_revert_through_a_legacy_host(fleet: Fleet,
                                                             short_cache: None) -> None:
    # Slow enough to see each alt step's queue while it waits or runs.
    env = {"ORCHESTRATOR_STEP_DELAYS": "resize_instance=0.6,finish_resize=0.6,"
                                       "check_instance_shared_storage=0.6"}
    start(fleet, [("compute1", {"legacy": True, "env": env}), ("compute2", {"env": env}),
                  ("compute3", {"env": env})])
    hosts = hosts_json()
    assert hosts["compute1"]["version"] == registry.LEGACY_SERVICE_VERSION
    assert hosts["compute1"]["queues"] == ["compute1"]
    assert hosts["compute1"]["alt_steps_to"] == "compute1"
    assert hosts["compute2"]["alt_steps_to"] == "compute2-alt"

    # Legacy source: resize_instance (alt) falls back to compute1; finish_resize uses alt.
    vm1 = boot_active("vm1", "compute1")
    resize1 = operations.resize("vm1", flavor="m1.large", dest="compute2")
    assert published_queue(resize1.id, "resize_instance") == "compute1"
    assert published_queue(resize1.id, "finish_resize") == "compute2-alt"
    assert wait_op(resize1.id, ended)["status"] == "completed"
    # Revert: check_instance_shared_storage and finish_revert_resize run on legacy compute1.
    revert1 = operations.revert("vm1")
    assert published_queue(revert1.id, "check_instance_shared_storage") == "compute1"
    data = wait_op(revert1.id, ended)
    assert data["status"] == "completed"
    assert step_row(data, "finish_revert_resize")["worker"].startswith("compute1@")
    vm = views.show_instance("vm1")
    assert (vm["host"], vm["flavor"], vm["vm_state"]) == ("compute1", "m1.small", "active")

    # Legacy destination: finish_resize falls back to compute1; then confirm there.
    vm2 = boot_active("vm2", "compute3")
    resize2 = operations.resize("vm2", flavor="m1.large", dest="compute1")
    assert published_queue(resize2.id, "resize_instance") == "compute3-alt"
    assert wait_op(resize2.id, ended)["status"] == "completed"
    confirm2 = operations.confirm("vm2")
    assert wait_op(confirm2.id, ended)["status"] == "completed"
    assert views.show_instance("vm2")["host"] == "compute1"

    # vm1's network-vif-plugged event, resize_instance, check_instance_shared_storage,
    # finish_revert_resize, finish_resize (each counted once sent, after the ledger's commit).
    wait_for(lambda: hosts_json()["compute1"]["alt_fallbacks"] == {"no-alt": 5}, 5,
             "the fallbacks to be counted")
    hosts = hosts_json()
    assert hosts["compute2"]["alt_fallbacks"] == hosts["compute3"]["alt_fallbacks"] == {}
    assert_conserved([vm1, resize1.id, revert1.id, vm2, resize2.id, confirm2.id],
                     ["compute1", "compute2", "compute3"])


def test_drains_with_a_legacy_host_in_the_operation(fleet: Fleet, short_cache: None) -> None:
    env = {"ORCHESTRATOR_STEP_DELAYS": "resize_instance=2"}
    legacy, current = start(fleet, [("compute1", {"legacy": True, "env": env}),
                                    ("compute2", {"graceful_timeout": 60, "env": env})])
    vm1, vm2 = boot_active("vm1", "compute1"), boot_active("vm2", "compute1")

    # 1. A current host drains while the operation's step runs from a legacy host's main
    #    queue: that operation can progress, so it waits, then finishes it through its alt queue.
    resize1 = operations.resize("vm1", flavor="m1.large", dest="compute2")
    wait_op(resize1.id, at_step("resize_instance"))
    assert views.operation_dict(resize1.id)["current_step"]["queue"] == "compute1"
    current.signal(signal.SIGTERM)
    assert current.wait(timeout=30) == 0, current.log()
    data = views.operation_dict(resize1.id)
    assert data["status"] == "completed"
    assert step_row(data, "finish_resize")["worker"].startswith("compute2@")
    assert "steps completed during drain: 1" in current.log()

    # 2. A legacy host drains like an old compute: it stops taking compute1 and exits as soon
    #    as nothing runs, without waiting for operations that will need it later.
    current = start(fleet, [("compute2", {"graceful_timeout": 60, "env": env})])[0]
    resize2 = operations.resize("vm2", flavor="m1.large", dest="compute2")
    wait_op(resize2.id, at_step("resize_instance"))
    signalled = time.monotonic()
    legacy.signal(signal.SIGTERM)
    assert legacy.wait(timeout=30) == 0, legacy.log()
    assert "steps completed during drain: 1" in legacy.log(), "it finished the running step"
    print(f"legacy host with a running step: SIGTERM to exit {time.monotonic() - signalled:.2f}s")
    late = operations.boot("vm3", "compute1")  # accepted; waits in compute1
    late_view = wait_op(late.id, lambda d: d["current_step"]["queue"] == "compute1")
    assert late_view["current_step"]["host_state"] == "down"
    assert "host compute1 is down" in late_view["current_step"]["waiting"]
    data = wait_op(resize2.id, ended)
    assert data["status"] == "completed", "finish_resize ran on compute2, alt"

    # 3. The operation's next step waits in a legacy host's main queue nobody consumes: the
    #    current host does not wait for it (it cannot progress) and exits at once.
    vm4 = operations.boot("vm4", "compute2")
    assert wait_op(vm4.id, ended)["status"] == "completed"
    resize3 = operations.resize("vm4", dest="compute1")  # prep on compute1: waits there
    confirm2 = operations.confirm("vm2")  # confirm_resize on the source, compute1: waits
    assert published_queue(confirm2.id, "confirm_resize") == "compute1"
    current.signal(signal.SIGTERM)
    assert current.wait(timeout=15) == 0, current.log()
    assert "drain: summary" in current.log()
    assert "not waited for (next step on a queue nobody consumes)" in current.log()
    assert queue_depth(app, "compute1") == 3

    # The upgrade: compute1 comes back current, compute2 restarts; everything completes.
    start(fleet, [("compute1", {"env": env}), ("compute2", {"env": env})])
    ops = [vm1, vm2, resize1.id, resize2.id, late.id, vm4.id, resize3.id, confirm2.id]
    for op_id in ops:
        assert wait_op(op_id, ended)["status"] == "completed"
    assert_conserved(ops, ["compute1", "compute2"])


def test_always_sends_alt_to_a_legacy_host_and_says_where_it_waits(fleet: Fleet,
                                                                   short_cache: None) -> None:
    always = {"ORCHESTRATOR_ALT_ROUTING": "always"}
    start(fleet, [("compute1", {"env": always}), ("compute2", {"legacy": True})])
    vm1 = boot_active("vm1", "compute1")
    resize = operations.resize("vm1", dest="compute2")
    assert published_queue(resize.id, "finish_resize") == "compute2-alt"
    data = wait_op(resize.id, lambda d: d["current_step"]["queue"] == "compute2-alt")
    current = data["current_step"]
    assert (current["host_state"], current["queue_consumed"]) == ("up", False)
    assert "no running service of compute2 consumes" in current["waiting"]
    text = CliRunner().invoke(cli, ["operation", resize.id]).output
    assert "waiting: in compute2-alt" in text
    hosts = hosts_json()
    assert any("wait in compute2-alt" in n for n in hosts["compute2"]["notes"])
    assert hosts["compute1"]["alt_fallbacks"] == {}

    # The remedy: a version-2 worker for compute2 (the upgrade) consumes it.
    fleet.workers[-1].stop()
    start(fleet, [("compute2", {})])
    assert wait_op(resize.id, ended)["status"] == "completed"
    assert_conserved([vm1, resize.id], ["compute1", "compute2"])


def test_never_sends_every_step_to_main(fleet: Fleet, short_cache: None) -> None:
    never = {"ORCHESTRATOR_ALT_ROUTING": "never", "ORCHESTRATOR_STEP_DELAYS": "resize_instance=0.6"}
    start(fleet, [("compute1", {"env": never}), ("compute2", {"env": never})])
    vm1 = boot_active("vm1", "compute1")
    resize = operations.resize("vm1", flavor="m1.large", dest="compute2")
    assert published_queue(resize.id, "resize_instance") == "compute1"
    assert wait_op(resize.id, ended)["status"] == "completed"
    # vm1's network-vif-plugged event and resize_instance; finish_resize.
    wait_for(lambda: [h["alt_fallbacks"] for h in hosts_json().values()]
             == [{"forced-main": 2}, {"forced-main": 1}], 5, "the fallbacks to be counted")
    assert_conserved([vm1, resize.id], ["compute1", "compute2"])


def test_stale_heartbeat_marks_a_killed_host_down_and_routing_falls_back(
    fleet: Fleet, short_cache: None,
) -> None:
    interval = float(os.environ["ORCHESTRATOR_HEARTBEAT_INTERVAL"])
    # A solo pool: the SIGKILLed worker leaves no pool child behind.
    survivor, doomed = start(fleet, [("compute1", {}),
                                     ("compute2", {"extra": ("-P", "solo")})])
    vm1 = boot_active("vm1", "compute2")
    assert orch.router.queue("resize_instance", "compute2") == "compute2-alt"

    killed = time.monotonic()
    doomed.signal(signal.SIGKILL)
    doomed.wait(timeout=10)
    assert hosts_json()["compute2"]["state"] == "up", "the registry cannot know yet"
    wait_for(lambda: hosts_json()["compute2"]["state"] == "down",
             registry.STALE_AFTER * interval + 5, "compute2's heartbeat to go stale")
    went_down = time.monotonic() - killed
    print(f"SIGKILLed host shown down after {went_down:.1f}s "
          f"(stale after {registry.STALE_AFTER * interval:.0f}s)")
    assert went_down >= (registry.STALE_AFTER - 1) * interval
    result = CliRunner().invoke(cli, ["hosts"])
    assert "compute2      down" in result.output, result.output

    # A new request to the down host is accepted and waits; an alt step falls back to main.
    resize = operations.resize("vm1", flavor="m1.large", dest="compute1")  # source: compute2
    assert published_queue(resize.id, "resize_instance") == "compute2"
    current = views.operation_dict(resize.id)["current_step"]
    assert current["host_state"] == "down" and "host compute2 is down" in current["waiting"]
    # The worker counts the fallback once the step is sent, after the ledger's commit.
    wait_for(lambda: hosts_json()["compute2"]["alt_fallbacks"] == {"down": 1}, 5,
             "the fallback to be counted")
    assert orch.router.capability is not None
    wait_for(lambda: orch.router.capability.status("compute2") == "down", 5,
             "this process's cache to see compute2 down")
    assert queue_depth(app, "compute2") == 1

    start(fleet, [("compute2", {})])
    assert wait_op(resize.id, ended)["status"] == "completed"
    assert_conserved([vm1, resize.id], ["compute1", "compute2"])
    assert survivor.proc.poll() is None


# -- the rolling restart ------------------------------------------------------------------
class Load(threading.Thread):
    """Submits boots and resizes (and confirms / reverts) across the hosts until stopped."""

    def __init__(self, hosts: list[str], instances: int = 8, pace: float = 0.12) -> None:
        super().__init__(daemon=True, name="load")
        self.hosts, self.instances, self.pace = hosts, instances, pace
        self.stop_event = threading.Event()
        self.submitted: list[str] = []
        self.busy: dict[str, str] = {}  # instance -> operation in flight
        self.errors: list[BaseException] = []
        self.rng = random.Random(6)

    def run(self) -> None:
        try:
            while not self.stop_event.wait(self.pace):
                self.submit_one()
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def _record(self, instance: str, op_id: str) -> None:
        self.submitted.append(op_id)
        self.busy[instance] = op_id

    def submit_one(self) -> None:
        for name, op_id in list(self.busy.items()):
            if orch.ledger.get_operation(op_id).status not in ACTIVE_STATUSES:
                del self.busy[name]
        count = len(self.submitted)
        booted = {i["name"]: i for i in views.list_instances()}
        idle = [i for n, i in booted.items() if n not in self.busy]
        if len(booted) < self.instances or not idle:  # all busy (some wait for a host): boot
            name = f"vm{len(booted)}"
            self._record(name, operations.boot(name, self.hosts[count % len(self.hosts)]).id)
            return
        vm = self.rng.choice(idle)
        if vm["vm_state"] == "active":
            dest = self.rng.choice([h for h in self.hosts if h != vm["host"]])
            op = operations.resize(vm["name"], flavor=f"m1.f{count}", dest=dest)
        elif vm["vm_state"] == "resized":
            op = (operations.confirm if count % 2 else operations.revert)(vm["name"])
        else:
            raise AssertionError(f"instance {vm['name']} is {vm['vm_state']}")
        self._record(vm["name"], op.id)

    def wait_submitted(self, more: int, timeout: float = 30) -> None:
        target = len(self.submitted) + more
        wait_for(lambda: len(self.submitted) >= target or self.errors, timeout,
                 f"{more} more operations")
        assert not self.errors, self.errors


def test_rolling_restart_under_load_loses_and_strands_nothing(fleet: Fleet,
                                                              short_cache: None) -> None:
    hosts = ["compute1", "compute2", "compute3"]
    env = {"ORCHESTRATOR_STEP_DELAYS": "resize_instance=0.4,finish_resize=0.2"}
    workers = dict(zip(hosts, start(fleet, [(h, {"legacy": True, "env": env}) for h in hosts]),
                       strict=True))
    load = Load(hosts)
    load.start()
    drain_seconds: dict[str, float] = {}  # SIGTERM to process exit
    drained_in: dict[str, float] = {}  # SIGTERM to the end of the drain (the worker's summary)
    try:
        for host in hosts:
            load.wait_submitted(12)
            signalled = time.monotonic()
            workers[host].signal(signal.SIGTERM)
            assert workers[host].wait(timeout=30) == 0, workers[host].log()
            drain_seconds[host] = time.monotonic() - signalled
            drained_in[host] = float(
                re.search(r"drain: summary for \S+ after ([0-9.]+)s", workers[host].log())[1]
            )
            load.wait_submitted(2)  # requests sent while the host is down wait for it
            workers[host] = start(fleet, [(host, {"graceful_timeout": 60, "env": env})])[0]
            assert hosts_json()[host]["version"] == registry.SERVICE_VERSION
        load.wait_submitted(12)  # and some more on the upgraded fleet, alt routing on
    finally:
        load.stop_event.set()
        load.join(timeout=30)
    assert not load.errors, load.errors

    submitted = list(load.submitted)
    for op_id in submitted:
        wait_op(op_id, ended, timeout=60)
    counts = assert_conserved(submitted, hosts)
    assert counts["completed"] == counts["submitted"], counts
    assert queued_messages(hosts) == 0, "nothing stranded in any queue"
    with db.session() as s:
        assert s.execute(select(func.max(StepRecord.applied))).scalar() == 1, \
            "no step's effect applied twice"
    fallbacks = {h: d["alt_fallbacks"] for h, d in hosts_json().items()}
    print(f"rolling restart: submitted {counts['submitted']}, completed {counts['completed']}, "
          "SIGTERM to exit (drain) " + ", ".join(
              f"{h}={t:.2f}s ({drained_in[h]:.1f}s)" for h, t in drain_seconds.items())
          + f"; alt steps sent to main: {fallbacks}")
    assert all(w.proc.poll() is None for w in workers.values())
