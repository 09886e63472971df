"""The service registry: which worker serves which host, on which queues, in which state.

Each worker writes its own row (up at start, draining on SIGTERM, down at exit) and refreshes a
heartbeat; a heartbeat older than ``STALE_AFTER`` heartbeat intervals counts as down, since a
killed worker writes nothing, unless the reader itself could not reach the ledger meanwhile
(:meth:`orchestrator.ledger.health.LedgerHealth.excuses_silence`): a heartbeat nobody could write
says nothing of its writer. The drain reads it to tell an operation that can still progress
from one whose next step waits on a queue nobody consumes.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError

from orchestrator.ledger.engines import Database
from orchestrator.ledger.health import LedgerHealth
from orchestrator.ledger.lease import EXPIRY, LIVE_WORKERS
from orchestrator.ledger.models import Drain, RoutingFallback, Service
from orchestrator.routing import AltSnapshot, AltStatus, Decision, split_queue

#: Version 2 consumes ``<host>-alt``; version 1 (legacy) consumes only ``<host>``.
SERVICE_VERSION = 2
LEGACY_SERVICE_VERSION = 1
#: The first service version that can consume ``<host>-alt``.
ALT_SERVICE_VERSION = 2
SERVICE_VERSIONS = (LEGACY_SERVICE_VERSION, SERVICE_VERSION)
STALE_AFTER = 3.0


@dataclass(frozen=True)
class ServiceView:
    nodename: str
    host: str
    version: int
    consumes_main: bool
    consumes_alt: bool
    state: str  # up, draining, down (stale heartbeats already folded into down)
    heartbeat_age: float
    started_at: float = 0.0
    #: The heartbeat is stale, but the ledger was unreachable meanwhile: not counted as down.
    unconfirmed: bool = False
    #: The state the worker last wrote (``state`` folds a stale heartbeat into down).
    recorded_state: str = ""
    #: The step names its code runs (None: a worker older than this record), its version.
    steps: frozenset[str] | None = None
    code_version: str | None = None

    def serves(self, step: str) -> bool:
        return self.steps is None or step in self.steps

    @property
    def silent(self) -> bool:
        """Counted down only for its stale heartbeat: a witness may still hear it."""
        return self.state == "down" and self.recorded_state in ("up", "draining")


@dataclass(frozen=True)
class HostConsumers:
    """Whether anyone is consuming each queue of a host right now."""

    main: bool
    alt: bool
    alive: bool

    def consumes(self, queue: str) -> bool:
        return self.alt if split_queue(queue)[1] == "alt" else self.main


def consumers(views: list[ServiceView], host: str) -> HostConsumers:
    mine = [v for v in views if v.host == host and v.state != "down"]
    return HostConsumers(
        main=any(v.consumes_main and v.state == "up" for v in mine),
        alt=any(v.consumes_alt for v in mine),
        alive=bool(mine),
    )


def unserved(views: list[ServiceView], host: str, step: str, held: bool = False) -> str | None:
    """Why ``step`` waits for a worker of ``host`` whose code serves it, or None. ``held``:
    a worker of the host took its message and its code did not register it
    (workers.held)."""
    live = _live(views, host)
    if any(v.serves(step) for v in live):
        return None
    if live:
        versions = ", ".join(sorted({v.code_version or "?" for v in live}))
        return (f"for a worker that serves {step} ({host} runs code that does not register "
                f"it: {versions})")
    if held:
        return (f"for a worker that serves {step} (held: the last worker of {host} to take "
                f"it ran code that does not register it)")
    return None


def _live(views: list[ServiceView], host: str) -> list[ServiceView]:
    return [v for v in views if v.host == host and v.state != "down"]


def advertises_alt(views: list[ServiceView], host: str) -> bool:
    """A live (up or draining) service of ``host`` recent enough to consume its alt queue, and
    consuming it. A draining version-2 host still does: that is what its alt queue is for."""
    return any(
        v.consumes_alt and v.version >= ALT_SERVICE_VERSION for v in _live(views, host)
    )


def alt_status(views: list[ServiceView], host: str) -> AltStatus:
    return alt_snapshot(views).status(host)


def by_host(views: list[ServiceView]) -> dict[str, list[ServiceView]]:
    """The services of each host: one pass, where asking each host of a fleet of 10,000
    about the whole list took 10 s."""
    out: dict[str, list[ServiceView]] = {}
    for v in views:
        out.setdefault(v.host, []).append(v)
    return out


def alt_snapshot(views: list[ServiceView]) -> AltSnapshot:
    """Every host's alt capability, from one read of the registry."""
    grouped = by_host(views)
    live, alt, silent_alt = set(), set(), {}
    for host, mine in grouped.items():
        if _live(mine, host):
            live.add(host)
        if advertises_alt(mine, host):
            alt.add(host)
        silent = tuple(v.nodename for v in mine
                       if v.silent and v.consumes_alt and v.version >= ALT_SERVICE_VERSION)
        if silent:
            silent_alt[host] = silent
    return AltSnapshot(known=frozenset(grouped), live=frozenset(live), alt=frozenset(alt),
                       silent_alt=silent_alt)


