"""Hand-back: a message fetched from ``<host>`` but not started goes back to the broker.

While its host drains, a worker still holds the main-queue messages it prefetched before its
``<host>`` consumer was cancelled. Celery asks ``Request.revoked()`` right before it gives a
request to a pool process (``workers.request.StepRequest``); such a request is given back
there instead of run. Celery's own revoke path acknowledges the message, which would lose it,
so it is given back first (rejected with requeue, or republished: see
:data:`orchestrator.broker.HAND_BACK`) and only then forgotten by the worker.
"""

from __future__ import annotations

from typing import Any

from celery.utils.log import get_logger

from orchestrator.broker import hand_back_mode, republish
from orchestrator.redact import error_text, printable
from orchestrator.seams import celery_internals as celery_seam

logger = get_logger(__name__)


class HandBack:
    def __init__(self, app: Any, queue_type: str, main_queue: str | None) -> None:
        self.app, self.queue_type, self.main_queue = app, queue_type, main_queue
        #: Messages handed back so far.
        self.count = 0
        #: requeue or republish, found at the first hand-back (it asks the broker).
        self.mode: str | None = None

    def fetched_from_main(self, request: Any) -> bool:
        return (self.main_queue is not None
                and (request.delivery_info or {}).get("routing_key") == self.main_queue)

    def unstarted(self, request: Any) -> bool:
        """Fetched from the main queue and not started: handed back, never waited for."""
        return self.fetched_from_main(request) and not celery_seam.is_active(request)

    def give_back(self, request: Any) -> None:
        """Back to its queue, in the way its broker and queue type allow without counting a
        return; a republish that fails falls back to the requeue (counted, but nothing lost
        now). Then the worker forgets the request: Celery neither runs nor acknowledges it."""
        if self.mode is None:
            self.mode = hand_back_mode(self.app, self.queue_type)
        given = False
        if self.mode == "republish":
            try:
                republish(self.app, request.message)
            except Exception as exc:
                logger.warning("drain: could not republish %s (%s); requeued instead",
                               printable(request.id), error_text(exc))
            else:
                request.acknowledge()
                given = True
        if not given:
            request.reject(requeue=True)
        celery_seam.forget_request(request)
        self.count += 1
        logger.warning("drain: handed back %s %s (not started)", printable(request.name),
                       printable(request.id))
