"""Base of the bootsteps that look after a host on a timer, in the worker's event loop."""

from __future__ import annotations

from celery import bootsteps
from celery.utils.log import get_logger

from workers.drain import HostQueues

logger = get_logger(__name__)


class HostTimerStep(bootsteps.StartStopStep):
    """Runs :meth:`tick` every ``interval`` seconds on a worker that serves a host (none on a
    plain worker). An error in a tick is logged and the next tick tries again: a database or
    broker hiccup must not stop the worker."""

    requires = ("celery.worker.components:Timer",)
    interval: float = 1.0

    def __init__(self, worker, **kwargs) -> None:
        self.host: str | None = None
        self.app = None
        self.orch = None
        self._tref = None

    def start(self, worker) -> None:
        self.app = worker.app
        self.orch = getattr(worker.app, "orchestrator", None)
        if self.orch is None:
            return
        queues = HostQueues.from_queue_names(
            list(self.app.amqp.queues.consume_from or {}), self.app.conf.task_default_queue
        )
        if queues is None:
            return
        self.host = queues.host
        self._tref = worker.timer.call_repeatedly(self.interval, self._safe_tick)

    def stop(self, worker) -> None:
        if self._tref is not None:
            self._tref.cancel()

    terminate = stop

    def _safe_tick(self) -> None:
        try:
            self.tick()
        except Exception as exc:
            logger.warning("%s on %s: %s", self.label, self.host, exc)

    def tick(self) -> None:
        raise NotImplementedError
