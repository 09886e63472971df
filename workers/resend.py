"""Worker bootstep: send again the steps of this host that have no message in the broker.

Two ways a step can be left with no message: its sender died between committing the step and
publishing it, or (Redis) a worker was SIGKILLed between BRPOP taking the message and kombu
recording it as unacknowledged, so no visibility timeout brings it back. Every
2 seconds this step looks at the operations whose current step targets this host:
one never sent after ``UNPUBLISHED_GRACE`` seconds is sent; one queued for longer than
``ORCHESTRATOR_RESEND_AFTER`` seconds (default 60) whose queue is empty is sent again. Steps
are idempotent, so a step that was not lost after all runs once and its copy is dropped.
"""

from __future__ import annotations

from celery.utils.log import get_logger

from orchestrator.broker import queue_depth
from workers.drain import UNPUBLISHED_GRACE
from workers.hoststep import HostTimerStep

logger = get_logger(__name__)


class StrandedSteps(HostTimerStep):
    label = "StrandedSteps"
    interval = 2.0

    def tick(self) -> None:
        stranded = self.orch.ledger.stranded_steps(
            self.host, UNPUBLISHED_GRACE, self.orch.settings.resend_after
        )
        for op in stranded:
            self._resend(op)

    def _resend(self, op) -> None:
        step, host = op.current
        if op.next_published and op.queue and queue_depth(self.app, op.queue) > 0:
            return  # still waiting its turn in the queue
        if not self.orch.ledger.claim_resend(op.id, op.position, op.step_since):
            return
        queue = self.orch.publish_step(op.id, op.position, step, host, op.kind, op.subject)
        self.orch.ledger.mark_published(op.id, op.position, queue)
        logger.warning(
            "resent %s of %s to %s: %s", step, op.id, queue,
            "it was never sent" if not op.next_published else "no message for it in the broker",
        )
