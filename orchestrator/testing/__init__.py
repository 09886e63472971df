"""Real processes for tests, the demo, the soak and the benchmark: not the engine.

- :mod:`.fleet`: start and signal real ``celery worker`` processes, one per host (the one
  process runner: the project's tests, the soak, the benchmark, the demo and the test kit);
- :mod:`.embedded`: a Redis server of its own when no broker is configured;
- :mod:`.stack`: a whole fleet on this machine (broker, ledger, workers, Flower) for the demo
  and ``orchestrator up``;
- :mod:`.kit`: shutdown-test your own flows (the ``orchestrator_fleet`` fixture of the pytest
  plugin, :mod:`orchestrator.pytest_plugin`).

The engine (``orchestrator``, ``workers``) imports none of these; nothing here is imported
until used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KitFleet": "orchestrator.testing.kit",
    "ShutdownReport": "orchestrator.testing.kit",
    "kit_broker": "orchestrator.testing.kit",
    "Fleet": "orchestrator.testing.fleet",
    "WorkerProcess": "orchestrator.testing.fleet",
    "local_stack": "orchestrator.testing.stack",
    "FLOWER_PORT": "orchestrator.testing.stack",
    "embedded_redis": "orchestrator.testing.embedded",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'orchestrator.testing' has no attribute {name!r}")
