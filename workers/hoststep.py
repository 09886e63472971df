"""Base of the bootsteps that look after a host on a timer, in the worker's event loop."""

from __future__ import annotations

import time

from celery import bootsteps
from celery.utils.log import get_logger

from orchestrator.errors import LedgerUnavailable
from workers.host import host_service_of

#: The same error again is logged at most this often.
REPEAT_LOG_SECONDS = 10.0

logger = get_logger(__name__)


class HostTimerStep(bootsteps.StartStopStep):
    """Runs :meth:`tick` every ``interval`` seconds on a worker that serves a host (none on a
    plain worker). An error in a tick is logged and the next tick tries again: a database or
    broker hiccup must not stop the worker. The ledger unreachable is said through the
    process's ledger health (once, then every 10 s); any other error when it changes, or
    every REPEAT_LOG_SECONDS while it repeats."""

    requires = ("workers.host:HostService",)
    interval: float = 1.0

    def __init__(self, worker, **kwargs) -> None:
        self.host: str | None = None
        self.app = None
        self.orch = None
        self.timer = None
        self._tref = None
        self._last_error = ""
        self._last_log = 0.0

    def start(self, worker) -> None:
        self.app = worker.app
        service = host_service_of(worker)
        if service is None:
            return
        self.orch, self.host = service.orch, service.queues.host
        self.timer = worker.timer
        self._schedule(self.delay())

    def stop(self, worker) -> None:
        if self._tref is not None:
            self._tref.cancel()
        self.timer = None

    def delay(self) -> float:
        """Seconds until the next tick (``interval``; a subclass may wait longer when idle)."""
        return self.interval

    def _schedule(self, seconds: float) -> None:
        if self._tref is not None:
            self._tref.cancel()
        if self.timer is not None:
            self._tref = self.timer.call_after(seconds, self._run)

    def _run(self) -> None:
        try:
            self._safe_tick()
        finally:
            self._schedule(self.delay())

    terminate = stop

    def _safe_tick(self) -> None:
        if not self.orch.ledger_health.up:
            # The ledger did not answer: leave it to the heartbeat thread to find it back.
            # Asking from here would hold the event loop (and the worker's answers over the
            # broker) for a connect or a query timeout at every tick.
            return
        try:
            self.tick()
        except LedgerUnavailable as exc:
            self.orch.ledger_health.report(exc, f"{self.label} on {self.host}")
        except Exception as exc:
            text = f"{self.label} on {self.host}: {exc}"
            if text != self._last_error or time.monotonic() - self._last_log >= \
                    REPEAT_LOG_SECONDS:
                self._last_error, self._last_log = text, time.monotonic()
                logger.warning("%s", text)

    def tick(self) -> None:
        raise NotImplementedError
