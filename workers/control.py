"""Worker bootstep: the package's remote-control commands, registered at worker start.

- ``drain [reason]``: start this worker's drain, as SIGTERM would (``orchestrator drain
  HOST``);
- ``orchestrator_status``: what the worker says of itself over the broker, the one channel
  left when the ledger does not answer (:mod:`workers.status`).

Celery runs a command in the worker's event loop with ``state.consumer.controller`` being the
worker, where the package's bootsteps hang (``worker.host_drain``, ...).
"""

from __future__ import annotations

from celery import bootsteps

from orchestrator.seams import celery_internals as celery_seam
from workers import status
from workers.host import host_service_of

NOT_A_HOST = {"error": "this worker serves no host queue"}


def _drain_of(state):
    worker = celery_seam.worker_of(state)
    if worker is None or host_service_of(worker) is None:
        return None
    return getattr(worker, "host_drain", None)


def drain(state, reason: str = "remote control") -> dict:
    """Start this worker's drain, as SIGTERM would."""
    d = _drain_of(state)
    if d is None:
        return NOT_A_HOST
    if not d.request(reason):
        return {"ok": f"{d.queues.host} already draining"}
    return {"ok": f"{d.queues.host} draining"}


def orchestrator_status(state) -> dict:
    d = _drain_of(state)
    if d is None:
        return NOT_A_HOST
    return status.report(d, getattr(d.worker, "stranded_steps", None))


class RemoteControl(bootsteps.StartStopStep):
    label = "RemoteControl"
    requires = ("workers.drain:Drain",)

    def start(self, worker) -> None:
        if host_service_of(worker) is None:
            return
        celery_seam.register_control_command("drain", drain, args=[("reason", str)],
                                             signature="[reason]")
        celery_seam.register_control_command(status.COMMAND, orchestrator_status)
