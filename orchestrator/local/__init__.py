"""A fleet on this machine, in real processes: what ``orchestrator up``, the demo, the test kit,
the project's tests, the soak and the benchmark run on.

- :mod:`.fleet`: start and signal real ``celery worker`` processes, one per host (the one
  process runner);
- :mod:`.embedded`: a Redis server of its own when no broker is configured;
- :mod:`.stack`: a whole fleet (broker, ledger, workers, Flower) for the demo and
  ``orchestrator up``.

The engine (``orchestrator``, ``workers``) imports none of these; nothing here is imported
until used.
"""

from __future__ import annotations

from orchestrator.lazy import exports

_EXPORTS = {
    "Fleet": "orchestrator.local.fleet",
    "WorkerProcess": "orchestrator.local.fleet",
    "local_stack": "orchestrator.local.stack",
    "FLOWER_PORT": "orchestrator.local.stack",
    "embedded_redis": "orchestrator.local.embedded",
    "free_port": "orchestrator.local.embedded",
}

__all__ = sorted(_EXPORTS)


__getattr__ = exports(__name__, _EXPORTS)
