"""kombu internals this package relies on (verified against kombu 5.7).

- ``Connection.declared_entities`` of the connections in Celery's pool (``pool._resource``,
  ``pool._dirty``): what a connection believes is declared (:func:`forget_declarations`).
- The Redis transport: ``QoS.restore_unacked`` and ``Channel._connparams`` (patched,
  :func:`guard_redis`), a channel's ``client`` and ``pool`` (redis-py), the ``BRPOP`` in
  flight (``_in_poll``, its ``_sock``), a channel's ``connection`` (its transport) set to None
  once the channel is closed, and the transport's ``client`` once its connection is.
- ``Producer.publish`` with ``retry``: ``_publish`` runs under ``Connection.ensure``, and the
  declare of the message's queue under an ``ensure`` of its own (``kombu.common``,
  ``_imaybe_declare``), see :func:`guard_redis_closed_channel`.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

#: What kombu's Redis channel raises once its connection is gone (its client is cleared).
DEAD_CHANNEL_ERRORS = (AttributeError,)


def forget_declarations(app: Any) -> None:
    """Make this process declare queues again before its next publish to them.

    kombu declares a queue with the first publish on a connection, then remembers it
    (``Connection.declared_entities``) and never declares it again on that connection. Once the
    queue is deleted, a publish from such a connection goes to the default exchange with no
    queue behind it, and RabbitMQ drops the message without an error (Redis does not: a list
    is created by the push). A pool slot not yet connected (a lazy callable) has nothing to
    forget.
    """
    pool = app.pool
    for conn in [*list(pool._resource.queue), *list(pool._dirty)]:
        declared = getattr(conn, "declared_entities", None)
        if declared is not None:
            declared.clear()


def redis_client(conn: Any) -> Any:
    """The redis-py client of a kombu Redis connection's default channel."""
    return conn.default_channel.client


def redis_queue_sizes(conn: Any, queues: list[str]) -> dict[str, int]:
    """Messages waiting in each queue of a kombu Redis connection, in one pipeline: what
    ``Channel._size`` counts for one queue (a list per priority step, kombu 5.x), for all.
    A page of a fleet's hosts is 100 queues: one round trip instead of 100 channels."""
    channel = conn.default_channel
    keys = [(queue, channel._q_for_pri(queue, pri))
            for queue in queues for pri in channel.priority_steps]
    with channel.conn_or_acquire() as client, client.pipeline() as pipe:
        for _, key in keys:
            pipe.llen(key)
        sizes = pipe.execute()
    out = dict.fromkeys(queues, 0)
    for (queue, _), size in zip(keys, sizes, strict=True):
        if isinstance(size, int):
            out[queue] += size
    return out


def guard_redis() -> None:
    """Both Redis guards (:func:`guard_redis_restore`, :func:`guard_redis_closed_channel`):
    patched once per process, when an Orchestrator is made."""
    guard_redis_restore()
    guard_redis_closed_channel()


def guard_redis_restore() -> None:
    """Work around a kombu 5.7 Redis crash when the broker restarts under a busy worker.

    On connection loss Celery closes the channel, and closing a Redis channel restores the
    worker's unacknowledged messages, through a client built from the (already released)
    kombu connection: ``AttributeError: 'NoneType' object has no attribute 'hostname'``.
    Celery does not expect an AttributeError there and stops the worker ("Unrecoverable
    error"). Raising a connection error instead lets Celery reconnect as it should; the
    messages stay in Redis's unacked index, and the visibility-timeout sweep restores them.
    Same family as kombu issues #582 and #970. Patched once per process, when asked.
    """
    from kombu.transport import redis as redis_transport
    from redis.exceptions import ConnectionError as RedisConnectionError

    qos = redis_transport.QoS
    if redis_restore_guarded():
        return
    original = qos.restore_unacked

    def restore_unacked(self, client=None):  # type: ignore[no-untyped-def]
        if client is None and self.channel.connection.client is None:
            raise RedisConnectionError(
                "broker connection already released; unacknowledged messages will be "
                "restored after the visibility timeout"
            )
        return original(self, client)

    restore_unacked._orchestrator_guard = True  # type: ignore[attr-defined]
    qos.restore_unacked = restore_unacked


