#!/usr/bin/env python
"""How much our routing, state keeping and drain cost, as ratios against plain Celery.

Three measurements, each the median of a few repetitions, each compared with an equivalent
plain Celery app (same broker, same no-loss settings: acks_late, reject on worker lost,
prefetch 1, JSON) measured in the same run:

1. **publish**: N step messages through ``nova_app.operations.publish_step`` (the
   StepRouter from routing.yaml picks ``<host>`` or ``<host>-alt``) versus N plain
   ``send_task`` calls with an explicit ``queue=``. Nothing consumes; the queues are purged
   (and their message counts checked) after every repetition.
2. **end-to-end**: N single-step ``boot`` operations through one real worker started with
   ``orchestrator.local.fleet.Fleet`` (prefork, concurrency 2,
   ``ORCHESTRATOR_STEP_DELAY=0``), from the first submit until the database shows every
   operation completed, versus N trivial tasks
   (one Redis INCR each) through a plain ``celery worker`` with the same pool and options.
3. **flow**: N three-step operations over two hosts (a resize's shape) against the same three
   tasks in plain Celery, each sending the next, over the same kinds of queues.
4. **ledger**: a worker's lookups of its own host (and a routing decision) at 2 and 50 hosts,
   against the fleet-wide scan they replaced.
5. **drain**: SIGTERM-to-exit time of an idle orchestrator worker versus an idle plain worker
   (both prefork ``-c 2``), their memory, and a busy drain: from the end of the last step it
   waited for to its exit.
6. **scale** (only with ``--only scale``: it starts 50 workers): real workers for 50 hosts, the
   same steady load at 2 hosts and at 50, then one host drained while the others stay busy;
   then plain Celery's own 2- and 50-host figures, its chain over the same ring of hosts.
7. **shapes** (only with ``--only shapes``): the steps users write. A three-step flow over two
   hosts (two workers ``-c 2``), N operations submitted with ``orch.submit`` in a loop, then
   each awaited with ``orch.wait``, against the same three tasks as plain Celery's chain (same
   no-loss settings, same work, same data; its completions counted in Redis, which it polls).
   Three variants: steps returning a small dict (ours merges it into the params; plain passes
   it on in the next task's kwargs), steps with an ``effect=`` on a table of the application's
   own (plain: the same statement in a short transaction of its own, same database), and
   Nova's resize (``nova_app``, instant steps; plain: the same instance and migration rows
   changed by three tasks). Ours and plain take turns batch by batch; then one operation at a
   time, submit to the wait's return, for the overhead per step.

Absolute times depend on the machine; only the ratios are meant to be compared between runs.
Everything runs against a dedicated Redis database (default ``redis://127.0.0.1:6379/12``) and
a temporary SQLite file. The Redis database must hold nothing but keys this script (or a
Celery app on it) creates; otherwise the script refuses to run.

    python scripts/benchmark.py --quick              # about a minute
    python scripts/benchmark.py --json bench.json    # fuller run, results also as JSON
    python scripts/benchmark.py --only shapes        # the steps users write (issue 25)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Every Redis key and queue this script creates starts with this (plus Celery's own
#: ``_kombu.*`` and ``unacked*`` bookkeeping keys); anything else in the database stops us.
PREFIX = "bench"
OURS_HOST = "benchhost"  # queues benchhost, benchhost-alt
DRAIN_HOST = "benchdrain"  # a host of its own: no operation of the throughput run involves it
PLAIN_QUEUE = "benchplain"  # the plain worker consumes benchplain and benchplain-alt
PLAIN_TASK = "bench.noop"
COUNTER_KEY = "bench:done"
PLAIN_MODULE = "benchplain_app"
OWNED_KEY_PREFIXES = (b"_kombu.", b"unacked", PREFIX.encode())

PLAIN_APP_SOURCE = '''\
"""Plain Celery: the no-loss settings of an Orchestrator's app, without router, database or
drain."""
import os

import redis
from celery import Celery

from orchestrator.config import Settings
from orchestrator.policy import no_loss

BROKER_URL = os.environ["BENCH_BROKER_URL"]
COUNTER_KEY = os.environ["BENCH_COUNTER_KEY"]

app = Celery("benchplain", broker=BROKER_URL)
# The same "nothing lost" settings an Orchestrator puts on its app (orchestrator.policy).
app.conf.update(
    no_loss(BROKER_URL, Settings.from_env()),
    task_default_queue="benchplain-default",
    worker_hijack_root_logger=True,
)
_client = None


@app.task(name="bench.noop")
def noop(**kwargs):
    global _client
    if _client is None:
        _client = redis.Redis.from_url(BROKER_URL)
    _client.incr(COUNTER_KEY)
'''


FLOW_MODULE = "benchflow_app"
FLOW_HOSTS = ("benchflowa", "benchflowb")  # roles a and b; queues <host> and <host>-alt
FLOW_COUNTER_KEY = "bench:flow:done"
OURS_COUNTER_KEY = "bench:flow:ours"
#: An idle worker is measured this long after it said " ready.".
IDLE_SETTLE_SECONDS = 5.0
FLOW_ROUTING = """\
steps:
  prep: {queue: main, reason: nothing started (as prep_resize)}
  move: {queue: alt, reason: started (as resize_instance)}
  finish: {queue: alt, reason: started (as finish_resize)}
"""
FLOW_APP_SOURCE = '''\
"""Three steps over two hosts, the shape of a resize: prep (b), move (a), finish (b)."""
import os

import redis
from celery import Celery

from orchestrator import Orchestrator

app = Celery("benchflow")
orch = Orchestrator(app, routing=os.environ["BENCH_FLOW_ROUTING"])


@orch.step
def prep(ctx):
    return None


@orch.step
def move(ctx):
    return None


_client = None


@orch.step
def finish(ctx):
    # Counted as the plain twin counts (the benchmark then reads the ledger once): polling
    # the ledger all along would load one side of the comparison only.
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["BENCH_BROKER_URL"])
    _client.incr("bench:flow:ours")
    return None


orch.flow("three", [("prep", "b"), ("move", "a"), ("finish", "b")])
'''
PLAIN_FLOW_SOURCE = '''\
"""Plain Celery doing the same work: three tasks over the same two queues, each sending the
next (as a chain would), with the same no-loss settings; the last one counts."""
import os
import time

import redis
from celery import Celery

from orchestrator.config import Settings
from orchestrator.policy import no_loss

BROKER_URL = os.environ["BENCH_BROKER_URL"]
A, B = os.environ["BENCH_FLOW_PLAIN_HOSTS"].split(",")

app = Celery("benchplainflow", broker=BROKER_URL)
# The same "nothing lost" settings an Orchestrator puts on its app (orchestrator.policy).
app.conf.update(no_loss(BROKER_URL, Settings.from_env()),
                task_default_queue="benchplainflow-default")
_client = None


@app.task(name="bench.prep")
def prep(operation_id, position, host, a=A, b=B):
    app.send_task("bench.move", kwargs={"operation_id": operation_id, "position": 1,
                  "host": a, "a": a, "b": b}, task_id=f"{operation_id}.1", queue=a + "-alt")


@app.task(name="bench.move")
def move(operation_id, position, host, a=A, b=B):
    app.send_task("bench.finish", kwargs={"operation_id": operation_id, "position": 2,
                  "host": b, "a": a, "b": b}, task_id=f"{operation_id}.2", queue=b + "-alt")


@app.task(name="bench.finish")
def finish(operation_id, position, host, a=A, b=B):
    global _client
    if _client is None:
        _client = redis.Redis.from_url(BROKER_URL)
    _client.set("bench:flow:last", repr(time.time()))
    _client.incr("bench:flow:done")
'''
PLAIN_FLOW_MODULE = "benchplainflow_app"
PLAIN_FLOW_HOSTS = ("benchplaina", "benchplainb")

# -- the steps users write (--only shapes) -------------------------------------------------
SHAPES_MODULE = "benchshapes_app"
SHAPES_HOSTS = ("benchshapesa", "benchshapesb")  # roles a and b of the data and effects flows
SHAPES_NOVA_HOSTS = ("benchshapesnovaa", "benchshapesnovab")  # a resize's source and dest
PLAIN_SHAPES_MODULE = "benchplainshapes_app"
PLAIN_SHAPES_HOSTS = ("benchshapesplaina", "benchshapesplainb")
SHAPES_VARIANTS = ("data", "effects", "nova")
SHAPES_ROUTING = """\
steps:
  data_prep: {queue: main, reason: nothing started (as prep_resize)}
  data_move: {queue: alt, reason: started (as resize_instance)}
  data_finish: {queue: alt, reason: started (as finish_resize)}
  effects_prep: {queue: main, reason: nothing started (as prep_resize)}
  effects_move: {queue: alt, reason: started (as resize_instance)}
  effects_finish: {queue: alt, reason: started (as finish_resize)}
"""
SHAPES_APP_SOURCE = '''\
"""The steps users write, over the shape of a resize (prep on b, move on a, finish on b):
"data" steps return a few keys that the next steps read from their params; "effects" steps
change a row of the application's own table in the ledger transaction that completes them."""
import os
import time

from celery import Celery
from sqlalchemy import Float, Integer, String, create_engine, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from orchestrator import Orchestrator

app = Celery("benchshapes")
orch = Orchestrator(app, routing=os.environ["BENCH_SHAPES_ROUTING"])


class Base(DeclarativeBase):
    pass


class BenchItem(Base):
    """One row per operation: what a user's effects keep up to date."""

    __tablename__ = "bench_items"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    counter: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32))
    updated_at: Mapped[float] = mapped_column(Float)


# The application's own table, next to the ledger's (as a user without migrations would).
_setup = create_engine(os.environ["ORCHESTRATOR_DB_URL"])
Base.metadata.create_all(_setup)
_setup.dispose()


@orch.step
def data_prep(ctx):
    return {"rows": 1000, "step": "prep", "source": ctx.host, "checksum": "9f86d081884c7d65"}


@orch.step
def data_move(ctx):
    rows = ctx.params["rows"]
    return {"moved": rows, "step": "move", "bytes": rows * 512, "target": ctx.host}


@orch.step
def data_finish(ctx):
    return {"step": "finish", "written": ctx.params["moved"],
            "total_bytes": ctx.params["bytes"]}


def _touch(status, first=False):
    def effect(session, operation):
        if first:
            session.add(BenchItem(id=operation.id, counter=1, status=status,
                                  updated_at=time.time()))
        else:
            session.execute(update(BenchItem).where(BenchItem.id == operation.id).values(
                counter=BenchItem.counter + 1, status=status, updated_at=time.time()))
    return effect


@orch.step(name="effects_prep", effect=_touch("prepped", first=True))
def effects_prep(ctx):
    return None


@orch.step(name="effects_move", effect=_touch("moved"))
def effects_move(ctx):
    return None


@orch.step(name="effects_finish", effect=_touch("finished"))
def effects_finish(ctx):
    return None


