"""The looks: what a worker asks the ledger to find the steps that need someone.

A step may be left with no message (never sent, lost by the broker, its worker gone, held for
a worker that serves it) or wait for an event until its deadline. A host's worker asks this
about its own host while it has work in flight; the holder of the fleet's lease
(:func:`fleet_lease`) asks about every host every :data:`LOOK_SECONDS`; an idle host asks
nothing. These are the statements and timings both run, and what the scale bed
(``orchestrator.testing.scale``) runs for its simulated hosts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestrator.config import Settings
from orchestrator.ledger.lease import LeaseHolder, Leases
from orchestrator.ledger.models import Operation
from orchestrator.ledger.store import Ledger, Settled
from orchestrator.registry import STALE_AFTER

#: A step not published after this long lost its sender.
UNPUBLISHED_GRACE = 5.0
#: The fleet's lease, in the ledger.
FLEET_LEASE = "fleet-looks"
#: How often the lease's holder looks at every host: a step whose sender died is sent within
#: this of its UNPUBLISHED_GRACE; two statements each time, the fleet's main fixed cost.
LOOK_SECONDS = 5.0
#: How long the lease lasts without renewal: how long a dead holder's looks go undone.
LEASE_SECONDS = 15.0
#: How often the holder renews it.
RENEW_SECONDS = 5.0
#: A worker that does not hold the lease asks for it at most this often ...
MIN_ASK_SECONDS = 5.0
#: ... and the fleet's workers, together, about this many times a second.
FLEET_ASKS_PER_SECOND = 0.25


def running_grace(heartbeat_interval: float) -> float:
    """How long a step is recorded as running before its delivery is questioned: long
    enough for a stale heartbeat to be noticed."""
    return max(10.0, (STALE_AFTER + 1) * heartbeat_interval)


def fleet_lease(leases: Leases, me: str, heartbeat_interval: float) -> LeaseHolder:
    """The fleet's lease as the worker named ``me`` holds or asks for it."""
    return LeaseHolder(
        leases, FLEET_LEASE, me, ttl=LEASE_SECONDS, renew=RENEW_SECONDS,
        floor=MIN_ASK_SECONDS, fleet_checks_per_second=FLEET_ASKS_PER_SECOND,
        live_window=STALE_AFTER * heartbeat_interval)


def stranded(ledger: Ledger, settings: Settings, host: str | None) -> list[Operation]:
    """The operations of ``host`` (None: every host) whose current step may have no message."""
    return ledger.stranded_steps(host, UNPUBLISHED_GRACE, settings.resend_after,
                                 running_grace(settings.heartbeat_interval))


def settle_waits(ledger: Ledger, host: str | None, spec_of: Callable[[str], Any]) -> Settled:
    """Settle the event waits of ``host`` (None: every host) whose event came or whose
    deadline passed, for the steps ``spec_of`` knows (None: left to a worker that does)."""
    return ledger.settle_waits(host, lambda step: spec_of(step).effect,
                               lambda step: spec_of(step).on_failure,
                               lambda step: spec_of(step) is not None)
