"""A whole fleet on this machine, for the demo and ``orchestrator up``: a broker (embedded
when none is configured), a ledger, one real worker per host, and Flower.

Every process it starts is stopped when the ``with`` block ends, on an error and on Ctrl-C
alike (:class:`contextlib.ExitStack`).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.testing.embedded import embedded_redis, free_port
from orchestrator.testing.fleet import Fleet

FLOWER_PORT = 5555


@dataclass
class Stack:
    broker_url: str
    db_url: str
    workdir: Path
    fleet: Fleet
    #: Where Flower answers (None: not started).
    flower_url: str | None
    #: What a shell needs to use the CLI against this stack.
    env: dict[str, str]
    embedded_broker: bool


def _port_free(port: int, address: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


@contextmanager
def local_stack(
    orch: Any, *, app: str = "orchestrator", flower: bool = True,
    flower_port: int = FLOWER_PORT, db_url: str | None = None,
    env: Mapping[str, str] | None = None, workdir: Path | None = None,
) -> Iterator[Stack]:
    """Broker, ledger and Flower for ``orch``'s application (``app``: the ``-A`` / ``--app``
    argument of the processes); start workers with ``stack.fleet.start(host)``.

    The broker is ``ORCHESTRATOR_BROKER_URL`` when set, else an embedded Redis; the ledger is
    ``db_url``, else a SQLite file in ``workdir`` (a temporary directory by default).
    """
    with ExitStack() as stack:
        broker = os.environ.get("ORCHESTRATOR_BROKER_URL")
        embedded = not broker
        if embedded:
            broker = stack.enter_context(embedded_redis()).url
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="orch-")))
        db_url = db_url or f"sqlite:///{workdir / 'ledger.db'}"
        shared = {"ORCHESTRATOR_BROKER_URL": broker, "ORCHESTRATOR_DB_URL": db_url}
        # This process publishes and reads the ledger too: the same settings as the workers.
        os.environ.update(shared)
        orch.app.conf.broker_url = broker
        fleet = Fleet(env={**shared, **(env or {})}, log_dir=workdir / "logs", app=app)
        stack.callback(fleet.stop_all)
        flower_url = None
        if flower:
            address = "127.0.0.1"
            port = flower_port if _port_free(flower_port, address) else free_port(address)
            fleet.start_flower(port, address)
            flower_url = f"http://{address}:{port}/"
        yield Stack(broker_url=broker, db_url=db_url, workdir=workdir, fleet=fleet,
                    flower_url=flower_url, env=shared, embedded_broker=embedded)
