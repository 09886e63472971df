"""A worker whose broker does not answer still stops on SIGTERM, as plain Celery does.

Celery retries the connection in its consumer's start (no event loop runs meanwhile, so the
drain cannot start); the host then drains through the ledger alone (workers.offline).
"""

from __future__ import annotations

import signal
import time

import pytest

from nova_app import operations
from orchestrator.local.embedded import free_port
from orchestrator.local.fleet import Fleet, wait_for

pytestmark = pytest.mark.shutdown


def _offline(fleet: Fleet, graceful_timeout: float):
    # The suite's kind of broker, where nothing listens.
    dead = (f"amqp://guest:guest@127.0.0.1:{free_port()}//"
            if operations.orch.app.conf.broker_url.startswith("amqp")
            else f"redis://127.0.0.1:{free_port()}/0")
    worker = fleet.start("compute1", graceful_timeout=graceful_timeout, ready=False,
                         env={"ORCHESTRATOR_BROKER_URL": dead})
    wait_for(lambda: "Cannot connect to" in worker.log(), 30, "compute1 to retry its broker")
    return worker


def test_sigterm_with_nothing_in_flight_exits_at_once(fleet: Fleet) -> None:
    worker = _offline(fleet, graceful_timeout=120)
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, worker.log()
    took = time.monotonic() - started
    log = worker.log()
    assert "nothing in flight needs compute1; exiting without its broker" in log, log
    assert "forcing the exit" not in log and "Traceback" not in log, log
    print(f"offline worker: SIGTERM to exit {took:.1f}s (graceful timeout 120s)")


def test_sigterm_with_work_for_the_host_stops_by_the_deadline(fleet: Fleet) -> None:
    worker = _offline(fleet, graceful_timeout=4)
    wait_for(lambda: "compute1" in operations.orch.registry.known_hosts(), 10,
             "compute1 registered")
    op = operations.boot("vm1", "compute1")  # queued on the real broker: it needs compute1
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 75, worker.log()
    log = worker.log()
    assert "drain: deadline passed without its broker; stopping (status 75)" in log, log
    assert "forcing the exit" not in log, log
    assert operations.orch.operation(op.id)["status"] in ("queued", "running")
