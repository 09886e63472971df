"""Telling waiters that an operation ended, through the broker, so that waiting costs nothing.

A worker that records an operation's end (its last step completed, or it failed) publishes a
notice, ``{"operation": id, "status": ...}``, to the fanout exchange :data:`EXCHANGE_NAME`
(transient, unconfirmed waits aside: a lost notice only makes a waiter look a second later).
A process that waits (``orch.wait``, ``orchestrator wait``) keeps one subscription for all its
waiters, a queue of its own bound to that exchange (exclusive and auto-deleted on RabbitMQ; a
Redis PUB/SUB channel through kombu's fanout), read by one thread (:class:`EndedNotices`):
a waiter sleeps until a notice for its operation comes, then confirms with one read of the
operation's status. The ledger stays the only truth: without the broker's notices a waiter
looks at the status every :data:`LOOK_AGAIN_SECONDS`, and with them every
:data:`LOOK_AGAIN_SUBSCRIBED_SECONDS` (a notice lost on its way).

Before this, a waiter polled the ledger on a schedule: a hundred waiters cost the workers'
CPU and the ledger a hundred reads every few milliseconds, and one waiter learnt of an end up
to half its polling interval late.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from kombu import Consumer, Exchange, Queue

from orchestrator.redact import error_text

logger = logging.getLogger(__name__)

EXCHANGE_NAME = "orchestrator.ended"
#: A waiter that was told nothing looks at the ledger again after this long: without the
#: broker's notices, and with them (a notice lost on its way, a broker restarted).
LOOK_AGAIN_SECONDS = 1.0
LOOK_AGAIN_SUBSCRIBED_SECONDS = 10.0
#: Ended operations remembered, for a waiter that starts just after its notice came.
REMEMBERED = 10_000


#: Where the notices go (built once: every announce and every subscription names it).
EXCHANGE = Exchange(EXCHANGE_NAME, type="fanout", durable=False, delivery_mode=1)


def announce(app: Any, operation_id: str, status: str) -> None:
    """Publish that ``operation_id`` ended: after the ledger recorded it. Never raises: a
    notice that cannot be sent costs a waiter a second, never a step."""
    try:
        with app.producer_or_acquire() as producer:
            producer.publish({"operation": operation_id, "status": status},
                             exchange=EXCHANGE, routing_key="", declare=[EXCHANGE],
                             serializer="json", delivery_mode=1, retry=False)
    except Exception as exc:  # the broker away: waiters look again on their own
        logger.debug("end of %s not announced: %s", operation_id, error_text(exc))


class EndedNotices:
    """One process's subscription to the ends announced in the fleet (started at its first
    wait; its thread is a daemon). :meth:`wait_for` returns once a notice for the operation
    came, or after ``timeout``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.pid = os.getpid()
        self.ended: OrderedDict[str, str] = OrderedDict()
        #: The waiters of each operation: one event they share, and how many they are (a
        #: notice wakes its operation's waiters only, not every waiter of the process).
        self.waiting: dict[str, list[Any]] = {}
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.thread: threading.Thread | None = None
        self.last_error = ""
        #: The broker subscribed to; a thread whose generation is past ends.
        self.url: str | None = None
        self.generation = 0

    def start(self, timeout: float = 2.0) -> None:
        """Subscribe (once per process and broker: an app pointed at another broker, as
        tests do, subscribes there), and wait until the subscription is in place: a notice
        sent after this returns is seen."""
        url = str(self.app.conf.broker_url)
        if (self.thread is not None and self.pid == os.getpid() and self.thread.is_alive()
                and url == self.url):
            return
        self.generation += 1
        self.pid, self.url, self.ready = os.getpid(), url, threading.Event()
        self.last_error = ""
        self.thread = threading.Thread(target=self._listen, args=(self.generation,),
                                       name="orchestrator-ended", daemon=True)
        self.thread.start()
        self.ready.wait(timeout)

    @property
    def look_again(self) -> float:
        """How long a waiter may sleep without a notice before it looks at the ledger."""
        subscribed = self.ready.is_set() and not self.last_error
        return LOOK_AGAIN_SUBSCRIBED_SECONDS if subscribed else LOOK_AGAIN_SECONDS

    def wait_for(self, operation_id: str, timeout: float) -> bool:
        """True once a notice for ``operation_id`` came (now or before), False at ``timeout``."""
        with self.lock:
            if operation_id in self.ended:
                return True
            entry = self.waiting.setdefault(operation_id, [threading.Event(), 0])
            entry[1] += 1
        try:
            return entry[0].wait(timeout)
        finally:
            with self.lock:
                entry[1] -= 1
                if entry[1] == 0 and self.waiting.get(operation_id) is entry:
                    del self.waiting[operation_id]

    def _heard(self, body: Any, message: Any) -> None:
        operation_id = body.get("operation") if isinstance(body, dict) else None
        if isinstance(operation_id, str):
            with self.lock:
                self.ended[operation_id] = str(body.get("status"))
                while len(self.ended) > REMEMBERED:
                    self.ended.popitem(last=False)
                entry = self.waiting.get(operation_id)
            if entry is not None:
                entry[0].set()

    def _listen(self, generation: int) -> None:
        queue = Queue(f"orchestrator.ended.{uuid.uuid4().hex}", EXCHANGE, routing_key="",
                      exclusive=True, auto_delete=True, durable=False)
        while generation == self.generation:
            try:
                with self.app.connection_for_read() as conn:
                    conn.ensure_connection(max_retries=1)
                    with Consumer(conn, [queue], callbacks=[self._heard], accept=["json"],
                                  no_ack=True):
                        first = True
                        while generation == self.generation:
                            # (on Redis the first one subscribes)
                            with contextlib.suppress(TimeoutError):
                                conn.drain_events(timeout=0.05 if first else 1.0)
                            if first:
                                first, self.last_error = False, ""
                                self.ready.set()
            except Exception as exc:  # the broker away: waiters look at the ledger meanwhile
                if generation != self.generation:
                    return
                self.ready.set()
                text = error_text(exc)
                if text != self.last_error:  # said once per cause, not at every retry
                    self.last_error = text
                    logger.warning("waiting without the broker's notices of ended operations "
                                   "(looking at the ledger every %.0f s): %s",
                                   LOOK_AGAIN_SECONDS, text)
                time.sleep(LOOK_AGAIN_SECONDS)
