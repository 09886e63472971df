"""Tables: instances, migrations, operations, their step log, and the host service registry.

Times are UNIX seconds (floats) so that SQLite and PostgreSQL compare them the same way.
"""

from __future__ import annotations

import time
import uuid

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    pass


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    host: Mapped[str] = mapped_column(String(255))
    flavor: Mapped[str] = mapped_column(String(64))
    #: Nova's vm_state: building, active, resized, error.
    vm_state: Mapped[str] = mapped_column(String(32))
    #: Nova's task_state (None when idle): resize_prep, resize_migrating, resize_finish, ...
    task_state: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time, onupdate=time.time)


class Migration(Base):
    __tablename__ = "migrations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.id"))
    source: Mapped[str] = mapped_column(String(255))
    dest: Mapped[str] = mapped_column(String(255))
    old_flavor: Mapped[str] = mapped_column(String(64))
    new_flavor: Mapped[str] = mapped_column(String(64))
    #: resize, migration (cold), live-migration; cross-cell resizes have ``cross_cell``.
    migration_type: Mapped[str] = mapped_column(String(32), default="resize")
    cross_cell: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Resize: pre-migrating, migrating, post-migrating, finished, confirmed, reverting,
    #: reverted, error. Live migration: queued, preparing, running, completed, error, cancelled.
    status: Mapped[str] = mapped_column(String(32))
    #: Set by live_migration_force_complete / live_migration_abort; polled by live_migration.
    force_complete: Mapped[bool] = mapped_column(Boolean, default=False)
    abort_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time, onupdate=time.time)


class Operation(Base):
    """One user request, run as a plan of steps; ``position`` is the step queued or running."""

    __tablename__ = "operations"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(64))
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.id"))
    migration_id: Mapped[int | None] = mapped_column(ForeignKey("migrations.id"), nullable=True)
    #: queued (first step not started), running, completed, failed.
    status: Mapped[str] = mapped_column(String(16), default="queued")
    #: ``[[step, host], ...]`` resolved at submission (see orchestrator.flows).
    plan: Mapped[list] = mapped_column(JSON)
    position: Mapped[int] = mapped_column(Integer, default=0)
    #: State of the step at ``position``: queued (a message waits for it), running, or
    #: waiting (its work is done and it waits for an external event, holding no worker).
    step_state: Mapped[str] = mapped_column(String(16), default="queued")
    #: When the step at ``position`` entered its ``step_state`` (queued: when last sent).
    step_since: Mapped[float] = mapped_column(Float, default=time.time)
    #: False between advancing ``position`` and the broker accepting that step's message:
    #: a redelivered step that finds it False publishes the next step again.
    next_published: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The queue the step at ``position`` was sent to (``<host>`` or ``<host>-alt``).
    queue: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: Hosts by role, and request details (event name, console type...).
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    #: What the operation returns to the user (console output or URL).
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    #: Why a step failed; with rollback steps still to run the operation is still running.
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time, onupdate=time.time)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    @property
    def current(self) -> tuple[str, str] | None:
        if self.position >= len(self.plan):
            return None
        step, host = self.plan[self.position]
        return step, host

    def remaining_hosts(self) -> set[str]:
        return {host for _, host in self.plan[self.position :]}


class InstanceEvent(Base):
    """An external event (network-vif-plugged...) delivered to the instance's host."""

    __tablename__ = "instance_events"
    __table_args__ = (UniqueConstraint("operation_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.id"), index=True)
    operation_id: Mapped[str] = mapped_column(ForeignKey("operations.id"))
    name: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    received_at: Mapped[float] = mapped_column(Float, default=time.time)


class StepRecord(Base):
    """The step log: one row per (operation, position), however many times it was delivered."""

    __tablename__ = "step_log"
    __table_args__ = (UniqueConstraint("operation_id", "position"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    operation_id: Mapped[str] = mapped_column(ForeignKey("operations.id"))
    position: Mapped[int] = mapped_column(Integer)
    step: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    #: running, completed, failed.
    status: Mapped[str] = mapped_column(String(16))
    #: Deliveries that started this step (more than 1: redelivered after a stop or a crash).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Times the step's effect was applied: must never exceed 1.
    applied: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


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


class RoutingFallback(Base):
    """Alt steps the router sent to ``<host>`` instead of ``<host>-alt``, fleet-wide, by reason
    (no-alt: the host's service does not consume its alt queue; unknown-host; forced-main)."""

    __tablename__ = "routing_fallbacks"
    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    reason: Mapped[str] = mapped_column(String(32), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)
    last_step: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_at: Mapped[float | None] = mapped_column(Float, nullable=True)
