"""Which names can be a host: two queue names on a broker shared with Celery's own machinery.

A host ``h`` is two queues, ``h`` and ``h-alt``, declared on the same broker (and, on Redis,
in the same database) as what kombu and Celery keep there for themselves. A host that takes
one of those names does not fail alone: it breaks every worker of the fleet.

- kombu's Redis transport keeps a queue as a list under the queue's name, in the keyspace
  where it keeps its own bookkeeping: the hash ``unacked`` (messages delivered and not yet
  acknowledged), the sorted set ``unacked_index`` and the lock ``unacked_mutex``, and the
  sets ``_kombu.binding.<exchange>``. A step published to queue ``unacked`` is an LPUSH on a
  hash; the next worker that fetches a message runs HSET on what is now a list, gets WRONGTYPE
  in its event loop and dies ("Unrecoverable error"), and so does every worker after it, until
  someone deletes the key (kombu 5.7, ``kombu/transport/redis.py``: ``unacked_key``,
  ``unacked_index_key``, ``unacked_mutex_key``, ``keyprefix_queue``).
- Celery's default queue (``task_default_queue``, ``celery`` unless the app says otherwise)
  carries what is not a step; a host named so would mix both.
- Remote control and events (Celery 5.7): the ``celery.pidbox`` and ``reply.celery.pidbox``
  exchanges with a queue per worker ``<node>.celery.pidbox`` and per reply
  ``<id>.reply.celery.pidbox``; the ``celeryev`` exchange with queues ``celeryev.<id>``;
  ``worker_direct`` queues ``<node>.dq2``. A queue of those names steals control replies
  or events, or receives them.
- RabbitMQ reserves every name beginning with ``amq.``: declaring one closes the channel
  (ACCESS_REFUSED), which a worker takes for a connection error and retries for ever.

The rules are data (:data:`RESERVED`), checked for both of a host's queues wherever a host
comes in: a submit, the command line, and a worker's start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.errors import SubmitError

__all__ = ["ALT_SUFFIX", "HOST_NAME", "Reserved", "RESERVED", "check_host_name",
           "host_problem", "reserved_reason"]

#: The suffix of a host's second queue: ``<host>-alt``.
ALT_SUFFIX = "-alt"
#: A host is a queue name on Redis and RabbitMQ, and ``<host>-alt`` is its second queue.
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,199}")
#: Celery's default queue when an app does not name another (``task_default_queue``).
CELERY_DEFAULT_QUEUE = "celery"


@dataclass(frozen=True)
class Reserved:
    """A queue name, or a family of them, that belongs to the broker or to Celery."""

    match: str  # "exact", "prefix" or "suffix"
    name: str
    owner: str
    #: RabbitMQ compares ``amq.`` without regard to case in practice (a client may not know
    #: which case a server refuses): such rules are matched case-insensitively.
    any_case: bool = False

    def matches(self, queue: str) -> bool:
        value, name = (queue.lower(), self.name.lower()) if self.any_case else (queue, self.name)
        if self.match == "exact":
            return value == name
        if self.match == "prefix":
            return value.startswith(name)
        return value.endswith(name)


RESERVED: tuple[Reserved, ...] = (
    Reserved("exact", "unacked", "kombu's Redis transport keeps unacknowledged messages there"),
    Reserved("exact", "unacked_index", "kombu's Redis transport indexes unacknowledged "
             "messages there"),
    Reserved("exact", "unacked_mutex", "kombu's Redis transport locks its restore there"),
    Reserved("prefix", "_kombu.", "kombu's Redis transport keeps its bindings there"),
    Reserved("exact", CELERY_DEFAULT_QUEUE, "Celery's default queue"),
    Reserved("prefix", "celeryev", "Celery's events"),
    Reserved("suffix", "celery.pidbox", "Celery's remote control"),
    Reserved("suffix", ".dq2", "Celery's worker-direct queues"),
    Reserved("prefix", "amq.", "RabbitMQ reserves names beginning with 'amq.'", any_case=True),
)


def reserved_reason(queue: str, default_queue: str | None = None) -> str | None:
    """Whose name ``queue`` is, if it is the broker's or Celery's (None: it is free).
    ``default_queue``: the app's own ``task_default_queue`` when it is not ``celery``."""
    if default_queue and queue == default_queue:
        return "the app's default queue (task_default_queue)"
    for rule in RESERVED:
        if rule.matches(queue):
            return rule.owner
    return None


def host_problem(host: object, default_queue: str | None = None) -> str | None:
    """What makes ``host`` unusable as a host (None: nothing)."""
    if not isinstance(host, str) or not HOST_NAME.fullmatch(host):
        return ("cannot be a queue name (letters, digits and . _ : @ + -, starting with a "
                "letter or digit, at most 200)")
    if host.endswith(ALT_SUFFIX):
        return f"ends with {ALT_SUFFIX!r}, the alt queue suffix"
    for queue in (host, host + ALT_SUFFIX):
        owner = reserved_reason(queue, default_queue)
        if owner is not None:
            return f"queue {queue!r} is reserved: {owner}"
    return None


def check_host_name(host: object, what: str, default_queue: str | None = None) -> None:
    """Raise :class:`SubmitError` (one line: ``what``, the host, why) unless ``host`` can be a
    host: two usable queue names on both brokers, neither the broker's nor Celery's own."""
    problem = host_problem(host, default_queue)
    if problem is not None:
        raise SubmitError(f"{what}: host {host!r} {problem}")
