"""A step this worker's code does not register is held in the ledger, never discarded.

Celery's consumer drops a message whose task name no registered task has ("Received
unregistered task of type 'copy_in'. The message has been ignored and discarded":
``Consumer.on_unknown_task`` rejects it without requeue). During a rolling deploy that renames
or removes a step, that is an operation in flight stranded on a host whose new code does not
know the step it still needs.

Here such a step is recorded as ``held`` in the ledger (:meth:`Ledger.hold_step`), and only
then is its message acknowledged: the ledger holds the step instead of the broker, the host's
queue is not blocked by a message nobody here can run, and no message circles between the
broker and this worker. A worker whose code serves the step (the old version, rolled back, or
new code with an alias) sends it again through its resend (``workers.resend``), as it does for
any step with no message. The operation's view says why it waits (``orchestrator.status``).

The ledger unreachable is a reason to wait: the message stays unacknowledged in this worker
(one prefetch slot) and the hold is tried again every :data:`RETRY_SECONDS`; if the worker
exits first, the message goes back to its queue.
"""

from __future__ import annotations

from typing import Any

from celery.utils.log import get_logger

from orchestrator.errors import LedgerUnavailable
from orchestrator.redact import printable

logger = get_logger(__name__)

#: Seconds between two tries to record a hold while the ledger does not answer.
RETRY_SECONDS = 5.0


def step_call(message: Any, orch: Any) -> tuple[str, str, int, str] | None:
    """``(step, operation_id, position, host)`` of a step message (protocol 2), None for any
    other message."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    name = headers.get("task")
    if not isinstance(name, str) or not name.startswith(orch.task_prefix):
        return None
    try:
        _args, kwargs, _embed = message.payload
        operation_id, position, host = (kwargs["operation_id"], kwargs["position"],
                                        kwargs["host"])
    except (TypeError, ValueError, KeyError):
        return None
    if not (isinstance(operation_id, str) and isinstance(position, int)
            and isinstance(host, str)):
        return None
    return name[len(orch.task_prefix):], operation_id, position, host


def hold(consumer: Any, orch: Any, message: Any, call: tuple[str, str, int, str],
         refuse: Any) -> None:
    """Record the step as held, then acknowledge its message (or try again later). A message
    that is no operation's step at all is ``refuse``d (Celery's own rejection)."""
    step, operation_id, position, host = call
    try:
        outcome = orch.ledger.hold_step(
            operation_id, position, step, host, worker=consumer.hostname,
            queue=(message.delivery_info or {}).get("routing_key"))
    except LedgerUnavailable as exc:
        orch.ledger_health.report(exc, f"step {step} of {operation_id}: cannot be held yet")
        consumer.timer.call_after(RETRY_SECONDS, hold,
                                  (consumer, orch, message, call, refuse))
        return
    if outcome == "mismatch":
        refuse()
        return
    if outcome == "held":
        logger.warning(
            "held %s of %s for %s: this code (%s) does not register %s; it waits for a worker "
            "that serves it (not discarded)", printable(step), printable(operation_id),
            printable(host), orch.code_fingerprint, printable(step))
    else:
        logger.info("step %s of %s delivered again: already done, dropped", printable(step),
                    printable(operation_id))
    message.ack()
