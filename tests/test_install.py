"""A plain install works, and the container image starts workers that drain.

The suite itself runs on an editable ``[test]`` install, which hides a missing dependency
(pytest brings ``packaging``, which kombu's Redis transport imports). Here the project's wheel
is built from a copy of the tree and installed, with the dependencies it declares and nothing
else, into a new venv; every command then runs from a directory with no pyproject.toml, no
PYTHONPATH and none of this suite's settings, as on a user's machine.

- README's "Your own workflow", as README gives it: ``shards.py`` and ``routing.yaml`` written
  from its code blocks, its ``pip install`` of the repository with the venv's own pip, its two
  ``celery worker`` commands, its submit, its SIGTERM to the destination's pid file while
  ``copy`` runs, its ``wait``: the operation completes; then what its prose says (the
  ``operation`` command, a rebalance sent to the draining host runs after its restart by the
  ``orchestrator worker`` line called "the same", the same from Python); workers exit 0.
- docker/Dockerfile replayed without a Docker engine: its COPY lines lay out the image's
  directories under a temporary root, its ``RUN pip install`` line runs there with the venv's
  pip, its ENV is set (image paths mapped under that root), and its CMD under its ENTRYPOINT
  starts in its WORKDIR; so do compose's and the Kubernetes manifest's worker commands and
  schema jobs, with their own environment. Each worker registers and drains on SIGTERM (exit
  0). What a replay cannot do is said where it is skipped (system packages, the non-root user).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from orchestrator.local.fleet import WorkerProcess, wait_for
from orchestrator.worker_command import worker_command
from tests.conftest import fresh_broker, fresh_db

pytestmark = pytest.mark.shutdown

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "docker" / "Dockerfile.dockerignore"
COMPOSE = ROOT / "docker" / "compose.yaml"
K8S = ROOT / "docker" / "k8s" / "fleet.yaml"

#: Left out of the copy the wheel is built from: caches and build leftovers (setuptools reuses
#: a stale build/, which would put modules deleted since into the wheel).
TREE_IGNORE = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
    ".ruff_cache", ".venv", ".benchmarks", "*.db", "*.db-*",
)


def run(argv: list[str], *, cwd: Path, env: Mapping[str, str], timeout: float = 120,
        what: str = "") -> subprocess.CompletedProcess:
    """``argv`` to completion; its output in the assertion when it fails."""
    done = subprocess.run(argv, cwd=cwd, env=dict(env), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, (
        f"{what or shlex.join(argv)}: exit {done.returncode}\n"
        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


def plain_env(venv: Path | None, extra: Mapping[str, str] = {}) -> dict[str, str]:
    """The machine's environment as a user's shell (with ``venv`` activated) has it: no
    PYTHONPATH (which points at this tree), none of this suite's settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
           and not k.startswith(("ORCHESTRATOR_", "PYTEST_", "CELERY_"))}
    if venv is not None:
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(venv)
    # The image's tini is PID 1 there, not here: as a subreaper it reaps what it would.
    env["TINI_SUBREAPER"] = "1"
    return {**env, **extra}


