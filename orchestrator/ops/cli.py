"""The ``orchestrator`` command line, for any application.

``orchestrator --app MODULE ...`` (or ``ORCHESTRATOR_APP``, or ``[tool.orchestrator] app`` in
the project's pyproject.toml) points every command at the application whose Orchestrator
``MODULE`` defines. The engine's commands (worker, submit, operation, wait, hosts, drain,
routing, db) work for any application; an application adds its own verbs
(``Orchestrator(commands=...)``) with the helpers in ``__all__``.

Operation commands check the request, record it and return once its first step is queued,
printing the operation id; ``wait`` follows it. Every command takes ``--json``. Errors go to
stderr (or as ``{"error": ...}`` with ``--json``) with exit status 2, and nothing is sent.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from orchestrator.errors import ConfigError, OrchestratorError, SubmitError

#: What an application's own commands use (``Orchestrator(commands=...)``): its public API.
__all__ = ["EXIT_ERROR", "EXIT_NOT_COMPLETED", "emit", "fail", "handles_errors", "json_option",
           "main", "wait_until_ended"]

EXIT_ERROR = 2
EXIT_NOT_COMPLETED = 1
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
#: What click (8.2 on) raises for a group named without its command: its help is wanted.
NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


def emit(as_json: bool, data: Any, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


def fail(as_json: bool, message: str) -> None:
    """Print ``message`` as the error (one line: a driver's or broker's error may quote the
    configured URLs, a subject or a host name may hold a newline) and exit 2."""
    from orchestrator.config import configured_urls
    from orchestrator.redact import printable, redact_text

    message = printable(redact_text(message, *configured_urls()))
    if as_json:
        click.echo(json.dumps({"error": message}))
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_ERROR)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the engine's and the application's errors into one line and exit status 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (OrchestratorError, TimeoutError) as exc:
            fail(bool(kwargs.get("as_json")), str(exc))

    return wrapper


def current() -> Any:
    """The Orchestrator of the application this command runs for (loaded once)."""
    from orchestrator.discovery import load_app

    root = click.get_current_context().find_root()
    if root.obj is None:
        root.obj = load_app(root.params.get("app"))
        # What only looks (hosts, operation, Flower, ...) creates nothing in the database it
        # was pointed at; a submit, a drain or `db upgrade` writes and creates as usual.
        root.obj.db.reads_create = False
    return root.obj


#: The reference application shipped with the package: what ``orchestrator demo`` runs when
#: no application is named (the demo is its command).
REFERENCE_APP = "nova_app.app"


def _named_app(app: str | None) -> str | None:
    """The application this command line names (``--app``, ``ORCHESTRATOR_APP``, the
    project's pyproject.toml), or None when it names none."""
    from orchestrator.discovery import app_name

    try:
        return app_name(app)
    except ConfigError:
        return None


def _app_commands(app: str | None) -> dict[str, click.Command]:
    from orchestrator.discovery import load_app

    try:
        orch = load_app(app)
    except OrchestratorError as exc:
        fail("--json" in sys.argv, str(exc))
    if not orch.commands:
        return {}
    mod_name, _, attr = orch.commands.partition(":")
    commands = getattr(importlib.import_module(mod_name), attr or "COMMANDS")
    return {c.name: c for c in commands if c.name}


class AppGroup(click.Group):
    """The engine's commands plus the application's (``Orchestrator(commands=...)``). A
    mistake on the command line (an unknown option, a bad value) is said as every other
    error is: one line, ``error: ...`` (with ``--json``, as JSON), exit status 2."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        given = list(args) if args is not None else sys.argv[1:]
        try:
            code = super().main(given, prog_name, complete_var, False, **extra)
        except NO_ARGS_IS_HELP as exc:
            # `orchestrator`, `orchestrator db`: a group named without its command is asked
            # for its help (click 8.2 raises it as a usage error, the help inside one line).
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.ClickException as exc:
            hint = " (see --help)" if isinstance(exc, click.UsageError) else ""
            fail("--json" in given, exc.format_message() + hint)
        except (click.Abort, KeyboardInterrupt, EOFError):
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def _extra(self, ctx: click.Context) -> dict[str, click.Command]:
        """The application's commands; none when no application is named (the engine's own
        commands and its help work anywhere)."""
        root = ctx.find_root()
        if "app_commands" not in root.meta:
            app = root.params.get("app")
            root.meta["app_commands"] = (
                _app_commands(app) if _named_app(app) is not None else {})
        return root.meta["app_commands"]

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Every argument is text: bytes that are not UTF-8 (held by Python as lone
        surrogates) would fail deep in a driver or a serializer, with a traceback."""
        from orchestrator.limits import utf8

        for arg in args:
            if not utf8(arg):
                shown = arg.encode("utf-8", "surrogateescape")
                fail("--json" in args, f"argument {shown!r} is not UTF-8 text")
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._extra(ctx)))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name) or self._extra(ctx).get(cmd_name)
        if found is not None:
            return found
        root = ctx.find_root()
        if _named_app(root.params.get("app")) is not None:
            return None
        if cmd_name == "demo":  # the reference application's demo, from any directory
            root.params["app"] = REFERENCE_APP
            root.meta.pop("app_commands", None)
            return self._extra(ctx).get(cmd_name)
        raise click.UsageError(
            f"no command {cmd_name!r} here, and no application is named: its commands come "
            "with --app MODULE, ORCHESTRATOR_APP, or [tool.orchestrator] app in the "
            "project's pyproject.toml", ctx)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if _named_app(ctx.find_root().params.get("app")) is None:
            formatter.write_paragraph()
            formatter.write_text(
                "No application is named: these are the engine's own commands. An "
                "application's (its operations, Nova's boot, resize, ...) come with --app "
                "MODULE, ORCHESTRATOR_APP, or [tool.orchestrator] app in the project's "
                "pyproject.toml. 'orchestrator demo' runs the reference application (Nova's "
                "compute service) from anywhere.")
        super().format_epilog(ctx, formatter)