orch.flow("shape_data", [("data_prep", "b"), ("data_move", "a"), ("data_finish", "b")])
orch.flow("shape_effects", [("effects_prep", "b"), ("effects_move", "a"),
                            ("effects_finish", "b")])
'''
PLAIN_SHAPES_SOURCE = '''\
"""Plain Celery doing what the shapes' steps do, with the same no-loss settings: three tasks
over the same two kinds of queues, each sending the next with what it returned in the next
one's kwargs (as a chain would); the last one counts in Redis. The effects and Nova's resize
change the same rows in short transactions of their own on the same database."""
import os
import time
import uuid

import redis
from celery import Celery
from sqlalchemy import Float, Integer, String, create_engine, event, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from nova_app.models import Instance, Migration
from orchestrator.config import Settings
from orchestrator.policy import no_loss

BROKER_URL = os.environ["BENCH_BROKER_URL"]
DB_URL = os.environ["ORCHESTRATOR_DB_URL"]
A, B = os.environ["BENCH_SHAPES_PLAIN_HOSTS"].split(",")

app = Celery("benchplainshapes", broker=BROKER_URL)
# The same "nothing lost" settings an Orchestrator puts on its app (orchestrator.policy).
app.conf.update(no_loss(BROKER_URL, Settings.from_env()),
                task_default_queue="benchplainshapes-default")


class Base(DeclarativeBase):
    pass


class BenchItem(Base):
    __tablename__ = "bench_items"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    counter: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32))
    updated_at: Mapped[float] = mapped_column(Float)


_engine = None
_client = None


def engine():
    """One engine per process. On SQLite, the settings the ledger's own engine uses (wait for
    the lock, WAL's synchronous=NORMAL, the write lock taken at BEGIN): a comparison of the
    library, not of two ways of setting up SQLite."""
    global _engine
    if _engine is None:
        if DB_URL.startswith("sqlite"):
            _engine = create_engine(DB_URL, connect_args={"timeout": 30,
                                                          "isolation_level": None})

            @event.listens_for(_engine, "connect")
            def _on_connect(dbapi_conn, _record):
                dbapi_conn.execute("PRAGMA busy_timeout=30000")
                dbapi_conn.execute("PRAGMA synchronous=NORMAL")

            @event.listens_for(_engine, "begin")
            def _on_begin(conn):
                conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            _engine = create_engine(DB_URL)
    return _engine


def _next(name, operation_id, position, queue, **kwargs):
    app.send_task(name, kwargs={"operation_id": operation_id, **kwargs},
                  task_id=f"{operation_id}.{position}", queue=queue)


def _done(variant):
    global _client
    if _client is None:
        _client = redis.Redis.from_url(BROKER_URL)
    pipe = _client.pipeline()
    pipe.set(f"bench:shapes:{variant}:last", repr(time.time()))
    pipe.incr(f"bench:shapes:{variant}:done")
    pipe.execute()


def submit(variant):
    """The data and effects shapes' first task (the twin of orch.submit)."""
    op = f"plain-{uuid.uuid4()}"
    app.send_task(f"shapes.{variant}_prep", kwargs={"operation_id": op},
                  task_id=f"{op}.0", queue=B)
    return op


# -- data -----------------------------------------------------------------------------------
@app.task(name="shapes.data_prep")
def data_prep(operation_id, **params):
    out = {"rows": 1000, "step": "prep", "source": B, "checksum": "9f86d081884c7d65"}
    _next("shapes.data_move", operation_id, 1, A + "-alt", **{**params, **out})
    return out


@app.task(name="shapes.data_move")
def data_move(operation_id, **params):
    rows = params["rows"]
    out = {"moved": rows, "step": "move", "bytes": rows * 512, "target": A}
    _next("shapes.data_finish", operation_id, 2, B + "-alt", **{**params, **out})
    return out


@app.task(name="shapes.data_finish")
def data_finish(operation_id, **params):
    out = {"step": "finish", "written": params["moved"], "total_bytes": params["bytes"]}
    _done("data")
    return out


# -- effects --------------------------------------------------------------------------------
def _touch(operation_id, status, first=False):
    with Session(engine()) as s, s.begin():
        if first:
            s.add(BenchItem(id=operation_id, counter=1, status=status, updated_at=time.time()))
        else:
            s.execute(update(BenchItem).where(BenchItem.id == operation_id).values(
                counter=BenchItem.counter + 1, status=status, updated_at=time.time()))


@app.task(name="shapes.effects_prep")
def effects_prep(operation_id):
    _touch(operation_id, "prepped", first=True)
    _next("shapes.effects_move", operation_id, 1, A + "-alt")


@app.task(name="shapes.effects_move")
def effects_move(operation_id):
    _touch(operation_id, "moved")
    _next("shapes.effects_finish", operation_id, 2, B + "-alt")


@app.task(name="shapes.effects_finish")
def effects_finish(operation_id):
    _touch(operation_id, "finished")
    _done("effects")


# -- Nova's resize --------------------------------------------------------------------------
def submit_resize(instance_id, flavor="m1.large"):
    """Nova's resize request without the orchestrator: the instance locked and checked, its
    migration recorded, in one transaction; then its first task (prep on the destination)."""
    with Session(engine()) as s, s.begin():
        instance = s.execute(select(Instance).where(Instance.id == instance_id)
                             .with_for_update()).scalar_one()
        if instance.vm_state != "active" or instance.task_state is not None:
            raise RuntimeError(f"instance {instance_id} is {instance.vm_state}")
        mig = Migration(instance_id=instance.id, source=instance.host, dest=B,
                        old_flavor=instance.flavor, new_flavor=flavor,
                        migration_type="resize", status="pre-migrating", cross_cell=False,
                        force_complete=False, abort_requested=False)
        s.add(mig)
        s.flush()
        instance.task_state = "resize_prep"
        migration_id = mig.id
    op = str(uuid.uuid4())
    app.send_task("shapes.nova_prep_resize", kwargs={
        "operation_id": op, "instance_id": instance_id, "migration_id": migration_id},
        task_id=f"{op}.0", queue=B)
    return op


def _resize(instance_id, migration_id, migration, to_dest=False, **fields):
    """What nova_app.effects' change() does, in a transaction of its own."""
    with Session(engine()) as s, s.begin():
        instance = s.get(Instance, instance_id)
        mig = s.get(Migration, migration_id)
        for name, value in fields.items():
            setattr(instance, name, value)
        mig.status = migration
        if to_dest:
            instance.host, instance.flavor = mig.dest, mig.new_flavor


@app.task(name="shapes.nova_prep_resize")
def nova_prep_resize(operation_id, instance_id, migration_id):
    _resize(instance_id, migration_id, "migrating", task_state="resize_migrating")
    _next("shapes.nova_resize_instance", operation_id, 1, A + "-alt",
          instance_id=instance_id, migration_id=migration_id)


@app.task(name="shapes.nova_resize_instance")
def nova_resize_instance(operation_id, instance_id, migration_id):
    _resize(instance_id, migration_id, "post-migrating", task_state="resize_finish")
    _next("shapes.nova_finish_resize", operation_id, 2, B + "-alt",
          instance_id=instance_id, migration_id=migration_id)


@app.task(name="shapes.nova_finish_resize")
def nova_finish_resize(operation_id, instance_id, migration_id):
    _resize(instance_id, migration_id, "finished", to_dest=True, vm_state="resized",
            task_state=None)
    _done("nova")