@dataclass
class Venv:
    path: Path
    wheel: Path
    #: The copy of this repository the wheel was built from (README's "/path/to/this/repository").
    tree: Path

    def pip(self, *args: str, cwd: Path, env: Mapping[str, str] = {}) -> None:
        run([str(self.path / "bin" / "pip"), "--disable-pip-version-check", *args], cwd=cwd,
            env=plain_env(self.path, env), timeout=600)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    """A new venv with the project's wheel and the dependencies it declares (from PyPI or the
    machine's pip cache); removed at the end (pytest keeps its last temporary directories)."""
    work = tmp_path_factory.mktemp("install")
    tree = work / "tree"
    shutil.copytree(ROOT, tree, symlinks=True, ignore=TREE_IGNORE)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "-q", "-w", str(work / "dist"), str(tree)], cwd=work, env=plain_env(None), timeout=300)
    (wheel,) = (work / "dist").glob("orchestrator-*.whl")
    run([sys.executable, "-m", "venv", str(work / "venv")], cwd=work, env=plain_env(None))
    made = Venv(work / "venv", wheel, tree)
    try:
        made.pip("install", "-q", str(wheel), cwd=work)
        yield made
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def processes() -> Iterator[list[WorkerProcess]]:
    """The long-running processes a test starts; any still running at the end is killed with
    its whole process group (its pool, the worker under tini)."""
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in started:
            proc.proc.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def spawn(started: list[WorkerProcess], name: str, argv: list[str], *, cwd: Path,
          env: Mapping[str, str], log_dir: Path) -> WorkerProcess:
    """``argv`` in the background, in a session of its own (as a service manager starts it)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^\w.-]+", "_", name)
    log_path = log_dir / f"{stem}-{len(started)}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    started.append(WorkerProcess(host=name, proc=proc, log_path=log_path))
    return started[-1]


def drains_to_zero(worker: WorkerProcess, timeout: float = 60) -> None:
    """SIGTERM to what we started (the worker, or tini in front of it): it must drain and exit
    0 by itself."""
    worker.signal(signal.SIGTERM)
    exited(worker, timeout)


def exited(worker: WorkerProcess, timeout: float = 60) -> None:
    """The worker, signalled, drains and exits 0 by itself."""
    try:
        code = worker.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{worker.host} still runs {timeout:g}s after SIGTERM:\n{worker.log()[-3000:]}")
    assert code == 0, f"{worker.host} exited {code} after SIGTERM:\n{worker.log()[-3000:]}"
    assert "drain: SIGTERM" in worker.log(), worker.log()[-3000:]


# -- README's "Your own workflow" ----------------------------------------------------------------

def readme_section(title: str) -> str:
    """The text of README's section ``title``, up to its first subsection."""
    return re.split(r"\n#{2,} ", README.read_text().split(f"\n## {title}\n", 1)[1], maxsplit=1)[0]


def readme_blocks(section: str) -> list[tuple[str, str, str]]:
    """(the paragraph before it, language, text) of each code block."""
    return [(section[:m.start()].rstrip("\n").rsplit("\n\n", 1)[-1].strip(), m[1], m[2])
            for m in re.finditer(r"^```(\w*)\n(.*?)^```", section, re.S | re.M)]


def shell_commands(script: str) -> list[tuple[str, list[str]]]:
    """A shell block's commands (the line as written, its words), continuation lines joined
    and comments dropped."""
    joined = script.replace("\\\n", " ")
    return [(line, argv) for line in joined.splitlines()
            if (argv := shlex.split(line, comments=True))]


