"""Worker bootstep: the looks done once for the whole fleet, by the worker holding its lease.

Steps that lost their message (never sent, lost by the broker, their worker gone, held for a
worker that serves them) and event waits past their deadline can be on any host, including a
host whose worker is idle, dead or gone. Looking for them from every host's worker every two
seconds cost an idle fleet of 10,000 hosts 10,000 ledger queries a second for nothing. Here one
worker, the holder of the ``fleet-looks`` lease (:mod:`orchestrator.ledger.lease`), looks for
every host every ``LOOK_SECONDS`` with the same code a host's worker runs for itself
(:meth:`workers.resend.StrandedSteps.look`, :meth:`workers.waits.EventWaits.look`); a host's
own worker looks only while it has work in flight.

Every other worker's heartbeat reads when the lease runs out (``workers.heartbeat``), and a
worker asks for it once it saw it free, or, in a fleet too small for its heartbeats to notice
soon, at the pace the holder sets from the fleet's size
(:func:`orchestrator.ledger.lease.check_every`): an added host adds nearly nothing, and when
the holder dies, the lease runs out after ``LEASE_SECONDS`` (:mod:`orchestrator.looks`) and
the next worker to see it free takes it. A worker that stops gives the lease up. Two holders
at once (a holder that has not yet noticed its lease ran out) only look twice: each resend
and each settled wait is a guarded transition one of them wins.
"""

from __future__ import annotations

from celery.utils.log import get_logger

from orchestrator.ledger.lease import LeaseHolder
from orchestrator.looks import LOOK_SECONDS, fleet_lease
from orchestrator.redact import error_text
from workers.hoststep import HostTimerStep

logger = get_logger(__name__)


class FleetLooks(HostTimerStep):
    label = "FleetLooks"
    requires = ("workers.resend:StrandedSteps", "workers.waits:EventWaits")
    interval = LOOK_SECONDS

    def __init__(self, worker, **kwargs) -> None:
        super().__init__(worker, **kwargs)
        self.lease: LeaseHolder | None = None

    def start(self, worker) -> None:
        super().start(worker)
        if self.orch is None:
            return
        self.stranded = worker.stranded_steps
        self.waits = worker.event_waits
        self.lease = fleet_lease(self.orch.leases, worker.hostname,
                                 self.orch.settings.heartbeat_interval)
        if worker.host_service.heartbeat is not None:
            worker.host_service.heartbeat.watch(self.lease)
        self.lease.first_ask_within(worker.host_service.fleet_size)
        worker.fleet_looks = self

    def tick(self) -> None:
        lease = self.lease
        was = lease.holding
        if lease.hold() != was:
            if was:
                logger.warning("fleet looks: %s lost the lease to %s", lease.me,
                               lease.last.holder if lease.last else "?")
            else:
                logger.info("fleet looks: %s holds the lease (term %d)", lease.me,
                            lease.last.term)
        if lease.holding:
            self.stranded.look(None)
            self.waits.look(None)

    def stop(self, worker) -> None:
        super().stop(worker)
        if self.lease is not None:
            try:
                self.lease.give_up()
            except Exception as exc:  # the ledger may be what failed: the lease runs out
                logger.info("fleet looks: lease not given back (%s)", error_text(exc))

    terminate = stop
