"""Settings read from the environment.

Every process of a deployment (API/CLI, each host's worker, Flower) must agree on the broker,
the database and the routing table, so all of them read the same ``ORCHESTRATOR_*`` variables
here and nowhere else; so too the standard ``OTEL_*`` variables of the engine's tracing
(``orchestrator.tracing``; the OTLP exporter reads its own ``OTEL_EXPORTER_OTLP_*``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import ConfigError

__all__ = ["ConfigError", "Settings", "configured_urls", "db_url"]

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DB_URL = "sqlite:///orchestrator.db"
DEFAULT_ROUTING_FILE = "routing.yaml"
#: Nova's default ``graceful_shutdown_timeout``.
DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT = 180.0
#: Longer than any step may run: a message unacked for longer is redelivered on Redis.
DEFAULT_VISIBILITY_TIMEOUT = 3600.0
#: Like Nova's ``[upgrade_levels]``: ``auto`` sends an alt step to ``<host>-alt`` only when that
#: host advertises alt support in the service registry; ``always`` / ``never`` force it.
ALT_ROUTING_MODES = ("auto", "always", "never")
DEFAULT_ALT_ROUTING = "auto"
#: How long a process trusts its snapshot of which hosts consume ``<host>-alt``.
DEFAULT_ALT_CACHE_SECONDS = 3.0
#: RabbitMQ queue type of the host queues: classic (durable) or quorum.
QUEUE_TYPES = ("classic", "quorum")


#: Seconds between two heartbeats of a worker in the registry: a worker silent for three is
#: asked over the broker, and counted down if it does not answer. An idle host costs the
#: ledger one write per interval, its only one (10,000 idle hosts: 167 a second; Nova's
#: database service group writes every 10 s). A small fleet that wants a killed worker
#: noticed sooner sets ORCHESTRATOR_HEARTBEAT_INTERVAL lower.
DEFAULT_HEARTBEAT_INTERVAL = 60.0
#: Hosts with per-host Prometheus series at most, those that matter first
#: (orchestrator.ops.views.rank).
DEFAULT_METRICS_MAX_HOSTS = 500
#: Steps queued for longer than this whose queue is empty are sent again (Redis can lose one).
DEFAULT_RESEND_AFTER = 60.0
#: A subject's length at most, in characters (the ledger's column holds 255 on every
#: database; SQLite would take more, PostgreSQL refuse it).
MAX_SUBJECT_CHARS = 255
#: An operation's params, and what a step returns, at most, as UTF-8 JSON: both are read at
#: every step and the params travel in views; 1 MiB is far above a flow's arguments.
DEFAULT_MAX_JSON_BYTES = 1024 * 1024
#: The name Redis Sentinel knows the broker's primary by (``sentinel monitor NAME ...``).
DEFAULT_SENTINEL_MASTER = "mymaster"
#: The test kit's gate variable (Settings.testkit_gate).
TESTKIT_GATE = "ORCHESTRATOR_TESTKIT_GATE"
#: Where a project names its application for ``orchestrator`` and ``celery -A orchestrator``.
PROJECT_FILE = "pyproject.toml"
#: The values of OpenTelemetry's standard ``OTEL_TRACES_EXPORTER`` that the engine's tracing
#: sets up (``orchestrator.tracing``): one JSON line per span on stdout, or OTLP over HTTP.
TRACES_EXPORTERS = ("console", "otlp", "none")


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not a number") from None
    if value < 0:
        raise ConfigError(f"{name}={raw!r}: must not be negative")
    return value


def _int(name: str, default: int, low: int, high: int | None = None) -> int:
    raw = (os.environ.get(name) or "").strip()
    if not raw:
        return default
    ok = raw.isascii() and raw.isdigit()
    if not ok or not low <= int(raw) <= (high if high is not None else int(raw)):
        bound = f"{low}..{high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name}={raw!r}: expected a whole number, {bound}")
    return int(raw)


def _traces_exporters() -> tuple[str, ...]:
    """``OTEL_TRACES_EXPORTER``, OpenTelemetry's standard variable: a comma-separated list of
    :data:`TRACES_EXPORTERS`; empty (unset, or ``none``): the engine sets up no tracing of
    its own."""
    raw = os.environ.get("OTEL_TRACES_EXPORTER") or ""
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    for name in names:
        if name not in TRACES_EXPORTERS:
            raise ConfigError(f"OTEL_TRACES_EXPORTER={raw!r}: {name!r} is not one of "
                              f"{', '.join(TRACES_EXPORTERS)}")
    return tuple(n for n in names if n != "none")


def _choice(name: str, choices: tuple[str, ...], default: str) -> str:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigError(f"{name}={raw!r}: must be one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Settings:
    broker_url: str
    db_url: str
    routing_file: Path
    graceful_shutdown_timeout: float
    visibility_timeout: float
    heartbeat_interval: float
    alt_routing: str = DEFAULT_ALT_ROUTING
    alt_cache_seconds: float = DEFAULT_ALT_CACHE_SECONDS
    queue_type: str = "classic"
    resend_after: float = DEFAULT_RESEND_AFTER
    #: ORCHESTRATOR_ROUTING_FILE was set (else ``routing_file`` is the default).
    routing_file_set: bool = False
    #: ``ORCHESTRATOR_APP``: the module (``module`` or ``module:attribute``) of the application
    #: (else :func:`project_app`).
    app: str | None = None
    #: ``ORCHESTRATOR_SENTINEL_MASTER``: the primary's name for a ``sentinel://`` broker URL.
    sentinel_master: str = DEFAULT_SENTINEL_MASTER
    #: ``ORCHESTRATOR_CODE_VERSION``: this code's version, as routing.yaml's ``versions``
    #: name it (default: none; the registry then records a fingerprint of the steps).
    code_version: str | None = None
    #: ``ORCHESTRATOR_TESTKIT_GATE``: set by the test kit (orchestrator.testing.kit) in the
    #: workers it starts, never in production: where a step may be held at its start.
    testkit_gate: Path | None = None
    #: ``ORCHESTRATOR_MAX_SUBJECT_CHARS`` (at most :data:`MAX_SUBJECT_CHARS`).
    max_subject_chars: int = MAX_SUBJECT_CHARS
    #: ``ORCHESTRATOR_MAX_JSON_BYTES``: params at submit, a step's output.
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES
    #: ``ORCHESTRATOR_DB_POOL_MODE`` (:func:`db_pool_mode`), checked at start.
    db_pool_mode: str = "session"
    #: ``ORCHESTRATOR_METRICS_MAX_HOSTS``: hosts with per-host metric series, at most.
    metrics_max_hosts: int = DEFAULT_METRICS_MAX_HOSTS
    #: ``OTEL_TRACES_EXPORTER`` (:func:`_traces_exporters`): the exporters the engine's
    #: tracing sets up; none: it uses an application's own TracerProvider, if there is one.
    traces_exporters: tuple[str, ...] = ()
    #: ``OTEL_SERVICE_NAME``: the ``service.name`` of the spans the engine's tracing exports.
    service_name: str | None = None
    #: ``OTEL_SDK_DISABLED=true``: no tracing at all, whatever else is set.
    tracing_disabled: bool = False

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            broker_url=os.environ.get("ORCHESTRATOR_BROKER_URL") or DEFAULT_BROKER_URL,
            db_url=os.environ.get("ORCHESTRATOR_DB_URL") or DEFAULT_DB_URL,
            routing_file=Path(
                os.environ.get("ORCHESTRATOR_ROUTING_FILE") or DEFAULT_ROUTING_FILE
            ),
            graceful_shutdown_timeout=_float(
                "ORCHESTRATOR_GRACEFUL_SHUTDOWN_TIMEOUT", DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT
            ),
            visibility_timeout=_float(
                "ORCHESTRATOR_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT
            ),
            heartbeat_interval=_float("ORCHESTRATOR_HEARTBEAT_INTERVAL",
                                      DEFAULT_HEARTBEAT_INTERVAL),
            alt_routing=_choice("ORCHESTRATOR_ALT_ROUTING", ALT_ROUTING_MODES, DEFAULT_ALT_ROUTING),
            alt_cache_seconds=_float(
                "ORCHESTRATOR_ALT_CACHE_SECONDS", DEFAULT_ALT_CACHE_SECONDS
            ),
            queue_type=_queue_type(),
            resend_after=_float("ORCHESTRATOR_RESEND_AFTER", DEFAULT_RESEND_AFTER),
            routing_file_set=bool(os.environ.get("ORCHESTRATOR_ROUTING_FILE")),
            app=os.environ.get("ORCHESTRATOR_APP") or None,
            sentinel_master=os.environ.get("ORCHESTRATOR_SENTINEL_MASTER")
            or DEFAULT_SENTINEL_MASTER,
            code_version=(os.environ.get("ORCHESTRATOR_CODE_VERSION") or "").strip() or None,
            testkit_gate=Path(os.environ[TESTKIT_GATE]) if os.environ.get(TESTKIT_GATE) else None,
            max_subject_chars=_int("ORCHESTRATOR_MAX_SUBJECT_CHARS", MAX_SUBJECT_CHARS,
                                   1, MAX_SUBJECT_CHARS),
            max_json_bytes=_int("ORCHESTRATOR_MAX_JSON_BYTES", DEFAULT_MAX_JSON_BYTES, 2),
            db_pool_mode=db_pool_mode(),
            metrics_max_hosts=_int("ORCHESTRATOR_METRICS_MAX_HOSTS", DEFAULT_METRICS_MAX_HOSTS,
                                   1),
            traces_exporters=_traces_exporters(),
            service_name=(os.environ.get("OTEL_SERVICE_NAME") or "").strip() or None,
            tracing_disabled=(os.environ.get("OTEL_SDK_DISABLED") or "").strip().lower()
            == "true",
        )


def configured_urls() -> tuple[str, ...]:
    """The broker and database URLs this process's environment names (an error message
    may quote either, or a part of it: :func:`orchestrator.redact.redact_text`)."""
    return tuple(url for url in (os.environ.get("ORCHESTRATOR_BROKER_URL"),
                                 os.environ.get("ORCHESTRATOR_DB_URL")) if url)


def db_url() -> str:
    """``ORCHESTRATOR_DB_URL``, read at each call: a process may be pointed at another
    database between two transactions (tests do), and reading one variable costs nothing."""
    return os.environ.get("ORCHESTRATOR_DB_URL") or DEFAULT_DB_URL


#: ``ORCHESTRATOR_DB_POOL_MODE``: how the ledger's PostgreSQL connections are pooled on the
#: way to the server. ``session`` (the default): each is a server session of its own, directly
#: or through a pooler in session mode. ``transaction``: a pooler (PgBouncer's ``pool_mode =
#: transaction``) may hand the server connection to another client after every transaction,
#: so nothing may outlive one: psycopg's server-side prepared statements are turned off.
DB_POOL_MODES = ("session", "transaction")


def db_pool_mode() -> str:
    """``ORCHESTRATOR_DB_POOL_MODE`` (:data:`DB_POOL_MODES`), read when an engine is made."""
    return _choice("ORCHESTRATOR_DB_POOL_MODE", DB_POOL_MODES, "session")


def _queue_type() -> str:
    raw = os.environ.get("ORCHESTRATOR_QUEUE_TYPE") or "classic"
    if raw not in QUEUE_TYPES:
        raise ConfigError(
            f"ORCHESTRATOR_QUEUE_TYPE={raw!r}: expected one of {', '.join(QUEUE_TYPES)}"
        )
    return raw


def project_app(start: Path | None = None) -> tuple[str, Path] | None:
    """``[tool.orchestrator] app`` of the project this directory belongs to (the nearest
    pyproject.toml from ``start`` up), and that file; None if it names none. The engine knows
    no application: a project names its own, as it names its pytest settings there."""
    import tomllib

    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        path = folder / PROJECT_FILE
        if path.is_file():
            try:
                data = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
                return None  # not ours to judge: pip and pytest say what is wrong with it
            app = data.get("tool", {}).get("orchestrator", {}).get("app")
            return (str(app), path) if app else None
    return None