def host_state(views: list[ServiceView], host: str) -> str:
    """up (some service takes new work), draining, down, or unknown (never registered)."""
    return _state_of({v.state for v in views if v.host == host})


def host_states(views: list[ServiceView]) -> dict[str, str]:
    """:func:`host_state` of every host, in one pass."""
    return {host: _state_of({v.state for v in mine}) for host, mine in by_host(views).items()}


def _state_of(states: set[str]) -> str:
    if not states:
        return "unknown"
    return "up" if "up" in states else "draining" if "draining" in states else "down"


class Registry:
    """The ``services`` and ``routing_fallbacks`` tables of one database."""

    def __init__(self, database: Database, heartbeat_interval: float = 60.0,
                 health: LedgerHealth | None = None) -> None:
        self.db, self.heartbeat_interval = database, heartbeat_interval
        self.health = health

    def register(
        self, nodename: str, host: str, *, consumes_main: bool, consumes_alt: bool, pid: int,
        version: int = SERVICE_VERSION, steps: Iterable[str] | None = None,
        code_version: str | None = None, state: str = "up", started_at: float | None = None,
    ) -> int:
        """Write the worker's row (``state``, heartbeat now, started now unless
        ``started_at``: a worker whose row was deleted under it writes it again as it was);
        returns how many workers the fleet has, this one included (live: not down, a
        heartbeat within the staleness window)."""
        now = time.time()
        with self.db.session() as s:
            row = s.get(Service, nodename)
            if row is None:
                row = Service(nodename=nodename)
                s.add(row)
            row.host, row.version, row.pid = host, version, pid
            row.consumes_main, row.consumes_alt = consumes_main, consumes_alt
            row.state, row.heartbeat_at = state, now
            row.started_at = now if started_at is None else started_at
            row.drain_started_at = None
            row.steps = sorted(steps) if steps is not None else None
            row.code_version = code_version
            s.flush()
            return s.execute(LIVE_WORKERS, {
                "since": now - STALE_AFTER * self.heartbeat_interval}).scalar_one()

    def heartbeat(self, nodename: str, state: str | None = None,
                  lease: str | None = None) -> Beat:
        """Refresh the worker's heartbeat, and its state if given (a state change that could
        not be written when it happened, the ledger being unreachable, is written here).
        With ``lease``, read when that lease runs out in the same transaction: a worker that
        does not hold it learns it is free at no cost of its own (``LeaseHolder.seen``)."""
        beat, params = (_BEAT, {}) if state is None else (_BEAT_AND_STATE, {"new_state": state})
        if lease is None:
            return Beat(bool(self.db.direct(beat, node=nodename, at=time.time(), **params)))
        with self.db.direct_transaction() as run:
            found = bool(run(beat, node=nodename, at=time.time(), **params))
            expiry = run(EXPIRY, lease=lease)
        return Beat(found, True, expiry[0][0] if expiry else None)

    def set_state(self, nodename: str, state: str, drain_started_at: float | None = None) -> None:
        with self.db.session() as s:
            row = s.get(Service, nodename)
            if row is not None:
                row.state, row.heartbeat_at = state, time.time()
                if drain_started_at is not None:
                    row.drain_started_at = drain_started_at

    def services(self, host: str | None = None, *,
                 hosts: Collection[str] | None = None) -> list[ServiceView]:
        """Every service (``host``: that host's; ``hosts``: those hosts'), stale heartbeats
        folded into down."""
        stale = STALE_AFTER * self.heartbeat_interval
        now = time.time()
        excused = self.health is not None and self.health.excuses_silence(stale)
        with self.db.read() as s:
            # Rows, not ORM objects: a fleet's registry is 10,000 of them at every view.
            query = select(*_services.c).order_by(Service.host, Service.nodename)
            if host is not None:
                query = query.where(Service.host == host)
            if hosts is not None:
                query = query.where(Service.host.in_(sorted(set(hosts))))
            rows = s.execute(query).all()
            return [
                ServiceView(
                    nodename=r.nodename, host=r.host, version=r.version,
                    consumes_main=r.consumes_main, consumes_alt=r.consumes_alt,
                    state="down" if now - r.heartbeat_at > stale and not excused else r.state,
                    heartbeat_age=now - r.heartbeat_at, started_at=r.started_at,
                    unconfirmed=excused and now - r.heartbeat_at > stale and r.state != "down",
                    recorded_state=r.state,
                    steps=frozenset(r.steps) if r.steps is not None else None,
                    code_version=r.code_version,
                )
                for r in rows
            ]

    def known_hosts(self) -> list[str]:
        return sorted({v.host for v in self.services()})

    def alt_snapshot(self, host: str | None = None) -> AltSnapshot:
        """Every host's alt capability (``host``: that host's alone, what the router keeps
        for a while) from one registry query."""
        return alt_snapshot(self.services(host))

    def count_fallback(self, decision: Decision) -> None:
        """Record an alt step sent to ``<host>`` (one small write, only for such steps)."""
        key = {"host": decision.host, "reason": decision.reason}
        for attempt in range(2):
            try:
                with self.db.session() as s:
                    row = s.get(RoutingFallback, key)
                    if row is None:
                        row = RoutingFallback(**key, count=0)
                        s.add(row)
                    row.count += 1
                    row.last_step, row.last_at = decision.step, time.time()
                return
            except IntegrityError:  # another process inserted the row first: update it
                if attempt:
                    raise

    def fallback_counts(self) -> dict[str, dict[str, int]]:
        """Alt steps sent to ``<host>`` fleet-wide: ``{host: {reason: count}}``."""
        with self.db.read() as s:
            rows = s.execute(select(RoutingFallback)).scalars().all()
            out: dict[str, dict[str, int]] = {}
            for r in rows:
                out.setdefault(r.host, {})[r.reason] = r.count
            return out

    # -- drains ------------------------------------------------------------------------------
    def drain_started(self, nodename: str, host: str, reason: str, started_at: float,
                      deadline_at: float, waiting: dict) -> int:
        with self.db.session() as s:
            row = Drain(nodename=nodename, host=host, reason=reason[:64], started_at=started_at,
                        deadline_at=deadline_at, handed_back=0, waiting=waiting)
            s.add(row)
            s.flush()
            return row.id

    def drain_progress(self, drain_id: int, handed_back: int, waiting: dict | None = None,
                       outcome: str | None = None) -> None:
        with self.db.session() as s:
            row = s.get(Drain, drain_id)
            if row is None:
                return
            row.handed_back = handed_back
            if waiting is not None:
                row.waiting = waiting
            if outcome is not None:
                row.outcome, row.ended_at = outcome, time.time()

    def drains(self, hosts: Collection[str] | None = None, since: float | None = None,
               until: float | None = None) -> list[Drain]:
        """The drains of ``hosts`` (None: of every host) under way at some time from ``since``
        to ``until`` (None: ever; now), oldest first: an operation's hosts' drains while it
        was in flight, the fleet's of the last day."""
        if hosts is not None and not hosts:
            return []
        with self.db.read() as s:
            query = select(Drain).order_by(Drain.started_at)
            if hosts is not None:
                query = query.where(Drain.host.in_(sorted(set(hosts))))
            if since is not None:
                # One never ended is over by its deadline: its worker requeues what is left
                # and exits then, or was killed (forced) and never says so.
                query = query.where(func.coalesce(Drain.ended_at, Drain.deadline_at) >= since)
            if until is not None:
                query = query.where(Drain.started_at <= until)
            return list(s.execute(query).scalars().all())

    def drain_totals(self, hosts: Collection[str]) -> dict[str, DrainTotals]:
        """Every drain the ``hosts`` ever had, counted (what Prometheus counters need): the
        ended ones grouped in the database, the few never ended read one by one (in progress,
        or forced: their worker is gone, which the caller's registry read tells)."""
        if not hosts:
            return {}
        names = sorted(set(hosts))
        totals: dict[str, DrainTotals] = {}
        with self.db.read() as s:
            ended = s.execute(
                select(Drain.host, Drain.outcome, func.count(), func.sum(Drain.handed_back),
                       func.sum(Drain.ended_at - Drain.started_at))
                .where(Drain.host.in_(names), Drain.outcome.is_not(None))
                .group_by(Drain.host, Drain.outcome)).all()
            open_ = s.execute(select(Drain.host, Drain.nodename, Drain.handed_back).where(
                Drain.host.in_(names), Drain.outcome.is_(None))).all()
        for host, outcome, count, handed_back, seconds in ended:
            t = totals.setdefault(host, DrainTotals())
            t.ended[outcome] = t.ended.get(outcome, 0) + count
            t.handed_back += int(handed_back or 0)
            t.timed += count
            t.seconds += float(seconds or 0.0)
        for host, nodename, handed_back in open_:
            t = totals.setdefault(host, DrainTotals())
            t.handed_back += handed_back or 0
            t.unended.append(nodename)
        return totals


@dataclass(frozen=True)
class Beat:
    """What a heartbeat found: the worker's row (False: deleted by an operator or a cleanup),
    and, when asked for, when a lease runs out (None: nobody took it yet)."""

    found: bool
    read_lease: bool = False
    lease_expires_at: float | None = None


@dataclass
class DrainTotals:
    """A host's drains, all time: how many ended each way (done, deadline, second-sigterm),
    how long the ended ones took in all, the messages all of them handed back, and the
    workers of those never ended (still draining, or forced when the worker is gone)."""

    ended: dict[str, int] = field(default_factory=dict)
    timed: int = 0
    seconds: float = 0.0
    handed_back: int = 0
    unended: list[str] = field(default_factory=list)


_services = Service.__table__
#: A heartbeat, built once (parameters named after no column: an UPDATE's SET takes those).
_BEAT = update(_services).where(_services.c.nodename == bindparam("node")).values(
    heartbeat_at=bindparam("at")).returning(_services.c.nodename)
_BEAT_AND_STATE = _BEAT.values(state=bindparam("new_state"))
