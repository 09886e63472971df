"""The worker's heartbeat in the registry, written from a thread of its own.

A heartbeat says "this worker is alive and can write to the ledger". Written from the event
loop, it would also say "and its broker connection is fine": a worker cut off from its broker
blocks its event loop in a publish that never returns (Celery's own worker heartbeat event,
a queue depth), every timer with it, and its registry heartbeat would stop while the worker
still runs its steps and records them. Other hosts would take it for dead. From a thread, it
is silent only when the process is gone or the ledger cannot be reached, which is what the
registry's readers judge it by (``Registry.services``; ``workers.status.Witness`` asks over
the broker about a worker whose heartbeat is stale).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from celery.utils.log import get_logger

from orchestrator.errors import LedgerUnavailable

logger = get_logger(__name__)


class Heartbeat:
    def __init__(self, orch: Any, nodename: str, interval: float,
                 state: Callable[[], str]) -> None:
        self.orch, self.nodename, self.interval, self.state = orch, nodename, interval, state
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-heartbeat",
                                        daemon=True)
        self._last_error = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 1)

    def beat(self) -> None:
        """One heartbeat, with the state (a state change that could not be written when it
        happened, the ledger being unreachable, is written here)."""
        try:
            self.orch.registry.heartbeat(self.nodename, self.state())
        except LedgerUnavailable as exc:
            self.orch.ledger_health.report(exc, "heartbeat")
        except Exception as exc:  # a database hiccup must not end the heartbeats
            if str(exc) != self._last_error:
                self._last_error = str(exc)
                logger.warning("heartbeat failed: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()
