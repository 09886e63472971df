"""The schema through Alembic: created on first use, refused when older, upgraded on request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect

from orchestrator import SchemaError
from orchestrator.ledger.engines import Database, reset
from tests.conftest import BROKER_URL, fresh_db

REPO = Path(__file__).resolve().parent.parent
#: The engine's newest revision (each release's migrations add one).
ENGINE_HEAD = sorted(p.name.split("_")[0] for p in (
    REPO / "orchestrator" / "ledger" / "migrations" / "versions").glob("0*.py"))[-1]
ENGINE_HEAD = f"orch{ENGINE_HEAD}"
FIRST = '''
"""shelves"""
import sqlalchemy as sa
from alembic import op

revision = "shelf0001"
down_revision = None
branch_labels = ("shelves",)
depends_on = None


def upgrade():
    op.create_table("shelves", sa.Column("id", sa.Integer(), primary_key=True))
'''
SECOND = '''
"""shelves.label"""
import sqlalchemy as sa
from alembic import op

revision = "shelf0002"
down_revision = "shelf0001"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("shelves", sa.Column("label", sa.String(64), nullable=True))
'''


def tables(url: str) -> set[str]:
    return set(inspect(Database(url).engine()).get_table_names())


def test_an_empty_database_gets_the_schema_on_first_use(tmp_path: Path) -> None:
    url = fresh_db(tmp_path)
    reset(url)  # nothing but the engine's tables, made through its migration
    assert {"operations", "operation_hosts", "step_log", "events", "services",
            "routing_fallbacks", "orchestrator_schema"} <= tables(url)
    status = Database(url).status()
    assert status["current"] == status["heads"] == [ENGINE_HEAD]


def test_an_older_schema_is_refused_until_upgraded(tmp_path: Path) -> None:
    url = fresh_db(tmp_path)
    reset(url)
    versions = tmp_path / "shelves"
    versions.mkdir()
    (versions / "0001_shelves.py").write_text(FIRST)
    Database(url, [versions]).engine()  # the app's branch, applied on first use
    assert "shelves" in tables(url)

    release2 = tmp_path / "shelves-2"  # a new release of the app, installed beside the old
    release2.mkdir()
    (release2 / "0001_shelves.py").write_text(FIRST)
    (release2 / "0002_label.py").write_text(SECOND)
    newer = Database(url, [release2])
    with pytest.raises(SchemaError) as info:
        newer.engine()
    message = str(info.value)
    assert "older schema (revision shelf0001" in message and "shelf0002" in message
    assert message.endswith("run `orchestrator db upgrade`") and "\n" not in message

    result = newer.upgrade()
    assert result["applied"] == ["shelf0002"]
    assert sorted(result["current"]) == [ENGINE_HEAD, "shelf0002"]
    newer.engine()  # accepted now
    columns = {c["name"] for c in inspect(newer.engine()).get_columns("shelves")}
    assert columns == {"id", "label"}


TINY_APP = """
from celery import Celery
from orchestrator import Orchestrator

app = Celery("shelves")
orch = Orchestrator(app, routing={routing!r}, migrations={versions!r})


@orch.step
def stack(ctx):
    return None
"""


def test_the_command_line_upgrades_and_a_worker_refuses_an_older_schema(
    tmp_path: Path,
) -> None:
    url = fresh_db(tmp_path)
    reset(url)
    env = {"ORCHESTRATOR_DB_URL": url, "PATH": "/usr/bin:/bin",
           "ORCHESTRATOR_BROKER_URL": BROKER_URL}
    cli = [sys.executable, "-c", "from orchestrator.ops.cli import main; main()"]
    proc = subprocess.run([*cli, "db", "status", "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and json.loads(proc.stdout)["missing"] == ["nova0001"]
    proc = subprocess.run([*cli, "db", "upgrade"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, "applied nova0001"), proc.stderr

    # An application whose database is one release behind: its worker will not start.
    versions = tmp_path / "shelves"
    versions.mkdir()
    (versions / "0001_shelves.py").write_text(FIRST)
    Database(url, [versions]).engine()
    (versions / "0002_label.py").write_text(SECOND)
    (tmp_path / "routing.yaml").write_text("steps:\n  stack: {queue: main, reason: new}\n")
    (tmp_path / "shelves_app.py").write_text(
        TINY_APP.format(routing=str(tmp_path / "routing.yaml"), versions=str(versions)))
    env = {**env, "PYTHONPATH": f"{tmp_path}:{REPO}"}
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "shelves_app", "worker", "-Q", "shelf1",
         "--pool", "solo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: database ") and "older schema" in last
    assert last.endswith("run `orchestrator db upgrade`")
    proc = subprocess.run(
        [sys.executable, "-c", "from orchestrator.ops.cli import main; main()", "--app",
         "shelves_app", "db", "upgrade"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=60,
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "applied shelf0002"), proc.stderr


def test_the_per_host_migration_indexes_operations_already_in_flight(tmp_path: Path) -> None:
    """orch0002 on a ledger with operations in flight: their per-host rows are made."""
    from alembic.operations import Operations
    from sqlalchemy import text

    from orchestrator.ledger import schema
    from orchestrator.ledger.store import Ledger

    url = fresh_db(tmp_path)
    reset(url)
    engine = Database(url).engine()
    with engine.begin() as conn:  # back to orch0001, with one operation in flight
        ctx = schema._context(conn, schema._script(()), lambda rev, c: schema._script(())
                              ._downgrade_revs("orch0001", rev))
        with Operations.context(ctx):
            ctx.run_migrations()
        conn.execute(text(
            "INSERT INTO operations (id, kind, status, plan, hosts, position, step_state, "
            "step_since, next_published, params, created_at, updated_at) VALUES ('op1', 'f', "
            "'running', '[[\"a\", \"h1\"], [\"b\", \"h2\"], [\"c\", \"h1\"]]', '{}', 1, "
            "'queued', 0, TRUE, '{}', 0, 0)"))
    applied = Database(url).upgrade()["applied"]
    assert applied[0] == "orch0002" and applied[-1] == ENGINE_HEAD
    ledger = Ledger(Database(url), {})
    assert [op.id for op in ledger.operations_needing("h1")] == ["op1"]
    assert [op.id for op in ledger.operations_needing("h2")] == ["op1"]
    assert ledger.in_flight_by_host() == {"h1": 1, "h2": 1}
    assert ledger.get_operation("op1").current_host == "h2"
