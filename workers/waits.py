"""Worker bootstep: finish the steps of this host that wait for an external event.

A build waits for ``network-vif-plugged`` (orchestrator.state.wait_for_event) without holding
a pool process. Every ``interval`` seconds this step, in the worker's event loop, completes the
waiting steps whose event has arrived and fails those past their deadline (Nova's
``vif_plugging_timeout``), then publishes what comes next.
"""

from __future__ import annotations

from celery.utils.log import get_logger

from orchestrator import state
from workers.hoststep import HostTimerStep

logger = get_logger(__name__)


class EventWaits(HostTimerStep):
    label = "EventWaits"
    interval = 0.2

    def tick(self) -> None:
        from workers.effects import EFFECTS, failure_effect
        from workers.steps import advance

        for operation_id, nxt in state.settle_waits(self.host, EFFECTS.__getitem__,
                                                    failure_effect):
            logger.info("event wait of %s settled on %s", operation_id, self.host)
            advance(operation_id, nxt)