@click.group(cls=AppGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="orchestrator", prog_name="orchestrator")
@click.option("--app", envvar="ORCHESTRATOR_APP", default=None, metavar="MODULE",
              help="The application: a module that defines an Orchestrator "
                   "(default: ORCHESTRATOR_APP, else [tool.orchestrator] app in "
                   "the project's pyproject.toml).")
def main(app: str | None) -> None:
    """Celery task orchestration with shutdown-aware (alt queue) routing."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("host")
@click.option("--main-only", "queues", flag_value="main", help="Consume only <host>.")
@click.option("--alt-only", "queues", flag_value="alt", help="Consume only <host>-alt.")
@click.option(
    "--legacy", is_flag=True,
    help="Run the previous service version (1): consumes only <host>, as a host not yet "
         "upgraded.",
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(host: str, queues: str | None, legacy: bool, celery_args: tuple[str, ...]) -> None:
    """Run the worker of HOST: celery -A APP worker -n HOST@%h -Q HOST,HOST-alt [CELERY_ARGS]."""
    from orchestrator.names import check_host_name
    from orchestrator.worker_command import worker_command

    if legacy and queues == "alt":
        raise click.UsageError("--legacy consumes only <host>; it cannot be --alt-only")
    try:
        check_host_name(host, "worker")
    except SubmitError as exc:
        raise click.UsageError(str(exc)) from None
    app = click.get_current_context().find_root().params.get("app") or "orchestrator"
    command = worker_command(
        host, queues or "both", celery_args, legacy=legacy, app=app,  # type: ignore[arg-type]
    )
    os.execv(command[0], command)


def _parse_pairs(pairs: tuple[str, ...], what: str, as_json_values: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SubmitError(f"{what} {pair!r} is not KEY=VALUE")
        if key in out:
            raise SubmitError(f"{what} {key!r} given twice")
        if as_json_values:
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value
        else:
            out[key] = value
    return out


@main.command()
@click.argument("flow")
@click.option("--host", "hosts", multiple=True, metavar="ROLE=HOST",
              help="The host of one of the flow's roles (repeat for each role).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A parameter (VALUE read as JSON when it is JSON, else as a string).")
@click.option("--subject", default=None, help="What must not run two operations at once.")
@json_option
@handles_errors
def submit(flow: str, hosts: tuple[str, ...], params: tuple[str, ...], subject: str | None,
           as_json: bool) -> None:
    """Submit an operation of FLOW; prints its id once its first step is queued."""
    orch = current()
    op_id = orch.submit(flow, hosts=_parse_pairs(hosts, "--host", False),
                        params=_parse_pairs(params, "--param", True), subject=subject)
    emit(as_json, {"operation": op_id}, f"operation {op_id} ({flow}) accepted")


@main.command()
@click.argument("host")
@click.option("--reason", default=None,
              help="Why (in the worker's log and the drain's record; default: remote control).")
@json_option
@handles_errors
def drain(host: str, reason: str | None, as_json: bool) -> None:
    """Start HOST's drain remotely, as SIGTERM would."""
    orch = current()
    known = orch.registry.known_hosts()
    if host not in known:
        raise SubmitError(
            f"unknown host {host!r} (known hosts: {', '.join(known) or 'none registered'})"
        )
    nodes = [v.nodename for v in orch.registry.services(host) if v.state != "down"]
    if not nodes:
        raise SubmitError(f"host {host!r} has no running worker")
    replies = orch.app.control.broadcast("drain", destination=nodes, reply=True, timeout=5,
                                         arguments={} if reason is None else {"reason": reason})
    answered = {name: reply for r in replies for name, reply in r.items()}
    emit(
        as_json, {"host": host, "replies": answered},
        "\n".join(f"{name}: {reply}" for name, reply in answered.items()) or "no reply",
    )
    if not answered:
        sys.exit(EXIT_NOT_COMPLETED)


