"""Bad step messages: rejected with one logged reason, never run, never redelivered.

A host queue is an input like any other: anyone who can publish to the broker can put anything
there. What each kind of bad message becomes (celery 5.7, checked by tests/test_bad_input.py on
Redis and RabbitMQ). Every one leaves the broker at once, is never run, and the worker carries on:

- content type not accepted (pickle, yaml, ..., or plain JSON when signing is on): Celery,
  ERROR "Received invalid task message: Refusing to deserialize untrusted content ...";
  rejected;
- a body that does not decode (garbage, a bad signature, an untrusted certificate): Celery,
  CRITICAL "Can't decode message body: DecodeError(...)"; acknowledged;
- an unregistered task name: Celery, ERROR "Received unregistered task of type ..."; rejected;
- no task at all (no ``task`` header or field): Celery, WARNING "Received and deleted unknown
  message"; rejected;
- what Celery 5.7 cannot take in and would stop or stall the worker on (a body that is not
  ``[args, kwargs, options]``, a task name that is not a string, no ``id``, a malformed
  ``timelimit``), a step with an ``eta``, or one of Celery's own tasks on a host queue:
  :class:`GuardedConsumer` (the worker's main process), ERROR "rejected malformed task message
  ..."; rejected;
- a step with positional args, missing, extra or wrongly typed kwargs, or a ``host`` that is
  not the host of the queue it came from; a step of an operation that does not exist
  (``state.UnknownOperation``) or that contradicts the operation's plan
  (``state.StepMismatch``): ``check_step_call`` / ``reject`` (:mod:`orchestrator.stepcall`)
  from ``StepTask``, ERROR
  "rejected step message ..."; rejected (``Reject``, no requeue).

Rejected without requeue is final: on Redis the message is gone; on RabbitMQ it is dropped, or
dead-lettered if the queue has a dead-letter exchange (set by a policy): that is where to look
for it. Nothing here touches a step's own failures (the hypervisor, the database): those keep
their meaning (see orchestrator.runner).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer

from orchestrator.redact import printable
from orchestrator.seams import celery_internals as celery_seam
from orchestrator.stepcall import shown, shown_name

logger = logging.getLogger(__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def message_problem(
    message: Any, default_queue: str | None = None,
    step_of_task: Any = lambda name: None, registered: Any = (),
) -> str | None:
    """What would make Celery 5.7's consumer crash or stall on this message (None: nothing).

    Celery validates little before building a request in the worker's main process: a body that
    is not ``[args, kwargs, options]`` or a malformed ``timelimit`` header raise there and stop
    the worker ("Unrecoverable error"; on Redis the message is restored and stops the next
    start too), an unhashable task name does the same, and a message without an ``id`` makes
    the consumer reconnect in a loop. What Celery already refuses by itself (content not
    accepted, a body that does not decode, an unknown task, no task at all) is left to it.
    """
    headers = message.headers
    if not isinstance(headers, dict):
        return None
    try:
        payload = message.payload
    except Exception:  # not accepted, or does not decode: Celery reports it
        return None
    if "task" in headers:  # protocol 2: the body is [args, kwargs, options]
        meta = headers
        if not isinstance(payload, list | tuple) or len(payload) != 3:
            return f"body is not [args, kwargs, options]: {shown(payload)}"
        args, kwargs, embed = payload
        if embed is not None and not isinstance(embed, dict):
            return f"options are not a mapping: {shown(embed)}"
    elif isinstance(payload, dict) and "task" in payload:  # protocol 1: one mapping
        meta = payload
        args, kwargs = payload.get("args", ()), payload.get("kwargs", {})
    else:
        return None
    if not isinstance(args, list | tuple):
        return f"args are not a list: {shown(args)}"
    if not isinstance(kwargs, dict):
        return f"kwargs are not a mapping: {shown(kwargs)}"
    task, task_id = meta.get("task"), meta.get("id")
    if not isinstance(task, str) or not task:
        return f"task name is not a string: {shown(task)}"
    if not isinstance(task_id, str) or not task_id:
        return f"no task id (got {shown(task_id)})"
    if not (task.isprintable() and task_id.isprintable()):
        # Celery logs both as they are ("Task NAME[ID] received"): one line each.
        return f"task name or id holds control characters: {shown(task)}[{shown(task_id)}]"
    limits = meta.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple) and len(limits) == 2
        and all(v is None or _is_number(v) for v in limits)
    ):
        return f"timelimit is not [soft, hard]: {shown(limits)}"
    queue = (message.delivery_info or {}).get("routing_key")
    if step_of_task(task) is None and queue != default_queue and task in registered:
        # Celery's own tasks (celery.chord_unlock, celery.group, ...) are registered in every
        # worker; a host queue carries steps and nothing else. An unknown name is left to
        # Celery ("Received unregistered task").
        return f"{shown(task)} is not a step; a host queue carries only steps"
    if step_of_task(task) is not None and meta.get("eta") is not None:
        # A step held for later would sit unacknowledged in the worker (RabbitMQ closes the
        # channel after consumer_timeout) and keep a drain waiting: steps run when sent.
        return f"a step is never scheduled for later (eta {shown(meta.get('eta'))})"
    return None


class GuardedConsumer(Consumer):
    """The worker's consumer (``worker_consumer``): a task message that Celery itself cannot
    take in is rejected with one logged line instead of stopping or stalling the worker.

    Without Celery's DelayedDelivery step: on quorum queues it declares RabbitMQ's delayed
    delivery exchanges on every node of the fail-over URL at each consumer start, retrying
    an unreachable node three times (1, 3, 5 s apart) before it consumes: with one node of
    a cluster down, every worker (re)starting or reconnecting waited 17 s (seen in
    tests/test_rabbit_cluster.py). Steps never carry an ETA or countdown (refused here,
    ``message_problem``), so nothing here needs delayed delivery."""

    class Blueprint(Consumer.Blueprint):
        default_steps = celery_seam.consumer_steps_without(
            celery_seam.DELAYED_DELIVERY)

    def create_task_handler(self, *args: Any, **kwargs: Any):
        on_task_received = super().create_task_handler(*args, **kwargs)

        def guarded(message: Any) -> Any:
            orch = getattr(self.app, "orchestrator", None)
            problem = message_problem(
                message, self.app.conf.task_default_queue,
                orch.step_of_task if orch is not None else (lambda name: None),
                self.app.tasks,
            )
            if problem is None:
                return on_task_received(message)
            self.on_malformed_message(message, problem)
            return None

        return guarded

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A step of a name this code does not register is held in the ledger, not dropped
        (workers.held); anything else is Celery's to reject."""
        from workers.held import hold, step_call

        orch = getattr(self.app, "orchestrator", None)
        call = step_call(message, orch) if orch is not None else None
        if call is None:
            return super().on_unknown_task(body, message, exc)
        hold(self, orch, message, call,
             lambda: super(GuardedConsumer, self).on_unknown_task(body, message, exc))

    def on_malformed_message(self, message: Any, problem: str) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        logger.error(
            "rejected malformed task message %s[%s] from queue %s: %s (not run, not requeued)",
            shown_name(headers.get("task")), shown_name(headers.get("id")),
            printable((message.delivery_info or {}).get("routing_key")), problem,
        )
        message.reject_log_error(logger, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=InvalidTaskError(problem))
