"""Every use of another library's internals, one module per library.

Celery, kombu, billiard and Flower are used through their public API everywhere else. What
this package does that their API does not offer (a private attribute read, a class patched, a
module-level state of Celery's worker set, a template's text rewritten) lives in
:mod:`.celery_internals`, :mod:`.kombu_internals`, :mod:`.billiard_internals` and
:mod:`.flower_internals` (and Alembic's one private call in :mod:`.alembic_internals`), each
written against the versions in :data:`VERIFIED`; pyproject.toml pins the same ranges. A
worker, and ``orchestrator flower``, call :func:`check` at start: an installed version outside
its range is said once, with the seam to read again (it may still work; nothing else is
known). ``tests/test_layout.py`` fails on a private attribute read, or an internal module
imported, anywhere else in the engine.
"""

from __future__ import annotations

from importlib import metadata

#: Library -> (the release series each seam was read in, the seam module to re-check).
VERIFIED: dict[str, tuple[str, str]] = {
    "celery": ("5.7", "orchestrator/seams/celery_internals.py"),
    "kombu": ("5.7", "orchestrator/seams/kombu_internals.py"),
    "billiard": ("4.3", "orchestrator/seams/billiard_internals.py"),
    "flower": ("2.2", "orchestrator/seams/flower_internals.py"),
    # One private method, unchanged since alembic 1.0: any 1.x.
    "alembic": ("1", "orchestrator/seams/alembic_internals.py"),
}


def _in_series(version: str, series: str) -> bool:
    """``5.7.0`` is in series ``5.7``; ``1.16.2`` in series ``1``."""
    return version.split(".")[: series.count(".") + 1] == series.split(".")

def unverified(libraries: tuple[str, ...] = tuple(VERIFIED)) -> list[str]:
    """One line per installed library whose release series is not the one its seam was read
    in, naming the seam; empty when all are."""
    lines = []
    for name in libraries:
        series, seam = VERIFIED[name]
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # flower is not needed by a worker
        if not _in_series(installed, series):
            lines.append(f"{name} {installed} is installed; {seam} was verified against "
                         f"{name} {series}.x: read it again against {name} {installed}")
    return lines


def check(logger, libraries: tuple[str, ...] = tuple(VERIFIED)) -> list[str]:
    """Say each unverified library once (a WARNING) at start; returns the lines said."""
    lines = unverified(libraries)
    for line in lines:
        logger.warning("orchestrator: %s", line)
    return lines
