"""SIGTERM while the event loop does not run: the host drains without its broker.

The drain runs in the worker's event loop (:mod:`workers.drain`). While Celery cannot reach
its broker there is no loop: the consumer sits in kombu's ``ensure_connection``, retrying, and
calls Celery's ``maybe_shutdown`` about once a second between tries (celery 5.7,
``Consumer.ensure_connected``), which ends the worker only once Celery's own shutdown flags
are set. Our SIGTERM handler sets none of them (it asks for a drain), so such a worker used to
sit out its whole graceful timeout and leave through the exit deadline's stack dump, where
plain Celery exits at once.

:class:`OfflineStop` is a thread that wakes on SIGTERM, gives the loop a moment to start the
drain, and, if the loop does not, drains the only way left: no alt step can be consumed
without a broker, so it waits only for what still needs the host, as the ledger says
(operations in flight with a step left here, started before the SIGTERM) and for steps the
pool still runs. Nothing left: Celery's warm shutdown (exit 0), at once. Something left: it
asks again every few seconds (the broker may come back, and the loop with it, which then
drains as usual) until the deadline or a second SIGTERM, then stops cold (exit 75) without a
stack dump. A ledger that does not answer either is no answer: it waits, as the drain does.

It stands in for the drain only when the loop is missing at the SIGTERM: a broker lost after
the drain began leaves the drain to its deadline (:class:`workers.deadline.ExitDeadline`).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from typing import Any

from celery.utils.log import get_logger

from orchestrator.errors import LedgerUnavailable
from orchestrator.redact import error_text
from orchestrator.seams import celery_internals as celery_seam
from workers.deadline import EX_DRAIN_EXPIRED

logger = get_logger(__name__)

#: How long the event loop has to start the drain before the host counts as offline.
LOOP_GRACE_SECONDS = 2.0
#: How often an offline drain asks the ledger again.
ASK_EVERY_SECONDS = 2.0


class OfflineStop:
    def __init__(self, drain: Any) -> None:
        self.drain = drain
        self.pid = os.getpid()
        self._wake: tuple[int, int] | None = None
        self._last_error = ""

    def start(self) -> None:
        self.pid = os.getpid()
        self._wake = os.pipe()
        for fd in self._wake:
            os.set_blocking(fd, False)
        threading.Thread(target=self._run, name="drain-offline", daemon=True).start()

    def asked(self) -> None:
        """From the SIGTERM handler: a byte on a pipe (signal-safe: no lock)."""
        if self._wake is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake[1], b"t")

    def _run(self) -> None:
        assert self._wake is not None
        select.select([self._wake[0]], [], [])
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._wake[0], 64)
        if os.getpid() != self.pid or not self._loop_missed():
            return
        drain, host = self.drain, self.drain.queues.host
        since = time.time()
        logger.warning("drain: SIGTERM while %s consumes nothing (its broker does not "
                       "answer); asking the ledger what still needs it", host)
        while not self._loop_took_over():
            if self.drain.hurry or time.time() >= drain.exit_deadline.deadline:
                logger.error("drain: %s without its broker; stopping (status %d)",
                             "second SIGTERM" if drain.hurry else "deadline passed",
                             EX_DRAIN_EXPIRED)
                drain.worker.exitcode = EX_DRAIN_EXPIRED  # Celery's terminate sets none
                celery_seam.stop_cold(EX_DRAIN_EXPIRED)
                return
            left = self._left(since)
            if left == 0:
                logger.warning("drain: nothing in flight needs %s; exiting without its broker",
                               host)
                celery_seam.stop_warm()
                return
            # A second SIGTERM wakes this at once (a byte on the pipe).
            if select.select([self._wake[0]], [], [], ASK_EVERY_SECONDS)[0]:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.read(self._wake[0], 64)

    def _loop_missed(self) -> bool:
        """The event loop did not start the drain within LOOP_GRACE_SECONDS."""
        until = time.monotonic() + LOOP_GRACE_SECONDS
        while time.monotonic() < until:
            if self._loop_took_over():
                return False
            time.sleep(0.1)
        return not self._loop_took_over()

    def _loop_took_over(self) -> bool:
        return self.drain.since is not None or celery_seam.shutdown_requested()

    def _left(self, since: float) -> int | None:
        """Steps running here plus operations that still need the host; None: unknown (said
        once per distinct reason: this asks every few seconds until the deadline)."""
        try:
            running = len(celery_seam.reserved_requests())
            needing = self.drain.orch.ledger.operations_needing(self.drain.queues.host,
                                                                created_before=since)
        except LedgerUnavailable as exc:
            self.drain.orch.ledger_health.report(exc, "drain: cannot tell what is in flight")
            return None
        except Exception as exc:
            said = error_text(exc, kind=True)
            if said != self._last_error:
                self._last_error = said
                logger.error("drain: cannot tell what is in flight: %s", said)
            return None
        return running + len(needing)
