"""What happens to a step's message in the worker just before it reaches a pool process.

Celery asks ``Request.revoked()`` right before it hands a request to a pool process, and
skips it on True. While the host drains, a message fetched from the main queue is handed back
there instead (rejected with requeue, never acknowledged, never run): see
:meth:`workers.drain.Drain.hand_back`.
"""

from __future__ import annotations

from celery.worker.request import Request


class StepRequest(Request):
    def revoked(self) -> bool:
        if self._already_revoked:
            return True
        orch = getattr(self._app, "orchestrator", None)
        drain = orch.drain if orch is not None else None
        if drain is not None and drain.hand_back(self):
            return True
        return super().revoked()
