"""The database schema, managed with Alembic: the engine's tables and an application's own.

Each owner keeps its revisions in a folder of its own, as an Alembic branch with a label
(the engine's is ``orchestrator``, in ``orchestrator/ledger/migrations/versions``; an application
passes ``Orchestrator(..., migrations=FOLDER)``). The revision a database is at is kept in the
table :data:`VERSION_TABLE`, not ``alembic_version``, so an application that runs Alembic for
tables of its own keeps its history apart.

:func:`ensure` runs when a process first touches a database: an empty one (or one where a
branch was never applied) is brought to the current schema in one transaction, under a lock,
so the workers of a fleet starting at once do it once; a branch found at an older revision
stops the process with the command to run (``orchestrator db upgrade``), since an upgrade
while older processes still run is an operator's decision.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, MetaData, inspect, text

from orchestrator.errors import SchemaError
from orchestrator.redact import redact_url
from orchestrator.seams import alembic_internals

#: Where the revision of each branch is kept.
VERSION_TABLE = "orchestrator_schema"
ENGINE_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
ENGINE_VERSIONS = ENGINE_MIGRATIONS / "versions"
#: Serialises schema changes between processes on PostgreSQL (SQLite: BEGIN IMMEDIATE).
_PG_LOCK_KEY = 0x6F72636865737472
UPGRADE_COMMAND = "orchestrator db upgrade"


def _script(locations: Sequence[Path]):
    from alembic.script import ScriptDirectory

    return ScriptDirectory(
        str(ENGINE_MIGRATIONS),
        version_locations=[str(ENGINE_VERSIONS), *(str(p) for p in locations)],
    )


def _context(conn: Connection, script, fn=None):
    from alembic.runtime.migration import MigrationContext

    opts = {"version_table": VERSION_TABLE, "script": script}
    if fn is not None:
        opts["fn"] = fn
    return MigrationContext.configure(conn, opts=opts)


@contextmanager
def _locked(engine: Engine):
    """A transaction that holds the schema lock until it ends."""
    with engine.begin() as conn:  # SQLite: our write engine begins IMMEDIATE (a write lock)
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        yield conn


def status(conn: Connection, locations: Sequence[Path]) -> dict[str, object]:
    """Where the database stands: current revisions, the code's heads, what is behind."""
    script = _script(locations)
    current = set(_context(conn, script).get_current_heads())
    heads = set(script.get_heads())
    behind, unknown = [], []
    for rev in sorted(current - heads):
        (behind if _known(script, rev) else unknown).append(rev)
    missing = sorted(heads - {_head_of(script, rev) for rev in current})
    return {"current": sorted(current), "heads": sorted(heads), "behind": behind,
            "unknown": unknown, "missing": missing}


def _known(script, rev: str) -> bool:
    try:
        return script.get_revision(rev) is not None
    except Exception:
        return False


def _head_of(script, rev: str) -> str | None:
    """The head of the branch ``rev`` belongs to (None if ``rev`` is unknown)."""
    if not _known(script, rev):
        return None
    for head in script.get_heads():
        if rev == head or any(r.revision == rev for r in script.iterate_revisions(head, "base")):
            return head
    return None


def _upgrade(conn: Connection, locations: Sequence[Path]) -> list[str]:
    from alembic.operations import Operations

    script = _script(locations)
    applied: list[str] = []

    def fn(rev, context):
        steps = alembic_internals.upgrade_steps(
            script, "heads", tuple(r for r in rev if _known(script, r)))
        applied.extend(str(s.revision.revision) for s in steps)
        return steps

    ctx = _context(conn, script, fn)
    with Operations.context(ctx):
        ctx.run_migrations()
    return applied


_REVISION = re.compile(r"^revision\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", re.M)
_DOWN = re.compile(r"^down_revision\s*(?::[^=]*)?=\s*(.+)$", re.M)


def _heads_from_files(locations: Sequence[Path]) -> set[str] | None:
    """The heads of every branch, read from the revision files without Alembic (a worker
    starting on an up-to-date database then never imports it); None if a file is not in the
    plain form this reads (``revision = "..."``, ``down_revision = "..." | (...) | None``)."""
    revisions, downs = set(), set()
    for folder in (ENGINE_VERSIONS, *locations):
        for path in Path(folder).glob("*.py"):
            text = path.read_text()
            rev, down = _REVISION.search(text), _DOWN.search(text)
            if rev is None or down is None:
                return None
            revisions.add(rev.group(1))
            downs.update(re.findall(r"['\"]([^'\"]+)['\"]", down.group(1)))
    return revisions - downs if revisions else None


