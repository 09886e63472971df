"""The engine is a library: it imports nothing of an application, no module is in an import
cycle, and importing any engine module has no side effect (no app, no file, no patch)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENGINE = ("orchestrator", "workers")
APPLICATIONS = ("nova_app", "examples")
PACKAGES = ENGINE + APPLICATIONS


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if "migrations" not in path.parts:
                found[_module_name(path)] = path
    return found


def _imports(path: Path, module: str, top_level_only: bool,
             known: Collection[str] = ()) -> set[str]:
    """Project modules that ``path`` imports (at module level only, or anywhere). With
    ``known`` (the project's modules), ``from package import submodule`` is an edge to the
    submodule only: a package's ``__init__`` here imports nothing at load time."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            subs = {f"{base}.{alias.name}" for alias in node.names}
            if not (known and subs <= set(known)):
                names.add(base)
            names |= subs
    return {n for n in names if n.split(".")[0] in PACKAGES}


def test_the_engine_imports_nothing_of_an_application() -> None:
    offenders = {
        name: sorted(i for i in _imports(path, name, top_level_only=False)
                     if i.split(".")[0] in APPLICATIONS)
        for name, path in _modules().items() if name.split(".")[0] in ENGINE
    }
    assert {k: v for k, v in offenders.items() if v} == {}


#: Engine modules an application may import names from: those in their ``__all__``.
PUBLIC_MODULES = ("orchestrator", "orchestrator.ops.cli", "orchestrator.local",
                  "orchestrator.testing")


def test_applications_use_only_what_the_package_exports() -> None:
    """nova_app and the example are built on the public API: names the package, its command
    line helpers and its testing package export, nothing else of the engine."""
    import importlib

    exported = {m: set(importlib.import_module(m).__all__) for m in PUBLIC_MODULES}
    offenders = []
    for name, path in _modules().items():
        if name.split(".")[0] not in APPLICATIONS:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] \
                    in ENGINE:
                bad = [a.name for a in node.names
                       if a.name not in exported.get(node.module or "", set())]
                offenders += [f"{path.name}:{node.lineno}: {node.module}.{b}" for b in bad]
            elif isinstance(node, ast.Import):
                offenders += [f"{path.name}:{node.lineno}: {a.name}" for a in node.names
                              if a.name.split(".")[0] in ENGINE and a.name != "orchestrator"]
    assert offenders == []


#: Packages and the packages they may import: the engine's core (the API, the ledger, the
#: step runner, the operator's surfaces) knows nothing of the worker's bootsteps, which
#: Celery loads by name (``WORKER_STEPS``); the ledger knows nothing of the rest.
MAY_IMPORT = {
    "orchestrator.ledger": {"orchestrator.ledger", "orchestrator.config", "orchestrator.errors",
                            "orchestrator.redact", "orchestrator.flows", "orchestrator.seams"},
    "orchestrator": {"orchestrator"},
    "workers": {"orchestrator", "workers"},
}


def test_packages_import_only_downwards() -> None:
    """Imports inside functions count. workers imports orchestrator, never the reverse; the
    ledger package imports only its own modules and the engine's leaves."""
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        package = max((p for p in MAY_IMPORT if name == p or name.startswith(p + ".")),
                      key=len, default=None)
        if package is None:
            continue
        for imported in _imports(path, name, top_level_only=False, known=modules):
            if imported not in modules:
                continue
            if not any(imported == a or imported.startswith(a + ".")
                       for a in MAY_IMPORT[package]):
                offenders.append(f"{name} imports {imported}")
    assert sorted(offenders) == []


#: What may import the operator's surfaces (orchestrator.ops): themselves, and the package's
#: face, whose lazy exports name a few of them (``Watch``), whose ``celery -A orchestrator``
#: says a missing application as the command line does, and whose ``python -m orchestrator``
#: is the command line.
OPS = "orchestrator.ops"
OPS_IMPORTERS = (OPS, "orchestrator", "orchestrator.__main__")