@main.command()
@click.argument("names", nargs=-1, metavar="[HOST|GLOB]...")
@click.option("--state", "states", multiple=True,
              type=click.Choice(["up", "draining", "down"]),
              help="Only hosts in this state (repeatable).")
@click.option("--busy", is_flag=True,
              help="Only hosts with work: operations in flight, or messages queued.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most this many hosts, by name.")
@click.option("--offset", type=click.IntRange(min=0), default=0,
              help="Skip this many hosts first (with --limit: pages).")
@json_option
@handles_errors
def hosts(names: tuple[str, ...], states: tuple[str, ...], busy: bool, limit: int | None,
          offset: int, as_json: bool) -> None:
    """Hosts: service version, up/draining/down, where alt steps go, queues, operations in
    flight, and what waits on a queue nobody consumes. NAMES (shell globs: 'compute1*')
    and the options choose which; the broker and the workers are asked about those only."""
    from orchestrator.errors import LedgerUnavailable
    from orchestrator.ops import views

    orch = current()
    only = views.HostFilter(names, states, busy, limit, offset)
    try:
        data = views.hosts(orch, with_reports=True, only=only)
    except LedgerUnavailable as exc:
        # What the workers say over the broker, then the error (one line, exit status 2).
        outage = views.ledger_outage(orch, exc, views.worker_reports(orch))
        if as_json:
            click.echo(json.dumps({"error": str(exc), **outage}, indent=2, sort_keys=True))
            sys.exit(EXIT_ERROR)
        click.echo("\n".join(views.describe_outage(outage)))
        fail(False, str(exc))
    lines = [
        f"{'HOST':<14}{'STATE':<10}{'VERSION':<9}{'ALT STEPS TO':<18}{'FALLBACKS':<11}"
        f"{'IN FLIGHT':<11}QUEUED"
    ]
    notes = []
    for h in data:
        queued = ", ".join(f"{q}={n}" for q, n in h["queued"].items())
        lines.append(
            f"{h['host']:<14}{h['state']:<10}{h['version']:<9}{h['alt_steps_to']:<18}"
            f"{sum(h['alt_fallbacks'].values()):<11}{h['operations_in_flight']:<11}{queued}"
        )
        notes += [f"{h['host']}: {note}" for note in h["notes"]]
        for v in h["services"]:
            ledger = v.get("ledger") or {}
            if ledger and not ledger.get("up"):
                notes.append(f"{h['host']}: {v['nodename']} cannot reach the ledger: "
                             f"{ledger.get('last_error') or 'unreachable'}")
            elif v.get("heartbeat_unconfirmed"):
                notes.append(f"{h['host']}: {v['nodename']} heartbeat {v['heartbeat_age']:.0f}s "
                             "old, not counted as down: the ledger was unreachable meanwhile")
        for d in h["drains"]:
            waits = d["waiting_for"].get("operations", []) + d["waiting_for"].get("running", [])
            notes.append(
                f"{h['host']}: {d['worker']} draining for {d['seconds']:.0f}s, deadline in "
                f"{d['deadline_in']:.0f}s, waiting for " + ("; ".join(waits) or "nothing")
            )
    lines.append(f"alt routing: {orch.settings.alt_routing} (ORCHESTRATOR_ALT_ROUTING)")
    emit(as_json, data, "\n".join(lines + notes))


