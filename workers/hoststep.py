"""Base of the bootsteps that look after a host on a timer, in the worker's event loop."""

from __future__ import annotations

import math
import time

from celery import bootsteps
from celery.utils.log import get_logger

from orchestrator.errors import LedgerUnavailable
from orchestrator.redact import error_text
from workers.host import host_service_of

#: The same error again is logged at most this often.
REPEAT_LOG_SECONDS = 10.0
#: How often an idle worker's periodic jobs run, all in the same turn of its event loop.
IDLE_PERIOD_SECONDS = 2.0


def on_grid(period: float) -> float:
    """The next multiple of ``period`` on the monotonic clock, kombu's timer clock: jobs of
    the same period scheduled with it (``timer.call_at``) come due at the very same time and
    run in one wake-up of the event loop, where each on its own phase woke it once more."""
    return (math.floor(time.monotonic() / period) + 1) * period


logger = get_logger(__name__)


class HostTimerStep(bootsteps.StartStopStep):
    """Runs :meth:`tick` every ``interval`` seconds on a worker that serves a host (none on a
    plain worker). An error in a tick is logged and the next tick tries again: a database or
    broker hiccup must not stop the worker. The ledger unreachable is said through the
    process's ledger health (once, then every 10 s); any other error when it changes, or
    every REPEAT_LOG_SECONDS while it repeats."""

    requires = ("workers.host:HostService",)
    interval: float = IDLE_PERIOD_SECONDS
    #: Whether a tick asks the ledger (skipped while it does not answer).
    needs_ledger: bool = True

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
        self._schedule(self.due())

    def stop(self, worker) -> None:
        if self._tref is not None:
            self._tref.cancel()
        self.timer = None

    def due(self) -> float:
        """When the next tick runs, on the monotonic clock: every ``interval``, on the grid
        the worker's other periodic jobs share (a subclass may tick sooner while busy)."""
        return on_grid(self.interval)

    def _schedule(self, eta: float) -> None:
        if self._tref is not None:
            self._tref.cancel()
        if self.timer is not None:
            self._tref = self.timer.call_at(eta, self._run)

    def _run(self) -> None:
        try:
            self._safe_tick()
        finally:
            self._schedule(self.due())

    terminate = stop

    def _safe_tick(self) -> None:
        if self.needs_ledger and not self.orch.ledger_health.up:
            # The ledger did not answer: leave it to the heartbeat thread to find it back.
            # Asking from here would hold the event loop (and the worker's answers over the
            # broker) for a connect or a query timeout at every tick.
            return
        try:
            self.tick()
        except LedgerUnavailable as exc:
            self.orch.ledger_health.report(exc, f"{self.label} on {self.host}")
        except Exception as exc:
            text = f"{self.label} on {self.host}: {error_text(exc)}"
            if text != self._last_error or time.monotonic() - self._last_log >= \
                    REPEAT_LOG_SECONDS:
                self._last_error, self._last_log = text, time.monotonic()
                logger.warning("%s", text)

    def tick(self) -> None:
        raise NotImplementedError
