"""End a Redis consumer's blocking poll at once, so a worker that is done exits at once.

kombu's Redis transport waits for messages with ``BRPOP`` (one second at a time); closing the
channel reads the reply of the one in flight, because that reply may carry a message already
popped from its list. A worker whose drain is over therefore spends half a second on average,
up to a second, just waiting for that poll to time out. ``CLIENT UNBLOCK`` (Redis >= 5) ends
the poll as a timeout would: the server pops nothing and replies nil at once, so the close
that follows loses nothing and waits for nothing. Any other transport, or any failure, leaves
the poll to end by itself.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def unblock_consumer(consumer: Any) -> bool:
    """Unblock the ``BRPOP`` the worker's task consumer has in flight; True if one was."""
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
