"""A private three-node RabbitMQ cluster on this machine, for broker fail-over tests.

Three nodes (``orchN-<pid>@localhost``), each with its own AMQP and distribution ports, data
and log directories and an Erlang cookie of the cluster's own, started from the installed
``rabbitmq-server`` as the current user; nodes 2 and 3 join node 1. The machine's RabbitMQ
(``rabbit@localhost`` on 5672) is never touched: a node of this cluster is stopped with
:meth:`RabbitCluster.stop_node` and the whole cluster with :meth:`destroy`.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import kombu

from orchestrator.local.embedded import free_port
from orchestrator.local.fleet import wait_for

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"


def available() -> str | None:
    if not (Path(SERVER).exists() and Path(CTL).exists()):
        return "rabbitmq-server is not installed"
    return None


@dataclass
class Node:
    name: str
    port: int
    dist_port: int
    base: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"


def open_files(pid: int) -> int:
    """Files process ``pid`` (a node's Erlang VM: :meth:`RabbitCluster.beam_pid`) has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_file_limit(pid: int) -> int:
    """Process ``pid``'s open-file limit (its soft ``ulimit -n``)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise RuntimeError(f"no open-file limit in /proc/{pid}/limits")


class RabbitCluster:
    def __init__(self, size: int = 3, nofile: int | None = None) -> None:
        #: The nodes' open-file limit (``ulimit -n``), when not this process's own: RabbitMQ
        #: counts file handles against it, 3 for each quorum queue, and a node out of them
        #: accepts no connection.
        self.nofile = nofile
        self.dir = Path(tempfile.mkdtemp(prefix="orchestrator-rabbit-"))
        self.cookie = secrets.token_hex(16)
        (self.dir / ".erlang.cookie").write_text(self.cookie)
        os.chmod(self.dir / ".erlang.cookie", 0o400)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        tag = os.getpid()
        self.nodes = []
        for i in range(1, size + 1):
            port = free_port()
            self.nodes.append(Node(f"orch{i}-{tag}@localhost", port, free_port(),
                                   self.dir / f"node{i}"))

    @property
    def url(self) -> str:
        """kombu's fail-over URL: every node, the first one first."""
        return ";".join(node.url for node in self.nodes)

    def _env(self, node: Node) -> dict[str, str]:
        node.base.mkdir(parents=True, exist_ok=True)
        (node.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{node.port}\n"
            "loopback_users = none\n"
            # Quorum queues need a majority: with one of three nodes down they keep working.
            "cluster_partition_handling = pause_minority\n"
        )
        return {
            **os.environ,
            "HOME": str(self.dir),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_PORT": str(node.port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.base / "log"),
            "RABBITMQ_CONFIG_FILE": str(node.base / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(node.base / "pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def ctl(self, node: Node, *args: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([CTL, "-n", node.name, *args], env=self._env(node), check=check,
                              capture_output=True, text=True, timeout=timeout)

    def start_node(self, node: Node) -> None:
        self._spawn(node)
        self._wait_booted(node)

    def _spawn(self, node: Node) -> None:
        log = (node.base / "console.log")
        node.base.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            node.proc = subprocess.Popen([SERVER], env=self._env(node), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True,
                                         preexec_fn=self._limits if self.nofile else None)

    def _limits(self) -> None:
        """In the node's process before it starts: its open-file limit, no higher than the
        hard limit this process may raise it to."""
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        soft = self.nofile if hard == resource.RLIM_INFINITY else min(self.nofile, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def beam_pid(self, node: Node) -> int:
        """The OS process of the node's Erlang VM (``node.proc`` is the script that starts
        it)."""
        out = self.ctl(node, "eval", "list_to_integer(os:getpid()).").stdout
        return int(out.strip())

    def _wait_booted(self, node: Node) -> None:
        log = (node.base / "console.log")

        # The CLI answers "not running" until the node has registered with epmd.
        def booted() -> bool:
            if node.proc.poll() is not None:
                raise RuntimeError(f"RabbitMQ node {node.name} exited:\n"
                                   + log.read_text()[-2000:])
            return self.ctl(node, "await_startup", "--timeout", "60", check=False,
                            timeout=90).returncode == 0

        wait_for(booted, 120, f"RabbitMQ node {node.name}", interval=0.5)

    def start(self) -> RabbitCluster:
        """The nodes boot side by side, then the others join the first."""
        for node in self.nodes:
            self._spawn(node)
        for node in self.nodes:
            self._wait_booted(node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        return self

    def set_policy(self, name: str, pattern: str, definition: str, apply_to: str) -> None:
        self.ctl(self.nodes[0], "set_policy", name, pattern, definition, "--apply-to", apply_to)

    def stop_node(self, index: int) -> None:
        """Stop node ``index`` (0-based) cleanly: its connections close, its queue replicas
        go away; the others keep the quorum."""
        node = self.nodes[index]
        self.ctl(node, "stop", check=False)
        if node.proc is not None:
            node.proc.wait(timeout=60)

    def running(self, index: int) -> bool:
        node = self.nodes[index]
        return node.proc is not None and node.proc.poll() is None

    def destroy(self) -> None:
        """Every node gone at once (a test's teardown: nothing of them is kept)."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)
        for node in self.nodes:
            if node.proc is not None:
                node.proc.wait(timeout=30)
        # epmd forgets a node once it is gone; nothing else of ours is left running.
        shutil.rmtree(self.dir, ignore_errors=True)

    def wait_queue(self, queue: str, messages: int, timeout: float = 30) -> None:
        """Until ``queue`` holds ``messages`` ready messages, asked over AMQP of a running
        node (a passive declare's message count: no Erlang CLI to boot at each look)."""
        node = next(n for i, n in enumerate(self.nodes) if self.running(i))

        def count() -> bool:
            with kombu.Connection(node.url, connect_timeout=5) as conn:
                return conn.default_channel.queue_declare(
                    queue, passive=True).message_count == messages

        wait_for(count, timeout, f"{messages} message(s) in {queue}")
