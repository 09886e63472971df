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
  (``state.StepMismatch``): :func:`check_step_call` / :func:`reject` from ``StepTask``, ERROR
  "rejected step message ..."; rejected (``Reject``, no requeue).

Rejected without requeue is final: on Redis the message is gone; on RabbitMQ it is dropped, or
dead-lettered if the queue has a dead-letter exchange (set by a policy): that is where to look
for it. Nothing here touches a step's own failures (the hypervisor, the database): those keep
their meaning (see workers.steps).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery import Task, signals
from celery.exceptions import InvalidTaskError, Reject
from celery.worker.consumer import Consumer

from orchestrator.redact import printable
from orchestrator.routing import split_queue
from orchestrator.seams import celery_internals as celery_seam

logger = logging.getLogger(__name__)

#: The keyword arguments every step message carries, and their types.
STEP_FIELDS: dict[str, type] = {"operation_id": str, "position": int, "host": str}
_MAX_SHOWN = 80


class RejectedStep(Reject):
    """A step message rejected (not requeued) before it ran; already logged by :func:`reject`."""

    def __init__(self, reason: str | None = None, requeue: bool = False) -> None:
        super().__init__(reason, requeue)


def _show(value: Any) -> str:
    """A value from an untrusted message, made safe and short for one log line."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _name(value: Any) -> str:
    """A task name or id from an untrusted message: as is when it is a short plain string."""
    if isinstance(value, str) and 0 < len(value) <= _MAX_SHOWN:
        return printable(value)
    return _show(value)


def problems(args: tuple, kwargs: Mapping[str, Any], queue: str | None) -> list[str]:
    """What is wrong with a step call (empty when nothing is)."""
    found = []
    if args:
        found.append(f"positional arguments {_show(args)} (a step takes keyword arguments)")
    missing = [name for name in STEP_FIELDS if name not in kwargs]
    if missing:
        found.append("missing " + ", ".join(missing))
    extra = sorted(str(name) for name in kwargs if name not in STEP_FIELDS)
    if extra:
        found.append("unexpected " + ", ".join(_show(name) for name in extra))
    for name, kind in STEP_FIELDS.items():
        if name not in kwargs:
            continue
        value = kwargs[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            found.append(f"{name} must be {kind.__name__}, not {type(value).__name__} "
                         f"{_show(value)}")
        elif kind is str and not value.strip():
            found.append(f"{name} is empty")
        elif kind is str and not value.isprintable():
            found.append(f"{name} holds control characters: {_show(value)}")
        elif kind is int and value < 0:
            found.append(f"{name} is negative ({value})")
    host = kwargs.get("host")
    if queue and isinstance(host, str) and host.strip() and split_queue(queue)[0] != host:
        found.append(f"host {_show(host)} is not this queue's host (a host runs only its own "
                     "steps)")
    return found


def reject(task: Task, reason: str) -> RejectedStep:
    """Log why a step message is refused, in one line; raise the result to reject it."""
    request = task.request
    queue = (request.delivery_info or {}).get("routing_key")
    logger.error("rejected step message %s[%s] from queue %s: %s (not run, not requeued)",
                 task.name, printable(request.id), printable(queue), reason)
    return RejectedStep(reason, requeue=False)


def check_step_call(task: Task, args: tuple, kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`RejectedStep` (logged) unless the message is a well-formed step call."""
    queue = (task.request.delivery_info or {}).get("routing_key")
    found = problems(args, kwargs, queue)
    if found:
        raise reject(task, "; ".join(found))


class _OneLinePerRejection(logging.Filter):
    """Celery logs every ``Reject`` again, as a WARNING with a traceback; ours already has its
    one line (:func:`reject`), so that repeat is dropped. Other rejections are untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, RejectedStep)


_rejection_filter = _OneLinePerRejection()


def quiet_repeated_rejections() -> None:
    """Install the filter (once; called by the Orchestrator, never at import)."""
    trace_logger = logging.getLogger("celery.app.trace")
    if _rejection_filter not in trace_logger.filters:
        trace_logger.addFilter(_rejection_filter)


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
            return f"body is not [args, kwargs, options]: {_show(payload)}"
        args, kwargs, embed = payload
        if embed is not None and not isinstance(embed, dict):
            return f"options are not a mapping: {_show(embed)}"
    elif isinstance(payload, dict) and "task" in payload:  # protocol 1: one mapping
        meta = payload
        args, kwargs = payload.get("args", ()), payload.get("kwargs", {})
    else:
        return None
    if not isinstance(args, list | tuple):
        return f"args are not a list: {_show(args)}"
    if not isinstance(kwargs, dict):
        return f"kwargs are not a mapping: {_show(kwargs)}"
    task, task_id = meta.get("task"), meta.get("id")
    if not isinstance(task, str) or not task:
        return f"task name is not a string: {_show(task)}"
    if not isinstance(task_id, str) or not task_id:
        return f"no task id (got {_show(task_id)})"
    if not (task.isprintable() and task_id.isprintable()):
        # Celery logs both as they are ("Task NAME[ID] received"): one line each.
        return f"task name or id holds control characters: {_show(task)}[{_show(task_id)}]"
    limits = meta.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple) and len(limits) == 2
        and all(v is None or _is_number(v) for v in limits)
    ):
        return f"timelimit is not [soft, hard]: {_show(limits)}"
    queue = (message.delivery_info or {}).get("routing_key")
    if step_of_task(task) is None and queue != default_queue and task in registered:
        # Celery's own tasks (celery.chord_unlock, celery.group, ...) are registered in every
        # worker; a host queue carries steps and nothing else. An unknown name is left to
        # Celery ("Received unregistered task").
        return f"{_show(task)} is not a step; a host queue carries only steps"
    if step_of_task(task) is not None and meta.get("eta") is not None:
        # A step held for later would sit unacknowledged in the worker (RabbitMQ closes the
        # channel after consumer_timeout) and keep a drain waiting: steps run when sent.
        return f"a step is never scheduled for later (eta {_show(meta.get('eta'))})"
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
            _name(headers.get("task")), _name(headers.get("id")),
            printable((message.delivery_info or {}).get("routing_key")), problem,
        )
        message.reject_log_error(logger, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=InvalidTaskError(problem))
