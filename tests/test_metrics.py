"""Prometheus metrics, scraped over HTTP during a real drain and after it."""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from nova_app import operations
from nova_app.app import orch
from orchestrator.local.embedded import free_port
from orchestrator.local.fleet import Fleet, wait_for
from orchestrator.ops.cli import main as cli
from orchestrator.ops.metrics import serve
from orchestrator.ops.refreshed import Refreshed
from tests.helpers import Gate, resize_vm1_until, wait_draining

pytestmark = pytest.mark.shutdown


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def scrape_until(port: int, name: str, expected: float, what: str,
                 **labels: str) -> dict[tuple[str, tuple], float]:
    """A scrape showing ``name{labels} == expected``: the read a scrape answers from is
    renewed every couple of seconds, so a change shows within them."""
    def shown() -> dict | None:
        samples = scrape(port)
        return samples if value(samples, name, **labels) == expected else None

    return wait_for(shown, 15, what)


def test_a_drain_as_prometheus_sees_it(fleet: Fleet, db_url: str, tmp_path: Path) -> None:
    # resize_instance is held at its start until the drain has been looked at.
    gate = Gate(tmp_path / "gate")
    env = {**gate.env, "ORCHESTRATOR_STEP_DELAYS": "resize_instance=0.5"}
    fleet.start("compute1", env=env)
    dest = fleet.start("compute2", graceful_timeout=60, env=env)
    port = free_port()
    server = serve(orch, port)
    try:
        booted, resize = resize_vm1_until("resize_instance", gate=gate)
        before = scrape(port)
        assert value(before, "orchestrator_host_state", host="compute2", state="up") == 1
        assert value(before, "orchestrator_operations_in_flight", host="compute2") == 1

        dest.signal(signal.SIGTERM)
        wait_draining("compute2")
        late = operations.boot("vm2", "compute2")  # waits in compute2 while it drains
        during = scrape_until(port, "orchestrator_queue_messages", 1, "the boot to wait",
                              host="compute2", queue="compute2", kind="main")
        assert value(during, "orchestrator_host_state", host="compute2", state="draining") == 1
        assert value(during, "orchestrator_host_state", host="compute2", state="up") == 0
        remaining = value(during, "orchestrator_drain_deadline_remaining_seconds",
                          host="compute2")
        assert remaining is not None and 50 < remaining <= 60
        assert value(during, "orchestrator_drain_waiting_operations", host="compute2") == 1
        assert value(during, "orchestrator_queue_messages", host="compute2", queue="compute2",
                     kind="main") == 1, "the queue of a draining host is visible"
        hosts = {h["host"]: h for h in json.loads(
            CliRunner().invoke(cli, ["hosts", "--json"]).output)}
        (drain,) = hosts["compute2"]["drains"]
        assert drain["worker"].startswith("compute2@") and 50 < drain["deadline_in"] <= 60
        assert [resize.id in w for w in drain["waiting_for"]["operations"]] == [True]
        text = CliRunner().invoke(cli, ["hosts"]).output
        assert "compute2: compute2@" in text and f"waiting for resize {resize.id}" in text

        gate.release()
        assert dest.wait(timeout=30) == 0, dest.log()
        after = scrape_until(port, "orchestrator_drains_total", 1, "the drain's end",
                             host="compute2", outcome="done")
        assert value(after, "orchestrator_host_state", host="compute2", state="down") == 1
        assert value(after, "orchestrator_drains_total", host="compute2", outcome="done") == 1
        assert value(after, "orchestrator_drains_total", host="compute2", outcome="forced") == 0
        assert value(after, "orchestrator_drain_duration_seconds_count", host="compute2") == 1
        duration = value(after, "orchestrator_drain_duration_seconds_sum", host="compute2")
        assert duration is not None and 0 < duration < 60  # within its deadline
        assert value(after, "orchestrator_drain_deadline_remaining_seconds",
                     host="compute2") is None, "a gone worker is not shown as draining"
        assert value(after, "orchestrator_queue_messages", host="compute2", queue="compute2",
                     kind="main") == 1
        assert value(after, "orchestrator_operations_in_flight", host="compute2") == 1  # vm2

        text = CliRunner().invoke(cli, ["metrics", "--once"]).output
        assert 'orchestrator_drains_total{host="compute2",outcome="done"} 1.0' in text
        fleet.start("compute2")
        wait_for(lambda: operations_done(late.id), 30, "the waiting boot to run")
        assert orch.operation(booted)["status"] == "completed"
        assert hosts_now()["compute2"]["drains"] == [], "a gone worker is not shown draining"
    finally:
        gate.release()
        server.shutdown()