def redis_restore_guarded() -> bool:
    from kombu.transport import redis as redis_transport

    return bool(getattr(redis_transport.QoS.restore_unacked, "_orchestrator_guard", False))


def guard_redis_closed_channel() -> None:
    """Make a Redis channel closed with its connection fail with a connection error, not an
    AttributeError, when it is used again (kombu 5.7).

    A publish (``Producer.publish`` with ``retry``, what Celery's ``send_task`` does) runs
    ``_publish`` under ``Connection.ensure``: it takes the producer's channel, then declares
    the message's queue, once per connection, under an ``ensure`` of its own
    (``kombu.common._imaybe_declare``). When the broker is lost just then (a Sentinel
    fail-over, a restart: the declare is the first command a queue gets on a new connection),
    that inner ``ensure`` collects the connection, which closes the producer's channel (its
    ``connection`` set to None, its redis-py pool dropped), reconnects, and revives the
    queue alone. ``_publish`` goes on with the channel it took, closed, whose ``_put`` builds a
    client from ``self.connection.client``: ``AttributeError: 'NoneType' object has no
    attribute 'client'``. The outer ``ensure`` retries connection errors only, so the publish
    failed at once, whatever the retry policy (a submit was abandoned with that message).
    Raised as redis-py's ConnectionError instead, the outer ``ensure`` does what it does for
    any connection lost: reconnect, revive the producer on the new channel, publish again,
    within the policy's retries. ``Channel._connparams`` is where every use of a closed
    channel that needs a client ends (its pool was dropped with it), and it is reached only
    for a new pool, so an open channel pays nothing. Patched once per process, when asked.
    """
    from kombu.transport import redis as redis_transport
    from redis.exceptions import ConnectionError as RedisConnectionError

    channel = redis_transport.Channel
    if redis_closed_channel_guarded():
        return
    original = channel._connparams

    def _connparams(self, asynchronous=False):  # type: ignore[no-untyped-def]
        if self.connection is None:
            raise RedisConnectionError(
                "broker channel closed with its connection (a reconnect replaced it); "
                "the publish is retried on the new one"
            )
        return original(self, asynchronous=asynchronous)

    _connparams._orchestrator_guard = True  # type: ignore[attr-defined]
    channel._connparams = _connparams


def redis_closed_channel_guarded() -> bool:
    from kombu.transport import redis as redis_transport

    return bool(getattr(redis_transport.Channel._connparams, "_orchestrator_guard", False))


def channel_gone(channel: Any) -> bool:
    """True if ``channel`` died with its connection (kombu virtual or py-amqp channel)."""
    if channel is None or getattr(channel, "closed", False):
        return True
    if getattr(channel, "is_open", True) is False:
        return True
    connection = getattr(channel, "connection", None)
    # A virtual transport's channel keeps its transport, whose client is cleared on close.
    return connection is None or getattr(connection, "client", True) is None


def unblock_consumer(consumer: Any) -> bool:
    """End a Redis consumer's blocking poll at once; True if one was in flight.

    kombu's Redis transport waits for messages with ``BRPOP`` (one second at a time); closing
    the channel reads the reply of the one in flight, because that reply may carry a message
    already popped from its list. A worker whose drain is over would spend up to a second
    waiting for that poll to time out. ``CLIENT UNBLOCK`` (Redis >= 5) ends the poll as a
    timeout would: the server pops nothing and replies nil at once, so the close that follows
    loses nothing and waits for nothing. Any other transport, or any failure, leaves the poll
    to end by itself.
    """
    channel = getattr(getattr(consumer, "task_consumer", None), "channel", None)
    polling = getattr(channel, "_in_poll", None)
    sock = getattr(polling, "_sock", None)
    if sock is None:  # not Redis, or no poll in flight
        return False
    try:
        import redis

        address = "{}:{}".format(*sock.getsockname()[:2])
        client = redis.Redis(connection_pool=channel.pool)
        try:
            for entry in client.client_list():
                if entry.get("addr") == address:
                    return bool(client.client_unblock(entry["id"]))
        finally:
            client.close()
    except Exception as exc:  # the poll ends by itself within a second
        logger.debug("could not unblock the consumer's BRPOP: %r", exc)
    return False
