"""What happens to a step's message in the worker around the pool process.

Celery asks ``Request.revoked()`` right before it hands a request to a pool process, and
skips it on True. While the host drains, a message fetched from the main queue is handed back
there instead (rejected with requeue, never acknowledged, never run): see
:mod:`workers.handback`.

A step that finishes after the broker connection it came on was lost cannot be acknowledged:
the channel is closed, and with Redis kombu raises ``AttributeError`` from the dead channel,
which Celery 5.7 lets out of the event loop and the worker dies ("Unrecoverable error"). The
broker delivers such a message again (AMQP at once, Redis after the visibility timeout) and
the ledger drops it as already done, so the worker logs it and goes on.
"""

from __future__ import annotations

from typing import Any

from celery.utils.log import get_logger
from celery.worker.request import Request

from orchestrator.broker import republish
from orchestrator.errors import first_line
from orchestrator.redact import error_text, printable
from orchestrator.seams import celery_internals as celery_seam
from orchestrator.seams.kombu_internals import DEAD_CHANNEL_ERRORS, channel_gone

logger = get_logger(__name__)

class StepRequest(Request):
    def _worker_part(self, name: str) -> Any:
        """A bootstep of the worker running this request (workers.host), or None."""
        worker = getattr(getattr(self.app, "orchestrator", None), "worker", None)
        return getattr(worker, name, None)

    def revoked(self) -> bool:
        if celery_seam.already_revoked(self):
            return True
        service = self._worker_part("host_service")
        if service is not None and service.queues is not None and self._send_home(service):
            return True
        drain = self._worker_part("host_drain")
        if drain is not None and drain.take_back(self):
            return True
        return super().revoked()

    def _send_home(self, service: Any) -> bool:
        """A step that came for another host's queue (a binding, a queue consumed by
        mistake) is published back to that queue unrun, and this worker stops consuming it if
        it does: a worker serves one host, and a step runs on the host its plan names. True
        if it was."""
        queue = (self.delivery_info or {}).get("routing_key")
        if not queue or queue == self.app.conf.task_default_queue or service.queues.owns(queue):
            return False
        host = service.queues.host
        try:
            republish(self.app, self.message, to=queue)
        except Exception as exc:  # nothing lost: back where it was, for a worker of its host
            self.reject(requeue=True)
            shown = f"requeued ({error_text(first_line(exc))})"
        else:
            self.acknowledge()
            shown = f"given back to {printable(queue)}"
        celery_seam.forget_request(self)
        logger.error("%s[%s] is for queue %r, another host's: %s unrun (%s serves only %s "
                     "and %s-alt)", self.name, self.id, queue, shown, host, host, host)
        consumer = self._worker_part("consumer")
        if consumer is not None:
            celery_seam.stop_consuming(consumer, queue)
        return True

    def on_accepted(self, pid, time_accepted) -> None:
        self._busy()
        super().on_accepted(pid, time_accepted)

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False) -> None:
        self._busy()
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _busy(self) -> None:
        """A step started or ended here: this worker looks at its host's steps for a while
        (workers.resend.StrandedSteps.touch)."""
        stranded = self._worker_part("stranded_steps")
        if stranded is not None:
            stranded.touch()

    def on_success(self, failed__retval__runtime, **kwargs) -> None:
        self._busy()
        failed, retval, _runtime = failed__retval__runtime
        if not failed and retval == "waiting":  # the step parked: look for its event soon
            waits = self._worker_part("event_waits")
            if waits is not None:
                waits.wake()
        super().on_success(failed__retval__runtime, **kwargs)

    def acknowledge(self) -> None:
        if self.acknowledged or self._lost_with_connection("acknowledged"):
            return
        # The ack runs later in the event loop: a connection lost in between is logged by
        # kombu (ack_log_error) instead of ending the worker.
        self.on_ack(logger, self.connection_errors + DEAD_CHANNEL_ERRORS)
        self.acknowledged = True

    def reject(self, requeue: bool = False) -> None:
        if self.acknowledged or self._lost_with_connection("rejected"):
            return
        self.on_reject(logger, self.connection_errors + DEAD_CHANNEL_ERRORS, requeue)
        self.acknowledged = True

    def _lost_with_connection(self, what: str) -> bool:
        if not channel_gone(getattr(self.message, "channel", None)):
            return False
        self.acknowledged = True
        logger.warning(
            "%s[%s] not %s: the broker connection it came on was lost; the broker delivers "
            "it again and the ledger drops it as already done", printable(self.name),
            printable(self.id), what,
        )
        return True
