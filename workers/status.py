"""The ``orchestrator_status`` remote-control command: what a worker says of itself over the
broker, the one channel left when the ledger does not answer.

Each worker answers from its event loop with its host, its drain state, its view of the
ledger (reachable, or unreachable since when, failed attempts) and the steps it recovered.
Flower's Hosts tab, ``orchestrator hosts`` and ``/metrics`` read it
(:func:`orchestrator.ops.views.worker_reports`), so an outage of the ledger shows as "ledger
unreachable since ..." on every worker rather than as a fleet of down hosts, and a worker
whose heartbeat is stale but which answers here is alive.
"""

from __future__ import annotations

import time

from orchestrator.witness import COMMAND

__all__ = ["COMMAND", "report"]


def report(drain, stranded) -> dict:
    """The answer of a worker whose host ``drain`` is (workers.control, ``orchestrator_status``)."""
    return {
        "host": drain.queues.host,
        "state": drain.state.reported,
        "deadline_in": None if drain.deadline is None else round(drain.deadline - time.time(), 1),
        "ledger": drain.orch.ledger_health.as_dict(),
        "steps_recovered": stranded.recovered if stranded is not None else 0,
    }
