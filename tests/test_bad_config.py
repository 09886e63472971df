"""Bad input that is not a message: ledger URLs and databases, the command line's bytes, sizes.

Each is refused in one line that names the culprit, with nothing created, changed or sent.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from nova_app.app import MIGRATIONS, orch
from orchestrator.errors import SchemaError, StepFailure, SubmitError
from orchestrator.ledger import schema
from orchestrator.ops.cli import main as cli
from orchestrator.runner import _output
from tests.test_schema import ENGINE_HEAD


def one_line_error(args: list[str], env: dict[str, str] | None = None) -> str:
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("url, said", [
    ("postgresql+psycopg://u@h:abc/db", "ledger URL"),
    ("foo://x", "ledger URL 'foo://x' (ORCHESTRATOR_DB_URL): Can't load plugin: "
                "sqlalchemy.dialects:foo"),
    ("notaurl", "ledger URL 'notaurl' (ORCHESTRATOR_DB_URL): Could not parse"),
])
def test_a_ledger_url_that_cannot_work_is_one_line(url: str, said: str) -> None:
    assert said in one_line_error(["hosts"], {"ORCHESTRATOR_DB_URL": url})


def test_reads_never_create_or_change_a_database(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    line = one_line_error(["hosts"], {"ORCHESTRATOR_DB_URL": f"sqlite:///{missing}"})
    assert f"{missing} does not exist" in line and not missing.exists()

    theirs = tmp_path / "theirs.db"
    with sqlite3.connect(theirs) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    for args in (["hosts"], ["operation", "0" * 32], ["routing", "show"]):
        result = CliRunner().invoke(cli, args, env={"ORCHESTRATOR_DB_URL": f"sqlite:///{theirs}"})
        if args[0] != "routing":
            assert result.exit_code == 2 and "is not a ledger: it has 1 table(s)" in result.output
    with sqlite3.connect(theirs) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
    assert tables == ["invoices"], tables

    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    assert "holds no ledger yet" in one_line_error(
        ["hosts"], {"ORCHESTRATOR_DB_URL": f"sqlite:///{empty}"})
    with sqlite3.connect(empty) as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)

    garbage = tmp_path / "garbage.db"
    garbage.write_text("not a database at all\n" * 100)
    assert "cannot be the ledger: file is not a database" in one_line_error(
        ["hosts"], {"ORCHESTRATOR_DB_URL": f"sqlite:///{garbage}"})


def test_a_schema_newer_than_the_code_is_named(db_url: str) -> None:
    orch.db.engine()  # the current schema
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {schema.VERSION_TABLE} SET version_num = 'orch0099' "
                          "WHERE version_num LIKE 'orch%'"))
    said = f"ledger schema orch0099 is newer than this code's {ENGINE_HEAD}: upgrade the code"
    for create in (True, False):
        with pytest.raises(SchemaError, match=said):
            schema.ensure(engine, [MIGRATIONS], create=create)
    with pytest.raises(SchemaError, match=said):
        schema.upgrade(engine, [MIGRATIONS])
    with engine.connect() as conn:  # nothing was created or changed
        assert conn.execute(text(f"SELECT version_num FROM {schema.VERSION_TABLE} "
                                 "ORDER BY 1")).scalars().all() == ["nova0001", "orch0099"]
    engine.dispose()


def test_bytes_that_are_not_utf8_on_the_command_line_are_one_line(db_url: str) -> None:
    for args in (["submit", "boot", "--host", "source=h1", "--subject", "\udcff"],
                 ["operation", "\udcff"], ["drain", "x\udcfe"]):
        assert one_line_error(args).startswith("error: argument b'"), args
    assert "unknown operation 'bad\\nid'" in one_line_error(["operation", "bad\nid"])


def test_sizes_and_text_are_checked_at_submit_on_every_database(db_url: str) -> None:
    orch.db.engine()  # the ledger exists: what is refused is refused before it
    hosts = {"source": "compute1"}
    with pytest.raises(SubmitError, match="subject is 300 characters, more than 255"):
        orch.submit("boot", hosts=hosts, subject="s" * 300)
    with pytest.raises(SubmitError, match="subject '\\\\udcff' is not UTF-8 text"):
        orch.submit("boot", hosts=hosts, subject="\udcff")
    big = {"blob": "x" * (orch.settings.max_json_bytes + 1)}
    with pytest.raises(SubmitError, match=r"params are \d+ bytes of JSON, more than 1048576"):
        orch.submit("boot", hosts=hosts, params=big)
    with pytest.raises(SubmitError, match="params hold text that is not UTF-8"):
        orch.submit("boot", hosts=hosts, params={"name": "\udcff"})
    with orch.read() as s:
        from orchestrator.ledger.models import Operation

        assert s.query(Operation).count() == 0, "nothing recorded"


def test_a_step_output_over_the_limit_fails_the_step() -> None:
    assert _output("copy", {"rows": 1}, 100) == {"rows": 1}
    with pytest.raises(StepFailure, match="step 'copy' returned 112 bytes of JSON, more than "
                                          "100"):
        _output("copy", {"blob": "x" * 100}, 100)
    with pytest.raises(StepFailure, match="its outputs hold text that is not UTF-8"):
        _output("copy", {"blob": "\udcff"}, 100)
