"""Start and stop real ``celery worker`` processes, one per host: for the demo and the tests.

The process we signal is the Celery MainProcess itself (no shell, no wrapper), exactly as a
supervisor with ``KillMode=mixed`` or ``docker stop`` would signal it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.status import wait_for
from orchestrator.worker_command import QueueSet, worker_command

__all__ = ["Fleet", "WorkerProcess", "wait_for"]



@dataclass
class WorkerProcess:
    host: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"worker {self.host} exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
                )
            return " ready." in self.log()

        wait_for(ready, timeout, f"worker {self.host} to be ready")

    def pool_pids(self) -> list[int]:
        """The worker's child processes (its prefork pool), from /proc; none once it exited."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=10)


@dataclass
class Fleet:
    """The worker processes of a test or of the demo, all with the same environment."""

    env: Mapping[str, str]
    log_dir: Path
    workers: list[WorkerProcess] = field(default_factory=list)
    #: The ``-A`` argument of every worker this fleet starts.
    app: str = "orchestrator"
    #: Where the workers run (their ``-A`` module is found from there; ``-A orchestrator``
    #: reads the application's name from ./pyproject.toml there).
    cwd: Path = field(default_factory=Path.cwd)

    def start(
        self, host: str, *, queues: QueueSet = "both", concurrency: int = 2,
        graceful_timeout: float | None = None, env: Mapping[str, str] | None = None,
        extra: tuple[str, ...] = (), ready: bool = True, legacy: bool = False,
        prefix: tuple[str, ...] = (),
    ) -> WorkerProcess:
        """``prefix``: what runs the command (``ip netns exec NS``: a machine of its own)."""
        args = ["-c", str(concurrency), "-l", "info", "--without-mingle", "--without-gossip"]
        if graceful_timeout is not None:
            args += ["--graceful-timeout", str(graceful_timeout)]
        command = [*prefix, *worker_command(host, queues, (*args, *extra), legacy=legacy,
                                            app=self.app)]
        return self.spawn(host, "legacy" if legacy else queues, command, env=env, ready=ready)

    def spawn(
        self, name: str, kind: str, command: list[str], *,
        env: Mapping[str, str] | None = None, ready: bool = True,
    ) -> WorkerProcess:
        """Run any ``celery worker`` command line (a plain Celery baseline, for one)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}-{kind}-{len(self.workers)}.log"
        with log_path.open("w") as log:
            # A process group of its own, as a supervisor gives each service: the worker and
            # its pool end together at kill_all, and a Ctrl-C meant for the caller is not
            # delivered to it behind the caller's back.
            proc = subprocess.Popen(
                command, cwd=self.cwd, env={**os.environ, **self.env, **(env or {})},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        worker = WorkerProcess(host=name, proc=proc, log_path=log_path)
        self.workers.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    def start_flower(self, port: int, address: str = "127.0.0.1") -> WorkerProcess:
        """``orchestrator flower`` on ``address:port`` for this fleet's application; returns
        once it answers."""
        import urllib.request

        app = [] if self.app == "orchestrator" else ["--app", self.app]
        flower = self.spawn("flower", str(port), [
            sys.executable, "-m", "orchestrator.ops.cli", *app, "flower", f"--port={port}",
            f"--address={address}",
        ], ready=False)

        def answers() -> bool:
            if flower.proc.poll() is not None:
                raise RuntimeError(f"flower exited: {flower.log()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{address}:{port}/healthcheck", timeout=2):
                    return True
            except OSError:
                return False

        wait_for(answers, 30, f"flower on {address}:{port}")
        return flower

    def kill_all(self) -> None:
        """End every process of this fleet at once, pools included (SIGKILL to each process
        group): a test's teardown, where nothing more is looked at. What they held goes back
        to the broker as after any SIGKILL; the next test starts from an empty broker."""
        for worker in self.workers:
            if worker.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(worker.pid, signal.SIGKILL)
        for worker in self.workers:
            worker.proc.wait(timeout=10)
            # Pool processes of a worker that exited earlier may linger in its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.pid, signal.SIGKILL)

    def stop_all(self, timeout: float = 30.0) -> list[str]:
        """Cold shutdown of every process still running (SIGQUIT), then SIGKILL to the
        process group of any that did not exit within ``timeout`` or left a pool process
        behind; returns what needed force."""
        forced: list[str] = []
        for worker in self.workers:
            worker.signal(signal.SIGQUIT)
        deadline = time.monotonic() + timeout  # one for all: they stop side by side
        for worker in self.workers:
            try:
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                last = worker.log().rstrip().splitlines()[-5:]
                forced.append(f"{worker.host} (pid {worker.pid}) did not exit within "
                              f"{timeout:g} s of SIGQUIT; killed; its log ended with:\n  "
                              + "\n  ".join(last))
        self.kill_all()
        return forced
