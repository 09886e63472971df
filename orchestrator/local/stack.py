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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.local.embedded import embedded_redis, free_port
from orchestrator.local.fleet import Fleet
from orchestrator.redact import redact_url

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
    #: The variables of ``env`` whose value this stack made (an embedded broker, a ledger in
    #: ``workdir``); the others are this shell's own.
    made: frozenset[str] = frozenset()
    #: Once the stack is closed: the workers that had to be killed, and why.
    forced: list[str] = field(default_factory=list)

    def shell_lines(self, app: str) -> list[str]:
        """What another shell needs to run ``orchestrator`` against this stack, without a
        password: the values this stack made (and that hold no secret) as one ``export``
        line; a value of the user's own is shown redacted, as this shell's to set there too
        (the user has it, and a terminal's scrollback or a screen share is no place for it).
        """
        own = {"ORCHESTRATOR_APP": app, **{k: v for k, v in self.env.items()
                                           if k in self.made and redact_url(v) == v}}
        lines = ["in another shell: export "
                 + " ".join(f"{k}={v}" for k, v in sorted(own.items()))]
        lines += [f"and {k} as set in this shell (it holds {redact_url(v)}"
                  + ("; secrets not printed)" if redact_url(v) != v else ")")
                  for k, v in sorted(self.env.items()) if k not in own]
        return lines


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
        made = {"ORCHESTRATOR_BROKER_URL"} if embedded else set()
        if not db_url:
            db_url = f"sqlite:///{workdir / 'ledger.db'}"
            made.add("ORCHESTRATOR_DB_URL")
        shared = {"ORCHESTRATOR_BROKER_URL": broker, "ORCHESTRATOR_DB_URL": db_url}
        # This process publishes and reads the ledger too: the same settings as the workers.
        os.environ.update(shared)
        orch.app.conf.broker_url = broker
        fleet = Fleet(env={**shared, **(env or {})}, log_dir=workdir / "logs", app=app)
        forced: list[str] = []
        stack.callback(lambda: forced.extend(fleet.stop_all()))
        flower_url = None
        if flower:
            address = "127.0.0.1"
            port = flower_port if _port_free(flower_port, address) else free_port(address)
            fleet.start_flower(port, address)
            flower_url = f"http://{address}:{port}/"
        yield Stack(broker_url=broker, db_url=db_url, workdir=workdir, fleet=fleet,
                    flower_url=flower_url, env=shared, embedded_broker=embedded,
                    made=frozenset(made), forced=forced)
