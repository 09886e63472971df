"""This process's view of the ledger's database: reachable, or unreachable since when.

Every part of a process that talks to the ledger (a step recording its outcome, the drain
asking what is left, the heartbeat, the periodic jobs, a Flower page) reports here what each
attempt gave. That gives three things:

- **waiting, not failing**: :meth:`LedgerHealth.call` tries again with backoff until the
  ledger answers (a step's work is not done again; only its recording is retried);
- **one log line per change of state, and one every** :data:`QUIET_SECONDS` while it lasts,
  whatever the number of callers and their rhythm (the drain asks ten times a second);
- **no verdict from silence**: a worker's heartbeat missed while the ledger was unreachable
  says nothing of the worker. :meth:`excuses_silence` tells the registry not to call a host
  down on a stale heartbeat while this process itself could not reach the ledger, or until
  every live worker has had time to write a heartbeat since it came back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from orchestrator.errors import LedgerUnavailable

T = TypeVar("T")

#: While the ledger stays unreachable, say so at most this often.
QUIET_SECONDS = 10.0
#: Backoff between two attempts of one call: from the first to the last, doubling.
FIRST_DELAY, MAX_DELAY = 0.5, 5.0

logger = logging.getLogger("orchestrator.ledger")


class LedgerHealth:
    """Reachability of one database as this process saw it (hung on the Orchestrator)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        #: Since when the last attempts failed; None while the ledger answers.
        self.unreachable_since: float | None = None
        #: When it last answered again after an outage (0: never was out).
        self.recovered_at = 0.0
        #: Failed attempts, all callers together, since the process started.
        self.errors = 0
        self.last_error = ""
        self._last_log = 0.0
        #: The outage (its start) whose first line was said.
        self._announced: float | None = None
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        return self.unreachable_since is None

    def note_failure(self, exc: BaseException) -> None:
        """An attempt failed: the ledger did not answer (the Database reports it)."""
        with self._lock:
            self.errors += 1
            self.last_error = str(exc)
            if self.unreachable_since is None:
                self.unreachable_since = self.clock()

    def note_success(self) -> None:
        """An attempt went through (the Database reports it; costs nothing while up)."""
        if self.unreachable_since is None:
            return
        now = self.clock()
        with self._lock:
            if self.unreachable_since is None:
                return
            since, self.unreachable_since = self.unreachable_since, None
            self.recovered_at = now
        logger.warning("the ledger answers again after %.1fs unreachable", now - since)

    def report(self, exc: BaseException, what: str) -> None:
        """Say that ``what`` waits for the ledger: once when the outage starts, then at
        most every QUIET_SECONDS, whoever asks and however often."""
        now = self.clock()
        with self._lock:
            since = self.unreachable_since if self.unreachable_since is not None else now
            first = self._announced != since
            if not first and now - self._last_log < QUIET_SECONDS:
                return
            self._last_log, self._announced = now, since
        if first:
            logger.warning("%s: %s; waiting for it, trying again", what, exc)
        else:
            logger.warning("%s: still %s (unreachable for %.0fs, %d failed attempts)",
                           what, exc, now - since, self.errors)

    def call(self, fn: Callable[[], T], what: str,
             give_up: Callable[[], bool] | None = None) -> T:
        """``fn()``, tried again with backoff for as long as the ledger is unreachable.
        ``give_up()`` true between two attempts re-raises the last LedgerUnavailable."""
        delay = FIRST_DELAY
        while True:
            try:
                result = fn()
            except LedgerUnavailable as exc:
                self.report(exc, what)
                if give_up is not None and give_up():
                    raise
                time.sleep(delay)
                delay = min(MAX_DELAY, delay * 2)
                continue
            return result

    def excuses_silence(self, stale_seconds: float) -> bool:
        """Whether a heartbeat older than ``stale_seconds`` may be the ledger's fault rather
        than its writer's: the ledger is unreachable from here now, or came back less than
        ``stale_seconds`` ago (every live worker writes one within that)."""
        return (self.unreachable_since is not None
                or self.clock() - self.recovered_at < stale_seconds)

    def as_dict(self) -> dict[str, object]:
        return {"up": self.up, "unreachable_since": self.unreachable_since,
                "errors": self.errors, "last_error": self.last_error if not self.up else ""}
