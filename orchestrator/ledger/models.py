"""The engine's tables: operations, their step log, events, the host service registry and the
router's fallback counts. An application keeps its own tables in its own metadata (and its own
migrations: :mod:`orchestrator.ledger.schema`); nothing here knows them.

Times are UNIX seconds (floats) so that SQLite and PostgreSQL compare them the same way.
"""

from __future__ import annotations

import time
import uuid

from sqlalchemy import JSON, Boolean, Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from orchestrator.ledger.states import ACTIVE

#: An operation in flight: its first step not started yet, or some step started.
ACTIVE_STATUSES = ACTIVE


def new_id() -> str:
    return str(uuid.uuid4())


def current_of(plan: list, position: int) -> tuple[str, str] | None:
    """The (step, host) at ``position`` of ``plan``; None once the plan is done."""
    if position >= len(plan):
        return None
    step, host = plan[position]
    return step, host


class Base(DeclarativeBase):
    pass


class Operation(Base):
    """One request, run as a plan of steps; ``position`` is the step queued or running."""

    __tablename__ = "operations"
    __table_args__ = (
        Index("ix_operations_status", "status"),
        Index("ix_operations_current_host", "current_host", "status", "step_state"),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    #: The flow's name.
    kind: Mapped[str] = mapped_column(String(64))
    #: The host of the step at ``position`` (None once the plan is done): what a worker's
    #: periodic lookups (event waits, stranded steps) select on, through an index.
    current_host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: What must not run two operations at once (an instance, a volume...), or None.
    subject: Mapped[str | None] = mapped_column(String(255), nullable=True, index=True)
    #: ``subject`` while the operation is in flight, None once it ended: the unique index is
    #: what refuses a second operation on a busy subject, even between two racing submits.
    holds: Mapped[str | None] = mapped_column(String(255), nullable=True, unique=True)
    #: queued (first step not started), running, completed, failed.
    status: Mapped[str] = mapped_column(String(16), default="queued")
    #: ``[[step, host], ...]``: the flow's roles resolved to hosts at submission.
    plan: Mapped[list] = mapped_column(JSON)
    #: The roles and their hosts (``{"source": "node1", "dest": "node2"}``).
    hosts: Mapped[dict] = mapped_column(JSON, default=dict)
    position: Mapped[int] = mapped_column(Integer, default=0)
    #: State of the step at ``position``: queued (a message waits for it), running, or
    #: waiting (its work is done and it waits for an event, holding no worker).
    step_state: Mapped[str] = mapped_column(String(16), default="queued")
    #: When the step at ``position`` entered its ``step_state`` (queued: when last sent).
    step_since: Mapped[float] = mapped_column(Float, default=time.time)
    #: False between advancing ``position`` and the broker accepting that step's message:
    #: a redelivered step that finds it False publishes the next step again.
    next_published: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The queue the step at ``position`` was sent to (``<host>`` or ``<host>-alt``).
    queue: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: The request's parameters, and what each step returned (merged in, in order).
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    #: The event the step at ``position`` waits for: name, key, since, deadline.
    wait: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    #: What the operation returns to its caller, when an application sets it.
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    #: The flow's rollback as it was at submit: ``{"on": [steps], "plan": [[step, host]]}``
    #: (None for an operation submitted before it was recorded: the flow's is used).
    rollback: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    #: Why a step failed; with rollback steps still to run the operation is still running.
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time, onupdate=time.time)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: The W3C traceparent of its submit's span, when traced (orchestrator.tracing): what is
    #: sent or noted for it where no span of it is current (a resend, a drain's hand-back)
    #: joins its trace. Written by the submit, read off the normal path only.
    trace: Mapped[str | None] = mapped_column(String(64), nullable=True)

    @property
    def current(self) -> tuple[str, str] | None:
        return current_of(self.plan, self.position)

    def remaining_hosts(self) -> set[str]:
        return {host for _, host in self.plan[self.position :]}


class OperationHost(Base):
    """A host an operation's plan names, and the last position it has there: the operation
    still needs ``host`` while its ``position`` is at most ``last_position``. Lets a draining
    worker ask for its own host's operations through an index, not scan the fleet's."""

    __tablename__ = "operation_hosts"
    __table_args__ = (Index("ix_operation_hosts_host", "host", "last_position"),)
    operation_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    last_position: Mapped[int] = mapped_column(Integer)


