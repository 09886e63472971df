"""Which application a command or ``celery -A orchestrator`` works on.

The engine names none: ``--app MODULE``, else ``ORCHESTRATOR_APP``, else the project's
pyproject.toml (``[tool.orchestrator] app``), as a project names its pytest settings there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery

from orchestrator.api import Orchestrator
from orchestrator.config import Settings, project_app
from orchestrator.errors import ConfigError


def app_name(module: str | None = None) -> str:
    """``module``, else ``ORCHESTRATOR_APP``, else the project's ``[tool.orchestrator] app``
    (its pyproject.toml, from the current directory up)."""
    name = module or Settings.from_env().app
    if name is None:
        found = project_app()
        if found is None:
            raise ConfigError(
                "no application: pass --app MODULE, set ORCHESTRATOR_APP, or name it in the "
                f"project's pyproject.toml ([tool.orchestrator] app = \"package.module\"); "
                f"none found from {Path.cwd()} up")
        name = found[0]
    return name


def load_app(module: str | None) -> Orchestrator:
    """The Orchestrator of an application module: ``package.module`` or
    ``package.module:attribute``; when ``module`` is None, ``ORCHESTRATOR_APP``, else the
    project's ``[tool.orchestrator] app`` (pyproject.toml)."""
    name = app_name(module)
    mod_name, _, attr = name.partition(":")
    from celery.utils.imports import import_from_cwd

    try:
        # As `celery -A`: the current directory is searched first (a console script's
        # sys.path does not hold it).
        mod = import_from_cwd(mod_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import application {name!r}: {exc}") from None
    candidates: list[Any] = [getattr(mod, attr, None)] if attr else list(vars(mod).values())
    for obj in candidates:
        if isinstance(obj, Orchestrator):
            orch = obj
            break
        if isinstance(obj, Celery) and isinstance(getattr(obj, "orchestrator", None),
                                                   Orchestrator):
            orch = obj.orchestrator
            break
    else:
        raise ConfigError(
            f"application {name!r} defines no Orchestrator (orch = Orchestrator(app, ...))"
        )
    orch.load_steps()
    return orch
