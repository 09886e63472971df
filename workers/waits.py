"""Worker bootstep: finish the steps of this host that wait for an external event.

A step that called ``ctx.wait_for(event, timeout)`` waits without holding a pool process
(``Ledger.wait_for_event``): Nova's build waits for ``network-vif-plugged`` that way. Every
``interval`` seconds, while steps of its host wait, this step, in the worker's event loop,
completes the waiting steps of its host whose event has arrived and fails those past their
deadline (Nova's ``vif_plugging_timeout``), then publishes what comes next.

An idle host asks nothing: a worker looks once at its start (waits parked before it) and from
when a step it runs parks until none of the host's waits is left. A wait parked by another
process of the host (a split ``--main-only`` / ``--alt-only`` pair) or left by a host with no
worker any more is settled by the worker holding the fleet's lease (``workers.fleet``), which
looks at every host's every five seconds.
"""

from __future__ import annotations

import time

from celery.utils.log import get_logger

from orchestrator.looks import settle_waits
from workers.hoststep import IDLE_PERIOD_SECONDS, HostTimerStep, on_grid

logger = get_logger(__name__)

class EventWaits(HostTimerStep):
    label = "EventWaits"
    #: How often a host with waiting steps is checked.
    interval = 0.2

    def __init__(self, worker, **kwargs) -> None:
        super().__init__(worker, **kwargs)
        self.busy = True  # until a check says otherwise

    def start(self, worker) -> None:
        super().start(worker)
        worker.event_waits = self  # woken by workers.request.StepRequest

    def wake(self) -> None:
        """A step of this host parked to wait for an event: check at once (from the event
        loop: workers.request.StepRequest.on_success)."""
        if not self.busy:
            self.busy = True
            self._schedule(time.monotonic())

    def due(self) -> float:
        """Every ``interval`` while steps wait here; else with the worker's other periodic
        jobs, so an idle worker's loop is not woken for nothing."""
        if self.busy:
            return time.monotonic() + self.interval
        return on_grid(IDLE_PERIOD_SECONDS)  # asks nothing then

    def tick(self) -> None:
        if self.busy:
            self.busy = self.look(self.host) > 0

    def look(self, host: str | None) -> int:
        """Settle the waits of ``host`` (None: of every host) that can be; how many still
        wait."""
        orch = self.orch
        settled = settle_waits(orch.ledger, host, orch.spec)
        for operation_id, nxt in settled:
            logger.info("event wait of %s settled%s", operation_id,
                        f" on {host}" if host else " for the fleet")
            orch.advance(operation_id, nxt)
        return settled.still_waiting