def test_the_readme_workflow_runs_from_a_plain_install(venv: Venv, tmp_path: Path) -> None:
    """README's own files and commands, from an empty directory, each as written: its pip
    install of the repository (with the pip of Python 3.11's venv), its two workers (with
    ``-E`` and ``--pidfile``), its submit, its SIGTERM to the destination's main process while
    ``copy`` runs on the source, its wait: the operation completes. Then what its prose says:
    ``operation <ID>`` shows each step, its host and attempts; a rebalance submitted to node2
    during its drain waits in queue node2 and runs once node2 starts again, here by the
    ``orchestrator worker`` line README calls the same as the celery one (and is); the same
    from Python. Every worker exits 0 after SIGTERM."""
    section = readme_section("Your own workflow")
    blocks = readme_blocks(section)
    here = tmp_path / "rebalance"
    here.mkdir()
    from_python = []
    for before, lang, text in blocks:
        named = re.match(r"`([\w.]+\.(?:py|yaml))`", before)
        if named:
            (here / named.group(1)).write_text(text)
        elif lang == "python":
            from_python.append(text)
    assert sorted(p.name for p in here.iterdir()) == ["routing.yaml", "shards.py"]
    assert len(from_python) == 1, "README's 'the same from Python'"
    (same,) = [line for _, lang, text in blocks if lang == "sh"
               for line in re.findall(r"^# the same:\s*(.+)$", text, re.M)]
    (show,) = re.findall(r"`(orchestrator --app shards operation <ID>)`", section)

    env = plain_env(venv.path)
    broker = fresh_broker()
    workers: dict[str, WorkerProcess] = {}
    started_by: dict[str, list[str]] = {}
    submit: list[str] = []
    operation = meantime = ""
    with processes() as started:
        for lang, line, argv in ((lang, line, argv) for _, lang, text in blocks if lang == "sh"
                                 for line, argv in shell_commands(text)):
            where = f"README, Your own workflow ({lang}): {shlex.join(argv)}"
            if argv[0] in ("mkdir", "cd"):
                continue  # the directory is `here`
            if argv[0] == "pip":
                # As written, of this repository (the copy the wheel was built from), with
                # the venv's own pip (Python 3.11's: 23.2), in place of the wheel.
                venv.pip("uninstall", "-y", "-q", "orchestrator", cwd=here)
                argv = [str(venv.tree) if a == "/path/to/this/repository" else a for a in argv]
                run(argv, cwd=here, env=env, timeout=600, what=where)
                version = run(["orchestrator", "--version"], cwd=here, env=env, what=where)
                assert version.stdout.startswith("orchestrator, version "), version.stdout
            elif argv[0] == "export":
                env.update(a.split("=", 1) for a in argv[1:])
                # "a Redis ... the workers and you can reach": the suite's.
                env["ORCHESTRATOR_BROKER_URL"] = broker
            elif argv[:1] == ["celery"] and "worker" in argv:
                # Task events for Flower's task pages; the main process's id to signal.
                assert "-E" in argv and "--pidfile" in argv, where
                node = argv[argv.index("-n") + 1].split("@")[0]
                workers[node] = spawn(started, node, argv, cwd=here, env=env,
                                      log_dir=tmp_path / "logs")
                started_by[node] = argv
                workers[node].wait_ready(60)
            elif argv[:1] == ["orchestrator"] and "submit" in argv:
                submit = argv
                done = run(argv, cwd=here, env=env, what=where)
                operation = json.loads(done.stdout)["operation"]
                source = next(a.split("=", 1)[1] for a in argv if a.startswith("source="))
                # README: "while `copy` runs on node1": its worker has taken it.
                wait_for(lambda s=source: re.search(r"Task copy\[\S+\] received",
                                                    workers[s].log()), 30,
                         f"copy to reach {source}")
            elif argv[:2] == ["kill", "-TERM"]:
                # README: the pid file names the worker's main process (its pool processes
                # run the same command line: a pattern would signal them too).
                (pidfile,) = re.findall(r"([\w-]+\.pid)", " ".join(argv))
                node = pidfile.removesuffix(".pid")
                assert int((here / pidfile).read_text()) == workers[node].proc.pid, where
                run(["sh", "-c", line], cwd=here, env=env, what=where)  # as written
                wait_for(lambda n=node: "drain: SIGTERM" in workers[n].log(), 30,
                         f"{node} to start draining")
                # README: "A rebalance submitted to node2 in the meantime ... waits".
                later = [a.replace("s1", "s2") for a in submit]
                meantime = json.loads(run(later, cwd=here, env=env,
                                          what=shlex.join(later)).stdout)["operation"]
                exited(workers[node])
                assert f"{node}: serving s1 (1000 rows)" in workers[node].log(), \
                    f"{node} ran activate through its alt queue:\n{workers[node].log()[-3000:]}"
            elif argv[:1] == ["orchestrator"] and "wait" in argv:
                argv = [operation if a == "<ID>" else a for a in argv]
                done = run(argv, cwd=here, env=env, timeout=90, what=where)
                assert f"rebalance {operation}: completed" in done.stdout, done.stdout
            else:
                pytest.fail(f"{where}: no replay for this command; teach this test")
        assert operation and meantime and len(workers) == 2, "README's submit and two workers"

        # "`orchestrator --app shards operation <ID>` shows each step, its host and attempts."
        argv = [operation if a == "<ID>" else a for a in shlex.split(show)]
        shown = run(argv, cwd=here, env=env, what=show).stdout
        for line in ("0. prepare@node2: completed (attempts 1)",
                     "1. copy@node1: completed (attempts 1)",
                     "2. activate@node2: completed (attempts 1)"):
            assert line in shown, shown

        # The rebalance sent to node2 while it drained waits in queue node2 ...
        waiting = json.loads(run(["orchestrator", "--app", "shards", "operation", meantime,
                                  "--json"], cwd=here, env=env).stdout)
        assert waiting["status"] == "queued", waiting
        assert (waiting["current_step"]["step"], waiting["current_step"]["queue"]) == \
            ("prepare", "node2"), waiting["current_step"]
        # ... and runs once node2 starts again: by README's "the same" line, which is.
        same_argv = shlex.split(same)
        assert same_argv[:4] == ["orchestrator", "--app", "shards", "worker"], same
        host = same_argv[4]
        assert worker_command(host, extra=tuple(same_argv[5:]), app="shards")[3:] == \
            started_by[host][1:], f"README's 'the same' is not: {same}"
        workers[host] = spawn(started, f"{host}-again", same_argv, cwd=here, env=env,
                              log_dir=tmp_path / "logs")
        workers[host].wait_ready(60)
        assert int((here / f"{host}.pid").read_text()) == workers[host].proc.pid, same
        done = run(["orchestrator", "--app", "shards", "wait", meantime], cwd=here, env=env,
                   timeout=90)
        assert f"rebalance {meantime}: completed" in done.stdout, done.stdout

        # The same from Python, as README gives it.
        script = from_python[0] + "\nprint(orch.operation(op_id)['status'])\n"
        done = run(["python", "-c", script], cwd=here, env=env, timeout=90,
                   what="README's 'the same from Python'")
        assert done.stdout.strip().splitlines()[-1] == "completed", done.stdout

        for worker in workers.values():
            if worker.proc.poll() is None:
                drains_to_zero(worker)


