"""The container deployments agree with the worker: grace periods longer than the drain plus
the exit margin, exec-form commands (no shell as PID 1), each host's two queues, and the same
routing.yaml. `docker compose config` parses the compose file where the compose plugin exists
(it needs no engine). tests/test_install.py runs what they start: the image's steps replayed,
its workers registering and draining."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from workers.deadline import EXIT_GRACE_SECONDS

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yaml"
K8S = ROOT / "docker" / "k8s" / "fleet.yaml"


def _seconds(value: str | int) -> float:
    match = re.fullmatch(r"(\d+)(s|m)?", str(value))
    assert match, f"cannot read a duration from {value!r}"
    return float(match.group(1)) * (60 if match.group(2) == "m" else 1)


def _option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def _check_worker(where: str, args: list[str], grace: float, host: str) -> None:
    assert args[0] not in ("sh", "bash", "/bin/sh") and "-c" not in args[:2], \
        f"{where}: a shell would be PID 1 and swallow SIGTERM"
    timeout = float(_option(args, "--graceful-timeout"))
    assert grace > timeout + EXIT_GRACE_SECONDS, (
        f"{where}: grace period {grace:g}s must exceed --graceful-timeout {timeout:g}s plus "
        f"the exit margin {EXIT_GRACE_SECONDS:g}s"
    )
    node = _option(args, "-n").split("@")[0]
    assert node in (host, host + "-main", host + "-alt"), f"{where}: node name {node}"
    queues = _option(args, "-Q").split(",")
    assert queues and all(q in (host, host + "-alt") for q in queues), f"{where}: {queues}"


def test_compose_workers_drain_within_the_grace_period() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    anchors = compose["x-worker"]
    workers = {name: svc for name, svc in compose["services"].items()
               if "--graceful-timeout" in (svc.get("command") or [])}
    assert {"compute1", "compute2", "compute3", "compute3-main", "compute3-alt"} <= set(workers)
    for name, svc in workers.items():
        grace = _seconds(svc.get("stop_grace_period", anchors["stop_grace_period"]))
        assert svc.get("stop_signal", anchors["stop_signal"]) == "SIGTERM"
        assert "restart" not in svc and "restart" not in anchors, \
            f"{name}: a drained host must stay down"
        host = name.removesuffix("-main").removesuffix("-alt")
        _check_worker(f"compose {name}", svc["command"], grace, host)
    flower = compose["services"]["flower"]["command"]
    assert flower[:2] == ["orchestrator", "flower"], "Flower with the Hosts tab"


def test_kubernetes_manifest_agrees_with_the_worker() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all(K8S.read_text())}
    pod = docs["StatefulSet"]["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    grace = float(pod["terminationGracePeriodSeconds"])
    assert "command" not in worker, "a container's command replaces the image's tini"
    args = worker["args"]
    assert args[0] == "celery"
    _check_worker("k8s compute", args, grace, "$(POD_NAME)")
    assert "lifecycle" not in worker, "a preStop hook would eat into the grace period"
    env = {e["name"]: e for e in worker["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert docs["ConfigMap"]["data"]["routing.yaml"] == (ROOT / "routing.yaml").read_text(), \
        "the ConfigMap's routing.yaml is the repository's"
    assert env["ORCHESTRATOR_ROUTING_FILE"]["value"] == "/etc/orchestrator/routing.yaml"
    flower = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert flower[:2] == ["orchestrator", "flower"]


def test_docker_compose_config_parses() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"],
                                        capture_output=True).returncode != 0:
        pytest.skip("no docker compose plugin here (the YAML checks above still ran)")
    done = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
