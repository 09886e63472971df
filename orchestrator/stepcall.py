"""A step's call checked before it runs: a malformed step message (positional arguments,
missing, extra or wrongly typed keyword arguments, a ``host`` that is not its queue's) is
rejected with one logged reason, never run and never requeued; the worker's consumer
(``workers.validation``) checks what Celery itself cannot take in before this.

Rejected without requeue is final: on Redis the message is gone; on RabbitMQ it is dropped, or
dead-lettered if the queue has a dead-letter exchange (set by a policy): that is where to look
for it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery import Task
from celery.exceptions import Reject

from orchestrator.redact import printable
from orchestrator.routing import split_queue

logger = logging.getLogger(__name__)

#: The keyword arguments every step message carries, and their types.
STEP_FIELDS: dict[str, type] = {"operation_id": str, "position": int, "host": str}
_MAX_SHOWN = 80


class RejectedStep(Reject):
    """A step message rejected (not requeued) before it ran; already logged by :func:`reject`."""

    def __init__(self, reason: str | None = None, requeue: bool = False) -> None:
        super().__init__(reason, requeue)


def shown(value: Any) -> str:
    """A value from an untrusted message, made safe and short for one log line."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def shown_name(value: Any) -> str:
    """A task name or id from an untrusted message: as is when it is a short plain string."""
    if isinstance(value, str) and 0 < len(value) <= _MAX_SHOWN:
        return printable(value)
    return shown(value)


def problems(args: tuple, kwargs: Mapping[str, Any], queue: str | None) -> list[str]:
    """What is wrong with a step call (empty when nothing is)."""
    found = []
    if args:
        found.append(f"positional arguments {shown(args)} (a step takes keyword arguments)")
    missing = [name for name in STEP_FIELDS if name not in kwargs]
    if missing:
        found.append("missing " + ", ".join(missing))
    extra = sorted(str(name) for name in kwargs if name not in STEP_FIELDS)
    if extra:
        found.append("unexpected " + ", ".join(shown(name) for name in extra))
    for name, kind in STEP_FIELDS.items():
        if name not in kwargs:
            continue
        value = kwargs[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            found.append(f"{name} must be {kind.__name__}, not {type(value).__name__} "
                         f"{shown(value)}")
        elif kind is str and not value.strip():
            found.append(f"{name} is empty")
        elif kind is str and not value.isprintable():
            found.append(f"{name} holds control characters: {shown(value)}")
        elif kind is int and value < 0:
            found.append(f"{name} is negative ({value})")
    host = kwargs.get("host")
    if queue and isinstance(host, str) and host.strip() and split_queue(queue)[0] != host:
        found.append(f"host {shown(host)} is not this queue's host (a host runs only its own "
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
    """Install the filter (once; by the worker's diagnostics bootstep, never at import)."""
    trace_logger = logging.getLogger("celery.app.trace")
    if _rejection_filter not in trace_logger.filters:
        trace_logger.addFilter(_rejection_filter)