def _up_to_date(engine: Engine, locations: Sequence[Path]) -> bool:
    """The database is at the code's heads, seen with one read (no lock, no Alembic)."""
    heads = _heads_from_files(locations)
    if heads is None or not inspect(engine).has_table(VERSION_TABLE):
        return False
    with engine.connect() as conn:
        current = {row[0] for row in conn.execute(text(
            f"SELECT version_num FROM {VERSION_TABLE}"))}
    return current == heads


def _family(rev: str) -> str:
    """A revision's branch, by what its id begins with before the first digit: the engine's
    are ``orch0001``, ``orch0002``...; an application names its own alike (``nova0001``)."""
    return re.match(r"\D*", rev).group(0)  # type: ignore[union-attr]


def _newer(state: dict[str, object]) -> str | None:
    """A revision of one of this code's branches that this code does not know: the database
    was upgraded by a newer release (a revision of another prefix is another application's
    branch, not ours to judge)."""
    heads = {_family(h): h for h in state["heads"]}  # type: ignore[union-attr]
    for rev in state["unknown"]:  # type: ignore[union-attr]
        family = _family(rev)
        if family and family in heads:
            return (f"ledger schema {rev} is newer than this code's {heads[family]}: upgrade "
                    "the code (a newer release upgraded this database)")
    return None


def _empty_or_foreign(conn: Connection, where: str,
                      setting: str = "ORCHESTRATOR_DB_URL") -> SchemaError:
    """What a read says of a database with no schema of ours: it creates none. ``setting``:
    where its URL came from, to check."""
    tables = inspect(conn).get_table_names()
    if tables:
        return SchemaError(
            f"database {where} is not a ledger: it has {len(tables)} table(s), none of them "
            f"{VERSION_TABLE} (check {setting})")
    return SchemaError(f"database {where} holds no ledger yet: a worker's start or a submit "
                       f"creates it, or run `{UPGRADE_COMMAND}`")


def ensure(engine: Engine, locations: Sequence[Path], create: bool = True,
           setting: str = "ORCHESTRATOR_DB_URL") -> None:
    """Bring a new database (or a branch never applied) to the current schema; refuse one
    where a branch is at an older revision, naming the command to run, or at a newer one.
    ``create=False`` (what only reads): refuse instead of creating anything. ``setting``:
    where the URL came from, which an error tells to check."""
    if _up_to_date(engine, locations):
        return
    where = redact_url(engine.url.render_as_string(hide_password=False))
    if not create:
        with engine.connect() as conn:
            if not inspect(conn).has_table(VERSION_TABLE):
                raise _empty_or_foreign(conn, where, setting)
            state = status(conn, locations)
        _refuse(state, where)
        if state["missing"]:
            raise SchemaError(f"database {where} lacks this code's schema (branch head(s) "
                              f"{', '.join(state['missing'])}): run `{UPGRADE_COMMAND}`")
        return
    with _locked(engine) as conn:
        state = status(conn, locations)
        _refuse(state, where)
        if state["missing"]:
            _upgrade(conn, locations)


def _refuse(state: dict[str, object], where: str) -> None:
    newer = _newer(state)
    if newer is not None:
        raise SchemaError(f"database {where}: {newer}")
    # A revision this code does not know is another application's branch (several apps
    # may share a ledger): not ours to judge.
    if state["behind"]:
        raise SchemaError(
            f"database {where} has an older "
            f"schema (revision {', '.join(state['behind'])}; this code needs "  # type: ignore[arg-type]
            f"{', '.join(state['heads'])}): run `{UPGRADE_COMMAND}`"  # type: ignore[arg-type]
        )


def upgrade(engine: Engine, locations: Sequence[Path]) -> dict[str, object]:
    """``orchestrator db upgrade``: every branch to its head. Returns what was applied."""
    where = redact_url(engine.url.render_as_string(hide_password=False))
    with _locked(engine) as conn:
        before = status(conn, locations)
        newer = _newer(before)
        if newer is not None:
            raise SchemaError(f"database {where}: {newer}")
        applied = _upgrade(conn, locations)
        after = status(conn, locations)
    return {"before": before["current"], "applied": applied, "current": after["current"]}


def drop_everything(engine: Engine) -> None:
    """Drop every table of the database (tests on a shared PostgreSQL database)."""
    meta = MetaData()
    meta.reflect(engine)
    meta.drop_all(engine)
