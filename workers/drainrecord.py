"""A drain's row in table ``drains``: what it waits for and the messages it handed back, as
Flower's Hosts tab, ``orchestrator hosts`` and ``/metrics`` show them.

Written at most every RECORD_EVERY_SECONDS and only when something changed: a drain's check
runs ten times a second and the ledger is not its log. The ledger unreachable is said through
the process's ledger health; the row is written once it answers.
"""

from __future__ import annotations

import time
from typing import Any

from celery.utils.log import get_logger

from orchestrator.errors import LedgerUnavailable
from orchestrator.redact import error_text
from workers.leftover import Waiting

logger = get_logger(__name__)

#: How often a draining worker records what it waits for, when it changed.
RECORD_EVERY_SECONDS = 1.0


class DrainRecord:
    def __init__(self, orch: Any, nodename: str, host: str) -> None:
        self.orch, self.nodename, self.host = orch, nodename, host
        #: The row's id, once written.
        self.id: int | None = None
        self._written: tuple | None = None
        self._last = 0.0

    def update(self, reason: str, since: float, deadline: float, waiting: Waiting,
               handed_back: int) -> None:
        if time.monotonic() - self._last < RECORD_EVERY_SECONDS:
            return
        state = (handed_back, waiting.as_dict())
        if state == self._written:
            return
        self._last = time.monotonic()
        registry = self.orch.registry
        try:
            if self.id is None:  # first row: now, or once the ledger answers
                self.id = registry.drain_started(self.nodename, self.host, reason, since,
                                                 deadline, waiting.as_dict())
                registry.drain_progress(self.id, handed_back)
            else:
                registry.drain_progress(self.id, handed_back, waiting.as_dict())
            self._written = state
        except LedgerUnavailable as exc:
            self.orch.ledger_health.report(exc, "drain: its progress is not recorded")
        except Exception as exc:
            logger.warning("drain: could not record its progress: %s", error_text(exc))

    def end(self, handed_back: int, outcome: str) -> None:
        if self.id is None:
            return
        try:
            self.orch.registry.drain_progress(
                self.id, handed_back, {"running": [], "operations": [], "blocked": []},
                outcome=outcome)
        except Exception as exc:
            logger.warning("drain: could not record its end: %s", error_text(exc))