def reference_app_finds_its_routing(venv: Venv, where: Path) -> None:
    """Nova's app as installed, in a directory with no routing.yaml and no
    ORCHESTRATOR_ROUTING_FILE: it finds the routing table the package carries."""
    done = run(["orchestrator", "--app", "nova_app.app", "routing", "check"], cwd=where,
               env=plain_env(venv.path), what="nova_app's routing.yaml, as installed")
    assert "nova_app/routing.yaml" in done.stdout + done.stderr, done.stdout + done.stderr


def test_the_reference_application_runs_anywhere_from_a_plain_install(
    venv: Venv, tmp_path: Path,
) -> None:
    """README: Nova's app runs "anywhere with ORCHESTRATOR_APP=nova_app.app"."""
    reference_app_finds_its_routing(venv, tmp_path)


# -- docker/Dockerfile, docker/compose.yaml, docker/k8s/fleet.yaml --------------------------------

def dockerfile_instructions(text: str) -> list[tuple[int, str, str]]:
    """(line, INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    found, pending, start = [], "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction, which Docker drops too
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        instruction, _, args = (pending + line).strip().partition(" ")
        found.append((start, instruction.upper(), args.strip()))
        pending = ""
    return found


def exec_form(args: str, where: str) -> list[str]:
    try:
        argv = json.loads(args)
    except ValueError:
        argv = None
    assert isinstance(argv, list) and argv, \
        f"{where}: not exec form (a JSON list): /bin/sh would be PID 1 and swallow SIGTERM"
    return argv


@dataclass
class Image:
    """What docker/Dockerfile builds, laid out under ``root`` (an image path ``/app`` is
    ``root/app``)."""

    root: Path
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    stopsignal: str = "SIGTERM"
    skipped: list[str] = field(default_factory=list)

    def path(self, image_path: str) -> Path:
        absolute = PurePosixPath(self.workdir, image_path)
        return self.root.joinpath(*absolute.parts[1:])

    def mapped(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` with each absolute path that exists in the image pointed under ``root``."""
        return {k: str(self.path(v)) if v.startswith("/") and self.path(v).exists() else v
                for k, v in env.items()}

    def command(self, entrypoint: list[str], cmd: list[str]) -> list[str]:
        """tini from the machine runs as the image's (the Debian package the image installs)."""
        if entrypoint[:1] == ["tini"] and shutil.which("tini") is None:
            entrypoint = entrypoint[entrypoint.index("--") + 1:]
        return [*entrypoint, *cmd]


def dockerignore() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def copy_into_image(image: Image, sources: list[str], dest: str, where: str) -> None:
    patterns = dockerignore()

    def ignored(directory: str, names: list[str]) -> set[str]:
        rel = Path(directory).relative_to(ROOT)
        return {n for n in names for p in patterns
                if fnmatch(str(rel / n), p) or (p.startswith("**/") and fnmatch(n, p[3:]))}

    target = image.path(dest)
    for source in sources:
        origin = ROOT / source
        assert origin.exists(), f"{where}: {source} is not in the build context"
        if origin.is_dir():
            # Links stay links, as Docker copies them: their targets must be copied too.
            shutil.copytree(origin, target, symlinks=True, ignore=ignored, dirs_exist_ok=True)
        else:
            into = target / origin.name if dest.endswith("/") or target.is_dir() else target
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, into)


