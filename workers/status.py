"""The ``orchestrator_status`` remote-control command: what a worker says of itself over the
broker, the one channel left when the ledger does not answer.

Each worker answers from its event loop with its host, its drain state, its view of the
ledger (reachable, or unreachable since when, failed attempts) and the steps it recovered.
Flower's Hosts tab, ``orchestrator hosts`` and ``/metrics`` read it
(:func:`orchestrator.views.worker_reports`), so an outage of the ledger shows as "ledger
unreachable since ..." on every worker rather than as a fleet of down hosts, and a worker
whose heartbeat is stale but which answers here is alive.
"""

from __future__ import annotations

import time

from celery.worker.control import control_command

COMMAND = "orchestrator_status"


def status(state) -> dict:
    orch = getattr(state.consumer.app, "orchestrator", None)
    drain = orch.drain if orch is not None else None
    if drain is None or drain.queues is None:
        return {"error": "this worker serves no host queue"}
    stranded = orch.stranded_steps
    return {
        "host": drain.queues.host,
        "state": "draining" if drain.since is not None else "up",
        "deadline_in": None if drain.deadline is None else round(drain.deadline - time.time(), 1),
        "ledger": orch.ledger_health.as_dict(),
        "steps_recovered": stranded.recovered if stranded is not None else 0,
    }


def register() -> None:
    """Register the command (at worker start, not at import)."""
    from celery.worker.control import Panel

    if COMMAND not in Panel.data:
        status.__name__ = COMMAND
        control_command(name=COMMAND)(status)
