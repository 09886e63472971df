"""routing.yaml validation (file, line, key) and the router, on pytest-celery's ``celery_app``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nova_app.flows import STEP_NAMES
from orchestrator.routing import (
    MissingHostError,
    RoutingError,
    StepRouter,
    load_routing,
    parse_routing,
    split_queue,
)

REPO = Path(__file__).resolve().parent.parent
VALID = (REPO / "routing.yaml").read_text()

# Nova's case-by-case choices (its compute-alt commits): these steps keep running while a
# host drains.
NOVA_ALT = {
    "live_migration", "pre_live_migration", "post_live_migration_at_destination",
    "rollback_live_migration_at_destination", "drop_move_claim_at_destination",
    "remove_volume_connection", "resize_instance", "finish_resize",
    "prep_snapshot_based_resize_at_source", "finish_snapshot_based_resize_at_dest",
    "check_instance_shared_storage", "finish_revert_resize",
    "finish_revert_snapshot_based_resize_at_source", "external_instance_event",
    "validate_console_port",
}


def parse(text: str):
    return parse_routing(text, Path("routing.yaml"), STEP_NAMES)


def error_of(text: str) -> RoutingError:
    with pytest.raises(RoutingError) as info:
        parse(text)
    return info.value


def test_repository_routing_file_matches_nova() -> None:
    table = load_routing(REPO / "routing.yaml", STEP_NAMES)
    assert set(table.routes) == STEP_NAMES
    assert {s for s, r in table.routes.items() if r.queue == "alt"} == NOVA_ALT
    assert all(r.reason.strip() for r in table.routes.values())


def test_unknown_step_names_line_and_suggests() -> None:
    text = VALID.replace("  finish_resize:", "  finish_resise:")
    err = error_of(text)
    line = text.splitlines().index("  finish_resise:") + 1
    assert (err.line, err.key) == (line, "finish_resise")
    assert str(err) == (
        f"routing.yaml:{line}: finish_resise: unknown step; did you mean 'finish_resize'?"
    )


def test_bad_queue_value_names_its_line() -> None:
    text = VALID.replace("queue: alt\n    reason: completes a started resize",
                         "queue: alternate\n    reason: completes a started resize")
    err = error_of(text)
    assert err.key == "finish_resize"
    assert text.splitlines()[err.line - 1].strip() == "queue: alternate"
    assert "queue must be 'main' or 'alt', not 'alternate'" in str(err)


def test_duplicate_step_is_an_error() -> None:
    text = VALID + "  prep_resize:\n    queue: alt\n    reason: again\n"
    err = error_of(text)
    assert err.key == "prep_resize"
    assert err.line == len(text.splitlines()) - 2
    assert "duplicate key (first at line" in str(err)


def test_yaml_syntax_error_names_the_line() -> None:
    text = VALID.replace("    queue: main\n    reason: a new request; a draining",
                         "    queue: [main\n    reason: a new request; a draining", 1)
    err = error_of(text)
    assert err.line is not None and "YAML syntax error" in str(err)
    assert str(err).startswith(f"routing.yaml:{err.line}: ")


def test_missing_step_is_an_error_not_a_default() -> None:
    lines = VALID.splitlines(keepends=True)
    start = lines.index("  confirm_resize:\n")
    err = error_of("".join(lines[:start] + lines[start + 3:]))
    assert err.key == "steps" and "no route for step(s) confirm_resize" in str(err)


@pytest.mark.parametrize(
    ("replace", "by", "message"),
    [
        ("    reason: completes", "    reasn: completes", "unknown field 'reasn'"),
        ("    reason: completes a started resize on the destination\n", "", "missing 'reason'"),
        ("steps:", "stepz:", "stepz: unknown top-level key"),
        ("  finish_resize:\n    queue: alt\n    reason: completes a started resize on the "
         "destination", "  finish_resize: alt", "finish_resize: expected a mapping"),
    ],
)
def test_other_mistakes_are_named(replace: str, by: str, message: str) -> None:
    assert replace in VALID
    assert message in str(error_of(VALID.replace(replace, by, 1)))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RoutingError, match="cannot read routing file"):
        load_routing(tmp_path / "nope.yaml", STEP_NAMES)


def test_worker_refuses_to_start_with_a_typo(tmp_path: Path) -> None:
    bad = tmp_path / "routing.yaml"
    bad.write_text(VALID.replace("  revert_resize:", "  revert_resizee:"))
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "orchestrator", "worker", "-Q", "compute1"],
        cwd=REPO, env={"ORCHESTRATOR_ROUTING_FILE": str(bad), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert f"{bad}:" in proc.stderr and "revert_resizee: unknown step" in proc.stderr


def test_split_queue() -> None:
    assert split_queue("compute1-alt") == ("compute1", "alt")
    assert split_queue("compute1") == ("compute1", "main")
    assert split_queue("-alt") == ("-alt", "main")


@pytest.fixture
def celery_config() -> dict:
    table = load_routing(REPO / "routing.yaml", STEP_NAMES)
    return {"broker_url": "memory://", "task_routes": (StepRouter(table, task_prefix="compute."),)}


def _queue_of(celery_app, step: str, **kwargs) -> str:
    with celery_app.producer_or_acquire() as producer:
        sent = []
        producer.publish = lambda body, **opts: sent.append(opts)  # capture, do not send
        celery_app.send_task(f"compute.{step}", kwargs=kwargs, producer=producer)
    return sent[0]["routing_key"]


def test_router_sends_each_step_to_its_host_queue(celery_app) -> None:
    kwargs = {"operation_id": "op", "position": 0}
    assert _queue_of(celery_app, "resize_instance", host="compute1", **kwargs) == "compute1-alt"
    assert _queue_of(celery_app, "prep_resize", host="compute2", **kwargs) == "compute2"


def test_step_without_host_fails_at_send_time(celery_app) -> None:
    with pytest.raises(MissingHostError, match="'finish_resize' sent without a target host"):
        celery_app.send_task("compute.finish_resize", kwargs={"operation_id": "op"})


def test_other_tasks_are_not_routed(celery_app) -> None:
    router = celery_app.conf.task_routes[0]
    assert router("celery.ping", (), {}, {}) is None


def test_nova_finds_its_routing_file_from_any_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in __import__("os").environ.items() if k != "ORCHESTRATOR_ROUTING_FILE"}
    env["ORCHESTRATOR_APP"] = "nova_app.app"  # no pyproject.toml names it there
    proc = subprocess.run(
        [sys.executable, "-c", "from orchestrator.ops.cli import main; main()", "routing", "check"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{REPO / 'routing.yaml'}: ok ({len(STEP_NAMES)} steps)"
    (tmp_path / "routing.yaml").write_text(VALID.replace("  revert_resize:", "  revert_resise:"))
    proc = subprocess.run(  # a ./routing.yaml wins (and here it is wrong)
        [sys.executable, "-c", "from orchestrator.ops.cli import main; main()", "routing", "check"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1 and "routing.yaml:" in proc.stdout
    assert "revert_resise: unknown step" in proc.stdout
    proc = subprocess.run(  # a file named on the command line: the hint is about that path
        [sys.executable, "-c", "from orchestrator.ops.cli import main; main()", "routing", "check",
         "no-such.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1 and proc.stdout.startswith("error: no-such.yaml: cannot read")
    assert "(the path given on the command line: check it)" in proc.stdout, proc.stdout
    assert "ORCHESTRATOR_ROUTING_FILE" not in proc.stdout


# -- one file for a fleet running two code versions ---------------------------------------------
TWO_RELEASES = """\
steps:
  copy_in:
    queue: alt
    reason: release 1's name
    versions: ["1"]
  install:
    queue: alt
    reason: release 2's name
    versions: ["2"]
  reserve:
    queue: main
    reason: both releases
