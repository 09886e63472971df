"""Worker bootstep: send again the steps of this host that have no message in the broker.

One rule for every step the ledger says is in flight on this host, queued or running: once the
delivery it had is known gone and no message for it waits in its queue, it is sent again.
Steps are idempotent and the ledger applies a step's effect once, so a step that was not lost
after all runs once more and its copy is dropped.

How a step is left with no delivery:

- **queued, never sent**: its sender died between committing the step and publishing it (sent
  after ``UNPUBLISHED_GRACE`` seconds);
- **queued, lost by the broker**: on Redis a worker SIGKILLed between BRPOP and kombu recording
  the message as unacknowledged, or a failover to a replica that had not received it (sent
  after ``ORCHESTRATOR_RESEND_AFTER`` seconds, default 60, if its queue is empty);
- **running, its worker gone**: the worker that started it is down, or was restarted since
  (on Redis its message waits out the visibility timeout, an hour by default; on RabbitMQ it
  is back in the queue at once, and then nothing is sent);
- **running, its delivery lost**: the worker that started it is this one, and it no longer
  holds the message (a delivery acknowledged or dropped without its outcome recorded);
- **held**: a worker whose code does not register the step took its message and recorded it
  so (``workers.held``): sent at once once a live worker of its host serves it.

A step is sent only where it can run: by a host's own worker if its code registers the step;
by the fleet's looks if a live worker of the step's host registered it (or, with none live,
if the looking worker's code does, and its routing.yaml routes it).

A running step is looked at after :func:`running_grace` seconds, a stale heartbeat only once
it is confirmed (``ServiceView.unconfirmed``: not while the ledger was unreachable).

Who looks: a host's worker at its own steps only while it has work (for
:meth:`StrandedSteps.quiet_after` seconds after a step it ran or ended: the one case no other
process can see is a delivery this worker lost), and the worker holding the fleet's lease at
every host's (``workers.fleet``). An idle host asks nothing.
"""

from __future__ import annotations

import time

from celery.utils.log import get_logger

from orchestrator import looks
from orchestrator.broker import queue_depth
from orchestrator.dispatch import StepMessage
from orchestrator.ledger.states import Happening
from orchestrator.ledger.store import step_task_id
from orchestrator.looks import running_grace
from orchestrator.redact import error_text
from orchestrator.registry import ServiceView, by_host, unserved
from orchestrator.seams import celery_internals as celery_seam
from workers.hoststep import HostTimerStep

logger = get_logger(__name__)


def delivery_gone(
    operation_id: str, position: int, worker: str | None, started_at: float | None, *,
    me: str, registered_at: float, held: set[str], views: list[ServiceView],
) -> str | None:
    """Why the running step's delivery is known gone, or None while a live worker may still
    run it. ``me``: this worker's name, registered at ``registered_at``, holding the requests
    ``held`` (task ids); ``views``: the registry."""
    if worker is None or started_at is None:
        return None
    if worker == me:
        if started_at < registered_at:
            return "the worker that ran it restarted since"
        if step_task_id(operation_id, position) not in held:
            return "this worker no longer holds its message"
        return None
    view = next((v for v in views if v.nodename == worker), None)
    if view is None:
        return None
    if view.started_at > started_at:
        return f"{worker} restarted since"
    if view.state == "down":
        return f"{worker} is down"
    return None