'''


@dataclass(frozen=True)
class Config:
    mode: str
    publish_n: int
    publish_reps: int
    e2e_n: int
    e2e_reps: int
    drain_reps: int
    concurrency: int = 2
    flow_n: int = 100
    flow_reps: int = 3
    #: Flows run one at a time for the latency (submit to the end of the last step).
    latency_n: int = 40
    #: How long an idle worker's CPU is sampled.
    idle_seconds: float = 20.0
    #: Windows of idle_seconds in turn; the one with the median ratio is reported.
    idle_windows: int = 3
    #: Operations in flight per host for the ledger lookups, and the fleet sizes compared.
    ledger_per_host: int = 100
    ledger_hosts: tuple[int, ...] = (2, 50)
    #: The scale run: real workers (prefork -c 1) for this many hosts, flows kept in flight,
    #: and how long each steady-load window lasts.
    scale_hosts: int = 50
    scale_inflight: int = 40
    scale_seconds: float = 15.0
    #: The steps users write (--only shapes): operations per batch, batches per side, and
    #: operations one at a time per side, for each variant.
    shapes_n: int = 150
    shapes_reps: int = 5
    shapes_latency_n: int = 30


QUICK = Config("quick", publish_n=500, publish_reps=3, e2e_n=50, e2e_reps=3, drain_reps=3,
               flow_n=40, flow_reps=3, latency_n=20, idle_seconds=5.0, idle_windows=1,
               scale_hosts=12, scale_seconds=8.0, shapes_n=40, shapes_reps=3,
               shapes_latency_n=20)
FULL = Config("full", publish_n=2000, publish_reps=5, e2e_n=200, e2e_reps=3, drain_reps=3,
              flow_n=150, flow_reps=5)


@dataclass
class Run:
    """What one invocation measured, plus anything that looked wrong on the way."""

    config: Config
    results: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        print(f"  ! {text}", flush=True)


def log(text: str) -> None:
    print(text, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(ours: float, plain: float) -> float:
    return ours / plain if plain else float("nan")


# -- processes -----------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (prefork pool processes), read from /proc."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        for child in map(int, text.split()):
            found.append(child)
            found.extend(_children(child))
    return found


def poll_until(done: Callable[[], bool], timeout: float, what: str, interval: float) -> float:
    """Poll until ``done()``; return the monotonic time at which it first answered True."""
    deadline = time.monotonic() + timeout
    while True:
        if done():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- the benchmark -------------------------------------------------------------------------


class Bench:
    def __init__(self, config: Config, broker_url: str, tmp: Path, run: Run) -> None:
        self.config, self.broker_url, self.tmp, self.run = config, broker_url, tmp, run
        self.db_path = tmp / "orchestrator.db"
        self.log_dir = tmp / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

        # Imported here: nova_app.app reads ORCHESTRATOR_* at import, set by main().
        import redis

        from nova_app import operations
        from nova_app.app import app, orch
        from nova_app.flows import STEP_NAMES
        from orchestrator.local.fleet import Fleet

        self.redis = redis.Redis.from_url(broker_url)
        self.ours_app, self.operations, self.orch = app, operations, orch
        self.routing_table = orch.routing
        self.steps = sorted(STEP_NAMES)
        self.fleet = Fleet(
            env={
                "ORCHESTRATOR_BROKER_URL": broker_url,
                "ORCHESTRATOR_DB_URL": os.environ["ORCHESTRATOR_DB_URL"],
                "ORCHESTRATOR_ROUTING_FILE": os.environ["ORCHESTRATOR_ROUTING_FILE"],
                "ORCHESTRATOR_STEP_DELAY": "0",
            },
            log_dir=self.log_dir, app="nova_app.app",
        )
        # Create the schema once, before any worker: several processes creating the tables of
        # a fresh SQLite file at the same moment is not what we measure.
        orch.db.engine()

        (tmp / f"{PLAIN_MODULE}.py").write_text(PLAIN_APP_SOURCE)
        os.environ["BENCH_BROKER_URL"] = broker_url
        os.environ["BENCH_COUNTER_KEY"] = COUNTER_KEY
        sys.path.insert(0, str(tmp))
        import importlib

        self.plain_app = importlib.import_module(PLAIN_MODULE).app
        # The plain apps (and the flow app) are modules written to ``tmp``: their workers run
        # there, with the repository importable.
        self.plain = Fleet(env={"PYTHONPATH": os.pathsep.join(filter(None, [
            str(tmp), str(REPO_ROOT), os.environ.get("PYTHONPATH")]))},
            log_dir=self.log_dir, cwd=tmp)

    # -- workers ---------------------------------------------------------------------------
    def start_ours(self, host: str):
        worker = self.fleet.start(host, concurrency=self.config.concurrency, ready=False)
        worker.wait_ready(timeout=60)
        return worker

    def start_plain(self) -> tuple[subprocess.Popen, Path]:
        worker = self.plain.spawn(PLAIN_QUEUE, "plain", [
            sys.executable, "-m", "celery", "-A", PLAIN_MODULE, "worker",
            "-n", f"{PLAIN_QUEUE}@%h", "-Q", f"{PLAIN_QUEUE},{PLAIN_QUEUE}-alt",
            "-c", str(self.config.concurrency), "-l", "info",
            "--without-mingle", "--without-gossip",
        ], ready=False)
        worker.wait_ready(timeout=60)
        return worker.proc, worker.log_path

    def stop(self, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait; SIGKILL (reported as a problem) if it does not exit in time."""
        if proc.poll() is not None:
            return proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.run.problem(f"{what} (pid {proc.pid}) still running {timeout:.0f}s after "
                             "SIGTERM; killed")
            proc.kill()
            proc.wait(timeout=10)
            return None

    # -- 1. publish ------------------------------------------------------------------------
    def _purge(self, app, queues: list[str]) -> int:
        purged = 0
        with app.connection_for_write() as conn:
            for queue in queues:
                purged += int(conn.default_channel.queue_purge(queue) or 0)
        return purged

    def publish(self) -> None:
        n, reps = self.config.publish_n, self.config.publish_reps
        log(f"[publish] {n} messages x {reps} repetitions")
        publish_step = self.operations.publish_step
        # The host is registered as a current (alt-consuming) service, as a running worker
        # would be: the router then takes its normal path (a cached registry snapshot), not
        # the fallback of an unknown host, which also records the fallback in the database.

        self.orch.registry.register(f"{OURS_HOST}@bench", OURS_HOST, consumes_main=True,
                          consumes_alt=True, pid=os.getpid())
        # Both sides send the same kwargs to the same pattern of queues: ours cycles through
        # every step (the router picks main or alt from routing.yaml); plain gets the queue
        # the router would have picked, named explicitly.
        plan = [self.steps[i % len(self.steps)] for i in range(n)]
        plain_queues = [
            PLAIN_QUEUE + ("-alt" if self.orch.routing.kind(step) == "alt" else "")
            for step in plan
        ]
        ours_queues = [OURS_HOST, OURS_HOST + "-alt"]
        plain_queue_names = [PLAIN_QUEUE, PLAIN_QUEUE + "-alt"]
        send_task = self.plain_app.send_task

        def ours() -> float:
            op = str(uuid.uuid4())
            start = time.perf_counter()
            for i, step in enumerate(plan):
                publish_step(op, i, step, OURS_HOST)
            return time.perf_counter() - start

        def plain() -> float:
            op = str(uuid.uuid4())
            start = time.perf_counter()
            for i, queue in enumerate(plain_queues):
                send_task(
                    PLAIN_TASK,
                    kwargs={"operation_id": op, "position": i, "host": OURS_HOST},
                    task_id=f"{op}.{i}", queue=queue,
                )
            return time.perf_counter() - start

        # Warm-up: connections, producer pools, first declaration of each queue.
        for i, step in enumerate(self.steps):
            publish_step(str(uuid.uuid4()), i, step, OURS_HOST)
        for queue in plain_queue_names:
            send_task(PLAIN_TASK, kwargs={"operation_id": "w", "position": 0, "host": "w"},
                      queue=queue)
        self._purge(self.ours_app, ours_queues)
        self._purge(self.plain_app, plain_queue_names)

        samples: dict[str, list[float]] = {"ours": [], "plain": []}
        try:
            for rep in range(reps):
                order = [("ours", ours), ("plain", plain)]
                if rep % 2:
                    order.reverse()
                for name, fn in order:
                    seconds = fn()
                    app, queues = ((self.ours_app, ours_queues) if name == "ours"
                                   else (self.plain_app, plain_queue_names))
                    purged = self._purge(app, queues)
                    if purged != n:
                        self.run.problem(f"publish {name}: sent {n} messages, found {purged} "
                                         f"in {', '.join(queues)}")
                    samples[name].append(seconds)
                log(f"  rep {rep + 1}: ours {samples['ours'][-1]:.3f}s, "
                    f"plain {samples['plain'][-1]:.3f}s")
        finally:
            self._purge(self.ours_app, ours_queues)
            self._purge(self.plain_app, plain_queue_names)
        ours_s, plain_s = median(samples["ours"]), median(samples["plain"])
        self.run.results["publish"] = {
            "messages": n, "repetitions": reps, "unit": "seconds",
            "ours_samples": samples["ours"], "plain_samples": samples["plain"],
            "ours": ours_s, "plain": plain_s,
            "ours_us_per_message": ours_s / n * 1e6, "plain_us_per_message": plain_s / n * 1e6,
            "ratio_ours_over_plain": ratio(ours_s, plain_s),
        }

    # -- 2. end-to-end ---------------------------------------------------------------------
    def _op_counts(self, conn: sqlite3.Connection) -> dict[str, int]:
        rows = conn.execute("SELECT status, COUNT(*) FROM operations GROUP BY status").fetchall()
        return {status: count for status, count in rows}

    def e2e_ours(self) -> dict[str, Any]:
        n, reps = self.config.e2e_n, self.config.e2e_reps
        warm = max(2, min(10, n // 10))
        boot = self.operations.boot
        # Polled with a plain autocommit reader: the project's sessions start with
        # BEGIN IMMEDIATE (a write lock) even to read, and the poll must not slow the run.
        conn = sqlite3.connect(self.db_path, isolation_level=None, timeout=30)
        worker = self.start_ours(OURS_HOST)
        submitted = 0
        samples: list[dict[str, float]] = []
        try:
            def run_batch(count: int, label: str) -> dict[str, float]:
                nonlocal submitted
                start = time.monotonic()
                for i in range(count):
                    boot(f"{PREFIX}-{label}-{i}", OURS_HOST)
                submit_end = time.monotonic()
                submitted += count

                def done() -> bool:
                    counts = self._op_counts(conn)
                    return counts.get("completed", 0) + counts.get("failed", 0) >= submitted

                end = poll_until(done, timeout=60 + count, what=f"{label}: {count} operations",
                                 interval=0.01)
                return {"seconds": end - start, "submit_seconds": submit_end - start,
                        "ops_per_second": count / (end - start)}

            run_batch(warm, "warmup")
            for rep in range(reps):
                sample = run_batch(n, f"rep{rep}")
                samples.append(sample)
                log(f"  ours rep {rep + 1}: {sample['ops_per_second']:.1f} ops/s "
                    f"({sample['seconds']:.2f}s, submitting took {sample['submit_seconds']:.2f}s)")
        finally:
            code = self.stop(worker.proc, "orchestrator worker (throughput)")
            if code not in (0, None):
                self.run.problem(f"orchestrator worker (throughput) exited {code} after SIGTERM")
        counts = self._op_counts(conn)
        steps = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(attempts > 1), 0), COALESCE(SUM(applied > 1), 0) "
            "FROM step_log"
        ).fetchone()
        conn.close()
        if counts.get("failed"):
            self.run.problem(f"end-to-end ours: {counts['failed']} operation(s) failed")
        if steps[1] or steps[2]:
            self.run.problem(f"end-to-end ours: {steps[1]} step(s) delivered more than once, "
                             f"{steps[2]} applied more than once")
        return {"samples": samples, "warmup": warm, "statuses": counts,
                "steps_logged": steps[0], "redelivered_steps": steps[1]}

    def e2e_plain(self) -> dict[str, Any]:
        n, reps = self.config.e2e_n, self.config.e2e_reps
        warm = max(2, min(10, n // 10))
        send_task = self.plain_app.send_task
        proc, _log = self.start_plain()
        samples: list[dict[str, float]] = []
        try:
            def run_batch(count: int) -> dict[str, float]:
                self.redis.set(COUNTER_KEY, 0)
                op = str(uuid.uuid4())
                start = time.monotonic()
                for i in range(count):
                    send_task(PLAIN_TASK,
                              kwargs={"operation_id": op, "position": 0, "host": OURS_HOST},
                              task_id=f"{op}.{i}", queue=PLAIN_QUEUE)
                submit_end = time.monotonic()
                end = poll_until(lambda: int(self.redis.get(COUNTER_KEY) or 0) >= count,
                                 timeout=60 + count, what=f"{count} plain tasks", interval=0.01)
                return {"seconds": end - start, "submit_seconds": submit_end - start,
                        "ops_per_second": count / (end - start)}

            run_batch(warm)
            for rep in range(reps):
                sample = run_batch(n)
                samples.append(sample)
                log(f"  plain rep {rep + 1}: {sample['ops_per_second']:.1f} ops/s "
                    f"({sample['seconds']:.2f}s, submitting took {sample['submit_seconds']:.2f}s)")
        finally:
            code = self.stop(proc, "plain worker (throughput)")
            if code not in (0, None):
                self.run.problem(f"plain worker (throughput) exited {code} after SIGTERM")
        return {"samples": samples, "warmup": warm}

    def e2e(self) -> None:
        n, reps = self.config.e2e_n, self.config.e2e_reps
        log(f"[end-to-end] {n} operations x {reps} repetitions, concurrency "
            f"{self.config.concurrency}")
        ours = self.e2e_ours()
        plain = self.e2e_plain()
        ours_ops = median([s["ops_per_second"] for s in ours["samples"]])
        plain_ops = median([s["ops_per_second"] for s in plain["samples"]])
        self.run.results["end_to_end"] = {
            "operations": n, "repetitions": reps, "concurrency": self.config.concurrency,
            "unit": "operations per second", "ours": ours_ops, "plain": plain_ops,
            "ratio_ours_over_plain": ratio(ours_ops, plain_ops),
            # Submitting alone (ours: boot(), three database transactions and a publish;
            # plain: send_task), per operation, while the worker already runs.
            "ours_submit_ms_per_op": median(
                [s["submit_seconds"] for s in ours["samples"]]) / n * 1e3,
            "plain_submit_ms_per_op": median(
                [s["submit_seconds"] for s in plain["samples"]]) / n * 1e3,
            "ours_detail": ours, "plain_detail": plain,
        }

    # -- 2b. three-step flows over two hosts -----------------------------------------------
    def _spawn(self, app_module: str, host: str, label: str, concurrency: int | None = None,
               ready: bool = True) -> subprocess.Popen:
        worker = self.plain.spawn(host, label, [
            sys.executable, "-m", "celery", "-A", app_module, "worker", "-n", f"{host}@%h",
            "-Q", f"{host},{host}-alt", "-c", str(concurrency or self.config.concurrency),
            "-l", "info", "--without-mingle", "--without-gossip"], ready=False)
        if ready:
            worker.wait_ready(timeout=60)
        proc = worker.proc
        proc.worker = worker  # type: ignore[attr-defined]
        return proc

    def _ready(self, proc: subprocess.Popen, timeout: float = 60) -> None:
        proc.worker.wait_ready(timeout=timeout)  # type: ignore[attr-defined]

    def _flow_orch(self) -> Any:
        """The three-step flow app (and its plain twin) written to the temporary directory."""
        import importlib

        (self.tmp / "flow-routing.yaml").write_text(FLOW_ROUTING)
        (self.tmp / f"{FLOW_MODULE}.py").write_text(FLOW_APP_SOURCE)
        (self.tmp / f"{PLAIN_FLOW_MODULE}.py").write_text(PLAIN_FLOW_SOURCE)
        os.environ["BENCH_FLOW_ROUTING"] = str(self.tmp / "flow-routing.yaml")
        os.environ["BENCH_FLOW_PLAIN_HOSTS"] = ",".join(PLAIN_FLOW_HOSTS)
        return importlib.import_module(FLOW_MODULE).orch

    def flow(self) -> None:
        """N three-step operations over two hosts (a resize's shape) against the same three
        tasks in plain Celery over the same two kinds of queues, each step sending the next."""
        import importlib

        n, reps = self.config.flow_n, self.config.flow_reps
        log(f"[flow] {n} three-step operations over two hosts x {reps} repetitions")
        orch = self._flow_orch()
        plain_app = importlib.import_module(PLAIN_FLOW_MODULE).app
        for host in FLOW_HOSTS:  # registered as current services, as their workers will be
            orch.registry.register(f"{host}@bench", host, consumes_main=True,
                                   consumes_alt=True, pid=os.getpid())
        a, b = FLOW_HOSTS
        from sqlalchemy import func, select

        from orchestrator.ledger.models import Operation

        def completed() -> int:  # any database: SQLite by default, --db-url for another
            with orch.db.read() as s:
                return s.execute(select(func.count()).select_from(Operation).where(
                    Operation.status == "completed", Operation.kind == "three")).scalar_one()

        def ours_batch(count: int) -> dict[str, float]:
            before = completed()
            self.redis.set(OURS_COUNTER_KEY, 0)
            start = time.monotonic()
            for _ in range(count):
                orch.submit("three", hosts={"a": a, "b": b})
            submitted = time.monotonic()
            # Their last steps ran (counted as plain's are), then recorded in the ledger.
            poll_until(lambda: int(self.redis.get(OURS_COUNTER_KEY) or 0) >= count,
                       timeout=120 + count, what=f"{count} flows", interval=0.01)
            end = poll_until(lambda: completed() - before >= count, timeout=60,
                             what=f"{count} flows recorded", interval=0.002)
            return {"seconds": end - start, "submit_seconds": submitted - start,
                    "ops_per_second": count / (end - start)}

        def plain_batch(count: int) -> dict[str, float]:
            self.redis.set(FLOW_COUNTER_KEY, 0)
            start = time.monotonic()
            for _ in range(count):
                op = str(uuid.uuid4())
                plain_app.send_task("bench.prep", kwargs={"operation_id": op, "position": 0,
                                    "host": PLAIN_FLOW_HOSTS[1]}, task_id=f"{op}.0",
                                    queue=PLAIN_FLOW_HOSTS[1])
            submitted = time.monotonic()
            end = poll_until(lambda: int(self.redis.get(FLOW_COUNTER_KEY) or 0) >= count,
                             timeout=120 + count, what=f"{count} plain flows", interval=0.01)
            return {"seconds": end - start, "submit_seconds": submitted - start,
                    "ops_per_second": count / (end - start)}

        def ours_one() -> tuple[float, float]:
            """One flow alone: (submit seconds, submit to the end of its last step)."""
            done = int(self.redis.get(OURS_COUNTER_KEY) or 0)
            start = time.time()
            op = orch.submit("three", hosts={"a": a, "b": b})
            submitted = time.time()
            poll_until(lambda: int(self.redis.get(OURS_COUNTER_KEY) or 0) > done, 30,
                       "a flow", 0.002)

            def finished() -> float | None:
                with orch.db.read() as s:
                    return s.execute(select(Operation.finished_at).where(
                        Operation.id == op, Operation.status == "completed")).scalar()

            poll_until(lambda: finished() is not None, 30, "a flow", 0.002)
            return submitted - start, finished() - start

        def plain_one() -> tuple[float, float]:
            done = int(self.redis.get(FLOW_COUNTER_KEY) or 0)
            op = str(uuid.uuid4())
            start = time.time()
            plain_app.send_task("bench.prep", kwargs={"operation_id": op, "position": 0,
                                "host": PLAIN_FLOW_HOSTS[1]}, task_id=f"{op}.0",
                                queue=PLAIN_FLOW_HOSTS[1])
            submitted = time.time()
            poll_until(lambda: int(self.redis.get(FLOW_COUNTER_KEY) or 0) > done, 30,
                       "a plain flow", 0.002)
            return submitted - start, float(self.redis.get("bench:flow:last")) - start

        # Both fleets run side by side and take turns, a batch (or a flow) of ours then one
        # of plain: this machine's speed drifts by a third between minutes, and a ratio of
        # runs minutes apart measured the drift as much as the code.
        samples: dict[str, list[dict[str, float]]] = {"ours": [], "plain": []}
        alone: dict[str, list[tuple[float, float]]] = {"ours": [], "plain": []}
        kinds = {"ours": (FLOW_MODULE, FLOW_HOSTS, ours_batch, ours_one),
                 "plain": (PLAIN_FLOW_MODULE, PLAIN_FLOW_HOSTS, plain_batch, plain_one)}
        procs = {name: [self._spawn(module, host, name) for host in hosts]
                 for name, (module, hosts, _, _) in kinds.items()}
        try:
            for _, _, batch, _ in kinds.values():
                batch(max(2, n // 10))  # warm-up
            for rep in range(reps):
                for name, (_, _, batch, _) in kinds.items():
                    sample = batch(n)
                    samples[name].append(sample)
                    log(f"  {name} rep {rep + 1}: {sample['ops_per_second']:.1f} ops/s "
                        f"(submitting {sample['submit_seconds'] / n * 1e3:.2f} ms/op)")
            for _ in range(self.config.latency_n):
                for name, (_, _, _, one) in kinds.items():
                    alone[name].append(one())
            for name in kinds:
                log(f"  {name}, one at a time: "
                    f"{median([x[1] for x in alone[name]]) * 1e3:.1f} ms per flow, submit "
                    f"{median([x[0] for x in alone[name]]) * 1e3:.2f} ms")
        finally:
            for name, workers in procs.items():
                for proc in workers:
                    code = self.stop(proc, f"{name} flow worker")
                    if code not in (0, None):
                        self.run.problem(f"{name} flow worker exited {code} after SIGTERM")
        ours_ops = median([x["ops_per_second"] for x in samples["ours"]])
        plain_ops = median([x["ops_per_second"] for x in samples["plain"]])
        self.run.results["flow"] = {
            "operations": n, "repetitions": reps, "steps_per_operation": 3,
            "unit": "operations per second", "ours": ours_ops, "plain": plain_ops,
            "ours_samples": [x["ops_per_second"] for x in samples["ours"]],
            "plain_samples": [x["ops_per_second"] for x in samples["plain"]],
            "ours_submit_ms_per_op": median(
                [x["submit_seconds"] for x in samples["ours"]]) / n * 1e3,
            "plain_submit_ms_per_op": median(
                [x["submit_seconds"] for x in samples["plain"]]) / n * 1e3,
            "ratio_ours_over_plain": ratio(ours_ops, plain_ops),
            # Each batch of ours against the plain batch that followed it.
            "paired_ratios": [round(ratio(o["ops_per_second"], p["ops_per_second"]), 3)
                              for o, p in zip(samples["ours"], samples["plain"], strict=True)],
        }
        ours_ms = median([x[1] for x in alone["ours"]]) * 1e3
        plain_ms = median([x[1] for x in alone["plain"]]) * 1e3
        self.run.results["latency"] = {
            "flows": self.config.latency_n, "steps_per_operation": 3,
            "unit": "ms, submit to the end of the last step, one flow at a time",
            "ours": ours_ms, "plain": plain_ms,
            "overhead_ms_per_step": (ours_ms - plain_ms) / 3,
            "ours_submit_ms": median([x[0] for x in alone["ours"]]) * 1e3,
            "plain_submit_ms": median([x[0] for x in alone["plain"]]) * 1e3,
        }

    # -- 2b'. the steps users write ----------------------------------------------------------
    def _shapes_modules(self) -> tuple[Any, Any]:
        """The data and effects app (and the plain twin of all three variants) written to the
        temporary directory and imported here: the benchmark submits, as users do."""
        import importlib

        (self.tmp / "shapes-routing.yaml").write_text(SHAPES_ROUTING)
        (self.tmp / f"{SHAPES_MODULE}.py").write_text(SHAPES_APP_SOURCE)
        (self.tmp / f"{PLAIN_SHAPES_MODULE}.py").write_text(PLAIN_SHAPES_SOURCE)
        os.environ["BENCH_SHAPES_ROUTING"] = str(self.tmp / "shapes-routing.yaml")
        os.environ["BENCH_SHAPES_PLAIN_HOSTS"] = ",".join(PLAIN_SHAPES_HOSTS)
        return (importlib.import_module(SHAPES_MODULE),
                importlib.import_module(PLAIN_SHAPES_MODULE))

    def _instances(self, count: int, host: str) -> list[str]:
        """``count`` active instances on ``host``, ready to be resized (outside the timing)."""
        from nova_app.models import Instance

        with self.orch.transaction() as s:
            rows = [Instance(name=f"benchshape-{uuid.uuid4()}", host=host, flavor="m1.small",
                             vm_state="active", task_state=None) for _ in range(count)]
            s.add_all(rows)
            s.flush()
            return [row.id for row in rows]

    def _shape(self, variant: str, orch: Any, ours_submit: Callable[[Any], str],
               plain_submit: Callable[[Any], object],
               prepare: Callable[[str, int], list[Any]],
               check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """One variant, ours and plain taking turns batch by batch (then one operation at a
        time): ours submits with ``ours_submit`` in a loop and waits for each operation with
        ``orch.wait``, as a user's code does; plain sends its first task in a loop and polls
        its counter in Redis. ``prepare(side, count)`` makes what each submit takes (Nova's
        instances) before the clock starts; ``check`` looks at each ended operation's view."""
        n, reps = self.config.shapes_n, self.config.shapes_reps
        done_key, last_key = f"bench:shapes:{variant}:done", f"bench:shapes:{variant}:last"
        counts = {"ours": 0, "plain": 0}

        def ours_batch(count: int) -> dict[str, float]:
            args = prepare("ours", count)
            start = time.monotonic()
            ids = [ours_submit(arg) for arg in args]
            submitted = time.monotonic()
            for op in ids:
                view = orch.wait(op, timeout=120 + count)
                if view["status"] != "completed" or not check(view):
                    raise RuntimeError(f"{variant}: operation {op} ended {view['status']} "
                                       f"({view.get('error')}), params {view['params']}")
            end = time.monotonic()
            counts["ours"] += count
            return {"seconds": end - start, "submit_seconds": submitted - start,
                    "ops_per_second": count / (end - start)}

        def plain_batch(count: int) -> dict[str, float]:
            args = prepare("plain", count)
            self.redis.set(done_key, 0)
            start = time.monotonic()
            for arg in args:
                plain_submit(arg)
            submitted = time.monotonic()
            end = poll_until(lambda: int(self.redis.get(done_key) or 0) >= count,
                             timeout=120 + count, what=f"{count} plain {variant} operations",
                             interval=0.002)
            counts["plain"] += count
            return {"seconds": end - start, "submit_seconds": submitted - start,
                    "ops_per_second": count / (end - start)}

        def ours_one() -> tuple[float, float, float]:
            """(submit, submit to orch.wait's return, submit to the end of the last step)."""
            arg = prepare("ours", 1)[0]
            start = time.time()
            op = ours_submit(arg)
            submitted = time.time()
            view = orch.wait(op, timeout=30)
            waited = time.time()
            if view["status"] != "completed" or not check(view):
                raise RuntimeError(f"{variant}: operation {op} ended {view['status']}")
            counts["ours"] += 1
            last = max(step["finished_at"] for step in view["steps"])
            return submitted - start, waited - start, last - start

        def plain_one() -> tuple[float, float, float]:
            arg = prepare("plain", 1)[0]
            done = int(self.redis.get(done_key) or 0)
            start = time.time()
            plain_submit(arg)
            submitted = time.time()
            poll_until(lambda: int(self.redis.get(done_key) or 0) > done, 30,
                       f"a plain {variant} operation", 0.002)
            waited = time.time()
            counts["plain"] += 1
            return submitted - start, waited - start, float(self.redis.get(last_key)) - start

        log(f"  [{variant}]")
        kinds = {"ours": (ours_batch, ours_one), "plain": (plain_batch, plain_one)}
        samples: dict[str, list[dict[str, float]]] = {"ours": [], "plain": []}
        alone: dict[str, list[tuple[float, float, float]]] = {"ours": [], "plain": []}
        for batch, _ in kinds.values():
            batch(max(2, n // 10))  # warm-up
        for rep in range(reps):
            for name, (batch, _) in kinds.items():
                sample = batch(n)
                samples[name].append(sample)
                log(f"    {name} rep {rep + 1}: {sample['ops_per_second']:.1f} ops/s "
                    f"(submitting {sample['submit_seconds'] / n * 1e3:.2f} ms/op)")
        for _ in range(self.config.shapes_latency_n):
            for name, (_, one) in kinds.items():
                alone[name].append(one())
        ours_ops = median([x["ops_per_second"] for x in samples["ours"]])
        plain_ops = median([x["ops_per_second"] for x in samples["plain"]])
        lat = {name: [median([x[i] for x in alone[name]]) * 1e3 for i in range(3)]
               for name in kinds}
        result = {
            "ours": ours_ops, "plain": plain_ops, "ratio_ours_over_plain": ratio(ours_ops,
                                                                                 plain_ops),
            "ours_samples": [x["ops_per_second"] for x in samples["ours"]],
            "plain_samples": [x["ops_per_second"] for x in samples["plain"]],
            # Each batch of ours against the plain batch that followed it.
            "paired_ratios": [round(ratio(o["ops_per_second"], p["ops_per_second"]), 3)
                              for o, p in zip(samples["ours"], samples["plain"], strict=True)],
            "ours_submit_ms_per_op": median(
                [x["submit_seconds"] for x in samples["ours"]]) / n * 1e3,
            "plain_submit_ms_per_op": median(
                [x["submit_seconds"] for x in samples["plain"]]) / n * 1e3,
            "latency": {
                "operations": self.config.shapes_latency_n,
                "ours_submit_ms": lat["ours"][0], "plain_submit_ms": lat["plain"][0],
                # What the user's code sees: submit to orch.wait's return (plain: to its
                # counter seen in Redis, polled every 2 ms).
                "ours_ms": lat["ours"][1], "plain_ms": lat["plain"][1],
                "overhead_ms_per_step": (lat["ours"][1] - lat["plain"][1]) / 3,
                # The work itself: submit to the end of the last step (the ledger's
                # finished_at; plain: the last task's timestamp in Redis).
                "ours_to_last_step_ms": lat["ours"][2], "plain_to_last_step_ms": lat["plain"][2],
                "overhead_ms_per_step_to_last_step": (lat["ours"][2] - lat["plain"][2]) / 3,
            },
            "operations_run": dict(counts),
        }
        t = result["latency"]
        log(f"    {variant}: {ours_ops:.1f} / {plain_ops:.1f} ops/s = "
            f"{result['ratio_ours_over_plain']:.2f}x (paired {result['paired_ratios']}); one "
            f"at a time {t['ours_ms']:.1f} / {t['plain_ms']:.1f} ms = "
            f"{t['overhead_ms_per_step']:+.2f} ms/step (to the last step's end "
            f"{t['ours_to_last_step_ms']:.1f} / {t['plain_to_last_step_ms']:.1f} ms = "
            f"{t['overhead_ms_per_step_to_last_step']:+.2f} ms/step)")
        return result

    def shapes(self) -> None:
        """The steps users write (issue 25): a three-step flow over two hosts, N operations
        submitted with ``orch.submit`` in a loop and each awaited with ``orch.wait``, against
        plain Celery doing the same work with the same no-loss settings. Three variants:
        steps that return data (merged into the params of the next), steps with an effect on
        the application's own table, and Nova's resize (nova_app, instant steps)."""
        from sqlalchemy import func, select
        from sqlalchemy.orm import Session

        from nova_app.models import Instance

        n, reps = self.config.shapes_n, self.config.shapes_reps
        log(f"[shapes] {n} three-step operations, submitted in a loop then each awaited, "
            f"x {reps} repetitions, then {self.config.shapes_latency_n} one at a time; "
            f"variants {', '.join(SHAPES_VARIANTS)}")
        ours_mod, plain_mod = self._shapes_modules()
        orch = ours_mod.orch
        a, b = SHAPES_HOSTS
        variants: dict[str, Any] = {}
        created: dict[str, list[str]] = {"ours": [], "plain": []}

        def nothing(side: str, count: int) -> list[None]:
            return [None] * count

        def instances(side: str, count: int) -> list[str]:
            ids = self._instances(count, (SHAPES_NOVA_HOSTS if side == "ours"
                                          else PLAIN_SHAPES_HOSTS)[0])
            created[side].extend(ids)
            return ids

        def items_finished(model: Any, plain: bool, since: float) -> int:
            """Rows of the effects variant's operations that saw their three steps' changes
            (plain's ids start with "plain-")."""
            mine = model.id.like("plain-%")
            with Session(plain_mod.engine()) as s:
                return s.execute(select(func.count()).select_from(model).where(
                    mine if plain else ~mine, model.updated_at >= since,
                    model.counter == 3, model.status == "finished")).scalar_one()

        def resized(side: str, dest: str) -> int:
            ids, total = created[side], 0
            with Session(plain_mod.engine()) as s:
                for i in range(0, len(ids), 500):
                    total += s.execute(select(func.count()).select_from(Instance).where(
                        Instance.id.in_(ids[i:i + 500]), Instance.vm_state == "resized",
                        Instance.task_state.is_(None), Instance.host == dest,
                        Instance.flavor == "m1.large")).scalar_one()
            return total

        def run(variant: str, *args: Any) -> None:
            try:
                variants[variant] = self._shape(variant, *args)
            except Exception as exc:
                self.run.problem(f"shapes {variant} failed: {type(exc).__name__}: {exc}")

        def stop(procs: list[subprocess.Popen], what: str) -> None:
            for proc in procs:
                code = self.stop(proc, what)
                if code not in (0, None):
                    self.run.problem(f"{what} exited {code} after SIGTERM")

        plain = [self._spawn(PLAIN_SHAPES_MODULE, host, "plain-shapes", ready=False)
                 for host in PLAIN_SHAPES_HOSTS]
        try:
            ours = [self._spawn(SHAPES_MODULE, host, "shapes", ready=False)
                    for host in SHAPES_HOSTS]
            try:
                for proc in plain + ours:
                    self._ready(proc)
                run("data", orch, lambda _: orch.submit("shape_data", hosts={"a": a, "b": b}),
                    lambda _: plain_mod.submit("data"), nothing,
                    lambda view: view["params"].get("total_bytes") == 512_000)
                since = time.time()
                run("effects", orch,
                    lambda _: orch.submit("shape_effects", hosts={"a": a, "b": b}),
                    lambda _: plain_mod.submit("effects"), nothing, lambda view: True)
                if "effects" in variants:
                    checks = {
                        "ours_rows_finished": items_finished(ours_mod.BenchItem, False, since),
                        "plain_rows_finished": items_finished(plain_mod.BenchItem, True, since)}
                    variants["effects"]["checks"] = checks
                    runs = variants["effects"]["operations_run"]
                    if checks["ours_rows_finished"] != runs["ours"] \
                            or checks["plain_rows_finished"] != runs["plain"]:
                        self.run.problem(f"shapes effects: rows finished {checks}, operations "
                                         f"run {runs}")
            finally:
                stop(ours, "shapes worker")
            # Nova's own workers, as its deployment starts them (orchestrator.local.fleet).
            nova = [self.fleet.start(host, concurrency=self.config.concurrency, ready=False)
                    for host in SHAPES_NOVA_HOSTS]
            try:
                for worker in nova:
                    worker.wait_ready(timeout=60)
                run("nova", self.orch,
                    lambda iid: self.operations.resize(iid, flavor="m1.large",
                                                       dest=SHAPES_NOVA_HOSTS[1]).id,
                    lambda iid: plain_mod.submit_resize(iid, flavor="m1.large"), instances,
                    lambda view: True)
                if "nova" in variants:
                    checks = {"ours_instances_resized": resized("ours", SHAPES_NOVA_HOSTS[1]),
                              "plain_instances_resized": resized("plain",
                                                                 PLAIN_SHAPES_HOSTS[1])}
                    variants["nova"]["checks"] = checks
                    runs = variants["nova"]["operations_run"]
                    if checks["ours_instances_resized"] != runs["ours"] \
                            or checks["plain_instances_resized"] != runs["plain"]:
                        self.run.problem(f"shapes nova: instances resized {checks}, "
                                         f"operations run {runs}")
            finally:
                stop([worker.proc for worker in nova], "nova worker")
        finally:
            stop(plain, "plain shapes worker")
        self.run.results["shapes"] = {
            "operations": n, "repetitions": reps, "steps_per_operation": 3,
            "concurrency": self.config.concurrency,
            "unit": "operations per second, first submit to the last one awaited",
            "variants": variants,
        }

    # -- 2c. a worker's ledger lookups, as the fleet grows -----------------------------------
    def ledger(self) -> None:
        """What a draining worker asks the ledger every 0.2 s (operations that still need its
        host), what event waits and resends ask, at ``ledger_per_host`` operations in flight
        per host, for fleets of each size in ``ledger_hosts``: the indexed per-host queries
        against the fleet-wide scan they replaced (the same data, the same run)."""
        per_host = self.config.ledger_per_host
        out: dict[str, Any] = {"operations_per_host": per_host, "fleets": {}}
        log(f"[ledger] {per_host} operations in flight per host, fleets of "
            f"{', '.join(map(str, self.config.ledger_hosts))} hosts")
        for fleet_size in self.config.ledger_hosts:
            entry = self._ledger_fleet(fleet_size, per_host)
            out["fleets"][str(fleet_size)] = entry
            log(f"  {fleet_size} hosts ({entry['operations']} operations): operations_needing "
                f"{entry['needing_ms']:.2f} ms (fleet-wide scan "
                f"{entry['fleet_scan_needing_ms']:.1f} ms), stranded_steps "
                f"{entry['stranded_ms']:.2f} ms, waits {entry['waits_ms']:.2f} ms; routing "
                f"decision {entry['decide_us']:.1f} us, registry snapshot "
                f"{entry['snapshot_ms']:.2f} ms")
        sizes = [str(n) for n in self.config.ledger_hosts]
        if len(sizes) >= 2:
            small, large = out["fleets"][sizes[0]], out["fleets"][sizes[-1]]
            out["needing_ratio_large_over_small"] = ratio(large["needing_ms"],
                                                          small["needing_ms"])
        self.run.results["ledger"] = out

    def _ledger_fleet(self, fleet_size: int, per_host: int) -> dict[str, Any]:
        from sqlalchemy import select

        from orchestrator.ledger.engines import Database
        from orchestrator.ledger.models import Operation, OperationHost
        from orchestrator.ledger.store import ACTIVE_STATUSES, Ledger

        db = Database(f"sqlite:///{self.tmp / f'ledger-{fleet_size}.db'}")
        ledger = Ledger(db, {})
        hosts = [f"h{i}" for i in range(fleet_size)]
        total = per_host * fleet_size
        now = time.time()
        with db.session() as s:
            for i in range(total):
                a, b = hosts[i % fleet_size], hosts[(i + 1) % fleet_size]
                op = Operation(kind="three", plan=[["prep", b], ["move", a], ["finish", b]],
                               hosts={"a": a, "b": b}, params={}, status="running",
                               position=i % 3,
                               step_state=("queued", "running", "queued")[i % 3],
                               step_since=now, next_published=True, queue=b)
                s.add(op)
                s.flush()
                s.add_all(OperationHost(operation_id=op.id, host=h, last_position=last)
                          for h, last in {b: 2, a: 1}.items())
                op.current_host = op.current[1]
        host = hosts[0]

        def scan_needing() -> int:
            with db.read() as s:
                ops = s.execute(select(Operation).where(
                    Operation.status.in_(ACTIVE_STATUSES))).scalars().all()
                return sum(1 for op in ops if host in op.remaining_hosts())

        def time_it(fn: Callable[[], object], reps: int = 20) -> float:
            fn()
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return median(times) * 1e3

        from orchestrator.registry import Registry
        from orchestrator.routing import AltCapability, StepRouter

        registry = Registry(db)
        for h in hosts:
            registry.register(f"{h}@bench", h, consumes_main=True, consumes_alt=True, pid=1)
        router = StepRouter(self.orch.routing, mode="auto",
                            capability=AltCapability(registry.alt_snapshot, 5.0))
        step = next(iter(self.orch.routing.routes))

        return {
            "operations": total,
            # The router: one registry snapshot per cache period, then a lookup per decision.
            "snapshot_ms": time_it(registry.alt_snapshot),
            "decide_us": time_it(lambda: router.decide(step, host, record=False), 200) * 1e3,
            "needing_ms": time_it(lambda: ledger.operations_needing(host)),
            "stranded_ms": time_it(lambda: ledger.stranded_steps(host, 5, 60)),
            "waits_ms": time_it(lambda: ledger.settle_waits(host, lambda s: None,
                                                            lambda s: None)),
            "fleet_scan_needing_ms": time_it(scan_needing, reps=5),
        }

    # -- 2d. a fleet of real workers ---------------------------------------------------------
    def _keep_in_flight(self, submit: Callable[[str, str], object],
                        completed: Callable[[], int], pairs: list[tuple[str, str]],
                        seconds: float) -> dict:
        """Keep scale_inflight three-step flows in flight over ``pairs`` (roles a, b) for
        ``seconds``, each sent by ``submit(a, b)``; operations completed per second over the
        window, by ``completed()``."""
        start_done, submitted, i = completed(), 0, 0
        start = time.monotonic()
        end = start + seconds
        while time.monotonic() < end:
            in_flight = submitted - (completed() - start_done)  # one count per round
            for _ in range(self.config.scale_inflight - in_flight):
                submit(*pairs[i % len(pairs)])
                submitted, i = submitted + 1, i + 1
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        return {"ops_per_second": (completed() - start_done) / elapsed, "seconds": elapsed,
                "submitted": submitted}

    def _steady(self, orch: Any, pairs: list[tuple[str, str]], seconds: float) -> dict:
        """Ours: submitted through the orchestrator, counted as completed in the ledger."""
        from sqlalchemy import func, select

        from orchestrator.ledger.models import Operation

        def completed() -> int:
            with orch.db.read() as s:
                return s.execute(select(func.count()).select_from(Operation).where(
                    Operation.status == "completed")).scalar_one()

        return self._keep_in_flight(lambda a, b: orch.submit("three", hosts={"a": a, "b": b}),
                                    completed, pairs, seconds)

    def _steady_plain(self, app: Any, pairs: list[tuple[str, str]], seconds: float) -> dict:
        """The plain chain over the same ring of pairs, counted by its last task in Redis."""
        def submit(a: str, b: str) -> None:
            op = str(uuid.uuid4())
            app.send_task("bench.prep", kwargs={"operation_id": op, "position": 0, "host": b,
                          "a": a, "b": b}, task_id=f"{op}.0", queue=b)

        return self._keep_in_flight(
            submit, lambda: int(self.redis.get(FLOW_COUNTER_KEY) or 0), pairs, seconds)

    def _scale_plain(self, n: int, seconds: float) -> tuple[float, float]:
        """Plain Celery's own figures at 2 hosts and at ``n``: the same workers (prefork
        ``-c 1``, one per host, ``<host>`` and ``<host>-alt``), the same load, one fleet
        after the other (both at once would be 100 workers on the same cores)."""
        import importlib

        plain_app = importlib.import_module(PLAIN_FLOW_MODULE).app
        hosts = [f"{PREFIX}plainscale{i}" for i in range(n)]
        procs = {h: self._spawn(PLAIN_FLOW_MODULE, h, "plainscale", concurrency=1)
                 for h in hosts[:2]}
        try:
            two = self._steady_plain(plain_app, [(hosts[0], hosts[1]), (hosts[1], hosts[0])],
                                     seconds)
            log(f"  plain, 2 hosts: {two['ops_per_second']:.1f} ops/s")
            procs.update({h: self._spawn(PLAIN_FLOW_MODULE, h, "plainscale", concurrency=1,
                                         ready=False) for h in hosts[2:]})
            for h in hosts[2:]:
                self._ready(procs[h], timeout=300)
            ring = [(hosts[k], hosts[(k + 1) % n]) for k in range(n)]
            everyone = self._steady_plain(plain_app, ring, seconds)
            log(f"  plain, {n} hosts: {everyone['ops_per_second']:.1f} ops/s")
        finally:
            for h, p in procs.items():
                self.stop(p, f"plain scale worker {h}")
        return two["ops_per_second"], everyone["ops_per_second"]

    def scale(self) -> None:
        """Real workers for scale_hosts hosts: the same steady load at 2 hosts and at all of
        them (the per-step cost, flat or not), then one host drained under load (its exit
        after the last step it waited for, and the others' throughput meanwhile)."""
        n, seconds = self.config.scale_hosts, self.config.scale_seconds
        log(f"[scale] {n} hosts of real workers (prefork -c 1), steady load "
            f"{self.config.scale_inflight} flows in flight, {seconds:g}s windows")
        orch = self._flow_orch()
        hosts = [f"{PREFIX}scale{i}" for i in range(n)]
        procs = {h: self._spawn(FLOW_MODULE, h, "scale", concurrency=1) for h in hosts[:2]}
        two = self._steady(orch, [(hosts[0], hosts[1]), (hosts[1], hosts[0])], seconds)
        log(f"  2 hosts: {two['ops_per_second']:.1f} ops/s")
        started = time.monotonic()
        procs.update({h: self._spawn(FLOW_MODULE, h, "scale", concurrency=1, ready=False)
                      for h in hosts[2:]})
        for h in hosts[2:]:
            self._ready(procs[h], timeout=300)
        log(f"  {n - 2} more workers ready in {time.monotonic() - started:.0f}s")
        ring = [(hosts[k], hosts[(k + 1) % n]) for k in range(n)]
        everyone = self._steady(orch, ring, seconds)
        log(f"  {n} hosts: {everyone['ops_per_second']:.1f} ops/s")

        # Drain hosts[0] while the other hosts stay busy: it has flows of its own in flight.
        victim, others = hosts[0], [p for p in ring if hosts[0] not in p]
        for _ in range(self.config.scale_inflight // 2):
            orch.submit("three", hosts={"a": hosts[1], "b": victim})
        proc = procs[victim]
        proc.send_signal(signal.SIGTERM)
        during: dict[str, Any] = {}
        import threading

        load = threading.Thread(target=lambda: during.update(
            self._steady(orch, others, seconds)))
        load.start()
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.run.problem("scale: the drained host still ran 120s after SIGTERM; killed")
            proc.kill()
            code = proc.wait(timeout=10)
        exited = time.time()
        load.join()
        from sqlalchemy import func, select

        from orchestrator.ledger.models import StepRecord

        with orch.db.read() as s:
            last = s.execute(select(func.max(StepRecord.finished_at)).where(
                StepRecord.host == victim)).scalar_one()
        after_last = exited - last if last else None
        log(f"  drained {victim}: exit {code}, {after_last:.3f}s after its last step ended; "
            f"the other {n - 1} hosts meanwhile {during['ops_per_second']:.1f} ops/s")
        rss = [self._rss_mb(p.pid) for h, p in procs.items() if h != victim and p.poll() is None]
        self.run.results["scale"] = {
            "hosts": n, "inflight": self.config.scale_inflight, "window_seconds": seconds,
            "two_hosts_ops_per_second": two["ops_per_second"],
            "all_hosts_ops_per_second": everyone["ops_per_second"],
            "per_step_cost_ratio_all_over_two": ratio(two["ops_per_second"],
                                                      everyone["ops_per_second"]),
            "drain_exit_code": code, "drain_exit_after_last_step_s": after_last,
            "others_during_drain_ops_per_second": during["ops_per_second"],
            "worker_rss_mib_median": median(rss) if rss else None,
        }
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for h, p in procs.items():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.run.problem(f"scale: {h} still running 60s after SIGTERM; killed")
                p.kill()
        plain_two, plain_all = self._scale_plain(n, seconds)
        self.run.results["scale"].update({
            "plain_two_hosts_ops_per_second": plain_two,
            "plain_all_hosts_ops_per_second": plain_all,
            "plain_per_step_cost_ratio_all_over_two": ratio(plain_two, plain_all),
            "all_hosts_ratio_ours_over_plain": ratio(everyone["ops_per_second"], plain_all),
        })

    # -- 3. drain --------------------------------------------------------------------------
    @staticmethod
    def _summed_mb(pid: int, file: str, field: str) -> float:
        """``field`` (kB) of ``/proc/PID/file``, summed over a worker and its pool."""
        total = 0
        for p in [pid, *_children(pid)]:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{p}/{file}").read_text().splitlines():
                    if line.startswith(field):
                        total += int(line.split()[1])
        return total / 1024

    def _rss_mb(self, pid: int) -> float:
        """Resident memory of a worker: its MainProcess and its pool processes."""
        return self._summed_mb(pid, "status", "VmRSS:")

    def _pss_mb(self, pid: int) -> float:
        """Proportional memory of a worker and its pool: a page shared after the fork counts
        once in all, where RSS counts it in every process."""
        return self._summed_mb(pid, "smaps_rollup", "Pss:")

    @staticmethod
    def _cpu_ns(pid: int) -> int:
        """CPU time on the scheduler's clock (ns, every thread) of a worker and its pool: the
        tick counts of /proc/PID/stat (10 ms each) are too coarse for 1-3 ms a second."""
        total = 0
        for p in [pid, *_children(pid)]:
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{p}/task"):
                    total += int(Path(f"/proc/{p}/task/{task}/schedstat").read_text().split()[0])
        return total

    def idle(self) -> None:
        """An orchestrator worker and a plain one, idle side by side: CPU over the same
        window, once both have settled (a worker's first seconds register it, open its
        database and run its first checks), and memory."""
        ours = self.start_ours(DRAIN_HOST)
        plain, _log = self.start_plain()
        procs = {"ours": ours.proc, "plain": plain}
        try:
            time.sleep(IDLE_SETTLE_SECONDS)
            # Windows in turn, and the one whose ratio is the median: the machine's speed
            # drifts (a window where both sides took twice their CPU was seen), and the
            # ratio of one window is what both sides did under the same conditions.
            windows = []
            for _ in range(self.config.idle_windows):
                before = {name: self._cpu_ns(proc.pid) for name, proc in procs.items()}
                started = time.monotonic()
                time.sleep(self.config.idle_seconds)
                window = time.monotonic() - started
                windows.append({name: (self._cpu_ns(proc.pid) - before[name]) / 1e6 / window
                                for name, proc in procs.items()})
            windows.sort(key=lambda w: ratio(w["ours"], w["plain"]))
            cpu = windows[len(windows) // 2]
            rss = {name: self._rss_mb(proc.pid) for name, proc in procs.items()}
            pss = {name: self._pss_mb(proc.pid) for name, proc in procs.items()}
        finally:
            for name, proc in procs.items():
                self.stop(proc, f"idle {name} worker")
        log(f"[idle] CPU ours {cpu['ours']:.2f} ms/s, plain {cpu['plain']:.2f} ms/s (window "
            "ratios " + ", ".join(f"{ratio(w['ours'], w['plain']):.2f}x" for w in windows)
            + "); memory "
            f"RSS {rss['ours']:.0f} / {rss['plain']:.0f} MiB, PSS {pss['ours']:.0f} / "
            f"{pss['plain']:.0f} MiB")
        self.run.results["memory"] = {
            "unit": "MiB, resident, MainProcess + pool processes (-c "
                    f"{self.config.concurrency}), idle", "ours": rss["ours"],
            "plain": rss["plain"], "ratio_ours_over_plain": ratio(rss["ours"], rss["plain"]),
            "pss_ours": pss["ours"], "pss_plain": pss["plain"],
            "pss_ratio_ours_over_plain": ratio(pss["ours"], pss["plain"]),
        }
        self.run.results["idle_cpu"] = {
            "unit": f"CPU ms per second, idle side by side, the median-ratio window of "
                    f"{len(windows)} of {window:.0f}s after {IDLE_SETTLE_SECONDS:g}s settling",
            "ours": cpu["ours"], "plain": cpu["plain"],
            "ratio_ours_over_plain": ratio(cpu["ours"], cpu["plain"]),
            "window_ratios": [ratio(w["ours"], w["plain"]) for w in windows],
        }

    def _sigterm_to_exit(self, proc: subprocess.Popen, what: str) -> tuple[float | None, int]:
        time.sleep(0.5)  # idle: let the consumer settle after " ready."
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.run.problem(f"drain: idle {what} still running 60s after SIGTERM; killed")
            proc.kill()
            proc.wait(timeout=10)
            return None, -9
        return time.monotonic() - start, code

    def drain(self) -> None:
        reps = self.config.drain_reps
        self.idle()
        log(f"[drain] idle worker, SIGTERM to exit, x {reps}")
        samples: dict[str, list[float]] = {"ours": [], "plain": []}
        codes: dict[str, list[int]] = {"ours": [], "plain": []}
        drain_logged: list[bool] = []
        for rep in range(reps):
            order = ["ours", "plain"] if rep % 2 == 0 else ["plain", "ours"]
            for name in order:
                if name == "ours":
                    worker = self.start_ours(DRAIN_HOST)
                    seconds, code = self._sigterm_to_exit(worker.proc, "orchestrator worker")
                    drain_logged.append("drain: nothing left in flight" in worker.log())
                else:
                    proc, _log = self.start_plain()
                    seconds, code = self._sigterm_to_exit(proc, "plain worker")
                codes[name].append(code)
                if seconds is not None:
                    samples[name].append(seconds)
                if code != 0:
                    self.run.problem(f"drain: idle {name} worker exited {code} after SIGTERM")
            last = {k: f"{v[-1]:.3f}s" if v else "n/a" for k, v in samples.items()}
            log(f"  rep {rep + 1}: ours {last['ours']} (exit {codes['ours'][-1]}), "
                f"plain {last['plain']} (exit {codes['plain'][-1]})")
        if not all(drain_logged):
            self.run.problem("drain: an orchestrator worker exited without logging its drain "
                             "('nothing left in flight'): SIGTERM may not have reached the drain")
        ours_s, plain_s = median(samples["ours"]), median(samples["plain"])
        self.run.results["drain"] = {
            "repetitions": reps, "unit": "seconds", "ours_samples": samples["ours"],
            "plain_samples": samples["plain"], "ours": ours_s, "plain": plain_s,
            "exit_codes": codes, "ratio_ours_over_plain": ratio(ours_s, plain_s),
        }
        self.busy_drain()

    def busy_drain(self) -> None:
        """SIGTERM while a boot's build runs on the host: the drain waits for the build and
        for the event step that follows it (through <host>-alt); measured from the end of
        that last step (its finished_at in the ledger) to the worker's exit."""
        reps = self.config.drain_reps
        log(f"[drain] busy worker: from the last step it waited for to exit, x {reps}")
        samples: list[float] = []
        for rep in range(reps):
            worker = self.fleet.start(
                DRAIN_HOST, concurrency=self.config.concurrency, ready=False,
                env={"ORCHESTRATOR_STEP_DELAYS": "build_and_run_instance=1"},
            )
            worker.wait_ready(timeout=60)
            accepted = self.operations.boot(f"{PREFIX}-busy-{rep}-{uuid.uuid4().hex[:6]}",
                                            DRAIN_HOST)
            op_id = accepted.id
            poll_until(lambda op_id=op_id: (self.orch.operation(op_id)["current_step"] or {})
                       .get("state") == "running", 30, "the build to run", 0.01)
            worker.proc.send_signal(signal.SIGTERM)
            try:
                code = worker.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.run.problem("busy drain: still running 60s after SIGTERM; killed")
                worker.proc.kill()
                worker.proc.wait(timeout=10)
                continue
            exited = time.time()
            data = self.orch.operation(accepted.id)
            if code != 0 or data["status"] != "completed":
                self.run.problem(f"busy drain: exit {code}, boot {data['status']}")
                continue
            last = max(step["finished_at"] for step in data["steps"])
            samples.append(exited - last)
            log(f"  rep {rep + 1}: exit {exited - last:.3f}s after the last step ended")
        self.run.results["busy_drain"] = {
            "repetitions": reps, "unit": "seconds", "samples": samples,
            "median": median(samples) if samples else None,
        }


# -- redis hygiene, output, main -----------------------------------------------------------


def clear_owned_keys(broker_url: str, strict: bool) -> None:
    """Delete the keys this script (and Celery on its behalf) creates; with ``strict``, refuse
    to go on when the database holds anything else."""
    import redis

    client = redis.Redis.from_url(broker_url)
    keys = list(client.scan_iter(count=1000))
    foreign = [k for k in keys if not k.startswith(OWNED_KEY_PREFIXES)]
    if foreign and strict:
        shown = ", ".join(repr(k.decode(errors="replace")) for k in foreign[:5])
        raise SystemExit(
            f"benchmark: {broker_url} holds {len(foreign)} key(s) this script did not create "
            f"(e.g. {shown}); use a dedicated Redis database (--redis-url)"
        )
    owned = [k for k in keys if k.startswith(OWNED_KEY_PREFIXES)]
    for i in range(0, len(owned), 500):
        client.delete(*owned[i:i + 500])


def fmt(value: float | None, unit: str) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:.3f} {unit}" if unit == "s" else f"{value:.1f} {unit}"


def table(run: Run) -> str:
    rows = [("measure", "ours", "plain", "ours/plain")]
    r = run.results
    if "publish" in r:
        p = r["publish"]
        rows.append((f"publish {p['messages']} msgs (median of {p['repetitions']})",
                     fmt(p["ours"], "s"), fmt(p["plain"], "s"),
                     f"{p['ratio_ours_over_plain']:.2f}x time"))
        rows.append(("  per message", f"{p['ours_us_per_message']:.0f} us",
                     f"{p['plain_us_per_message']:.0f} us", ""))
    if "end_to_end" in r:
        e = r["end_to_end"]
        rows.append((f"end-to-end {e['operations']} ops, -c {e['concurrency']} "
                     f"(median of {e['repetitions']})",
                     fmt(e["ours"], "ops/s"), fmt(e["plain"], "ops/s"),
                     f"{e['ratio_ours_over_plain']:.2f}x throughput"))
        rows.append(("  of which submitting, per op", f"{e['ours_submit_ms_per_op']:.2f} ms",
                     f"{e['plain_submit_ms_per_op']:.2f} ms",
                     f"{ratio(e['ours_submit_ms_per_op'], e['plain_submit_ms_per_op']):.2f}x"
                     " time"))
    if "flow" in r:
        f = r["flow"]
        rows.append((f"3-step flows over 2 hosts, {f['operations']} ops (median of "
                     f"{f['repetitions']})", fmt(f["ours"], "ops/s"), fmt(f["plain"], "ops/s"),
                     f"{f['ratio_ours_over_plain']:.2f}x throughput"))
        rows.append(("  of which submitting, per op", f"{f['ours_submit_ms_per_op']:.2f} ms",
                     f"{f['plain_submit_ms_per_op']:.2f} ms",
                     f"{ratio(f['ours_submit_ms_per_op'], f['plain_submit_ms_per_op']):.2f}x"
                     " time"))
    if "latency" in r:
        t = r["latency"]
        rows.append((f"one flow at a time, submit to last step's end (median of {t['flows']})",
                     f"{t['ours']:.1f} ms", f"{t['plain']:.1f} ms",
                     f"+{t['overhead_ms_per_step']:.2f} ms/step"))
        rows.append(("  submit, idle workers", f"{t['ours_submit_ms']:.2f} ms",
                     f"{t['plain_submit_ms']:.2f} ms",
                     f"{ratio(t['ours_submit_ms'], t['plain_submit_ms']):.2f}x time"))
    if "shapes" in r:
        h = r["shapes"]
        for variant, v in h["variants"].items():
            rows.append((f"shapes/{variant}: {h['operations']} ops, submit loop + orch.wait "
                         f"(median of {h['repetitions']})", fmt(v["ours"], "ops/s"),
                         fmt(v["plain"], "ops/s"),
                         f"{v['ratio_ours_over_plain']:.2f}x throughput"))
            rows.append(("  paired ratios, batch by batch", "", "",
                         " ".join(f"{x:.2f}" for x in v["paired_ratios"])))
            t = v["latency"]
            rows.append((f"  one at a time, submit to wait's return (median of "
                         f"{t['operations']})", f"{t['ours_ms']:.1f} ms",
                         f"{t['plain_ms']:.1f} ms", f"{t['overhead_ms_per_step']:+.2f} ms/step"))
            rows.append(("  one at a time, submit to the last step's end",
                         f"{t['ours_to_last_step_ms']:.1f} ms",
                         f"{t['plain_to_last_step_ms']:.1f} ms",
                         f"{t['overhead_ms_per_step_to_last_step']:+.2f} ms/step"))
    if "ledger" in r:
        g = r["ledger"]
        for size, entry in g["fleets"].items():
            rows.append((f"routing decision, {size} hosts registered",
                         f"{entry['decide_us']:.1f} us", "", ""))
            rows.append((f"ledger, {size} hosts x {g['operations_per_host']} ops: needing(host)",
                         f"{entry['needing_ms']:.2f} ms",
                         f"scan {entry['fleet_scan_needing_ms']:.1f} ms",
                         f"{ratio(entry['needing_ms'], entry['fleet_scan_needing_ms']):.3f}x"))
        if "needing_ratio_large_over_small" in g:
            rows.append(("  needing(host): largest fleet / smallest", "", "",
                         f"{g['needing_ratio_large_over_small']:.2f}x"))
    if "drain" in r:
        d = r["drain"]
        rows.append((f"idle SIGTERM->exit (median of {d['repetitions']})",
                     fmt(d["ours"], "s"), fmt(d["plain"], "s"),
                     f"{d['ratio_ours_over_plain']:.2f}x time"))
    if "scale" in r:
        c = r["scale"]
        rows.append((f"scale: flows, 2 hosts -> {c['hosts']} hosts of real workers",
                     f"{c['all_hosts_ops_per_second']:.1f} ops/s",
                     f"{c['two_hosts_ops_per_second']:.1f} ops/s",
                     f"{c['per_step_cost_ratio_all_over_two']:.2f}x cost"))
        if "plain_all_hosts_ops_per_second" in c:
            rows.append((f"  plain Celery's own: 2 hosts -> {c['hosts']} hosts",
                         f"{c['plain_all_hosts_ops_per_second']:.1f} ops/s",
                         f"{c['plain_two_hosts_ops_per_second']:.1f} ops/s",
                         f"{c['plain_per_step_cost_ratio_all_over_two']:.2f}x cost"))
            rows.append((f"  {c['hosts']} hosts: ours / plain's",
                         f"{c['all_hosts_ops_per_second']:.1f} ops/s",
                         f"{c['plain_all_hosts_ops_per_second']:.1f} ops/s",
                         f"{c['all_hosts_ratio_ours_over_plain']:.2f}x throughput"))
        rows.append(("  one host drained under load: exit after its last step",
                     fmt(c["drain_exit_after_last_step_s"], "s"), "", ""))
        rows.append(("  the other hosts meanwhile",
                     f"{c['others_during_drain_ops_per_second']:.1f} ops/s", "", ""))
        rows.append(("  worker RSS (-c 1, under load)", f"{c['worker_rss_mib_median']:.0f} MiB",
                     "", ""))
    if "memory" in r:
        m = r["memory"]
        rows.append(("idle worker memory, RSS incl. pool", f"{m['ours']:.0f} MiB",
                     f"{m['plain']:.0f} MiB", f"{m['ratio_ours_over_plain']:.2f}x"))
        if "pss_ours" in m:
            rows.append(("idle worker memory, PSS incl. pool", f"{m['pss_ours']:.0f} MiB",
                         f"{m['pss_plain']:.0f} MiB", f"{m['pss_ratio_ours_over_plain']:.2f}x"))
    if "idle_cpu" in r:
        c = r["idle_cpu"]
        rows.append(("idle worker CPU, incl. pool", f"{c['ours']:.2f} ms/s",
                     f"{c['plain']:.2f} ms/s", f"{c['ratio_ours_over_plain']:.2f}x"))
    if r.get("busy_drain", {}).get("median") is not None:
        b = r["busy_drain"]
        rows.append((f"busy drain: last step ended->exit (median of {b['repetitions']})",
                     fmt(b["median"], "s"), "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Publish cost, end-to-end throughput and idle drain time, as ratios "
                    "against plain Celery measured in the same run.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="small run (about a minute): fewer messages and operations")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write the results (all samples) as JSON here")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12",
                        help="a Redis database used only by this script (default: %(default)s)")
    parser.add_argument("--only", choices=("publish", "e2e", "flow", "ledger", "drain",
                                           "scale", "shapes"),
                        action="append",
                        help="run only this measurement (repeatable)")
    parser.add_argument("--db-url", metavar="URL",
                        help="the ledger's database for the flow, drain and shapes "
                             "measurements "
                             "(default: a temporary SQLite file), e.g. postgresql+psycopg://"
                             "postgres@127.0.0.1/orchestrator_bench")
    parser.add_argument("--keep-tmp", action="store_true",
                        help="keep the temporary directory (SQLite file, worker logs)")
    return parser.parse_args(argv)


def _terminate_on_signal(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parsed = urlparse(args.redis_url)
    if parsed.scheme not in ("redis", "rediss"):
        raise SystemExit("benchmark: --redis-url must be a redis:// URL")
    config = QUICK if args.quick else FULL
    only = set(args.only or ("publish", "e2e", "flow", "ledger", "drain"))
    tmp = Path(tempfile.mkdtemp(prefix="orchestrator-bench-"))

    # orchestrator.app reads these at import: set them before anything imports it.
    os.environ["ORCHESTRATOR_BROKER_URL"] = args.redis_url
    if args.db_url and only & {"e2e", "ledger"}:
        raise SystemExit("benchmark: --db-url applies to --only flow, drain and shapes "
                         "(e2e and ledger read the SQLite file directly)")
    os.environ["ORCHESTRATOR_DB_URL"] = args.db_url or f"sqlite:///{tmp / 'orchestrator.db'}"
    os.environ["ORCHESTRATOR_ROUTING_FILE"] = str(REPO_ROOT / "routing.yaml")
    os.environ["ORCHESTRATOR_STEP_DELAY"] = "0"
    for name in ("ORCHESTRATOR_STEP_DELAYS", "ORCHESTRATOR_FAIL_STEPS"):
        os.environ.pop(name, None)

    signal.signal(signal.SIGTERM, _terminate_on_signal)
    signal.signal(signal.SIGHUP, _terminate_on_signal)

    run = Run(config)
    bench: Bench | None = None
    failed = False
    try:
        clear_owned_keys(args.redis_url, strict=True)
        bench = Bench(config, args.redis_url, tmp, run)
        import celery
        import kombu

        log(f"benchmark ({config.mode}): broker {args.redis_url}, database {bench.db_path}, "
            f"celery {celery.__version__}, {os.cpu_count()} CPU(s)")
        if "publish" in only:
            bench.publish()
        if "e2e" in only:
            bench.e2e()
        if "flow" in only:
            bench.flow()
        if "ledger" in only:
            bench.ledger()
        if "drain" in only:
            bench.drain()
        if "scale" in only:
            bench.scale()
        if "shapes" in only:
            bench.shapes()
        run.results["environment"] = {
            "python": platform.python_version(), "celery": celery.__version__,
            "kombu": kombu.__version__, "cpus": os.cpu_count(), "platform": platform.platform(),
            "broker": args.redis_url,
        }
    except KeyboardInterrupt as exc:
        failed = True
        run.problem(f"interrupted ({exc or 'SIGINT'})")
    except Exception as exc:
        failed = True
        run.problem(f"benchmark failed: {type(exc).__name__}: {exc}")
    finally:
        # Cleanup is bounded (SIGQUIT, then SIGKILL): do not let a second signal cut it short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if bench is not None:
            for fleet in (bench.fleet, bench.plain):
                for text in fleet.stop_all(timeout=15):
                    run.problem(text)
        try:
            clear_owned_keys(args.redis_url, strict=False)
        except Exception as exc:
            run.problem(f"could not clean {args.redis_url}: {exc}")
        if args.keep_tmp or failed:
            log(f"temporary files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(table(run))
    print("ratios: publish and drain are ours/plain time (above 1 = we are slower); "
          "end-to-end is ours/plain throughput (below 1 = we are slower).")
    if run.problems:
        print("problems:")
        for text in run.problems:
            print("  - " + textwrap.shorten(text, 300))
    if args.json is not None:
        payload = {"config": vars(config), "results": run.results, "problems": run.problems,
                   "completed": not failed}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"JSON written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