@main.command()
@click.argument("operation_id")
@json_option
@handles_errors
def operation(operation_id: str, as_json: bool) -> None:
    """Show an operation: its steps, where the current one waits, and its timeline (when
    and where each step ran, from which queue, and what happened on the way: hand-backs by
    a drain, holds, resends, retries, waits, a rollback). OPERATION_ID: the id, or a
    unique prefix of it, as the demo prints."""
    from orchestrator import timeline
    from orchestrator.status import operation_dict

    orch = current()
    data = operation_dict(orch, orch.ledger.resolve(operation_id), with_timeline=True)
    about = data.get("instance") or data.get("subject") or "-"
    lines = [f"{data['kind']} {data['operation']} on {about}: {data['status']}"]
    lines += [
        f"  {s['position']}. {s['step']}@{s['host']}: {s['status']} (attempts {s['attempts']})"
        for s in data["steps"]
    ]
    current_step = data["current_step"]
    if current_step is not None:
        lines.append(
            f"  now: {current_step['step']}@{current_step['host']} {current_step['state']}"
            f"{' in ' + current_step['queue'] if current_step['queue'] else ''}"
            f" (host {current_step['host_state']})"
        )
        if current_step["waiting"]:
            lines.append(f"  waiting: {current_step['waiting']}")
    if data["error"]:
        lines.append(f"  error: {data['error']}")
    lines.append("timeline:")
    lines += [f"  {line}" for line in timeline.lines(data["timeline"], data["created_at"])]
    emit(as_json, data, "\n".join(lines))


@main.command()
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(["queued", "running", "completed", "failed"]),
              help="Only these statuses (repeatable).")