class StrandedSteps(HostTimerStep):
    label = "StrandedSteps"

    def __init__(self, worker, **kwargs) -> None:
        super().__init__(worker, **kwargs)
        self.nodename = getattr(worker, "hostname", "")
        #: Steps this worker sent again (``orchestrator_steps_recovered``).
        self.recovered = 0
        #: Until when (monotonic clock) this host's own steps are looked at, and whether a
        #: look is still owed (until one succeeds after that).
        self.busy_until = 0.0
        self.owed = False

    def start(self, worker) -> None:
        super().start(worker)
        self.nodename = worker.hostname
        self.service = worker.host_service
        # Not busy at start: what a previous run of this worker left behind (steps it ran,
        # steps held for code like this) the fleet's looks find (``delivery_gone``: "the
        # worker that ran it restarted since"; ``_served``: the registry says it serves it).
        worker.stranded_steps = self  # its count, in orchestrator_status

    @property
    def quiet_after(self) -> float:
        """How long after its last step a worker still looks at its host: until a step it ran
        and lost the delivery of would be found."""
        return running_grace(self.orch.settings.heartbeat_interval) + 2 * self.interval

    def touch(self) -> None:
        """A step was accepted or ended here (workers.request.StepRequest): keep looking."""
        if self.orch is not None:
            self.busy_until = max(self.busy_until, time.monotonic() + self.quiet_after)
            self.owed = True

    def tick(self) -> None:
        # Busy until a look has succeeded past the window: a tick skipped (the ledger
        # unreachable) or failed meanwhile does not end it, or a delivery this worker lost
        # during an outage would never be found.
        if self.owed:
            self.look(self.host)
            self.owed = time.monotonic() < self.busy_until

    def look(self, host: str | None) -> None:
        """Send again the steps of ``host`` (None: of every host) known to have no message."""
        held = {r.id for r in celery_seam.reserved_requests()}  # before the ledger read
        orch = self.orch
        stranded = looks.stranded(orch.ledger, orch.settings, host)
        if not stranded:
            return
        running = [op for op in stranded if op.step_state == "running"]
        attempts = orch.ledger.step_attempts(running)
        # The registry, only where it is asked: running steps' workers, other hosts' code.
        everyone = orch.registry.services() if running or host is None else []
        grouped = by_host(everyone)
        views = everyone if running else []
        if views:  # silent workers asked over the broker
            ran = {worker for worker, _ in attempts.values()}
            views = self.service.witness.revise([v for v in views if v.nodename in ran])
        registered_at = self.service.started_at
        for op in stranded:
            if step_task_id(op.id, op.position) in held:
                continue  # this worker holds its message (fetched, not yet started)
            if not self._served(*op.current, grouped):
                continue  # left to a worker that serves it, or that can route it
            if op.step_state == "held":
                why = "held for a worker that serves it, and this one does"
            elif op.step_state == "running":
                why = delivery_gone(op.id, op.position, *attempts.get(op.id, (None, None)),
                                    me=self.nodename, registered_at=registered_at, held=held,
                                    views=views)
                if why is None:
                    continue
            elif not op.next_published:
                why = "it was never sent"
            else:
                why = "no message for it in the broker"
            try:
                self._resend(op, why)
            except Exception as exc:  # one step must not stop the look at the others
                if host is not None:
                    raise
                logger.warning("fleet looks: %s of %s not resent: %s", op.current[0], op.id,
                               error_text(exc))

    def _served(self, step: str, host: str, grouped: dict[str, list[ServiceView]]) -> bool:
        """Whether this worker should send ``step`` to ``host``, as far as code goes. For its
        own host, whether its code runs it. For another host (the fleet's looks), whether
        that host's live workers registered it (a step sent where nobody serves it is only
        held again), or with none live, whether this code does; and this worker's
        routing.yaml must route it."""
        known = self.orch.spec(step) is not None
        if host == self.host:
            return known
        if self.orch.router.table.route(step) is None:
            return False  # routing.yaml here has no entry for it: a worker of its host sends it
        live = [v for v in grouped.get(host, []) if v.state != "down"]
        return unserved(live, host, step) is None if live else known

    def _resend(self, op, why: str) -> None:
        step, host = op.current
        if (op.next_published or op.step_state == "running") and op.queue \
                and queue_depth(self.app, op.queue) > 0:
            return  # a message for it waits its turn in the queue
        if not self.orch.ledger.claim_resend(op.id, op.position, op.step_since, op.step_state):
            return
        queue = self.orch.dispatch.again(
            StepMessage(op.id, op.position, step, host, op.kind, op.subject))
        self.recovered += 1
        logger.warning("resent %s of %s to %s: %s (the step was %s)", step, op.id, queue, why,
                       op.step_state)
        self.orch.ledger.note_quietly(Happening.RESENT, op.id, op.position, step, host,
                                      worker=self.nodename, queue=queue,
                                      detail=f"{why} (it was {op.step_state})")