def hosts_now() -> dict:
    return {h["host"]: h for h in json.loads(
        CliRunner().invoke(cli, ["hosts", "--json"]).output)}


def operations_done(operation_id: str) -> bool:
    return orch.operation(operation_id)["status"] == "completed"


def test_a_scrape_of_50_hosts_answers_from_the_kept_read(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """50 hosts known (one running, 49 whose worker exited): three scrapes at once wait for
    one read of the fleet; the next ones answer from it, even while its renewal is under way
    (held here until they have: counted, not timed)."""
    fleet.start("compute1")
    for i in range(49):
        node = f"gone{i:02d}@elsewhere"
        orch.registry.register(node, f"gone{i:02d}", consumes_main=True, consumes_alt=True,
                               pid=1)
        orch.registry.set_state(node, "down")
    from orchestrator.ops import views

    reads: list[float] = []
    renewal = threading.Event()
    page = views.hosts_page

    def counted(*args: object, **kwargs: object) -> dict:
        reads.append(time.monotonic())
        if len(reads) > 1:  # the renewal waits until the warm scrapes are answered
            renewal.wait(60)
        return page(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(views, "hosts_page", counted)
    port = free_port()
    server = serve(orch, port)
    try:
        with ThreadPoolExecutor(3) as pool:
            cold = list(pool.map(lambda _: timed_scrape(port), range(3)))
        assert len(reads) == 1, "three scrapes at once, one read"
        samples = cold[0][0]
        assert sum(value(samples, "orchestrator_host_state", host=f"gone{i:02d}",
                         state="down") == 1 for i in range(49)) == 49
        assert value(samples, "orchestrator_host_state", host="compute1", state="up") == 1
        wait_for(lambda: len(reads) == 2, 30, "the kept read's renewal to start")
        warm = [timed_scrape(port) for _ in range(5)]
        assert len(reads) == 2 and not renewal.is_set()
        assert all(value(s, "orchestrator_host_state", host="compute1", state="up") == 1
                   for s, _ in warm), "answered from the kept read while it was renewed"
        print(f"\n50 hosts, orchestrator metrics: cold scrapes "
              f"{[round(t, 3) for _, t in cold]} s, warm {[round(t, 3) for _, t in warm]} s")
    finally:
        renewal.set()
        server.shutdown()


def timed_scrape(port: int) -> tuple[dict[tuple[str, tuple], float], float]:
    started = time.monotonic()
    samples = scrape(port)
    return samples, time.monotonic() - started


def test_concurrent_asks_share_one_read() -> None:
    """Three asks while nothing is kept wait for the same read; later asks answer from it
    until it is renewed; after a pause the next ask waits for a new read."""
    started, release, reads = threading.Event(), threading.Event(), []

    def read() -> int:
        reads.append(time.monotonic())
        started.set()
        release.wait(10)
        return len(reads)

    kept = Refreshed(read, ttl=0.2, idle_after=0.5, name="test-refresh")
    try:
        with ThreadPoolExecutor(3) as pool:
            asks = [pool.submit(kept.get) for _ in range(3)]
            assert started.wait(10)
            release.set()
            assert [ask.result(10) for ask in asks] == [1, 1, 1]
        assert kept.get() >= 1
        wait_for(lambda: kept.get() >= 2, 5, "the read renewed")
        count = len(reads)
        wait_for(lambda: not kept.reading, 5, "the reading to stop once nobody asks")
        assert len(reads) <= count + 4  # no reading past idle_after
        assert kept.get() == len(reads), "after a pause, a new read"
    finally:
        kept.close()


def test_a_large_fleet_keeps_per_host_series_bounded_and_its_totals(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """30 hosts, at most 10 with series of their own (ORCHESTRATOR_METRICS_MAX_HOSTS): the
    draining one first, then the down ones by name (the live view's order); the fleet's
    totals by state count all 30."""
    for i in range(30):
        orch.registry.register(f"h{i:02d}@x", f"h{i:02d}", consumes_main=True,
                               consumes_alt=True, pid=1)
        if i < 27:
            orch.registry.set_state(f"h{i:02d}@x", "down")
    orch.registry.set_state("h29@x", "draining")
    # The app's settings were read at its start, as in a process given the variable.
    monkeypatch.setattr(orch, "settings", dataclasses.replace(orch.settings,
                                                              metrics_max_hosts=10))
    result = CliRunner().invoke(cli, ["metrics", "--once"])
    assert result.exit_code == 0, result.output
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(result.output)
               for s in family.samples}
    assert value(samples, "orchestrator_hosts", state="down") == 27
    assert value(samples, "orchestrator_hosts", state="up") == 2
    assert value(samples, "orchestrator_hosts", state="draining") == 1
    assert value(samples, "orchestrator_hosts_in_series") == 10
    shown = {dict(labels)["host"] for name, labels in samples
             if name == "orchestrator_host_state"}
    # No operation in flight here: the draining one, then the down ones by name.
    assert sorted(shown) == [f"h{i:02d}" for i in range(9)] + ["h29"]


def test_drains_of_all_time_are_counted_and_a_gone_workers_drain_is_forced(
        db_url: str) -> None:
    """The drain counters count every drain a host ever had, read grouped in the ledger: two
    ended ones (one last week), one whose worker is gone without ending it (forced) and one
    in progress (not counted as ended; its deadline shown). ``orchestrator hosts`` and the
    operations' timelines show only drains under way in their window: last week's forced
    drain, over by its deadline, is in neither."""
    now = time.time()
    week = 7 * 24 * 3600
    orch.registry.register("d1@x", "d1", consumes_main=True, consumes_alt=True, pid=1)
    orch.registry.register("d1@y", "d1", consumes_main=True, consumes_alt=True, pid=1)
    orch.registry.set_state("d1@y", "draining")
    orch.registry.register("d1@gone", "d1", consumes_main=True, consumes_alt=True, pid=1)
    orch.registry.set_state("d1@gone", "down")
    old = orch.registry.drain_started("d1@old", "d1", "sigterm", now - week, now - week + 60,
                                      {})
    orch.registry.drain_progress(old, handed_back=2, outcome="done")
    with orch.db.session() as s:  # it ended last week, 30 s after it started
        s.execute(text("UPDATE drains SET ended_at = :e WHERE id = :i"),
                  {"e": now - week + 30, "i": old})
    done = orch.registry.drain_started("d1@x", "d1", "sigterm", now - 20, now + 40, {})
    orch.registry.drain_progress(done, handed_back=1, outcome="deadline")
    orch.registry.drain_started("d1@gone", "d1", "sigterm", now - week, now - week + 60, {})
    orch.registry.drain_started("d1@y", "d1", "sigterm", now - 5, now + 55,
                                {"operations": ["op-a", "op-b"]})

    result = CliRunner().invoke(cli, ["metrics", "--once"])
    assert result.exit_code == 0, result.output
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(result.output)
               for s in family.samples}
    assert value(samples, "orchestrator_drains_total", host="d1", outcome="done") == 1
    assert value(samples, "orchestrator_drains_total", host="d1", outcome="deadline") == 1
    assert value(samples, "orchestrator_drains_total", host="d1", outcome="forced") == 1
    assert value(samples, "orchestrator_drains_total", host="d1", outcome="second-sigterm") == 0
    assert value(samples, "orchestrator_drain_handed_back_total", host="d1") == 3
    assert value(samples, "orchestrator_drain_duration_seconds_count", host="d1") == 2
    assert 30 < value(samples, "orchestrator_drain_duration_seconds_sum", host="d1") < 55
    assert 50 < value(samples, "orchestrator_drain_deadline_remaining_seconds", host="d1") <= 55
    assert value(samples, "orchestrator_drain_waiting_operations", host="d1") == 2

    (host,) = json.loads(CliRunner().invoke(cli, ["hosts", "--json"]).output)
    assert [d["worker"] for d in host["drains"]] == ["d1@y"]
    assert host["last_drain"]["worker"] == "d1@x", "last week's forced drain is over"
    assert [d.nodename for d in orch.registry.drains(["d1"], since=now - 3600)] \
        == ["d1@x", "d1@y"]
    assert orch.registry.drains([], since=0) == []
