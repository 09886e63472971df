"""The second witness of a worker's liveness: what it says of itself over the broker
(``orchestrator_status``, answered by ``workers.control`` from its event loop), asked when
its heartbeat in the ledger is stale. A worker cut off from the ledger, or whose ledger was
down, writes no heartbeat and is not gone: a drain's decisions and the router both ask this
before they treat it as gone.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable

from orchestrator.redact import error_text, printable
from orchestrator.registry import ServiceView

logger = logging.getLogger(__name__)
#: The remote-control command a worker answers with what it says of itself.
COMMAND = "orchestrator_status"
#: How long a witness's answer about one worker is trusted.
WITNESS_CACHE_SECONDS = 5.0
#: A worker is taken for gone only once it has not answered for this long: a worker cut off
#: from the ledger may have its event loop held for a few seconds by a query on a connection
#: gone silent (libpq's tcp_user_timeout) before it can answer again.
WITNESS_CONFIRM_SECONDS = 6.0



class Witness:
    """The second witness of a worker's liveness: a worker whose heartbeat is stale (it could
    not write to the ledger: cut off from it, or the ledger was down) but which answers
    ``orchestrator_status`` over the broker is alive, and is not judged down.

    Asked only about silent workers that a decision depends on, at most once per
    WITNESS_CACHE_SECONDS each; a worker that answers neither is down as far as anyone can
    tell. Blocks its caller for up to ``timeout`` seconds when the worker does not answer."""

    def __init__(self, app, timeout: float = 2.0) -> None:
        self.app, self.timeout = app, timeout
        self._heard: dict[str, tuple[float, dict | None]] = {}
        #: Since when each worker has not answered.
        self._silent_since: dict[str, float] = {}

    def hear(self, nodename: str) -> dict | None:
        """What ``nodename`` says of itself over the broker, or None if it does not answer."""
        now = time.monotonic()
        cached = self._heard.get(nodename)
        if cached is not None and now - cached[0] < WITNESS_CACHE_SECONDS:
            return cached[1]
        try:
            replies = self.app.control.broadcast(COMMAND, destination=[nodename], reply=True,
                                                 timeout=self.timeout, limit=1) or []
        except Exception as exc:  # the broker does not answer either
            logger.info("witness: cannot ask %s over the broker: %s", printable(nodename),
                        error_text(exc, kind=True))
            replies = []
        said = next((r[nodename] for r in replies if isinstance(r.get(nodename), dict)
                     and "error" not in r[nodename]), None)
        if said is not None:
            self._silent_since.pop(nodename, None)
        else:
            since = self._silent_since.setdefault(nodename, now)
            if now - since < WITNESS_CONFIRM_SECONDS:
                said = {"state": "", "unconfirmed": True}  # not yet: alive as far as we know
        answers = said is not None and not said.get("unconfirmed")
        previous = self._heard.get(nodename)
        if previous is None or (previous[1] is not None
                                and not previous[1].get("unconfirmed")) != answers:
            logger.info("witness: %s %s over the broker", printable(nodename),
                        "answers" if answers else "does not answer")
        self._heard[nodename] = (time.monotonic(), said)
        return said

    def revise(self, views: list[ServiceView], hosts: Iterable[str] | None = None
               ) -> list[ServiceView]:
        """``views`` with each silent worker (of ``hosts``, default all) that answers over
        the broker put back in the state it reports."""
        wanted = None if hosts is None else set(hosts)
        out = []
        for v in views:
            if v.silent and (wanted is None or v.host in wanted):
                said = self.hear(v.nodename)
                if said is not None:
                    v = dataclasses.replace(v, state=said.get("state") or v.recorded_state)
            out.append(v)
        return out
