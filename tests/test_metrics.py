"""Prometheus metrics, scraped over HTTP during a real drain and after it."""

from __future__ import annotations

import json
import signal
import urllib.request

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from nova_app import operations
from nova_app.app import orch
from orchestrator.cli import main as cli
from orchestrator.metrics import serve
from orchestrator.testing.embedded import free_port
from orchestrator.testing.fleet import Fleet, wait_for
from tests.helpers import resize_vm1_until, wait_draining

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


def test_a_drain_as_prometheus_sees_it(fleet: Fleet, db_url: str) -> None:
    env = {"ORCHESTRATOR_STEP_DELAYS": "resize_instance=3"}
    fleet.start("compute1", env=env)
    dest = fleet.start("compute2", graceful_timeout=60, env=env)
    port = free_port()
    server = serve(orch, port)
    try:
        booted, resize = resize_vm1_until("resize_instance")
        before = scrape(port)
        assert value(before, "orchestrator_host_state", host="compute2", state="up") == 1
        assert value(before, "orchestrator_operations_in_flight", host="compute2") == 1

        dest.signal(signal.SIGTERM)
        wait_draining("compute2")
        late = operations.boot("vm2", "compute2")  # waits in compute2 while it drains
        during = scrape(port)
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

        assert dest.wait(timeout=30) == 0, dest.log()
        after = scrape(port)
        assert value(after, "orchestrator_host_state", host="compute2", state="down") == 1
        assert value(after, "orchestrator_drains_total", host="compute2", outcome="done") == 1
        assert value(after, "orchestrator_drains_total", host="compute2", outcome="forced") == 0
        assert value(after, "orchestrator_drain_duration_seconds_count", host="compute2") == 1
        duration = value(after, "orchestrator_drain_duration_seconds_sum", host="compute2")
        assert duration is not None and 0 < duration < 15
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
        server.shutdown()


def hosts_now() -> dict:
    return {h["host"]: h for h in json.loads(
        CliRunner().invoke(cli, ["hosts", "--json"]).output)}


def operations_done(operation_id: str) -> bool:
    return orch.operation(operation_id)["status"] == "completed"
