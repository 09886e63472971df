"""Celery task orchestration with Nova-style shutdown-aware routing.

``celery -A orchestrator worker ...`` finds the Celery application as ``orchestrator.app``.
A broken routing.yaml or setting stops every entry point here with one clear line (file, line,
key), not a traceback.
"""

from orchestrator.config import ConfigError
from orchestrator.routing import RoutingError

try:
    from orchestrator.app import app
except (RoutingError, ConfigError) as exc:
    raise SystemExit(f"orchestrator: {exc}") from None

__all__ = ["app"]
