"""Flower with the project's additions: ``orchestrator flower``.

It is Flower (same options, same pages, same API, same ``FLOWER_*`` variables) plus:

* on Flower's Workers page, a draining worker reads "Draining, N s left" (what it waits for
  on hover) instead of "Online", and one that exited reads "Exited";
* a **Hosts** page (``/hosts``, in Flower's navigation bar): each host's state (up, draining,
  down once its worker is gone), a draining host's live countdown to its deadline, what the
  drain waits for (steps running there, operations still needing the host, with their current
  step and host), messages handed back, the depth of ``<host>`` and ``<host>-alt`` for every
  known host, draining and down ones included (Flower's Broker page lists only the queues live
  workers consume), and how each host's last drain ended;
* the same as JSON on ``/api/orchestrator/hosts`` (Flower's API rules: basic/OAuth auth, or
  ``FLOWER_UNAUTHENTICATED_API=true``);
* the orchestrator's Prometheus metrics (:mod:`orchestrator.metrics`) on Flower's ``/metrics``,
  beside Flower's own.

Everything is read from the registry, the ledger and the broker when asked, in Flower's
executor, never cached, so a gone worker shows as down, not as the draining it last reported.
Flower is imported when the command runs, not when this module is.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from orchestrator import views

TEMPLATES = Path(__file__).parent / "templates"
HOSTS_PATH = r"/hosts"
HOSTS_API_PATH = r"/api/orchestrator/hosts"
#: Added to Flower's navigation bar, after its Broker tab.
NAV_ITEM = """
        <li class="nav-item">
          <a class="nav-link{% if active_tab == 'hosts' %} active{% end %}"
            href="{{ reverse_url('orchestrator-hosts') }}"
            {% if active_tab == 'hosts' %}aria-current="page"{% end %}>Hosts</a>
        </li>
"""

WORKERS_SCRIPT = '\n{% include "orchestrator_workers_status.html" %}\n'


def snapshot(orch: Any) -> dict[str, Any]:
    """What the Hosts page and its API show: every known host, read now, with what each
    live worker says of the ledger; while the ledger does not answer, since when and the
    workers that answer over the broker (no host judged down for a heartbeat it could not
    write)."""
    from orchestrator.errors import LedgerUnavailable

    base = {"generated_at": time.time(), "alt_routing": orch.settings.alt_routing}
    try:
        return {**base, "ledger": {"up": True}, "hosts": views.hosts(orch, with_reports=True)}
    except LedgerUnavailable as exc:
        return {**base, "hosts": [], **views.ledger_outage(orch, exc, views.worker_reports(orch))}


def patch_flower_template(name: str, text: str) -> str:
    """Flower's navbar gains the Hosts tab; its Workers page shows draining and exited
    workers as such (a script after Flower's own, which restyles the Status column)."""
    if name == "navbar.html":
        head, sep, tail = text.partition("</ul>")
        return head + NAV_ITEM + sep + tail
    if name == "workers.html":
        block = "{% block extra_scripts %}"
        return text.replace(block, block + WORKERS_SCRIPT, 1)
    return text


def template_loader(flower_templates: str) -> Any:
    """Templates from this package first, then Flower's; Flower's navbar gains the Hosts tab."""
    import tornado.template

    class Loader(tornado.template.Loader):
        def _create_template(self, name: str) -> tornado.template.Template:
            for root in (TEMPLATES, Path(flower_templates)):
                path = root / name
                if path.is_file():
                    text = path.read_text()
                    if root != TEMPLATES:
                        text = patch_flower_template(name, text)
                    return tornado.template.Template(text, name=name, loader=self)
            raise FileNotFoundError(f"template {name} not found in {TEMPLATES} or Flower's")

    return Loader(flower_templates)


def handlers(orch: Any) -> list[Any]:
    """The Hosts page and its API, as Flower handlers (Flower's authentication applies)."""
    from flower.api import BaseApiHandler
    from flower.views import BaseHandler
    from tornado import web

    async def read(handler: Any) -> dict[str, Any]:
        return await handler.application.io_loop.run_in_executor(None, snapshot, orch)

    class HostsView(BaseHandler):
        @web.authenticated
        async def get(self) -> None:
            if self.get_argument("json", default=False, type=bool):
                self.write(await read(self))
                return
            self.render("orchestrator_hosts.html", active_tab="hosts")

    class HostsApi(BaseApiHandler):
        @web.authenticated
        async def get(self) -> None:
            self.write(await read(self))

    return [
        web.url(HOSTS_PATH, HostsView, name="orchestrator-hosts"),
        web.url(HOSTS_API_PATH, HostsApi, name="orchestrator-hosts-api"),
    ]


def make_flower(orch: Any, options: Any, settings: dict[str, Any]) -> Any:
    """Flower on ``orch``'s Celery app, with the Hosts page, its API and the metrics."""
    from flower.app import Flower, rewrite_handler
    from prometheus_client import REGISTRY

    from orchestrator.metrics import OrchestratorCollector

    settings = dict(settings, template_loader=template_loader(settings["template_path"]))
    app = Flower(capp=orch.app, options=options, **settings)
    ours = handlers(orch)
    if options.url_prefix:
        ours = [rewrite_handler(h, options.url_prefix) for h in ours]
    # Ahead of Flower's rules: its last one is a catch-all 404. (process_rule names them
    # for reverse_url.)
    router = app.wildcard_router
    router.rules[:0] = [router.process_rule(handler) for handler in ours]
    REGISTRY.register(OrchestratorCollector(orch))
    return app


def run(orch: Any, argv: list[str], prog: str = "orchestrator flower") -> None:
    """What ``celery flower`` does, on ``orch``'s app, with the additions."""
    import atexit
    import contextlib
    import signal

    from flower import command
    from tornado.options import options

    command.apply_env_options()
    command.apply_options(prog, argv)
    command.extract_settings()
    command.setup_logging()
    app = make_flower(orch, options, command.settings)
    atexit.register(app.stop)
    signal.signal(signal.SIGTERM, command.sigterm_handler)
    port = app.start_http_server()
    command.print_banner(orch.app, "ssl_options" in command.settings, port)
    print(f"orchestrator: hosts and drains at {_base_url(options, port)}{HOSTS_PATH.lstrip('/')}",
          flush=True)
    with contextlib.suppress(KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM: a clean exit
        app.start()


def _base_url(options: Any, port: int) -> str:
    address = options.address or "127.0.0.1"
    prefix = (options.url_prefix or "").strip("/")
    return f"http://{address}:{port}/" + (prefix + "/" if prefix else "")
