"""What happens to a step's message in the worker around the pool process.

Celery asks ``Request.revoked()`` right before it hands a request to a pool process, and
skips it on True. While the host drains, a message fetched from the main queue is handed back
there instead (rejected with requeue, never acknowledged, never run): see
:meth:`workers.drain.Drain.hand_back`.

A step that finishes after the broker connection it came on was lost cannot be acknowledged:
the channel is closed, and with Redis kombu raises ``AttributeError`` from the dead channel,
which Celery 5.7 lets out of the event loop and the worker dies ("Unrecoverable error"). The
broker delivers such a message again (AMQP at once, Redis after the visibility timeout) and
the ledger drops it as already done, so the worker logs it and goes on.
"""

from __future__ import annotations

from celery.utils.log import get_logger
from celery.worker.request import Request

logger = get_logger(__name__)

#: What kombu's Redis channel raises once its connection is gone (its client is cleared).
DEAD_CHANNEL_ERRORS = (AttributeError,)


def channel_gone(channel) -> bool:
    """True if ``channel`` died with its connection (kombu virtual or py-amqp channel)."""
    if channel is None or getattr(channel, "closed", False):
        return True
    if getattr(channel, "is_open", True) is False:
        return True
    connection = getattr(channel, "connection", None)
    # A virtual transport's channel keeps its transport, whose client is cleared on close.
    return connection is None or getattr(connection, "client", True) is None


class StepRequest(Request):
    def revoked(self) -> bool:
        if self._already_revoked:
            return True
        orch = getattr(self._app, "orchestrator", None)
        drain = orch.drain if orch is not None else None
        if drain is not None and drain.hand_back(self):
            return True
        return super().revoked()

    def on_success(self, failed__retval__runtime, **kwargs) -> None:
        failed, retval, _runtime = failed__retval__runtime
        if not failed and retval == "waiting":  # the step parked: look for its event soon
            waits = getattr(getattr(self._app, "orchestrator", None), "event_waits", None)
            if waits is not None:
                waits.wake()
        super().on_success(failed__retval__runtime, **kwargs)

    def acknowledge(self) -> None:
        if self.acknowledged or self._lost_with_connection("acknowledged"):
            return
        # The ack runs later in the event loop: a connection lost in between is logged by
        # kombu (ack_log_error) instead of ending the worker.
        self._on_ack(logger, self._connection_errors + DEAD_CHANNEL_ERRORS)
        self.acknowledged = True

    def reject(self, requeue: bool = False) -> None:
        if self.acknowledged or self._lost_with_connection("rejected"):
            return
        self._on_reject(logger, self._connection_errors + DEAD_CHANNEL_ERRORS, requeue)
        self.acknowledged = True

    def _lost_with_connection(self, what: str) -> bool:
        if not channel_gone(getattr(self._message, "channel", None)):
            return False
        self.acknowledged = True
        logger.warning(
            "%s[%s] not %s: the broker connection it came on was lost; the broker delivers "
            "it again and the ledger drops it as already done", self.name, self.id, what,
        )
        return True