"""


def test_a_step_of_another_version_is_accepted_where_the_file_says_so() -> None:
    one = parse_routing(TWO_RELEASES, Path("r.yaml"), {"copy_in", "reserve"}, "1")
    two = parse_routing(TWO_RELEASES, Path("r.yaml"), {"install", "reserve"}, "2")
    assert set(one.routes) == set(two.routes) == {"copy_in", "install", "reserve"}
    assert one.routes["install"].versions == ("2",) and one.kind("copy_in") == "alt"


def test_a_typo_is_still_an_error_with_line_and_suggestion() -> None:
    text = TWO_RELEASES.replace("  install:\n    queue: alt\n    reason: release 2's name\n"
                                "    versions: [\"2\"]\n", "  instal:\n    queue: alt\n"
                                "    reason: typo\n")
    with pytest.raises(RoutingError) as info:
        parse_routing(text, Path("r.yaml"), {"install", "reserve"}, "2")
    assert str(info.value).startswith("r.yaml:6: instal: unknown step; did you mean 'install'?")


def test_an_entry_for_this_version_that_the_code_does_not_register_is_an_error() -> None:
    with pytest.raises(RoutingError, match=r"r.yaml:6: install: listed for version '2', "
                                           r"this code's, which does not register it"):
        parse_routing(TWO_RELEASES, Path("r.yaml"), {"copy_in", "reserve"}, "2")
    with pytest.raises(RoutingError, match=r"versions' must be a list"):
        parse_routing(TWO_RELEASES.replace('["2"]', "2"), Path("r.yaml"),
                      {"copy_in", "reserve"}, "1")


def test_an_alias_routes_like_its_step() -> None:
    text = TWO_RELEASES.replace('    versions: ["1"]\n', "", 1)  # copy_in: no versions
    table = parse_routing(text.replace("  copy_in:\n    queue: alt\n    reason: release 1's "
                                       "name\n", ""), Path("r.yaml"),
                          {"install": "install", "reserve": "reserve", "copy_in": "install"},
                          "2")
    assert "copy_in" not in table.routes and table.route("copy_in").step == "install"
    router = StepRouter(table, mode="always")
    assert router.queue("copy_in", "node2") == "node2-alt"


def test_a_silent_host_is_asked_before_its_alt_steps_go_to_main() -> None:
    """A host whose alt-consuming worker went silent (a stale heartbeat; it was up or
    draining) counts as down only if the second witness does not hear that worker over the
    broker: one that answers still takes its alt steps (a draining worker no longer consumes
    ``<host>``). A legacy worker, or one recorded down, is never asked."""
    from orchestrator.registry import ServiceView, alt_snapshot
    from orchestrator.routing import AltCapability

    def view(node: str, host: str, *, version: int = 2, recorded: str = "draining",
             alt: bool = True) -> ServiceView:
        return ServiceView(node, host, version, consumes_main=False, consumes_alt=alt,
                           state="down", heartbeat_age=60.0, recorded_state=recorded)

    views = [view("c1@x", "c1"), view("c2@x", "c2"), view("old@x", "c3", version=1),
             view("gone@x", "c4", recorded="down")]
    asked: list[str] = []

    def witness(node: str) -> bool:
        asked.append(node)
        return node == "c1@x"

    capability = AltCapability(lambda _host: alt_snapshot(views), ttl=60, witness=witness)
    assert [capability.status(h) for h in ("c1", "c2", "c3", "c4")] == [
        "alt", "down", "down", "down"]
    assert asked == ["c1@x", "c2@x"]
    without = AltCapability(lambda _host: alt_snapshot(views), ttl=60)
    assert without.status("c1") == "down"