def test_the_engine_never_imports_the_operators_surfaces() -> None:
    """Imports inside functions count: the API, the ledger, the runner, the bootsteps and the
    test kit work with no command line, view, metric or Flower page installed beside them."""
    modules = _modules()
    offenders = sorted(
        f"{name} imports {imported}"
        for name, path in modules.items()
        if name.split(".")[0] in ENGINE and name not in OPS_IMPORTERS
        and not name.startswith(OPS + ".")
        for imported in _imports(path, name, top_level_only=False, known=modules)
        if imported == OPS or imported.startswith(OPS + "."))
    assert offenders == []
    assert any(n.startswith(OPS + ".") for n in modules)  # the package is where it is said


def test_no_module_is_in_an_import_cycle() -> None:
    """Imports inside functions count: one there hides a cycle from Python's import system,
    not from the design (api -> workers.steps -> api was one)."""
    modules = _modules()
    graph = {
        name: {i for i in _imports(path, name, top_level_only=False, known=modules)
               if i in modules}
        for name, path in modules.items()
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
    print(f"import graph: {len(graph)} modules, {sum(map(len, graph.values()))} edges, "
          "no cycle")


PROBE = r"""
import json, logging, sys
opened = []
def audit(event, args):
    if event == "open" and isinstance(args[0], str):
        path = args[0]
        if not path.endswith((".py", ".pyc", ".so", ".pth")) and "/lib/python" not in path \
                and "__pycache__" not in path and not path.startswith("/proc/") \
                and not path.endswith((".json", ".txt")) and "site-packages" not in path \
                and not path.startswith("/usr/share/zoneinfo") and "__editable__" not in path:
            opened.append(path)
sys.addaudithook(audit)
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
import celery._state
from kombu.transport import redis as redis_transport
from celery.worker.control import Panel
print(json.dumps({
    "apps": len(celery._state._apps),
    "kombu_patched": any(getattr(f, "_orchestrator_guard", False) for f in (
        redis_transport.QoS.restore_unacked, redis_transport.Channel._connparams)),
    "log_filters": len(logging.getLogger("celery.app.trace").filters),
    "drain_command": "drain" in Panel.data,
    "opened": opened,
}))
"""


def test_importing_the_engine_has_no_side_effect() -> None:
    engine = sorted(n for n in _modules() if n.split(".")[0] in ENGINE)
    for first in ("workers.drain", "orchestrator"):  # each in a fresh interpreter
        proc = subprocess.run([sys.executable, "-c", PROBE, first], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-c", PROBE, *engine], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "apps": 0, "kombu_patched": False, "log_filters": 0, "drain_command": False,
        "opened": [],
    }, f"importing {len(engine)} engine modules"


#: Modules of other libraries that are their internals: imported only by orchestrator.seams.
#: (Subclassing Celery's Request and Consumer is their documented extension point, through
#: ``Task.Request`` and the ``worker_consumer`` setting: workers/request.py, validation.py.)
FOREIGN_INTERNALS = ("celery.worker.state", "celery.worker.control", "celery.platforms",
                     "kombu.transport", "billiard", "flower", "tornado")
#: Private names of the standard library the engine may use.
OWN_PRIVATE = {"os._exit"}


def _foreign_reaches(path: Path) -> list[str]:
    """Where a module imports another library's internals or reads a private attribute of an
    object that is not its own (``x._name``, ``getattr(x, "_name")``)."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names])
            found += [f"{path.name}:{node.lineno}: import {n}" for n in names
                      if n.startswith(FOREIGN_INTERNALS)]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            text = ast.unparse(node)
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")) \
                    and text not in OWN_PRIVATE:
                found.append(f"{path.name}:{node.lineno}: {text}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1 \
                and isinstance(node.args[1], ast.Constant) \
                and str(node.args[1].value).startswith("_") \
                and not str(node.args[1].value).startswith("__"):
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_foreign_internals_are_reached_only_through_the_seams() -> None:
    """Celery, kombu, billiard and Flower internals live in orchestrator/seams/ (one module
    per library, with the version it was read in), so an upgrade has one place to re-read."""
    offenders = {
        name: _foreign_reaches(path) for name, path in _modules().items()
        if name.split(".")[0] in ENGINE and not name.startswith("orchestrator.seams")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_engine_names_no_application(tmp_path: Path) -> None:
    """Outside a project that names one (pyproject.toml, ``[tool.orchestrator] app``), with
    no --app and no ORCHESTRATOR_APP, a command says how to name it, in one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env["PYTHONPATH"] = str(REPO)
    for command in (["-m", "orchestrator.ops.cli", "hosts"],
                    ["-m", "celery", "-A", "orchestrator", "inspect", "ping"]):
        proc = subprocess.run([sys.executable, *command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        said = (proc.stdout + proc.stderr).strip()
        assert proc.returncode == 2 and "Traceback" not in said, said
        assert said.startswith("error: ") and "\n" not in said, said  # as every command's
        assert said.splitlines()[-1].endswith(f"none found from {tmp_path} up"), said
        assert "--app MODULE, set ORCHESTRATOR_APP, or name it in the project's pyproject" \
            in said
    assert subprocess.run([sys.executable, "-m", "orchestrator.ops.cli", "routing", "check"],
                          cwd=REPO, env=env, capture_output=True, timeout=60).returncode == 0


def test_the_repository_stands_alone() -> None:
    """No file cites what lives outside the repository (a shared notes folder beside it), and
    every module or name a file quotes as ``package.module.name`` of this project exists."""
    import importlib
    import re

    tracked = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.yaml", "*.yml", "*.toml",
                              "*.html", "*.sh", "*.txt"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    outside, missing = [], []
    # The notes folder beside the repository, by its path (spelt in two pieces, so that this
    # test is not itself a file that cites it).
    folder = "shared"
    beside = re.compile(rf"{folder}/NOTES|\.\./{folder}\b")
    quoted = re.compile(r"`((?:orchestrator|nova_app|workers|scripts|examples)(?:\.\w+)+)`")
    # Span and attribute names the tracing writes (``orchestrator.flow``...): names, not modules.
    traced = set(re.findall(r'"(orchestrator\.[\w.]+)',
                            (REPO / "orchestrator" / "tracing.py").read_text()))
    for name in tracked:
        path = REPO / name
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if beside.search(line):
                outside.append(f"{name}:{number}: {line.strip()}")
            for dotted in quoted.findall(line):
                if dotted in traced:
                    continue
                parts = dotted.split(".")
                for cut in range(len(parts), 0, -1):
                    try:
                        found: object = importlib.import_module(".".join(parts[:cut]))
                    except ImportError:
                        continue
                    for attribute in parts[cut:]:
                        found = getattr(found, attribute, missing)
                    break
                else:
                    found = missing
                if found is missing:
                    missing.append(f"{name}:{number}: {dotted}")
    assert outside == [], outside
    assert missing == [], missing


def test_every_setting_read_is_in_the_readmes_settings_table() -> None:
    """Each ``ORCHESTRATOR_*`` and ``OTEL_*`` variable the engine or the reference application
    reads is a row of README's Settings table (a row may name a family's others by their tail:
    ``ORCHESTRATOR_SIGNING_KEY``, ``_CERT``), but the few documented where they are used."""
    import re

    elsewhere = {"ORCHESTRATOR_TESTKIT_GATE": "## Test your own flows"}
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Settings\n")
    table = readme[start:readme.index("\n## ", start + 1)]
    named = set(re.findall(r"`((?:ORCHESTRATOR|OTEL)_[A-Z_]+)`", table))
    tails = set(re.findall(r"`(_[A-Z_]+)`", table))
    read: dict[str, str] = {}
    for package in ("orchestrator", "workers", "nova_app"):
        for path in sorted((REPO / package).rglob("*.py")):
            for name in re.findall(r"[\"']((?:ORCHESTRATOR|OTEL)_[A-Z_]+)[\"']",
                                   path.read_text()):
                read.setdefault(name, str(path.relative_to(REPO)))
    assert len(read) > 20, read  # the scan finds what it looks for
    missing = []
    for name, where in sorted(read.items()):
        if name in elsewhere:
            section = elsewhere[name]
            body = readme[readme.index(section):readme.index("\n## ", readme.index(section))]
            if name not in body:
                missing.append(f"{name} ({where}): not in README's {section!r}")
            continue
        parts = name.split("_")
        if name not in named and not any(f"_{'_'.join(parts[k:])}" in tails
                                         for k in range(1, len(parts))):
            missing.append(f"{name} ({where})")
    assert missing == [], missing
