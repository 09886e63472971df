"""Move a block volume from one storage node to another, and survive either node's restart.

Four steps over two hosts (roles ``source`` and ``dest``), with a rollback:

1. ``reserve`` (dest, main queue): claim space for the volume on the destination;
2. ``copy_out`` (source, alt): read the volume and stage it for the transfer;
3. ``copy_in`` (dest, alt): write the staged data on the destination and verify it;
4. ``retire_source`` (source, alt): the copy is verified, remove the source's copy.

If ``copy_out`` or ``copy_in`` fails, ``release`` (dest, alt) frees the reservation and the
volume stays where it was. A storage node is a directory (``VOLUMES_ROOT/<node>``), a volume a
file in it, so each step does real, idempotent I/O: writes go to a temporary file renamed into
place, so a step run twice (redelivered after a crash) leaves the same result.

Run it (see the README, "Your own workflow")::

    celery -A examples.volume_move.app worker -n node1@%h -Q node1,node1-alt
    celery -A examples.volume_move.app worker -n node2@%h -Q node2,node2-alt
    orchestrator --app examples.volume_move.app submit move \\
        --host source=node1 --host dest=node2 --param volume=vol1 --subject vol1

Knobs for tests and demos: ``VOLUMES_STEP_SECONDS`` (``copy_out=3,copy_in=1``: how long a
step takes), ``VOLUMES_FAIL`` (``copy_in`` or ``copy_in@node2``: a step that fails) and
``VOLUMES_RUN_LOG`` (a file each step's work appends a line to when it starts: how often each
step's work was done) and ``VOLUMES_GATE`` (``copy_out=/tmp/go``: the step ends only once that
file exists, at most 300 s later).

A deploy that changes the code (README, "Deploying new code"): ``VOLUMES_RELEASE=2`` runs the
app's next release, in which ``copy_in`` is renamed ``install`` (still answering to
``copy_in`` with ``VOLUMES_ALIASES=1``) and ``retire_source`` is replaced by ``retire``; the
flow is ``reserve -> copy_out -> install -> retire``. One routing.yaml serves both releases.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from celery import Celery

from orchestrator import Orchestrator, StepContext, StepFailure

HERE = Path(__file__).resolve().parent

#: Which release of the code runs: "1", or "2" (renames; see the module's docstring).
RELEASE = os.environ.get("VOLUMES_RELEASE") or "1"

app = Celery("volumes")
orch = Orchestrator(app, routing=HERE / "routing.yaml", code_version=RELEASE)


def root() -> Path:
    return Path(os.environ.get("VOLUMES_ROOT") or "volumes")


def volume_path(node: str, volume: str, suffix: str = ".img") -> Path:
    return root() / node / f"{volume}{suffix}"


def staging_path(volume: str, operation_id: str) -> Path:
    """Where copy_out leaves the data for copy_in (the "wire" between the two nodes)."""
    return root() / "_staging" / f"{volume}.{operation_id}"


def _take_time_and_maybe_fail(ctx: StepContext) -> None:
    run_log = os.environ.get("VOLUMES_RUN_LOG")
    if run_log:
        with open(run_log, "a") as log:
            log.write(f"{ctx.step}@{ctx.host} {ctx.operation_id} attempt={ctx.attempt}\n")
    delays = dict(item.split("=", 1) for item in
                  filter(None, (os.environ.get("VOLUMES_STEP_SECONDS") or "").split(",")))
    time.sleep(float(delays.get(ctx.step, 0.05)))
    gates = dict(item.split("=", 1) for item in
                 filter(None, (os.environ.get("VOLUMES_GATE") or "").split(",")))
    if ctx.step in gates:  # a test lets the step end when it is ready for what follows
        deadline = time.monotonic() + 300
        while not Path(gates[ctx.step]).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    failing = set(filter(None, (os.environ.get("VOLUMES_FAIL") or "").split(",")))
    if ctx.step in failing or f"{ctx.step}@{ctx.host}" in failing:
        raise StepFailure(f"injected failure of {ctx.step} on {ctx.host}")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


@orch.step
def reserve(ctx: StepContext) -> dict:
    """Claim room for the volume on the destination (a reservation file)."""
    volume = ctx.params["volume"]
    _take_time_and_maybe_fail(ctx)
    if volume_path(ctx.host, volume).exists():
        raise StepFailure(f"volume {volume} already exists on {ctx.host}")
    _write(volume_path(ctx.host, volume, ".reserved"), ctx.operation_id.encode())
    return {"reserved_on": ctx.host}


@orch.step
def copy_out(ctx: StepContext) -> dict:
    """Read the volume on the source and stage it for the destination."""
    volume = ctx.params["volume"]
    source = volume_path(ctx.host, volume)
    if not source.exists():
        raise StepFailure(f"volume {volume} not found on {ctx.host}")
    data = source.read_bytes()
    _take_time_and_maybe_fail(ctx)
    _write(staging_path(volume, ctx.operation_id), data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def copy_in(ctx: StepContext) -> dict:
    """Write the staged data on the destination and check it against the source's digest."""
    volume = ctx.params["volume"]
    staged = staging_path(volume, ctx.operation_id)
    target = volume_path(ctx.host, volume)
    _take_time_and_maybe_fail(ctx)
    if staged.exists():
        _write(target, staged.read_bytes())
    if not target.exists():
        raise StepFailure(f"no staged data for {volume}")
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != ctx.params["sha256"]:
        raise StepFailure(f"{volume} on {ctx.host}: checksum mismatch")
    volume_path(ctx.host, volume, ".reserved").unlink(missing_ok=True)
    staged.unlink(missing_ok=True)
    return {"verified": True}


def retire_source(ctx: StepContext) -> dict:
    """The destination holds a verified copy: remove the source's."""
    _take_time_and_maybe_fail(ctx)
    volume_path(ctx.host, ctx.params["volume"]).unlink(missing_ok=True)
    return {"moved_to": ctx.hosts["dest"]}


@orch.step
def release(ctx: StepContext) -> None:
    """Rollback on the destination: drop the reservation and any partial copy."""
    volume = ctx.params["volume"]
    _take_time_and_maybe_fail(ctx)
    volume_path(ctx.host, volume, ".reserved").unlink(missing_ok=True)
    volume_path(ctx.host, volume).unlink(missing_ok=True)
    staging_path(volume, ctx.operation_id).unlink(missing_ok=True)


if RELEASE == "1":
    INSTALL, RETIRE = "copy_in", "retire_source"
    orch.step(copy_in)
    orch.step(retire_source)
else:
    INSTALL, RETIRE = "install", "retire"
    orch.step(copy_in, name=INSTALL,
              aliases=["copy_in"] if os.environ.get("VOLUMES_ALIASES") == "1" else [])
    orch.step(retire_source, name=RETIRE)

orch.flow(
    "move",
    [("reserve", "dest"), ("copy_out", "source"), (INSTALL, "dest"), (RETIRE, "source")],
    rollback=[("release", "dest")],
    rollback_on=["copy_out", INSTALL],
)
