"""Worker bootstep: routing.yaml is looked at every 2 s and read again when it changed.

The dispatcher reads the table as it routes (``Orchestrator.routing``), but a worker that
routes nothing for a while would only say that an edit took effect (or was refused, with file,
line and key) at its next step. Looking from the event loop's timer, with the worker's other
periodic jobs (:class:`workers.hoststep.HostTimerStep`), says it where and when the edit
lands. A file gone keeps the table in use, said once per change.
"""

from __future__ import annotations

from celery.utils.log import get_logger

from orchestrator.redact import error_text
from workers.hoststep import HostTimerStep

logger = get_logger(__name__)


class RoutingReload(HostTimerStep):
    """A ``stat`` of the file every ``interval``; read only when it changed."""

    label = "RoutingReload"
    #: The file is local: its check goes on while the ledger does not answer.
    needs_ledger = False

    def tick(self) -> None:
        try:
            self.orch.routing  # noqa: B018
        except Exception as exc:  # the file vanished: keep the table, say so
            if str(exc) != self._last_error:
                self._last_error = str(exc)
                logger.warning("routing check failed: %s", error_text(exc))
        else:
            self._last_error = ""
