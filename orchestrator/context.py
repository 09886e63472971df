"""What a step function is given, and what the engine keeps of a registered step.

A leaf module: the step runner in a worker (``orchestrator.runner``) and the public API
(``orchestrator.api``) both use it, and neither imports the other through it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import DefinitionError
from orchestrator.ledger.store import Effect, no_effect

#: The operation whose step this thread runs now (set by the step runner around the step's
#: function): a submit made from a step is part of that operation's progress, and a broker
#: that refuses its first publish leaves it for the resend instead of failing it
#: (orchestrator.dispatch). Celery's ``current_worker_task`` would say so of any task.
running_step: ContextVar[str | None] = ContextVar("running_step", default=None)


@dataclass
class StepContext:
    """What a step function gets: where it runs and what its operation carries."""

    #: The :class:`orchestrator.Orchestrator` the step belongs to.
    orchestrator: Any
    step: str
    host: str
    operation_id: str
    position: int
    #: Deliveries of this step so far, this one included (more than 1: redelivered).
    attempt: int
    #: The request's params, with what the earlier steps returned merged in.
    params: dict[str, Any]
    #: The flow's roles and their hosts.
    hosts: dict[str, str]
    flow: str = ""
    subject: str | None = None
    #: Set by :meth:`wait_for`.
    waiting: tuple[str, str, float] | None = field(default=None, repr=False)

    def wait_for(self, event_name: str, timeout: float, key: str | None = None) -> None:
        """Once this step returns, park it until ``event_name`` is delivered for ``key``
        (default: the operation's subject) with :meth:`Orchestrator.deliver_event` or
        :meth:`Orchestrator.record_event`; fail it after ``timeout`` seconds. The step holds
        no worker while it waits, and a draining host keeps waiting for it."""
        key = key if key is not None else self.subject
        if not key:
            raise DefinitionError(
                f"step {self.step!r}: wait_for({event_name!r}) needs a key (the operation "
                "has no subject)"
            )
        self.waiting = (event_name, key, float(timeout))


@dataclass(frozen=True)
class StepSpec:
    name: str
    fn: Callable[[StepContext], Any]
    task: Any
    effect: Effect = no_effect
    on_failure: Effect = no_effect
