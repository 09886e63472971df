"""Celery task orchestration with Nova-style shutdown-aware routing, for any Celery app.

::

    from celery import Celery
    from orchestrator import Orchestrator, StepFailure

    app = Celery("rebalance")
    orch = Orchestrator(app, routing="routing.yaml")

Importing this package (or any module of the engine) builds no app, reads no file, opens no
connection and patches nothing: the names below are resolved on first use.

``celery -A orchestrator worker ...`` finds the application ``ORCHESTRATOR_APP`` names, else
the one the project's pyproject.toml names (``[tool.orchestrator] app``), as
``orchestrator.app``; the engine names none.
"""

from __future__ import annotations

from typing import Any

from orchestrator.lazy import exports

#: Public name -> the module that defines it.
_EXPORTS = {
    "Orchestrator": "orchestrator.api",
    "StepContext": "orchestrator.context",
    "load_app": "orchestrator.discovery",
    "StepFailure": "orchestrator.errors",
    "OrchestratorError": "orchestrator.errors",
    "ConfigError": "orchestrator.errors",
    "DefinitionError": "orchestrator.errors",
    "SubmitError": "orchestrator.errors",
    "SubjectBusy": "orchestrator.errors",
    "UnknownFlow": "orchestrator.errors",
    "UnknownOperation": "orchestrator.errors",
    "BrokerUnavailable": "orchestrator.errors",
    "LedgerUnavailable": "orchestrator.errors",
    "SchemaError": "orchestrator.errors",
    "RoutingError": "orchestrator.routing",
    # For an application's own views and commands (nova_app uses these and nothing else).
    "ended": "orchestrator.status",
    "wait_for": "orchestrator.status",
    "wait_operation": "orchestrator.status",
    "timeline_lines": "orchestrator.status",
    "queue_depth": "orchestrator.broker",
    "Watch": "orchestrator.ops.live",
}

__all__ = sorted(_EXPORTS)


_exported = exports(__name__, _EXPORTS)


def __getattr__(name: str) -> Any:
    if name == "app":
        # `celery -A orchestrator`: the application named by ORCHESTRATOR_APP or the project's
        # pyproject.toml (by name: the engine imports no application). Celery would print a
        # traceback for the error: one line instead.
        from orchestrator.discovery import load_app
        from orchestrator.errors import OrchestratorError
        from orchestrator.ops.cli import fail

        try:
            return load_app(None).app
        except OrchestratorError as exc:
            fail(False, str(exc))  # as every command's error: one line, exit status 2
    return _exported(name)
