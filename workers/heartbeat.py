"""The worker's heartbeat in the registry, written from a thread of its own.

A heartbeat says "this worker is alive and can write to the ledger". Written from the event
loop, it would also say "and its broker connection is fine": a worker cut off from its broker
blocks its event loop in a publish that never returns (Celery's own worker heartbeat event,
a queue depth), every timer with it, and its registry heartbeat would stop while the worker
still runs its steps and records them. Other hosts would take it for dead. From a thread, it
is silent only when the process is gone or the ledger cannot be reached, which is what the
registry's readers judge it by (``Registry.services``; ``orchestrator.witness.Witness`` asks over
the broker about a worker whose heartbeat is stale).

The prefork pool forks a new pool process from the main thread whenever one dies (a step
cancelled at a connection loss, a SIGKILL). A fork while this thread is inside a SQLite
transaction gives the child SQLite's in-memory record of a lock it does not hold, and every
transaction of that child then fails with "database is locked" (seen in the RabbitMQ
fail-over test). So a fork waits for the heartbeat's transaction to end, and a heartbeat for
a fork to be made (``os.register_at_fork``).
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from typing import Any

from celery.utils.log import get_logger

from orchestrator.errors import LedgerUnavailable
from orchestrator.redact import error_text

logger = get_logger(__name__)


class Heartbeat:
    def __init__(self, orch: Any, nodename: str, interval: float,
                 state: Callable[[], str], lost: Callable[[], None]) -> None:
        """``lost``: writes the worker's row again, when a beat finds none (deleted under
        it): without it the worker would run unseen, its steps taken for stranded."""
        self.orch, self.nodename, self.interval, self.state = orch, nodename, interval, state
        self.lost = lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-heartbeat",
                                        daemon=True)
        self._last_error = ""
        #: Held by a heartbeat's transaction, and by a fork of this process.
        self._no_fork = threading.Lock()
        #: The fleet's lease, when this worker's fleet looks ask for it: each beat reads when
        #: it runs out, in its own transaction (:meth:`watch`).
        self.lease: Any = None

    def watch(self, lease: Any) -> None:
        """Read when ``lease`` (a ``LeaseHolder``) runs out at each beat and tell it: a free
        lease is then noticed by the fleet's heartbeats, not by asks on a schedule."""
        lease.watched_every(self.interval)
        self.lease = lease

    def start(self) -> None:
        os.register_at_fork(before=self._no_fork.acquire,
                            after_in_parent=self._no_fork.release,
                            after_in_child=self._forked)
        self._thread.start()

    def _forked(self) -> None:
        """In the child: the lock was copied held, and no heartbeat runs here."""
        self._no_fork = threading.Lock()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 1)

    def beat(self) -> None:
        """One heartbeat, with the state (a state change that could not be written when it
        happened, the ledger being unreachable, is written here)."""
        try:
            lease = self.lease
            with self._no_fork:
                beat = self.orch.registry.heartbeat(self.nodename, self.state(),
                                                    lease=lease.name if lease else None)
                if not beat.found:
                    logger.warning("heartbeat: %s has no row in the registry (deleted?); "
                                   "registering again", self.nodename)
                    self.lost()
            if beat.read_lease:
                lease.seen(beat.lease_expires_at)
        except LedgerUnavailable as exc:
            self.orch.ledger_health.report(exc, "heartbeat")
        except Exception as exc:  # a database hiccup must not end the heartbeats
            if str(exc) != self._last_error:
                self._last_error = str(exc)
                logger.warning("heartbeat failed: %s", error_text(exc))

    def _run(self) -> None:
        # The first beat at a random point of the first interval (registering wrote one):
        # a fleet started at once then beats spread out, not all in the same second.
        wait = self.interval * random.random()
        while not self._stop.wait(wait):
            self.beat()
            wait = self.interval
