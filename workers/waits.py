"""Worker bootstep: finish the steps of this host that wait for an external event.

A step that called ``ctx.wait_for(event, timeout)`` waits without holding a pool process
(``Ledger.wait_for_event``): Nova's build waits for ``network-vif-plugged`` that way. Every
``interval`` seconds this step, in the worker's event loop, completes the waiting steps of its
host whose event has arrived and fails those past their deadline (Nova's
``vif_plugging_timeout``), then publishes what comes next.
"""

from __future__ import annotations

import time

from celery.utils.log import get_logger

from workers.hoststep import IDLE_PERIOD_SECONDS, HostTimerStep, on_grid

logger = get_logger(__name__)

#: With no step of this host waiting, the ledger is asked only this often: an idle fleet of 50
#: hosts would otherwise run 250 queries a second for nothing. A step this worker parks wakes
#: the check at once (``wake``); a wait parked by another process of the host (a split
#: ``--main-only`` / ``--alt-only`` pair) is found within this delay.
IDLE_CHECK_SECONDS = IDLE_PERIOD_SECONDS


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
        """Every ``interval`` while steps wait here; else every IDLE_CHECK_SECONDS with the
        worker's other periodic jobs, so an idle worker's loop is not woken for nothing."""
        if self.busy:
            return time.monotonic() + self.interval
        return on_grid(IDLE_CHECK_SECONDS)

    def tick(self) -> None:
        orch = self.orch
        settled = orch.ledger.settle_waits(
            self.host, lambda step: orch.spec(step).effect,
            lambda step: orch.spec(step).on_failure,
        )
        self.busy = settled.still_waiting > 0
        for operation_id, nxt in settled:
            logger.info("event wait of %s settled on %s", operation_id, self.host)
            orch.advance(operation_id, nxt)
