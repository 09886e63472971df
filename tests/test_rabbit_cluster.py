"""The broker fails over: a private three-node RabbitMQ cluster with quorum host queues.

The cluster (tests/rabbitcluster.py) is started once for this module, on ports of its own; a
policy sets ``delivery-limit`` 20 on the quorum queues (RabbitMQ 4.x's default; 3.10 has no
default). One test shows that a requeue counts against that limit and a hand-back by
republish does not; one stops the node the workers are connected to during a drain.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue

from examples.volume_move.app import orch
from orchestrator.broker import republish
from orchestrator.local.fleet import Fleet
from tests import rabbitcluster
from tests.volumes import (
    each_effect_once,
    effects_applied,
    move_with_destination_draining,
    runs,
    submit_move,
    volume_fleet,
)

pytestmark = [
    pytest.mark.shutdown,
    pytest.mark.skipif(rabbitcluster.available() is not None,
                       reason=str(rabbitcluster.available())),
]
DELIVERY_LIMIT = 20


@pytest.fixture(scope="module")
def cluster() -> Iterator[rabbitcluster.RabbitCluster]:
    nodes = rabbitcluster.RabbitCluster()
    try:
        nodes.start()
        nodes.set_policy("limit", ".*", f'{{"delivery-limit": {DELIVERY_LIMIT}}}',
                         "queues")  # RabbitMQ 3.10: no quorum_queues yet
        yield nodes
    finally:
        nodes.destroy()


def quorum(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True,
                 queue_arguments={"x-queue-type": "quorum"})


def get(conn: Connection, queue: Queue, timeout: float = 10):
    """The next delivery from ``queue`` (unacknowledged), or None once it stays empty."""
    bound = queue.bind(conn.default_channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = bound.get(no_ack=False)
        if message is not None:
            return message
        time.sleep(0.05)
    return None


def test_a_requeue_counts_against_the_delivery_limit_a_republish_does_not(cluster) -> None:
    app = Celery("limit", broker=cluster.nodes[0].url)
    app.conf.broker_transport_options = {"confirm_publish": True}
    requeued, republished = quorum("limit-requeue"), quorum("limit-republish")
    with Connection(cluster.nodes[0].url, transport_options={"confirm_publish": True}) as conn:
        for queue in (requeued, republished):
            queue.bind(conn.default_channel).declare()
            with conn.Producer() as producer:
                producer.publish({"step": queue.name}, exchange=queue.exchange,
                                 routing_key=queue.name, declare=[queue], serializer="json")
        requeues, gone = 0, False
        for _ in range(DELIVERY_LIMIT + 5):  # 25 hand-backs in a row
            message = get(conn, republished)
            assert message is not None, "the republished message was lost"
            republish(app, message)
            message.ack()
            if not gone:  # once dropped it stays gone (checked below): no 2 s wait per round
                message = get(conn, requeued, timeout=2)
                gone = message is None
                if not gone:
                    message.requeue()
                    requeues += 1
        assert gone and requeues <= DELIVERY_LIMIT + 1, requeues
        # The requeued one is gone past the limit (no dead-letter exchange here); the
        # republished one is still there, as it was sent.
        assert get(conn, requeued, timeout=2) is None
        last = get(conn, republished)
        assert last is not None and last.payload == {"step": "limit-republish"}
        assert not (last.headers or {}).get("x-delivery-count")
        last.ack()


@pytest.fixture
def cluster_fleet(cluster, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    # Submits go through the command line (tests.volumes.submit_move): a process whose Celery
    # app declares quorum queues, as the workers' does (this one's declares classic ones).
    with volume_fleet(
        tmp_path, monkeypatch, cluster.url, f"sqlite:///{tmp_path / 'ledger.db'}",
        ORCHESTRATOR_QUEUE_TYPE="quorum", VOLUMES_STEP_SECONDS="copy_out=5",
        # A step whose message a fail-over held back is sent again after this.
        ORCHESTRATOR_RESEND_AFTER="10",
    ) as fleet:
        yield fleet


def test_a_node_stopped_during_a_drain_loses_nothing(cluster, cluster_fleet: Fleet,
                                                     tmp_path: Path) -> None:
    source, dest, op = move_with_destination_draining(cluster_fleet)
    late = submit_move("vol2")  # its first step waits in node2 for the restart

    cluster.stop_node(0)  # the node every worker is connected to, first in the URL
    assert orch.wait(op, timeout=90)["status"] == "completed"
    assert dest.wait(timeout=90) == 0, dest.log()[-3000:]
    assert orch.operation(late)["status"] == "queued"
    cluster_fleet.start("node2")
    assert orch.wait(late, timeout=60)["status"] == "completed"
    assert source.proc.poll() is None, source.log()[-3000:]

    # Every step's effect applied exactly once (the ledger's step records), its work at
    # least once: a step running on a connection that closed is delivered again at once
    # (RabbitMQ requeues it), and a step whose message the fail-over held back is sent again
    # by the resend of its host.
    assert effects_applied([op, late]) == each_effect_once([op, late])
    done = runs(tmp_path)
    assert sorted(set(done)) == ["copy_in@node2", "copy_out@node1", "reserve@node2",
                                 "retire_source@node1"], done
    print(f"\nwork done per step over both moves: "
          f"{ {step: done.count(step) for step in sorted(set(done))} }")
    for queue in ("node1", "node1-alt", "node2", "node2-alt"):
        cluster.wait_queue(queue, 0)
