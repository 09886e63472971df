"""A worker serves exactly one host, and no host takes a name of the broker or of Celery.

Real workers on the suite's broker: what ``-Q`` may name, Celery's ``add_consumer`` and
``shutdown`` remote-control commands (Flower's buttons), and a step that reaches the wrong
host's worker anyway.
"""

from __future__ import annotations

import json
import signal
import socket
import sys

import pytest
from click.testing import CliRunner

from nova_app import operations
from nova_app.app import app, orch
from orchestrator.broker import queue_depth
from orchestrator.errors import SubmitError
from orchestrator.local.fleet import Fleet, wait_for
from orchestrator.names import host_problem
from orchestrator.ops.cli import main as cli
from tests.helpers import boot_active, ended, wait_op

pytestmark = pytest.mark.shutdown

RESERVED_HOSTS = ["unacked", "unacked_index", "unacked_mutex", "celery", "celeryev",
                  "celeryev.x", "node1.celery.pidbox", "reply.celery.pidbox", "node1.dq2",
                  "amq.gen-1", "AMQ.direct"]


@pytest.mark.parametrize("host", RESERVED_HOSTS)
def test_a_reserved_name_is_never_a_host(host: str) -> None:
    assert host_problem(host) is not None and "reserved" in host_problem(host)
    with pytest.raises(SubmitError, match=rf"role 'source': host '{host}' .*reserved"):
        orch.submit("boot", hosts={"source": host}, params={"instance_id": "x"})


def test_the_apps_own_default_queue_is_reserved_too() -> None:
    assert "default queue" in host_problem("jobs", default_queue="jobs")
    assert host_problem("jobs") is None
    assert host_problem("unacked2") is None and host_problem("compute-amq.1") is None


def test_the_command_line_refuses_a_reserved_host_in_one_line(db_url: str) -> None:
    for args in (["worker", "unacked"], ["submit", "boot", "--host", "source=unacked"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if "unacked" in line]
        assert len(lines) == 1 and "reserved" in lines[0], result.output
        assert "Traceback" not in result.output


def _celery_worker(fleet: Fleet, name: str, queues: str):
    return fleet.spawn(name, "bad-q", [
        sys.executable, "-m", "celery", "-A", "orchestrator", "worker", "-n", f"{name}@%h",
        "-Q", queues, "-c", "1", "-l", "info", "--without-mingle", "--without-gossip",
    ], ready=False)


@pytest.mark.parametrize("queues, said", [
    ("compute1,compute1-alt,compute2",
     "error: a worker serves one host; -Q names queues of hosts compute1, compute2 "
     "(start one worker per host)"),
    ("unacked,unacked-alt",
     "error: -Q unacked,unacked-alt: host 'unacked' queue 'unacked' is reserved: "
     "kombu's Redis transport keeps unacknowledged messages there"),
])
def test_a_worker_refuses_queues_it_cannot_serve_in_one_line(
        fleet: Fleet, queues: str, said: str) -> None:
    worker = _celery_worker(fleet, "bad", queues)
    assert worker.wait(timeout=60) == 2
    log = worker.log()
    assert said in log, log
    assert "Traceback" not in log and "Unrecoverable" not in log, log


def _reply(command: str, node: str, **arguments) -> dict:
    replies = app.control.broadcast(command, arguments=arguments, destination=[node],
                                    reply=True, timeout=5)
    assert replies, f"no reply to {command} from {node}"
    return replies[0][node]


def test_add_consumer_of_another_host_is_refused_and_shutdown_drains(fleet: Fleet) -> None:
    worker = fleet.start("compute1", graceful_timeout=60)
    node = f"compute1@{socket.gethostname()}"
    refused = _reply("add_consumer", node, queue="compute2")
    assert refused == {"error": "compute1's worker serves only compute1 and compute1-alt: not "
                                "consuming 'compute2' (start a worker for its host)"}, refused
    # Its own queue is still Celery's to add (nothing changes: it consumes it already).
    assert "ok" in _reply("add_consumer", node, queue="compute1-alt")

    # Flower's "Shut Down" is Celery's shutdown command: here it drains, as SIGTERM does.
    said = _reply("shutdown", node)
    assert said["ok"].startswith("compute1 draining: shutdown drains as SIGTERM does"), said
    assert worker.wait(timeout=30) == 0, worker.log()
    log = worker.log()
    assert "drain: " in log and "remote shutdown" in log, log
    with orch.read() as s:
        from orchestrator.ledger.models import Drain

        drains = s.query(Drain).filter_by(host="compute1").all()
        assert [d.outcome for d in drains] == ["done"], [d.outcome for d in drains]


def test_a_step_for_another_host_is_given_back_unrun(fleet: Fleet) -> None:
    """A boot for compute2 that lands in compute1's queue anyway (moved there by hand: its
    message still says compute2) is published back to compute2 unrun, and runs there."""
    if not app.conf.broker_url.startswith("redis"):
        pytest.skip("moves a message between two Redis lists")
    import redis

    compute2 = fleet.start("compute2", concurrency=1)
    boot_active("vm0", "compute2")  # compute2 is known to the registry
    compute2.signal(signal.SIGTERM)
    assert compute2.wait(timeout=30) == 0
    op = operations.boot("vm1", "compute2")
    wait_for(lambda: queue_depth(app, "compute2") == 1, 10, "the boot queued for compute2")
    client = redis.Redis.from_url(app.conf.broker_url)
    assert client.lmove("compute2", "compute1", "RIGHT", "LEFT") is not None
    assert json.loads(client.lindex("compute1", 0))["properties"]["delivery_info"][
        "routing_key"] == "compute2"

    compute1 = fleet.start("compute1", concurrency=1)
    wait_for(lambda: "another host's" in compute1.log(), 15, "compute1 to give the boot back")
    wait_for(lambda: queue_depth(app, "compute2") == 1, 10, "the boot back in compute2")
    line = next(x for x in compute1.log().splitlines() if "another host's" in x)
    assert "is for queue 'compute2', another host's: given back to compute2 unrun" in line
    assert queue_depth(app, "compute1") == 0
    assert wait_op(op.id, lambda d: True)["status"] in ("queued", "running")
    assert " succeeded in " not in compute1.log()

    fleet.start("compute2", concurrency=1)
    assert wait_op(op.id, ended)["status"] == "completed"


def test_attempts_are_counted_by_the_ledger_not_by_the_message(fleet: Fleet) -> None:
    """A step that had its three retries already (the ledger says so) fails its operation at
    the next error, whatever the message's own ``retries`` header says (0 here, as a copy of
    the first message would): the count cannot be reset by whoever can publish."""
    import time

    from orchestrator.ledger.store import Attempt

    env = {"ORCHESTRATOR_CRASH_STEPS": "get_console_output@compute1",
           "ORCHESTRATOR_CRASH_DELIVERIES": "99"}
    first = fleet.start("compute1", concurrency=1, env=env)
    boot_active("vm1", "compute1")
    first.signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    op = operations.console("vm1")
    for _ in range(orch.max_retries):
        orch.ledger.record_attempt(op.id, 0, Attempt("earlier@compute1", time.time()),
                                   "get_console_output", "compute1", "an earlier crash")
    worker = fleet.start("compute1", concurrency=1, env=env)
    data = wait_op(op.id, ended)
    assert data["status"] == "failed", data
    assert f"gave up after {orch.max_retries} retries" in data["error"], data
    assert "; retry " not in worker.log(), worker.log()
