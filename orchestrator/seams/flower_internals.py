"""Flower (and tornado) internals this package relies on (verified against flower 2.2,
tornado 6).

- tornado's ``Loader._create_template``: overridden so a template is read from this package
  first, else from Flower's, and Flower's own text can be rewritten before it is compiled
  (the navigation bar gains a tab; the Workers page a script).
- ``Flower.wildcard_router.rules``: Flower's last rule is a catch-all 404, so added handlers
  go first (``process_rule`` names them for ``reverse_url``); ``flower.app.rewrite_handler``
  applies ``--url_prefix``.
- ``flower.views.BaseHandler``, ``flower.api.BaseApiHandler``: a page and an API of
  Flower's kind (its templates, its authentication). Flower decides who may read in two
  places, both reused as they are: ``BaseHandler.get_current_user`` (run by tornado's
  ``web.authenticated``) checks ``--basic-auth`` credentials (401 without them) and the
  ``--auth`` OAuth session cookie (none: a redirect to ``/login``), and lets anyone in when
  neither option is set; ``BaseApiHandler.prepare`` answers 401 when neither is set unless
  ``FLOWER_UNAUTHENTICATED_API`` is true (the variable opens nothing when auth is on).
- ``flower.views.monitor.Metrics``: Flower's ``/metrics`` (its own metrics, offline workers
  purged first), which has no ``web.authenticated`` of its own and renders on the loop;
  ``metrics`` puts a subclass ahead of it that is authenticated like Flower's pages and adds
  ours, rendered in Flower's executor.
- ``flower.command``: the steps ``celery flower`` takes (environment options, command line,
  settings, logging, banner, SIGTERM handler), taken in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def template_loader(ours: Path, flower_templates: str,
                    rewrite: Callable[[str, str], str]) -> Any:
    """Templates from ``ours`` first, then Flower's, each of Flower's through
    ``rewrite(name, text)``."""
    import tornado.template

    class Loader(tornado.template.Loader):
        def _create_template(self, name: str) -> tornado.template.Template:
            for root in (ours, Path(flower_templates)):
                path = root / name
                if path.is_file():
                    text = path.read_text()
                    if root != ours:
                        text = rewrite(name, text)
                    return tornado.template.Template(text, name=name, loader=self)
            raise FileNotFoundError(f"template {name} not found in {ours} or Flower's")

    return Loader(flower_templates)


def page_and_api(page_path: str, api_path: str, name: str, template: str, *,
                 active_tab: str, read: Callable[..., dict[str, Any]]) -> list[Any]:
    """A page (``template``, or the JSON with ``?json=1``) and its API, as Flower's own are
    built (``flower.views.BaseHandler``, ``flower.api.BaseApiHandler``: Flower's
    authentication applies); ``read(query, *groups)`` (the request's query arguments, the
    last value of each, and what the path's groups matched) runs in Flower's executor, never
    in its loop. A ``LookupError`` it raises (an unknown operation) answers 404 with its
    message, as JSON."""
    from flower.api import BaseApiHandler
    from flower.views import BaseHandler
    from tornado import web

    async def data(handler: Any, groups: tuple[str, ...]) -> dict[str, Any] | None:
        args = {name: values[-1].decode("utf-8", "replace")
                for name, values in handler.request.query_arguments.items() if values}
        try:
            return await handler.application.io_loop.run_in_executor(None, read, args, *groups)
        except LookupError as exc:
            handler.set_status(404)
            handler.write({"error": str(exc.args[0] if exc.args else exc)})
            return None

    class Page(BaseHandler):
        @web.authenticated
        async def get(self, *groups: str) -> None:
            if self.get_argument("json", default=False, type=bool):
                found = await data(self, groups)
                if found is not None:
                    self.write(found)
                return
            self.render(template, active_tab=active_tab)

    class Api(BaseApiHandler):
        @web.authenticated
        async def get(self, *groups: str) -> None:
            found = await data(self, groups)
            if found is not None:
                self.write(found)

    return [web.url(page_path, Page, name=name), web.url(api_path, Api, name=f"{name}-api")]


def metrics(path: str, name: str, ours: Callable[[], bytes]) -> Any:
    """Flower's ``/metrics`` behind Flower's authentication, followed by ``ours()`` (more
    metrics in Prometheus' text format), which runs in Flower's executor, never in its loop.

    Behind the same rule as Flower's pages (``web.authenticated``): with ``--basic-auth``,
    credentials are needed, which Prometheus sends (``basic_auth`` in its scrape config);
    with neither ``--basic-auth`` nor ``--auth``, it is open, as Flower's own ``/metrics``."""
    from flower.views.monitor import Metrics
    from tornado import web

    class AuthenticatedMetrics(Metrics):
        @web.authenticated
        async def get(self) -> None:
            text = await self.application.io_loop.run_in_executor(None, ours)
            await super().get()
            self.write(text)

    return web.url(path, AuthenticatedMetrics, name=name)


def make_app(capp: Any, options: Any, settings: dict[str, Any], template_loader: Any,
             handlers: list[Any]) -> Any:
    """A Flower application on ``capp`` with ``handlers`` ahead of Flower's own rules."""
    from flower.app import Flower, rewrite_handler

    app = Flower(capp=capp, options=options, **dict(settings, template_loader=template_loader))
    if options.url_prefix:
        handlers = [rewrite_handler(h, options.url_prefix) for h in handlers]
    router = app.wildcard_router
    router.rules[:0] = [router.process_rule(handler) for handler in handlers]
    return app


def command_line(prog: str, argv: list[str]) -> tuple[Any, dict[str, Any]]:
    """What ``celery flower`` reads before it builds its app: ``FLOWER_*`` variables, the
    command line, the settings; logging set up. Returns (options, settings)."""
    from flower import command
    from tornado.options import options

    command.apply_env_options()
    command.apply_options(prog, argv)
    command.extract_settings()
    command.setup_logging()
    return options, command.settings


def serve(app: Any, capp: Any, settings: dict[str, Any], started: Callable[[int], None]) -> None:
    """Run ``app`` as ``celery flower`` does (banner, SIGTERM exits cleanly); ``started(port)``
    once it listens."""
    import atexit
    import contextlib
    import signal

    from flower import command

    atexit.register(app.stop)
    signal.signal(signal.SIGTERM, command.sigterm_handler)
    port = app.start_http_server()
    command.print_banner(capp, "ssl_options" in settings, port)
    started(port)
    with contextlib.suppress(KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM: a clean exit
        app.start()