class Event(Base):
    """An event delivered for a key (an instance, a volume...): what a waiting step waits for."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("operation_id"), Index("ix_events_key_name", "key", "name"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(64))
    #: The operation that delivered it (one event per operation, however often it ran).
    operation_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    received_at: Mapped[float] = mapped_column(Float, default=time.time)


class StepRecord(Base):
    """The step log: one row per (operation, position), however many times it was delivered."""

    __tablename__ = "step_log"
    __table_args__ = (UniqueConstraint("operation_id", "position"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    operation_id: Mapped[str] = mapped_column(String(36))
    position: Mapped[int] = mapped_column(Integer)
    step: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    #: running, waiting, completed, failed.
    status: Mapped[str] = mapped_column(String(16))
    #: Deliveries that started this step (more than 1: redelivered after a stop or a crash).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Times the step's effect was applied: must never exceed 1.
    applied: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: The queue the last counted delivery came from (``<host>`` or ``<host>-alt``).
    queue: Mapped[str | None] = mapped_column(String(255), nullable=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class HistoryEntry(Base):
    """What happened to an operation off its normal path (:class:`Happening`): a step handed
    back by a drain, held, resent, retried, waiting for an event, a rollback started. With the
    step log (one row per step, however often delivered) it is the operation's timeline. The
    normal path writes none: a step that runs and completes costs the step log's row only."""

    __tablename__ = "history"
    __table_args__ = (Index("ix_history_operation", "operation_id", "at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    operation_id: Mapped[str] = mapped_column(String(36))
    at: Mapped[float] = mapped_column(Float)
    #: A :class:`~orchestrator.ledger.states.Happening`.
    kind: Mapped[str] = mapped_column(String(32))
    position: Mapped[int | None] = mapped_column(Integer, nullable=True)
    step: Mapped[str | None] = mapped_column(String(64), nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: The worker that saw it happen (its nodename), and the queue concerned.
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    queue: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: Why, in a line (an error, the drain's reason, the event waited for).
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class Service(Base):
    """A worker process serving a host: what it consumes and whether it is up or draining."""

    __tablename__ = "services"
    nodename: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), index=True)
    version: Mapped[int] = mapped_column(Integer)
    consumes_main: Mapped[bool] = mapped_column(Boolean)
    consumes_alt: Mapped[bool] = mapped_column(Boolean)
    #: up, draining, down (as written by the worker; a stale heartbeat also means down).
    state: Mapped[str] = mapped_column(String(16))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float, default=time.time)
    heartbeat_at: Mapped[float] = mapped_column(Float, default=time.time)
    drain_started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: The step names its code runs (aliases included), and the code's version or fingerprint.
    steps: Mapped[list | None] = mapped_column(JSON, nullable=True)
    code_version: Mapped[str | None] = mapped_column(String(64), nullable=True)


class RoutingFallback(Base):
    """Alt steps the router sent to ``<host>`` instead of ``<host>-alt``, fleet-wide, by reason
    (no-alt: the host's service does not consume its alt queue; unknown-host; forced-main)."""

    __tablename__ = "routing_fallbacks"
    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    reason: Mapped[str] = mapped_column(String(32), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)
    last_step: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Drain(Base):
    """One drain of one worker: when it began, its deadline, what it waits for (refreshed while
    it lasts) and how it ended: done (nothing left), deadline, second SIGTERM; a row never ended
    whose worker is gone was ended by the exit deadline or a kill."""

    __tablename__ = "drains"
    __table_args__ = (Index("ix_drains_host", "host", "started_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    nodename: Mapped[str] = mapped_column(String(255))
    host: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[float] = mapped_column(Float)
    deadline_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: done, deadline, second-sigterm (None while it lasts).
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    handed_back: Mapped[int] = mapped_column(Integer, default=0)
    #: {"running": [...], "operations": [...], "blocked": [...]}, as last checked.
    waiting: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class Lease(Base):
    """A fleet-wide job one worker does for every host, taken for a while and renewed
    (``orchestrator.ledger.lease``): who holds it, until when, how many times it changed hands,
    and how often a worker that does not hold it asks again (set by the holder from the
    fleet's size, so the fleet's asking stays the same whatever its size)."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(255), nullable=True)
    expires_at: Mapped[float] = mapped_column(Float, default=0.0)
    term: Mapped[int] = mapped_column(Integer, default=0)
    check_every: Mapped[float] = mapped_column(Float, default=0.0)