def build_image(venv: Venv, root: Path) -> Image:
    """docker/Dockerfile's instructions, replayed: what installs the project runs with the
    venv's pip in the image's directories; system packages and users are the base image's
    business and are listed in ``skipped``."""
    image = Image(root)
    for number, instruction, args in dockerfile_instructions(DOCKERFILE.read_text()):
        where = f"docker/Dockerfile:{number}: {instruction}"
        if instruction == "WORKDIR":
            image.workdir = str(PurePosixPath(image.workdir, args))
            image.path(".").mkdir(parents=True, exist_ok=True)
        elif instruction == "ENV":
            words = shlex.split(args)
            pairs = [w.split("=", 1) for w in words] if "=" in words[0] else [
                [words[0], " ".join(words[1:])]]
            image.env.update(pairs)
        elif instruction == "COPY":
            *sources, dest = [w for w in shlex.split(args) if not w.startswith("--")]
            copy_into_image(image, sources, dest, where)
        elif instruction == "RUN" and "pip install" in args:
            words = shlex.split(args)
            commands = [[]]
            for word in words:
                if word == "&&":
                    commands.append([])
                else:
                    commands[-1].append(word)
            for argv in commands:
                if argv[:2] in (["pip", "install"], ["pip3", "install"]):
                    venv.pip(*argv[1:], cwd=image.path("."), env=image.mapped(image.env))
                elif argv[:2] == ["rm", "-rf"]:
                    for gone in argv[2:]:
                        shutil.rmtree(image.path(gone))
                else:
                    pytest.fail(f"{where}: no replay for `{shlex.join(argv)}`; teach this test")
        elif instruction in ("RUN", "USER", "FROM"):
            image.skipped.append(f"{where} {args}")
        elif instruction == "ENTRYPOINT":
            image.entrypoint = exec_form(args, where)
        elif instruction == "CMD":
            image.cmd = exec_form(args, where)
        elif instruction == "STOPSIGNAL":
            image.stopsignal = args
        else:
            pytest.fail(f"{where}: no replay for this instruction; teach this test")
    return image


@dataclass
class Container:
    """One process the deployment files start from the image."""

    name: str
    argv: list[str]
    env: dict[str, str]
    #: Runs to completion (a schema job) rather than serving (a worker).
    job: bool = False


def interpolated(value: Any) -> str:
    """A compose value with ``${VAR:-default}`` at its default (the fleet's own services)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def compose_containers(image: Image, services: Mapping[str, str]) -> dict[str, list[Container]]:
    """Per compose profile (``""``: the default), the services built from docker/Dockerfile,
    with compose's rules: ``command`` replaces CMD, ``entrypoint`` the ENTRYPOINT (and CMD)."""
    compose = yaml.safe_load(COMPOSE.read_text())
    found: dict[str, list[Container]] = {}
    for name, svc in compose["services"].items():
        if (svc.get("build") or {}).get("dockerfile") != "docker/Dockerfile":
            continue
        env = {k: interpolated(v) for k, v in (svc.get("environment") or {}).items()}
        entrypoint = svc.get("entrypoint", image.entrypoint)
        cmd = svc.get("command", image.cmd if "entrypoint" not in svc else [])
        argv = image.command(entrypoint, cmd)
        for profile in svc.get("profiles") or [""]:
            found.setdefault(profile, []).append(Container(
                f"compose {name}", argv, {**env, **services},
                job=not {"worker", "flower"} & set(cmd)))
    return found


