"""Alembic internals this package relies on (verified against alembic 1.x).

``ScriptDirectory._upgrade_revs(destination, current)``: the revisions an upgrade from
``current`` to ``destination`` applies, as ``alembic upgrade`` computes them (its
``command.upgrade`` calls it the same way). The ledger upgrades the branches it knows and
leaves another application's revisions alone, so it runs the upgrade itself.
"""

from __future__ import annotations

from typing import Any


def upgrade_steps(script: Any, destination: str, current: tuple[str, ...]) -> Any:
    return script._upgrade_revs(destination, current)
