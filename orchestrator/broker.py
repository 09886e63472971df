"""Broker look-ups that work the same on Redis and RabbitMQ."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import suppress

from celery import Celery
from kombu.exceptions import ChannelError

from orchestrator.seams import kombu_internals


def queue_depths(app: Celery, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each queue (not counting unacknowledged ones); 0 for a queue that
    does not exist. One connection for all of them.

    On Redis, one pipeline of lengths. A passive declare answers on RabbitMQ, where a missing
    queue closes the channel, hence a channel per queue.
    """
    depths: dict[str, int] = {}
    with app.connection_for_write() as conn:
        if conn.transport.driver_type == "redis":
            return kombu_internals.redis_queue_sizes(conn, list(queues))
        for queue in queues:
            channel = conn.channel()
            try:
                _, count, _ = channel.queue_declare(queue=queue, passive=True)
                depths[queue] = int(count)
            except ChannelError:
                depths[queue] = 0
            finally:
                with suppress(Exception):  # already closed by the broker after an error
                    channel.close()
    return depths


def peek_task_names(app: Celery, queues: Iterable[str]) -> dict[str, list[str]] | None:
    """The task name of every message waiting in each queue, without taking any (Redis: the
    list's entries); None on a broker that cannot look without taking (AMQP: a get would
    redeliver the message, flagged and perhaps out of order)."""
    if not str(app.conf.broker_url or "").startswith(("redis", "rediss", "sentinel")):
        return None
    import json

    names: dict[str, list[str]] = {}
    with app.connection_for_read() as conn:
        client = kombu_internals.redis_client(conn)
        for queue in queues:
            found = []
            for raw in client.lrange(queue, 0, -1):
                try:
                    found.append(str(json.loads(raw)["headers"]["task"]))
                except (ValueError, KeyError, TypeError):
                    found.append("?")
            names[queue] = found
    return names


def queue_depth(app: Celery, queue: str) -> int:
    return queue_depths(app, [queue])[queue]


def delete_queues(app: Celery, queues: list[str]) -> None:
    """Delete queues (tests and the soak start from empty brokers); missing ones are fine.

    Only while nothing else publishes to them: another process's connections still believe
    the queues exist (see :func:`kombu_internals.forget_declarations`) and on RabbitMQ what
    they publish there is dropped until they reconnect.
    """
    with app.connection_for_write() as conn:
        # On Redis the list is the queue, and kombu deletes only the bindings its own
        # connection declared (none, on a fresh one): emptying the list is the delete.
        redis = conn.transport.driver_type == "redis"
        for queue in queues:
            try:
                if redis:
                    conn.default_channel.queue_purge(queue=queue)
                else:
                    conn.default_channel.queue_delete(queue=queue)
            except ChannelError:
                conn.close()
                conn.connect()
    kombu_internals.forget_declarations(app)


#: How a draining worker gives back a message it fetched and did not start, by transport and
#: queue type. ``requeue`` (``basic.reject`` with requeue; on Redis, back at the head of the
#: list) is one call, but a RabbitMQ quorum queue counts every such return against its
#: ``delivery-limit`` (20 by default on RabbitMQ 4.x) and drops or dead-letters the message
#: past it: a step handed back by 21 drains in a row would be lost. ``republish`` sends a
#: copy back to the queue it came from, with publisher confirms, and only then acknowledges
#: the delivery: not a return, so nothing is counted (a crash in between leaves two copies,
#: and the ledger drops the second).
HAND_BACK = {("amqp", "quorum"): "republish"}
#: Headers the broker sets on a delivery, not the sender: not copied into a republished copy.
_BROKER_HEADERS = ("x-delivery-count", "x-death", "x-first-death-exchange",
                   "x-first-death-queue", "x-first-death-reason")


def hand_back_mode(app: Celery, queue_type: str) -> str:
    with app.connection_for_write() as conn:
        driver = conn.transport.driver_type
    return HAND_BACK.get((driver, queue_type), "requeue")


def republish(app: Celery, message, to: str | None = None) -> None:  # type: ignore[no-untyped-def]
    """Publish ``message`` (a kombu Message as delivered) again where it came from (or to
    queue ``to``, declared first), as it is (body, serializer, headers, properties), and
    return once the broker confirmed it."""
    info = message.delivery_info or {}
    props = message.properties or {}
    headers = {k: v for k, v in (message.headers or {}).items() if k not in _BROKER_HEADERS}
    where = ({"exchange": info.get("exchange") or "", "routing_key": info.get("routing_key")}
             if to is None else
             {"exchange": "", "routing_key": to, "declare": [app.amqp.queues[to]]})
    with app.producer_or_acquire() as producer:
        producer.publish(
            message.body, **where, headers=headers,
            content_type=message.content_type, content_encoding=message.content_encoding,
            delivery_mode=props.get("delivery_mode", 2), priority=props.get("priority"),
            correlation_id=props.get("correlation_id"), reply_to=props.get("reply_to"),
            retry=False,
        )
