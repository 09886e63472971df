"""What the drain relies on from the broker, checked on whichever broker the suite runs on
(``ORCHESTRATOR_TEST_BROKER_URL``: Redis or RabbitMQ); RabbitMQ-only checks say so."""

from __future__ import annotations

import time
from urllib.parse import urlparse

import pytest
from kombu import Queue
from kombu.exceptions import ChannelError

from nova_app import operations
from nova_app.app import app, orch
from orchestrator.broker import delete_queues, queue_depth
from orchestrator.local.fleet import Fleet
from tests.helpers import ended, wait_op
from tests.raw import STEP


def _rabbitmq() -> bool:
    return urlparse(app.conf.broker_url).scheme in ("amqp", "amqps", "pyamqp")


def _queue_exists(name: str) -> bool:
    with app.connection_for_write() as conn:
        try:
            conn.default_channel.queue_declare(queue=name, passive=True)
        except ChannelError:
            return False
        return True


def _send(queue: str, host: str) -> None:
    """Publish a step the way the API does (send_task, explicit queue)."""
    app.send_task(STEP, kwargs={"operation_id": "x", "position": 0, "host": host}, queue=queue)


def test_step_to_a_queue_nobody_declared_waits_for_its_host(fleet: Fleet) -> None:
    # compute3 is known (registered) but its worker never ran here: no queue exists. This
    # process even declared compute3 before and the queue was deleted since, so its
    # connection's "already declared" cache is stale (delete_queues forgets it).
    orch.registry.register("compute3@elsewhere", "compute3", consumes_main=True, consumes_alt=True,
                      pid=0)
    _send("compute3", "compute3")
    delete_queues(app, ["compute3", "compute3-alt"])
    if _rabbitmq():
        assert not _queue_exists("compute3")

    op = operations.boot("vm1", "compute3")
    assert queue_depth(app, "compute3") == 1, "the publish declared the queue: not dropped"

    fleet.start("compute3")
    assert wait_op(op.id, ended)["status"] == "completed"
    assert queue_depth(app, "compute3") == 0


def test_queue_depth_and_delete_queues(broker: str) -> None:
    # A missing queue is 0, and asking does not break the next question (on RabbitMQ the
    # passive declare of a missing queue closes the channel).
    assert queue_depth(app, "compute4") == 0
    assert queue_depth(app, "compute4") == 0
    _send("compute4", "compute4")
    _send("compute4", "compute4")
    assert queue_depth(app, "compute4") == 2
    delete_queues(app, ["compute4", "compute4-never-existed"])
    assert queue_depth(app, "compute4") == 0
    _send("compute4", "compute4")
    assert queue_depth(app, "compute4") == 1, "declared again after the delete"
    delete_queues(app, ["compute4"])


def test_queues_are_durable_and_messages_persistent(broker: str) -> None:
    _send("compute4", "compute4")
    other_type = "quorum" if orch.settings.queue_type == "classic" else "classic"
    with app.connection_for_write() as conn:
        if _rabbitmq():  # Redis has no durable flag or queue type to check
            with pytest.raises(ChannelError, match="durable"):
                Queue("compute4", durable=False, channel=conn.channel()).declare()
            with pytest.raises(ChannelError, match="x-queue-type"):
                Queue("compute4", queue_arguments={"x-queue-type": other_type},
                      channel=conn.channel()).declare()
        message = Queue("compute4", channel=conn.channel(), no_declare=True).get()
        assert message is not None
        assert message.properties["delivery_mode"] == 2, "persistent"
        assert message.content_type == "application/json"
        message.requeue()
    assert queue_depth(app, "compute4") == 1, "still there"
    delete_queues(app, ["compute4"])


def test_redis_restore_mutex_of_a_killed_worker_expires_soon(fleet: Fleet) -> None:
    """kombu's Redis sweep that gives back the messages of killed workers runs under a mutex
    that expires after 300 s by default: a worker SIGKILLed inside a sweep blocked every
    restore for five minutes (the soak saw operations stuck so). A real worker must take it
    for UNACKED_MUTEX_EXPIRE_SECONDS only: watched on the wire with MONITOR."""
    if _rabbitmq():
        pytest.skip("Redis transport only")
    import redis

    from orchestrator.policy import UNACKED_MUTEX_EXPIRE_SECONDS

    client = redis.Redis.from_url(app.conf.broker_url)
    db = client.connection_pool.connection_kwargs.get("db", 0)
    with client.monitor() as monitor:
        fleet.start("compute1", env={"ORCHESTRATOR_VISIBILITY_TIMEOUT": "2"})
        deadline = time.monotonic() + 15
        for command in monitor.listen():
            words = command["command"].split()
            if words[:2] == ["SET", "unacked_mutex"] and int(command["db"]) == db:
                break
            assert time.monotonic() < deadline, "no restore sweep seen in 15 s"
    expire = {k: v for k, v in zip(words, words[1:], strict=False) if k in ("EX", "PX")}
    seconds = int(expire["EX"]) if "EX" in expire else int(expire["PX"]) / 1000
    assert seconds == UNACKED_MUTEX_EXPIRE_SECONDS, words
