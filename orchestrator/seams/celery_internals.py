"""Celery worker internals this package relies on (verified against celery 5.7).

- ``celery.worker.state``: Celery's per-process worker state is module-level
  (``reserved_requests``, ``active_requests``, ``should_stop``, ``should_terminate``,
  ``task_ready``); the drain reads what the worker holds and ends it warm or cold through the
  same flags Celery's own signal handlers set (``celery/apps/worker.py``,
  ``_shutdown_handler``), which the event loop checks (``celery/worker/loops.py``).
- ``celery.platforms.signals``: how Celery installs its SIGTERM handler; the drain's replaces
  it after Celery's (``install_worker_term_handler`` runs before the consumer starts).
- ``Request._already_revoked``: the flag ``Request.revoked()`` sets once a request was
  announced revoked; a request handed back is marked so, so Celery neither runs nor
  acknowledges it.
- ``Panel.data``: the registry of remote-control commands; a command is registered once per
  process, at worker start, not at import. The pidbox dispatches through that very dict
  (``Panel.data[name](state, **arguments)``), so replacing an entry replaces one of Celery's
  own commands (``add_consumer``, ``shutdown``) for this process.
- ``Consumer.Blueprint.default_steps``: the consumer's bootsteps by name; the worker's
  consumer leaves out ``DelayedDelivery`` (:func:`consumer_steps_without`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from celery import platforms
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from celery.worker.control import Panel, control_command
from celery.worker.request import Request

#: Celery's consumer step for RabbitMQ's native delayed delivery (celery 5.5+), included when
#: any queue is a quorum queue.
DELAYED_DELIVERY = "celery.worker.consumer.delayed_delivery:DelayedDelivery"


def consumer_steps_without(*names: str) -> list[str]:
    """Celery's consumer bootsteps, by name, but ``names``: for a consumer's Blueprint."""
    return [step for step in Consumer.Blueprint.default_steps if step not in names]


def shutdown_requested() -> bool:
    """Celery was told to stop (warm or cold), by a signal or by one of our steps."""
    return worker_state.should_stop is not None or worker_state.should_terminate is not None


def stop_warm() -> None:
    """Warm shutdown, as Celery's SIGTERM handler starts it: the pool finishes what it holds."""
    worker_state.should_stop = 0


def stop_cold(exitcode: int) -> None:
    """Cold shutdown with ``exitcode``: running jobs are terminated, unacknowledged."""
    worker_state.should_terminate = exitcode


def reserved_requests() -> list[Request]:
    """Every request this worker holds (fetched, running or not)."""
    return list(worker_state.reserved_requests)


def is_active(request: Request) -> bool:
    """The request was handed to the pool (started)."""
    return request in worker_state.active_requests


def nothing_reserved() -> bool:
    return not worker_state.reserved_requests


def forget_request(request: Request) -> None:
    """The request is done here without running: out of the worker's state, and never run
    nor acknowledged by Celery (the caller gave its message back)."""
    worker_state.task_ready(request)
    request._already_revoked = True


def already_revoked(request: Request) -> bool:
    return bool(request._already_revoked)


def handle_sigterm(handler: Callable[..., None]) -> None:
    """Install ``handler`` as the worker's SIGTERM handler, in place of Celery's."""
    platforms.signals["SIGTERM"] = handler


def register_control_command(name: str, fn: Callable[..., Any], *,
                             args: list[tuple[str, type]] | None = None,
                             signature: str | None = None) -> None:
    """Register ``fn(state, ...)`` as remote-control command ``name``, once per process.
    ``state.consumer.controller`` is the worker (``celery/worker/consumer/consumer.py``)."""
    if name in Panel.data:
        return
    fn.__name__ = name
    control_command(name=name, args=args, signature=signature)(fn)


def override_control_command(name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]
                             ) -> None:
    """Replace Celery's remote-control command ``name`` by ``make(celery's own)``, once per
    process; the replacement keeps the original's arguments and reply conventions."""
    original = Panel.data[name]
    if getattr(original, "_orchestrator_original", None) is not None:
        return
    replacement = make(original)
    replacement._orchestrator_original = original  # type: ignore[attr-defined]
    Panel.data[name] = replacement


def use_queue_type(app: Any, queue_type: str) -> None:
    """Declare the queues this process creates on demand as ``queue_type`` from now on.
    Celery reads ``task_create_missing_queue_type`` when it builds ``app.amqp.queues`` and
    ``app.amqp.router``, both cached on first use (kombu's ``cached_property``, reset by
    deleting it): a process whose app has published already keeps the old type otherwise,
    and RabbitMQ refuses a declare of another type (PRECONDITION_FAILED)."""
    app.conf.task_create_missing_queue_type = queue_type
    app.conf.task_default_queue_type = queue_type
    for name in ("queues", "router"):
        with contextlib.suppress(AttributeError, KeyError):
            delattr(app.amqp, name)


def stop_consuming(consumer: Any, queue: str) -> None:
    """Cancel ``consumer``'s consumer of ``queue`` from the event loop (a no-op when it
    consumes no such queue): ``Consumer.cancel_task_queue``, called soon, not from inside the
    request being handled."""
    consumer.call_soon(consumer.cancel_task_queue, queue)


def worker_of(state: Any) -> Any:
    """The worker (WorkController) behind a remote-control command's ``state``."""
    return getattr(state.consumer, "controller", None)


def point_app_at(app: Any, broker_url: str) -> None:
    """Make this process's publishers of ``app`` use ``broker_url`` from now on.

    Celery keeps a connection pool and a producer pool made for the URL it first saw
    (``app._pool``, ``app.amqp._producer_pool``); the app's references are dropped, not the
    pools: kombu's registry hands them out again, by URL, when a process switches back."""
    app.conf.broker_url = broker_url
    app._pool = None
    app.amqp._producer_pool = None
