"""Worker bootstep: routing.yaml is looked at every 2 s and read again when it changed.

The dispatcher reads the table as it routes (``Orchestrator.routing``), but a worker that
routes nothing for a while would only say that an edit took effect (or was refused, with file,
line and key) at its next step. Looking from the event loop's timer says it where and when
the edit lands. A file gone keeps the table in use, said once per change.
"""

from __future__ import annotations

from celery import bootsteps
from celery.utils.log import get_logger

from workers.host import host_service_of
from workers.hoststep import IDLE_PERIOD_SECONDS, on_grid

logger = get_logger(__name__)

#: How often the file is looked at (a stat; read only when it changed), with the worker's
#: other periodic jobs.
CHECK_SECONDS = IDLE_PERIOD_SECONDS


class RoutingReload(bootsteps.StartStopStep):
    label = "RoutingReload"
    requires = ("workers.host:HostService",)

    def __init__(self, worker, **kwargs) -> None:
        self._tref = None
        self.orch = self.timer = None
        self._last_error = ""

    def start(self, worker) -> None:
        service = host_service_of(worker)
        if service is None:
            return
        self.orch, self.timer = service.orch, worker.timer
        self._schedule()

    def _schedule(self) -> None:
        if self.timer is not None:  # None once stopped
            self._tref = self.timer.call_at(on_grid(CHECK_SECONDS), self._run)

    def _run(self) -> None:
        try:
            self.check(self.orch)
        finally:
            self._schedule()

    def check(self, orch) -> None:
        try:
            orch.routing  # noqa: B018
        except Exception as exc:  # the file vanished: keep the table, say so
            if str(exc) != self._last_error:
                self._last_error = str(exc)
                logger.warning("routing check failed: %s", exc)
        else:
            self._last_error = ""

    def stop(self, worker) -> None:
        self.timer = None
        if self._tref is not None:
            self._tref.cancel()

    terminate = stop
