"""The broker fails over: Redis Sentinel, the primary lost during a drain, and under a
publish.

A private Sentinel set (tests/sentinel.py): a primary, a replica, three sentinels. Redis
replicates asynchronously, so a fail-over loses what the primary had not yet passed on: the
test makes that happen for real (the replica is stopped, SIGSTOP, while the source finishes
its step and publishes the next; then the primary is killed and the replica resumes and is
promoted), and the ledger's resend sends the lost step again.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from examples.volume_move.app import orch
from orchestrator import Orchestrator
from orchestrator.local.fleet import Fleet, wait_for
from orchestrator.policy import publish_retry_policy
from tests import sentinel
from tests.volumes import (
    each_effect_once,
    effects_applied,
    move_with_destination_draining,
    submit_move,
    volume_fleet,
)

pytestmark = [
    pytest.mark.shutdown,
    pytest.mark.skipif(sentinel.available() is not None, reason=str(sentinel.available())),
]


@pytest.fixture
def sentinels() -> Iterator[sentinel.SentinelSet]:
    servers = sentinel.SentinelSet()
    try:
        yield servers.start()
    finally:
        servers.destroy()


@pytest.fixture
def fleet(sentinels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    with volume_fleet(
        tmp_path, monkeypatch, sentinels.url, f"sqlite:///{tmp_path / 'ledger.db'}",
        ORCHESTRATOR_SENTINEL_MASTER=sentinel.MASTER,
        # A step queued this long with an empty queue is sent again (what a fail-over lost).
        ORCHESTRATOR_RESEND_AFTER="5", VOLUMES_STEP_SECONDS="copy_out=4",
    ) as workers:
        yield workers


def test_primary_lost_during_a_drain_the_ledger_resends_what_replication_lost(
        sentinels, fleet: Fleet) -> None:
    source, dest, op = move_with_destination_draining(fleet)

    # The replica lags (stopped, its link to the primary cut): a move submitted now has its
    # first step, for the draining node2's main queue, on the primary only. Then the primary
    # dies and the replica, which never received that step, is promoted.
    sentinels.signal("replica", signal.SIGSTOP)
    sentinels.client("primary").client_kill_filter(_type="replica")  # its link is cut
    late = submit_move("vol2")
    assert sentinels.client("primary").llen("node2") == 1
    sentinels.kill("primary")
    sentinels.signal("replica", signal.SIGCONT)
    wait_for(lambda: sentinels.primary_port() == sentinels.ports["replica"], 60,
             "the sentinels to promote the replica")
    assert sentinels.client("replica").llen("node2") == 0  # lost with the primary

    # The workers follow the new primary: the first move completes, node2 drains and exits.
    assert orch.wait(op, timeout=90)["status"] == "completed"
    assert dest.wait(timeout=90) == 0, dest.log()[-3000:]
    assert source.proc.poll() is None, source.log()[-3000:]

    # The ledger knows the late move's first step was sent; node2's resend (the draining
    # one's, or the restarted one's) finds its queue empty and sends it again.
    restarted = fleet.start("node2")
    assert orch.wait(late, timeout=60)["status"] == "completed"
    assert f"resent reserve of {late} to node2: no message for it in the broker" \
        in "".join(w.log() for w in fleet.workers), restarted.log()[-3000:]
    assert effects_applied([op, late]) == each_effect_once([op, late])


def test_a_submit_rides_out_a_failover_that_closes_its_producers_channel(
        sentinels, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """kombu declares a message's queue once per connection, under a retry of its own. The
    first publish to node3 after the primary is killed meets the fail-over in that declare,
    whose retry reconnects and closes the channel the publish holds: kombu 5.7 then failed
    with "'NoneType' object has no attribute 'client'" (no retry), and the submit was
    abandoned. It waits for the promoted replica instead (kombu_internals.guard_redis)."""
    monkeypatch.setenv("ORCHESTRATOR_SENTINEL_MASTER", sentinel.MASTER)
    (tmp_path / "routing.yaml").write_text("steps:\n  prepare:\n    queue: main\n"
                                           "    reason: new work\n")
    app = Celery("failover-submit", broker=sentinels.url)
    publisher = Orchestrator(app, routing=tmp_path / "routing.yaml")
    publisher.step(lambda ctx: None, name="prepare")
    publisher.flow("prepare", [("prepare", "host")])
    # Room for a slow election (the production policy rides out about 6.5 s).
    app.conf.task_publish_retry_policy = {**publish_retry_policy(sentinels.url),
                                          "max_retries": 30 * len(sentinels.sentinel_ports)}
    first = publisher.submit("prepare", hosts={"host": "node4"})  # node4 declared, not node3
    sentinels.kill("primary")
    second = publisher.submit("prepare", hosts={"host": "node3"})
    assert [publisher.operation(op)["status"] for op in (first, second)] == ["queued"] * 2
    # Where the submit went is where the clients go now: the promoted replica.
    wait_for(lambda: sentinels.primary_port() == sentinels.ports["replica"], 30,
             "the sentinels to name the promoted replica")
    assert sentinels.client("replica").llen("node3") == 1