@click.option("--flow", default=None, help="Only operations of this flow (boot, resize...).")
@click.option("--host", default=None, help="Only those that ran, or will run, on HOST.")
@click.option("--subject", default=None, help="Only those for SUBJECT ('*' a wildcard).")
@click.option("--stuck", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Only those in flight whose current step has not moved for SECONDS.")
@click.option("--limit", type=click.IntRange(min=1, max=1000), default=50,
              show_default=True, help="At most this many.")
@click.option("--offset", type=click.IntRange(min=0), default=0,
              help="Skip this many first (with --limit: pages).")
@json_option
@handles_errors
def operations(statuses: tuple[str, ...], flow: str | None, host: str | None,
               subject: str | None, stuck: float | None, limit: int, offset: int,
               as_json: bool) -> None:
    """List operations: those in flight first, the longest unmoved first (the stuck ones),
    then those that ended, newest first. 'orchestrator operation ID' shows one."""
    from orchestrator.ledger.store import OperationQuery
    from orchestrator.ops.views import operations_page

    page = operations_page(current(), OperationQuery(
        statuses, flow, subject, host, stuck, limit, offset))
    lines = [f"{'OPERATION':<10}{'FLOW':<16}{'SUBJECT':<18}{'STATUS':<11}{'STEP':<6}"
             f"{'NOW':<40}{'FOR':>8}"]
    for op in page["operations"]:
        now = op["current_step"]
        where = (f"{now['step']}@{now['host']} {now['state']}" if now else
                 (op["error"] or "")[:38])
        lasted = now["seconds"] if now else op["seconds"]
        lines.append(f"{op['operation'][:8]:<10}{op['kind'][:15]:<16}"
                     f"{(op['subject'] or '-')[:17]:<18}{op['status']:<11}"
                     f"{str(op['position']) + '/' + str(op['steps']):<6}"
                     f"{where[:39]:<40}{lasted:>7.0f}s")
    shown = len(page["operations"])
    lines.append(f"{shown} of {page['total']}" + (
        f" (from {offset + 1}; --offset {offset + shown} for more)"
        if offset + shown < page["total"] else ""))
    emit(as_json, page, "\n".join(lines))


def wait_until_ended(operation_id: str, timeout: float) -> dict[str, Any]:
    """The operation once ended, or as it stands when ``timeout`` passes."""
    orch = current()
    try:
        return orch.wait(operation_id, timeout=timeout)
    except TimeoutError:
        return orch.operation(operation_id)


@main.command()
@click.argument("operation_id")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait.")
@json_option
@handles_errors
def wait(operation_id: str, timeout: float, as_json: bool) -> None:
    """Wait for an operation to end: exit 0 if it completed, 1 otherwise (OPERATION_ID: the
    id, or a unique prefix of it)."""
    data = wait_until_ended(current().ledger.resolve(operation_id), timeout)
    emit(as_json, data, f"{data['kind']} {data['operation']}: {data['status']}")
    if data["status"] != "completed":
        sys.exit(EXIT_NOT_COMPLETED)


@main.group()
def deploy() -> None:
    """Before a rollout: what the new code (--app) would not serve."""


@deploy.command(name="check")
@json_option
@handles_errors
def deploy_check(as_json: bool) -> None:
    """Load the new code (--app MODULE) and compare it with the ledger's operations in flight,
    the step messages waiting in the host queues and routing.yaml: list every step it would
    not serve; exit 1 when anything would be stranded, 0 otherwise (a deploy pipeline's
    gate)."""
    from orchestrator.ops.deploy import check, describe

    result = check(current())
    emit(as_json, result, "\n".join(describe(result)))
    if not result["ok"]:
        sys.exit(EXIT_NOT_COMPLETED)


def _table_dict(source: Any) -> dict[str, Any]:
    table = source.table
    return {
        "file": str(table.path),
        "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(source.loaded_at)),
        "steps": {s: {"queue": r.queue, "reason": r.reason, "line": r.line}
                  for s, r in sorted(table.routes.items())},
        "pending_error": str(source.error) if source.error is not None else None,
    }


@main.group(invoke_without_command=True)
@json_option
@click.pass_context
@handles_errors
def routing(ctx: click.Context, as_json: bool) -> None:
    """The routing table in force (routing.yaml); subcommands show, check and explain."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(routing_show, as_json=as_json)


@routing.command(name="show")
@json_option
@handles_errors
def routing_show(as_json: bool) -> None:
    """The table in force: each step's queue and reason, the file and when it was read."""
    orch = current()
    orch.routing_source.check(force=True)  # read again now if the file changed
    data = _table_dict(orch.routing_source)
    width = max((len(step) for step in data["steps"]), default=0) + 2
    lines = [f"{step:<{width}}{r['queue']:<6}{r['reason']}" for step, r in data["steps"].items()]
    lines.append(f"from {data['file']}, read at {data['loaded_at']}")
    if data["pending_error"]:
        lines.append(f"not in force (the file's current text has an error): "
                     f"{data['pending_error']}")
    emit(as_json, data, "\n".join(lines))


@routing.command(name="check")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@json_option
def routing_check(path: str | None, as_json: bool) -> None:
    """Validate routing.yaml (PATH, or the application's) against the registered steps: exit
    0 if every process would accept it, 1 with file, line and key if not (CI, pre-commit)."""
    from orchestrator.redact import printable
    from orchestrator.routing import RoutingError, load_routing

    try:
        orch = current()
        orch.load_steps()
        table = load_routing(path or orch.routing_file, orch.served_steps(), orch.code_version,
                             "argument" if path else orch.routing_origin)
    except RoutingError as exc:
        emit(as_json, {"ok": False, "error": str(exc)}, f"error: {printable(str(exc))}")
        sys.exit(EXIT_NOT_COMPLETED)
    except OrchestratorError as exc:
        fail(as_json, str(exc))
    emit(as_json, {"ok": True, "file": str(table.path), "steps": len(table.routes)},
         f"{table.path}: ok ({len(table.routes)} steps)")


@routing.command(name="explain")
@click.argument("step")
@click.option("--host", required=True, help="The host the step would run on.")
@json_option
@handles_errors
def routing_explain(step: str, host: str, as_json: bool) -> None:
    """Which queue STEP for HOST goes to now, and why: routing.yaml, the host's state in the
    service registry, and ORCHESTRATOR_ALT_ROUTING."""
    from orchestrator import registry
    from orchestrator.routing import RoutingError

    orch = current()
    table = orch.routing_source.check(force=True)
    route = table.route(step)
    if route is None:
        raise RoutingError(table.path, None, step, "no such step in the table in force")
    decision = orch.router.decide(step, host, record=False)
    views = orch.registry.services()
    live = [v for v in views if v.host == host and v.state != "down"]
    host_text = (
        f"{host} is {registry.host_state(views, host)}"
        + (f", version {max(v.version for v in live)}, consuming "
           + ", ".join(sorted({host for v in live if v.consumes_main}
                              | {f"{host}-alt" for v in live if v.consumes_alt}))
           if live else "")
    )
    why = {
        "table": "as routing.yaml says",
        "no-alt": f"{host} has no live service that consumes {host}-alt (legacy or main-only)",
        "down": f"every service of {host} is down",
        "unknown": f"{host} never registered",
        "forced-main": "ORCHESTRATOR_ALT_ROUTING=never",
    }[decision.reason]
    data = {
        "step": step, "host": host, "queue": decision.queue, "wanted": route.queue,
        "reason": decision.reason, "explanation": why, "fallback": decision.fallback,
        "routing_file": str(table.path), "line": route.line, "route_reason": route.reason,
        "alt_routing": orch.settings.alt_routing, "host_state": host_text,
    }
    emit(as_json, data, "\n".join([
        f"{step} for {host} goes to {decision.queue}: {why}",
        f"  {table.path}:{route.line}: {step}: queue {route.queue} ({route.reason})",
        f"  registry: {host_text}",
        f"  ORCHESTRATOR_ALT_ROUTING={orch.settings.alt_routing}",
    ]))


@main.command()
@click.option("--port", type=int, default=9808, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option("--once", is_flag=True, help="Print one scrape on stdout and exit.")
@handles_errors
def metrics(port: int, address: str, once: bool) -> None:
    """Serve Prometheus metrics of hosts and drains on http://ADDRESS:PORT/metrics."""
    from orchestrator.ops.metrics import OrchestratorCollector, serve

    orch = current()
    if once:
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(OrchestratorCollector(orch, kept=False))
        click.echo(generate_latest(registry).decode(), nl=False)
        return
    try:
        server = serve(orch, port, address)
    except OSError as exc:
        raise SubmitError(f"cannot listen on {address}:{port}: {exc.strerror}") from None
    click.echo(f"serving metrics on http://{address}:{port}/metrics", err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
@handles_errors
def flower(flower_args: tuple[str, ...]) -> None:
    """Flower with a Hosts page (drains, deadlines, queue depths) and the orchestrator's
    metrics on /metrics; takes Flower's options (--port, --address, --basic-auth, ...)."""
    from orchestrator.ops import flower as orchestrator_flower

    orchestrator_flower.run(current(), list(flower_args))


@main.command()
@click.option("--host", "hosts", multiple=True, default=("compute1", "compute2"),
              show_default=True, help="A host to run a worker for (repeat for more).")
@click.option("--flower/--no-flower", default=True, show_default=True,
              help="Start Flower (orchestrator flower) beside the workers.")
@click.option("--flower-port", default=5555, show_default=True,
              help="Flower's port (a free one if it is taken).")
@click.option("--live/--plain", default=None,
              help="Draw the fleet live (default on a terminal) or print events as lines.")
@handles_errors
def up(hosts: tuple[str, ...], flower: bool, flower_port: int, live: bool | None) -> None:
    """Run a fleet here until Ctrl-C: a broker (embedded unless ORCHESTRATOR_BROKER_URL is
    set), a ledger, one worker per host and Flower; use the CLI against it from another shell."""
    import faulthandler
    import signal

    from orchestrator.discovery import app_name
    from orchestrator.local.stack import local_stack
    from orchestrator.names import check_host_name
    from orchestrator.ops.live import Watch

    for host in hosts:
        check_host_name(host, "--host")
    orch = current()
    app = app_name(click.get_current_context().find_root().params.get("app"))

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    # Python leaves SIGINT ignored when its parent ignored it (a script's `orchestrator up &`,
    # a test runner that ignores it): Ctrl-C, which this command promises, would do nothing.
    signal.signal(signal.SIGINT, stop)
    # `kill -USR1` prints every thread's stack: where a stop that takes long waits.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    stack = None
    try:
        with local_stack(orch, app=app, flower=flower, flower_port=flower_port,
                         db_url=os.environ.get("ORCHESTRATOR_DB_URL")) as stack:
            for host in hosts:
                stack.fleet.start(host, graceful_timeout=orch.settings.graceful_shutdown_timeout)
            click.echo(f"up: workers {', '.join(hosts)}"
                       + (f"; Flower {stack.flower_url}" if stack.flower_url else ""))
            for line in stack.shell_lines(app):
                click.echo(f"up: {line}")
            click.echo("up: Ctrl-C stops everything")
            watch = Watch(orch, title=f"orchestrator up: {', '.join(hosts)}",
                          subtitle=f"Flower: {stack.flower_url}" if stack.flower_url else None)
            if live is not None:
                watch.live = live
            with watch:
                while True:
                    time.sleep(3600)
    except KeyboardInterrupt:
        for line in stack.forced if stack is not None else ():
            click.echo(f"up: {line}", err=True)
        click.echo("up: stopped", err=True)
    except (RuntimeError, OSError) as exc:  # no broker to embed, a worker that did not start
        raise SubmitError(str(exc)) from None


@main.group()
def db() -> None:
    """The ledger's database schema (Alembic migrations of the engine and the application)."""


@db.command(name="upgrade")
@json_option
@handles_errors
def db_upgrade(as_json: bool) -> None:
    """Bring the database to the schema this code needs (engine and application tables)."""
    result = current().db.upgrade()
    applied = result["applied"]
    emit(as_json, result, f"applied {', '.join(applied)}" if applied
         else f"already current ({', '.join(result['current'])})")


@db.command(name="status")
@json_option
@handles_errors
def db_status(as_json: bool) -> None:
    """Where the database's schema stands against this code's migrations."""
    state = current().db.status()
    behind = state["behind"] or state["missing"]
    emit(as_json, state, f"current: {', '.join(state['current']) or 'empty'}; heads: "
         f"{', '.join(state['heads'])}" + ("; run `orchestrator db upgrade`" if behind else ""))
    if behind:
        sys.exit(EXIT_NOT_COMPLETED)


if __name__ == "__main__":
    main()
