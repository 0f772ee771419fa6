"""The shape of the code, checked: the import graph, its layers, module sizes, one home for backend names.

Read statically (``ast``), so every import counts: module level, inside functions, and under
``TYPE_CHECKING`` (a circle tied through type hints is still a circle for a reader).
"""

from __future__ import annotations

import ast
from pathlib import Path

from orchestrator.backends.names import NAMES
from tests.orch_helpers import ROOT

PKG = ROOT / "orchestrator"
MAX_LINES = 500
DRIVER = PKG / "run" / "driver.py"
DRIVER_MAX = 150

# Lowest first: a module may import its own layer and the ones below, never one above. The rank side
# ("rank") imports only itself and "base" (protocol.py is the one module both sides share).
LAYERS = [
    ("base", ["orchestrator", "orchestrator.protocol", "orchestrator.units", "orchestrator.errnos", "orchestrator.aio",
              "orchestrator.backends.names"]),
    ("rank", ["orchestrator.runtime", "orchestrator.integrations"]),
    ("model", ["orchestrator.hostfile", "orchestrator.backends", "orchestrator.plan", "orchestrator.rundir",
               "orchestrator.records", "orchestrator.programs", "orchestrator.diagnose", "orchestrator.events"]),
    ("reach", ["orchestrator.probe", "orchestrator.remote"]),
    ("launch", ["orchestrator.launch", "orchestrator.stage"]),  # orch stage launches relays
    ("supervise", ["orchestrator.supervisor", "orchestrator.supervisor_state", "orchestrator.output",
                   "orchestrator.watchdog", "orchestrator.live", "orchestrator.stdin_relay", "orchestrator.stdin_forward"]),
    ("run", ["orchestrator.run"]),
    ("commands", ["orchestrator.health", "orchestrator.report"]),
    ("cli", ["orchestrator.cli", "orchestrator.__main__"]),
]
RANK = 1


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def layer(name: str) -> int:
    best = (-1, -1)
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best[1]:
                best = (i, len(p))
    assert best[0] >= 0, f"{name} is in no layer: add it to LAYERS"
    return best[0]


def test_the_import_graph_has_no_circles():
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def test_no_import_goes_up_a_layer():
    up = []
    for name, deps in import_graph().items():
        mine = layer(name)
        for dep in deps:
            theirs = layer(dep)
            if theirs > mine or (mine == RANK and theirs > RANK):
                up.append(f"{name} ({LAYERS[mine][0]}) -> {dep} ({LAYERS[theirs][0]})")
    assert up == []


def test_modules_stay_small_and_the_driver_reads_in_one_screen():
    big = {n: len(p.read_text().splitlines()) for n, p in modules().items() if len(p.read_text().splitlines()) > MAX_LINES}
    assert big == {}
    assert len(DRIVER.read_text().splitlines()) < DRIVER_MAX


def test_backend_names_are_compared_only_in_the_backends_package():
    """The controller asks a ``Backend`` object (``backends/base.py``); only ``backends/`` knows the names.
    (The rank side, ``runtime/``, reads MLX's own backend name from ``ORCH_BACKEND``, as MLX's init takes it.)"""
    offenders = []
    for name, path in modules().items():
        if name.startswith(("orchestrator.backends", "orchestrator.runtime")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                values = [side] if isinstance(side, ast.Constant) else getattr(side, "elts", [])
                if any(isinstance(v, ast.Constant) and v.value in NAMES for v in values):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
