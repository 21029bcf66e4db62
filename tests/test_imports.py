"""The import graph, read from the source: no circles between our modules, and each package
imports only what DESIGN.md allows (fmvr <- train; fmvr, runtime <- export; runtime never
imports train or export). Imports inside functions count: a lazy import that calls back is
still a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fmvr", "train", "export", "runtime")
ALLOWED = {
    "fmvr": {"fmvr"},
    "train": {"fmvr", "train"},
    "export": {"fmvr", "runtime", "export"},
    "runtime": {"fmvr", "runtime"},
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for t in targets:
                # the deepest of our modules the name refers to (pkg.mod.func -> pkg.mod)
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and t not in PACKAGES:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports():
    graph = import_graph()
    assert "fmvr.config" in graph["fmvr.model"] and "fmvr.atomic" in graph["train.eval"]


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_packages_import_only_what_they_may():
    bad = [
        f"{m} imports {t}"
        for m, ts in import_graph().items()
        for t in ts
        if t.split(".")[0] not in ALLOWED[m.split(".")[0]]
    ]
    assert bad == []