def k8s_containers(image: Image, services: Mapping[str, str]) -> list[Container]:
    """The StatefulSet's first pod and the schema Job, with Kubernetes' rules: ``command``
    replaces the ENTRYPOINT (and CMD), ``args`` the CMD; ``$(VAR)`` from the container's env;
    ConfigMap volumes written at their mount path."""
    docs = list(yaml.safe_load_all(K8S.read_text()))
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for d in docs
               if d["kind"] == "Secret"}
    config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    found = []
    for doc in docs:
        if doc["kind"] not in ("StatefulSet", "Job"):
            continue
        pod_name = f"{doc['metadata']['name']}-0"
        pod = doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            env: dict[str, str] = {}
            for source in c.get("envFrom", []):
                env.update(secrets[source["secretRef"]["name"]])
            for var in c.get("env", []):
                if "value" in var:
                    env[var["name"]] = var["value"]
                else:
                    assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", var
                    env[var["name"]] = pod_name
            env.update(services)
            for mount in c.get("volumeMounts", []):
                files = config_maps[volumes[mount["name"]]["configMap"]["name"]]
                target = image.path(mount["mountPath"])
                target.mkdir(parents=True, exist_ok=True)
                for file, text in files.items():
                    (target / file).write_text(text)

            def expand(words: list[str], env: dict[str, str] = env) -> list[str]:
                return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), w) for w in words]

            entrypoint = expand(c["command"]) if "command" in c else image.entrypoint
            cmd = expand(c.get("args", image.cmd if "command" not in c else []))
            found.append(Container(f"k8s {doc['kind']} {c['name']}",
                                   image.command(entrypoint, cmd), env,
                                   job=doc["kind"] == "Job"))
    return found


def node_of(argv: list[str]) -> str:
    return argv[argv.index("-n") + 1].split("@")[0]


def test_the_image_and_its_deployments_start_workers_that_drain(
    venv: Venv, tmp_path: Path,
) -> None:
    """The Dockerfile's own steps build the image's layout in a new venv (the plain
    ``pip install`` of the Dockerfile's line, after the wheel of the other test is removed);
    its CMD, compose's worker services (per profile) and the StatefulSet's pod start from its
    WORKDIR with its ENV: each registers, then drains on SIGTERM to the process Docker or the
    kubelet signals (tini, PID 1) and exits 0. The schema jobs run first and succeed."""
    venv.pip("uninstall", "-y", "-q", "orchestrator", cwd=tmp_path)
    image = build_image(venv, tmp_path / "image")
    # The package the image installed is whole (its routing.yaml is a link the build follows).
    reference_app_finds_its_routing(venv, tmp_path)
    assert image.stopsignal == "SIGTERM"
    assert image.entrypoint == ["tini", "--"], "tini as PID 1 forwards SIGTERM to Celery only"
    services = {"ORCHESTRATOR_BROKER_URL": fresh_broker(),
                "ORCHESTRATOR_DB_URL": fresh_db(tmp_path)}
    # `docker run -e ...` for the image's own CMD: the broker and ledger are the deployer's.
    batches = {"": [Container("docker/Dockerfile CMD", image.command(image.entrypoint,
                                                                     image.cmd), services)]}
    batches[""] += k8s_containers(image, services)
    for profile, containers in compose_containers(image, services).items():
        batches.setdefault(profile, []).extend(containers)

    for profile, containers in batches.items():
        # What runs twice alike (compose compute1 is the image's CMD) runs once.
        unique: dict[tuple, Container] = {}
        for c in containers:
            key = (tuple(c.argv), tuple(sorted(c.env.items())))
            if key in unique:
                unique[key].name += f" = {c.name}"
            else:
                unique[key] = c
        for job in (c for c in unique.values() if c.job):
            run(job.argv, cwd=image.path("."), env=plain_env(venv.path, image.mapped(
                {**image.env, **job.env})), what=job.name)
        workers = [c for c in unique.values() if not c.job and "worker" in c.argv]
        assert workers, f"profile {profile or 'default'}: no worker"
        with processes() as started:
            for c in workers:
                spawn(started, f"{c.name}: {node_of(c.argv)}", c.argv,
                      cwd=image.path("."), env=plain_env(venv.path, image.mapped(
                          {**image.env, **c.env})), log_dir=tmp_path / "logs")
            for proc in started:
                proc.wait_ready(90)
            nodes = {node_of(c.argv) for c in workers}
            hosts = json.loads(run(["orchestrator", "hosts", "--json"], cwd=image.path("."),
                                   env=plain_env(venv.path, image.mapped(
                                       {**image.env, **services})),
                                   what="orchestrator hosts --json").stdout)
            registered = {s["nodename"].split("@")[0] for h in hosts if h["state"] == "up"
                          for s in h["services"]}
            assert nodes <= registered, (nodes, hosts)
            for proc in started:
                # tini is the process signalled; it forwards SIGTERM to the Celery MainProcess
                drains_to_zero(proc)
