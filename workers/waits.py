"""Worker bootstep: finish the steps of this host that wait for an external event.

A step that called ``ctx.wait_for(event, timeout)`` waits without holding a pool process
(``Ledger.wait_for_event``): Nova's build waits for ``network-vif-plugged`` that way. Every
``interval`` seconds this step, in the worker's event loop, completes the waiting steps of its
host whose event has arrived and fails those past their deadline (Nova's
``vif_plugging_timeout``), then publishes what comes next.
"""

from __future__ import annotations

from celery.utils.log import get_logger

from workers.hoststep import HostTimerStep

logger = get_logger(__name__)


class EventWaits(HostTimerStep):
    label = "EventWaits"
    interval = 0.2

    def tick(self) -> None:
        orch = self.orch
        settled = orch.ledger.settle_waits(
            self.host, lambda step: orch.steps[step].effect,
            lambda step: orch.steps[step].on_failure,
        )
        for operation_id, nxt in settled:
            logger.info("event wait of %s settled on %s", operation_id, self.host)
            orch.advance(operation_id, nxt)
