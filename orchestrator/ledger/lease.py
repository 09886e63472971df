"""Leases: a job done once for the whole fleet, by whichever worker holds its lease.

A lease is a row (``leases``): who holds it and until when. The holder renews it well before
it runs out; any other worker takes it once it has run out, so a holder that dies (SIGKILL, a
partition, a ledger it cannot reach) hands it over within ``ttl`` seconds plus a check.

A row, not a PostgreSQL advisory lock: a session-level advisory lock belongs to one server
connection, which a pooler in transaction mode (PgBouncer, the way to run thousands of
workers on one PostgreSQL) hands to another client after each transaction, and a blocked
``pg_advisory_lock`` would hold a connection per waiting worker. A row works the same on SQLite
and PostgreSQL, through a pooler, and costs a statement only when asked.

Two holders at once (clocks that disagree, a holder that does not yet know it lost) cost only
duplicate work: every change a fleet-wide job makes is a guarded ledger transition
(``Ledger.claim_resend``, ``Ledger.complete``) that one process wins.

How often a worker that does not hold a lease asks for it is set by the holder from the
fleet's size (:func:`check_every`): the fleet as a whole asks about
``fleet_checks_per_second`` times a second, so an added idle host adds nearly nothing, and a
dead holder is replaced within seconds at any size. A worker whose heartbeat reads when the
lease runs out, in the heartbeat's own transaction (:meth:`LeaseHolder.watched_every`), asks
only once it saw it run out: past the size where the fleet's heartbeats read the lease more
often than its asks would (about 15 workers beating every 60 s), the asks cost nothing but a
backstop every :data:`BACKSTOP_SECONDS`, and a dead holder is noticed sooner the larger
the fleet.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from sqlalchemy import bindparam, case, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from orchestrator.ledger.engines import Database
from orchestrator.ledger.models import Lease, Service

_leases = Lease.__table__
_services = Service.__table__

# Parameters named after no column: an UPDATE's SET takes those.
_TAKE = update(_leases).where(
    _leases.c.name == bindparam("lease"),
    or_(_leases.c.holder == bindparam("me"), _leases.c.expires_at < bindparam("now")),
).values(
    holder=bindparam("me"), expires_at=bindparam("until"), check_every=bindparam("every"),
    term=case((_leases.c.holder == bindparam("me"), _leases.c.term), else_=_leases.c.term + 1),
).returning(_leases.c.term)
_FIRST = insert(_leases).values(
    name=bindparam("lease"), holder=bindparam("me"), expires_at=bindparam("until"), term=1,
    check_every=bindparam("every"))
_READ = select(_leases.c.holder, _leases.c.expires_at, _leases.c.term,
               _leases.c.check_every).where(_leases.c.name == bindparam("lease"))
#: When the lease runs out: what a heartbeat reads beside its own write (``Registry.heartbeat``).
EXPIRY = select(_leases.c.expires_at).where(_leases.c.name == bindparam("lease"))
_RELEASE = update(_leases).where(
    _leases.c.name == bindparam("lease"), _leases.c.holder == bindparam("me"),
).values(expires_at=0.0)
#: Workers whose heartbeat is recent and that are not down: the fleet's size (registering
#: says it too: ``Registry.register``).
LIVE_WORKERS = _LIVE = select(func.count()).select_from(_services).where(
    _services.c.state != "down", _services.c.heartbeat_at >= bindparam("since"))


#: A worker that does not hold a lease asks at least this often, whatever the fleet's size:
#: after a fleet shrinks (10,000 workers to 10, the holder among those gone), the survivors
#: ask within this, not within the hours the old size set. 10,000 workers then ask 11 times
#: a second in all (0.0011 a second each).
MAX_CHECK_SECONDS = 900.0
#: A worker whose heartbeat watches the lease (:meth:`LeaseHolder.watched_every`) and finds
#: it held asks at least this often all the same: a backstop, since its beats see the lease
#: free within a heartbeat interval of its running out, whatever the fleet's size.
BACKSTOP_SECONDS = 3600.0


def check_every(live_workers: int, *, floor: float, fleet_checks_per_second: float) -> float:
    """Seconds between two asks of one worker that does not hold a lease: the fleet's asks
    spread to ``fleet_checks_per_second`` in all, never more often than ``floor``, never less
    often than :data:`MAX_CHECK_SECONDS`."""
    return min(MAX_CHECK_SECONDS, max(floor, live_workers / fleet_checks_per_second))


@dataclass(frozen=True)
class Claim:
    """What one ask said: whether the asker holds the lease now (until ``expires_at``, its
    own clock), who does, and when to ask again if not."""

    held: bool
    holder: str | None
    expires_at: float
    term: int
    check_every: float


class Leases:
    """The ``leases`` table of one database."""

    def __init__(self, database: Database) -> None:
        self.db = database

    def claim(self, name: str, me: str, ttl: float, *, live_since: float,
              floor: float, fleet_checks_per_second: float) -> Claim:
        """Take or renew lease ``name`` for ``ttl`` seconds if it is free, run out or
        ``me``'s; else say who holds it. One transaction: the fleet's size (workers heard
        since ``live_since``), the take, and if it was not taken, the row."""
        now = time.time()
        until = now + ttl
        try:
            with self.db.direct_transaction() as run:
                live = run(_LIVE, since=live_since)[0][0]
                every = check_every(live, floor=floor,
                                    fleet_checks_per_second=fleet_checks_per_second)
                taken = run(_TAKE, lease=name, me=me, now=now, until=until, every=every)
                if taken:
                    return Claim(True, me, until, taken[0][0], every)
                row = run(_READ, lease=name)
                if not row:
                    run(_FIRST, lease=name, me=me, until=until, every=every)
                    return Claim(True, me, until, 1, every)
        except IntegrityError:  # another worker made the row first: it holds it
            return Claim(False, None, until, 0, floor)
        holder, expires_at, term, every = row[0]
        return Claim(False, holder, expires_at, term, every or floor)

    def release(self, name: str, me: str) -> None:
        """Give the lease up (a worker stopping): the next worker to ask takes it."""
        self.db.direct(_RELEASE, lease=name, me=me)

    def read(self, name: str) -> Claim | None:
        """Who holds ``name``, for the views (None: nobody ever took it)."""
        rows = self.db.direct(_READ, lease=name)
        if not rows:
            return None
        holder, expires_at, term, every = rows[0]
        return Claim(expires_at > time.time(), holder, expires_at, term, every)


class LeaseHolder:
    """One worker's side of a lease: whether it holds it now, renewed every ``renew``
    seconds while it does, asked for at the pace the holder set while it does not.

    ``live_window``: how recent a heartbeat counts a worker in the fleet's size (the
    registry's staleness)."""

    def __init__(self, leases: Leases, name: str, me: str, *, ttl: float, renew: float,
                 floor: float, fleet_checks_per_second: float, live_window: float) -> None:
        self.leases, self.name, self.me = leases, name, me
        self.ttl, self.renew, self.live_window = ttl, renew, live_window
        self.floor, self.rate = floor, fleet_checks_per_second
        #: Until when (wall clock) this worker holds the lease, as its last ask said.
        self.until = 0.0
        self.renew_at = 0.0
        #: When (monotonic clock) this worker asks again while it does not hold it.
        self.ask_at = 0.0
        self.last: Claim | None = None
        #: Seconds between two reads of the lease's expiry by this worker's heartbeat (None:
        #: nothing reads it but the asks).
        self.watched: float | None = None

    def watched_every(self, seconds: float) -> None:
        """This worker's heartbeat reads the lease's expiry every ``seconds`` and says what
        it read (:meth:`seen`): asks on a schedule are then needed only while the fleet is
        too small for its heartbeats to notice a free lease as soon as its asks would."""
        self.watched = seconds

    def seen(self, expires_at: float | None) -> None:
        """What a heartbeat read: the lease runs out at ``expires_at`` (None: nobody took it
        yet). A free one is asked for at this worker's next :meth:`hold`."""
        if (expires_at is None or expires_at <= time.time()) and not self.holding:
            self.ask_at = 0.0

    def _between_asks(self, every: float) -> float:
        """Seconds from an ask to the next while not holding: ``every`` (the holder's pace),
        unless the heartbeats watch the lease at least as often, when asking is only a
        backstop (:data:`BACKSTOP_SECONDS`)."""
        if self.watched is not None and every >= self.watched:
            return BACKSTOP_SECONDS
        return every

    @property
    def holding(self) -> bool:
        return time.time() < self.until

    def hold(self) -> bool:
        """Whether this worker holds the lease now: renewed when due, asked for when this
        worker's turn to ask has come; no statement otherwise."""
        now = time.time()
        if now < self.until:
            if now >= self.renew_at:
                self.ask()
            return self.holding
        if time.monotonic() < self.ask_at:
            return False
        self.ask()
        return self.holding

    def ask(self) -> Claim:
        claim = self.last = self.leases.claim(
            self.name, self.me, self.ttl, live_since=time.time() - self.live_window,
            floor=self.floor, fleet_checks_per_second=self.rate)
        if claim.held:
            self.until, self.renew_at = claim.expires_at, time.time() + self.renew
        else:
            self.until = 0.0
            # Spread over the interval, so that a fleet started at once does not ask at once.
            self.ask_at = time.monotonic() + self._between_asks(
                claim.check_every) * random.uniform(0.5, 1.5)
        return claim

    def first_ask_within(self, fleet_size: int) -> None:
        """A worker joining a fleet of ``fleet_size`` first asks at a random point of the
        interval the holder would set: a fleet started at once asks at its usual pace, not
        all in the same second."""
        every = check_every(fleet_size, floor=self.floor, fleet_checks_per_second=self.rate)
        self.ask_at = time.monotonic() + random.uniform(0, self._between_asks(every))

    def give_up(self) -> None:
        """Release the lease if held (a worker stopping): the next worker to ask takes it."""
        if self.holding:
            self.until = 0.0
            self.leases.release(self.name, self.me)
