"""Testing your flows against real processes: not the engine.

- :mod:`.kit`: shutdown-test your own flows (the ``orchestrator_fleet`` fixture of the pytest
  plugin, :mod:`orchestrator.pytest_plugin`);
- :mod:`.pgserver`, :mod:`.pgbouncer`: a private PostgreSQL and PgBouncer, started and
  stopped by a test;
- :mod:`.scale`: the scale bed's simulated hosts.

The real worker processes, the embedded Redis and the whole local fleet these run on are
:mod:`orchestrator.local`'s (``orchestrator up`` and the demo use them too); ``Fleet``,
``WorkerProcess``, ``local_stack`` and ``embedded_redis`` are exported here as well, for a
test suite that imports them from here. The engine (``orchestrator``, ``workers``) imports
none of these; nothing here is imported until used.
"""

from __future__ import annotations

from orchestrator.lazy import exports
from orchestrator.local import _EXPORTS as _LOCAL

_EXPORTS = {
    "KitFleet": "orchestrator.testing.kit",
    "ShutdownReport": "orchestrator.testing.kit",
    "Gate": "orchestrator.testing.kit",
    "kit_broker": "orchestrator.testing.kit",
    # orchestrator.local's, where a test suite imported them from before they moved there.
    **{name: _LOCAL[name] for name in ("Fleet", "WorkerProcess", "local_stack", "FLOWER_PORT",
                                       "embedded_redis")},
}

__all__ = sorted(_EXPORTS)


__getattr__ = exports(__name__, _EXPORTS)
