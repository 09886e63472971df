"""Worker bootstep: the package's remote-control commands, registered at worker start.

- ``drain [reason]``: start this worker's drain, as SIGTERM would (``orchestrator drain
  HOST``);
- ``orchestrator_status``: what the worker says of itself over the broker, the one channel
  left when the ledger does not answer (:mod:`workers.status`).

Two of Celery's own commands are replaced on a host's worker, because Celery's would break
what the host promises:

- ``shutdown`` (Flower's "Shut Down" button, ``celery control shutdown``) raises
  ``WorkerShutdown`` in Celery: the worker exits at once, skipping the drain, and the alt
  steps of operations in flight wait for its restart. Here it drains, as SIGTERM does, and
  says so in its reply; a plain worker of the same app keeps Celery's.
- ``add_consumer`` (Flower's "Add consumer", ``celery control add_consumer``) would let a
  worker consume another host's queue and run that host's steps here (a resize finished on
  the wrong hypervisor). A worker serves exactly one host: another host's queue is refused,
  with a reply that says why, and so is ``<host>`` again while the host drains.

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


def _add_consumer(celery_add_consumer):
    def add_consumer(state, queue, exchange=None, exchange_type=None, routing_key=None,
                     **options):
        worker = celery_seam.worker_of(state)
        service = host_service_of(worker) if worker is not None else None
        if service is not None:
            host = service.queues.host
            if not service.queues.owns(queue):
                return {"error": f"{host}'s worker serves only {host} and {host}-alt: not "
                                 f"consuming {queue!r} (start a worker for its host)"}
            d = getattr(worker, "host_drain", None)
            if d is not None and d.requested is not None and queue == host:
                return {"error": f"{host} is draining: it takes no new work from {queue!r} "
                                 "until it restarts"}
        return celery_add_consumer(state, queue, exchange, exchange_type, routing_key,
                                   **options)
    return add_consumer


def _shutdown(celery_shutdown):
    def shutdown(state, msg: str = "Got shutdown from remote", **kwargs):
        d = _drain_of(state)
        if d is None:
            return celery_shutdown(state, msg, **kwargs)
        host = d.queues.host
        if not d.request("remote shutdown"):
            return {"ok": f"{host} already draining (SIGTERM twice, or SIGQUIT, stops it now)"}
        return {"ok": f"{host} draining: shutdown drains as SIGTERM does, and the worker "
                      f"exits once nothing in flight needs {host} or by its deadline"}
    return shutdown


class RemoteControl(bootsteps.StartStopStep):
    label = "RemoteControl"
    requires = ("workers.drain:Drain",)

    def start(self, worker) -> None:
        if host_service_of(worker) is None:
            return
        celery_seam.register_control_command("drain", drain, args=[("reason", str)],
                                             signature="[reason]")
        celery_seam.register_control_command(status.COMMAND, orchestrator_status)
        celery_seam.override_control_command("add_consumer", _add_consumer)
        celery_seam.override_control_command("shutdown", _shutdown)
