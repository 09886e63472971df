"""The one way a step is sent: decide its queue, publish it, record that it was sent.

Every path that sends a step comes here: a submit (the first step, :meth:`Dispatcher.first`),
a ledger transition in a worker (a step completed or failed, an event wait settled:
:meth:`Dispatcher.next`), and the resend of a step with no message (:meth:`Dispatcher.again`).
What differs between them is what the ledger already recorded, and what a broker that refuses
the message means:

- the first step of a submit is recorded as sent in the operation's own transaction; if the
  broker refuses it, the operation is abandoned (failed before anything ran, its subject
  freed) and the caller gets :class:`BrokerUnavailable` at once. Not so for a submit made
  while a worker runs a task (a step that sends an event, as Nova's network service does
  from a build): it is part of an operation in flight, and nobody could act on the error;
  its first step is left "not sent", like the next one below;
- any later step follows a transition the ledger has recorded; a publish that fails is no
  reason to undo or repeat that transition: the step is left "not sent" and the looks
  (``workers.resend``: its host's worker while busy, the fleet's lease holder always; after
  ``UNPUBLISHED_GRACE``) send it once the broker answers.

A publish already rides out a broker that is briefly away: Celery's publish retry
(``orchestrator.policy.publish_retry_policy``: about 6.5 s, each reconnect asking the
sentinels anew). What fails after that is handled as above, whatever it raised.

A fallback of an alt step to ``<host>`` is counted (a write of its own, never inside the
ledger's transaction) only once the step was really sent.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kombu.exceptions import OperationalError as KombuOperationalError

from orchestrator import notices
from orchestrator.context import running_step
from orchestrator.errors import BrokerUnavailable, LedgerUnavailable, first_line
from orchestrator.ledger.states import Happening
from orchestrator.ledger.store import Ledger, step_task_id
from orchestrator.redact import error_text
from orchestrator.routing import Decision, StepRouter

logger = logging.getLogger("orchestrator")

#: What a publish raises when the broker cannot take a message (kombu wraps the transport's
#: connection errors in its OperationalError; a socket error may come through as it is).
BROKER_ERRORS = (KombuOperationalError, ConnectionError, OSError)


@dataclass(frozen=True)
class StepMessage:
    """One step of one operation, as a message names it."""

    operation_id: str
    position: int
    step: str
    host: str
    kind: str = ""
    subject: str | None = None


class Dispatcher:
    """Sends steps with ``app`` to the queues ``router()`` decides (the routing table in
    force, read again when routing.yaml changes), records in ``ledger`` what was sent, and
    tells waiters of an operation's end (:mod:`orchestrator.notices`)."""

    def __init__(self, app: Any, ledger: Ledger, router: Callable[[], StepRouter],
                 task_prefix: str, tracing: Any = None) -> None:
        self.app, self.ledger, self.router, self.task_prefix = app, ledger, router, task_prefix
        #: orchestrator.tracing.Tracing: the headers that carry an operation's trace.
        self.tracing = tracing

    def route(self, step: str, host: str) -> Decision:
        """Where ``step`` for ``host`` goes now (no fallback counted yet)."""
        return self.router().decide(step, host, record=False)

    def ended(self, operation_id: str) -> None:
        """The ledger recorded the operation's end: its waiters are told."""
        notices.announce(self.app, operation_id, "ended")

    def publish(self, message: StepMessage, queue: str) -> None:
        """Publish one step's message to ``queue`` (already decided).

        What task events (Flower's task rows) show as the step's kwargs also names the
        operation's flow, its subject and the queue it was sent to: a step that came through
        ``<host>-alt`` says so. With tracing on, its headers carry the operation's trace
        context (:meth:`orchestrator.tracing.Tracing.headers`); a retry, a drain's hand-back
        and a send home keep them."""
        kwargs = {"operation_id": message.operation_id, "position": message.position,
                  "host": message.host}
        about = " ".join(filter(None, [message.kind,
                                       message.subject and f"subject={message.subject}"]))
        headers = (self.tracing.headers(message.operation_id, self.ledger.trace_of)
                   if self.tracing is not None else None)
        self.app.send_task(
            self.task_prefix + message.step, kwargs=kwargs,
            task_id=step_task_id(message.operation_id, message.position), queue=queue,
            kwargsrepr=f"{kwargs!r} {about} via {queue}".replace("  ", " "), headers=headers,
        )

    def first(self, message: StepMessage, decision: Decision) -> None:
        """The first step of a submit, recorded as sent to ``decision.queue``."""
        try:
            self.publish(message, decision.queue)
        except Exception as exc:
            if running_step.get() is not None:
                # Submitted by a step as it runs (Nova's build sends its network event): an
                # operation in flight sent it, and has nobody to tell.
                self._not_sent(message, exc)
                return
            why = error_text(first_line(exc) if isinstance(exc, BROKER_ERRORS) else repr(exc))
            self.ledger.abandon(message.operation_id, f"could not queue {message.step}@"
                                                           f"{message.host}: {why}")
            raise BrokerUnavailable(
                f"could not queue {message.step} for {message.host} ({why}); operation "
                f"{message.operation_id} abandoned"
            ) from exc
        self._sent(message, decision)

    def next(self, message: StepMessage, queue: str | None = None,
             decision: Decision | None = None) -> None:
        """A step a recorded transition returned. ``queue``: where the transition recorded
        it as sent (``decision``: how that was decided); None: decide now, then record it."""
        try:
            if queue is None:
                decision = self.route(message.step, message.host)
            self.publish(message, queue or decision.queue)  # type: ignore[union-attr]
        except Exception as exc:
            self._not_sent(message, exc, recorded_as_sent=queue is not None)
            return
        if queue is None:
            try:
                self.ledger.mark_published(message.operation_id, message.position,
                                                decision.queue)  # type: ignore[union-attr]
            except LedgerUnavailable as exc:
                # Sent; the ledger still says "not sent", so the resend may send a copy,
                # which the ledger drops as a duplicate.
                logger.warning("operation %s: %s@%s sent, not recorded as sent (%s)",
                               message.operation_id, message.step, message.host, exc)
        if decision is not None:
            self._sent(message, decision)

    def _sent(self, message: StepMessage, decision: Decision) -> None:
        """``message`` was sent as ``decision`` said: an alt step sent to ``<host>`` is
        counted (the router's fallbacks) and said in the operation's history."""
        self.router().record(decision)
        if decision.fallback:
            self.ledger.note_quietly(Happening.ROUTED_TO_MAIN, message.operation_id,
                                     message.position, message.step, message.host,
                                     queue=decision.queue, detail=decision.reason)

    def _not_sent(self, message: StepMessage, exc: Exception,
                  recorded_as_sent: bool = True) -> None:
        """A step the ledger has recorded could not be published: marked "not sent", for the
        looks to send again. Anything a publish raises comes here: a broker error (kombu's
        OperationalError once its retries are spent) as any other, since the transition is
        recorded and only a resend can finish it."""
        if recorded_as_sent:
            # Ledger down too: still recorded as sent, resent after resend_after.
            with contextlib.suppress(LedgerUnavailable):
                self.ledger.unpublish(message.operation_id, message.position)
        why = error_text(first_line(exc) if isinstance(exc, BROKER_ERRORS) else repr(exc))
        logger.warning("operation %s: %s@%s recorded, not sent (%s); the resend of %s "
                       "sends it once the broker answers", message.operation_id,
                       message.step, message.host, why, message.host)
        self.ledger.note_quietly(Happening.NOT_SENT, message.operation_id, message.position,
                                 message.step, message.host, detail=why)

    def send(self, message: StepMessage) -> str:
        """Decide, publish, count a fallback; returns the queue. Records nothing in the
        ledger (a duplicate sent on purpose, by a test)."""
        decision = self.route(message.step, message.host)
        self.publish(message, decision.queue)
        self._sent(message, decision)
        return decision.queue

    def again(self, message: StepMessage) -> str:
        """A step sent again (its message is lost, or was never sent): decide, send, record
        where it went; returns the queue. A refusing broker raises, for the caller to retry
        at its next look."""
        queue = self.send(message)
        self.ledger.mark_published(message.operation_id, message.position, queue)
        return queue
