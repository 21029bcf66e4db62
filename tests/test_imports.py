"""The import graph, read from the source: no circles between our modules, and each package
imports only what docs/DESIGN.md allows (fmvr <- train; fmvr, runtime <- export; runtime never
imports train or export; the benchmark, fmvr.tasks, sits below all of them and never imports
torch; runtime's core never imports its rooms, and the rooms never import each other).
Imports inside functions count: a lazy import that calls back is still a circle. Imports under
`if TYPE_CHECKING:` are for annotations only: they count for who may import whom, not as circles."""

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


def type_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under an `if TYPE_CHECKING:` block."""
    out = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
        ):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def import_graph(types: bool = True) -> dict[str, set[str]]:
    """{module: our modules it imports}; types=False leaves out imports for annotations only."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = set() if types else type_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
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
    assert cycles(import_graph(types=False)) == []


def test_type_only_imports_are_told_apart():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nimport b\n")
    names = {
        n.names[0].name for n in ast.walk(tree) if isinstance(n, ast.Import) and id(n) in type_only(tree)
    }
    assert names == {"a"}


ROOMS = ("runtime.serve", "runtime.ros", "runtime.tools", "runtime.cluster")
# The one allowed arrow between rooms: the cluster's ingress runs the server's app (one API).
ROOM_ARROWS = {("runtime.cluster", "runtime.serve")}


def room(module: str) -> str | None:
    return next((r for r in ROOMS if module == r or module.startswith(r + ".")), None)


def test_the_runtime_core_never_imports_a_room_and_rooms_not_each_other():
    graph = import_graph()
    assert {m for m in graph if room(m)} >= {
        "runtime.serve.server", "runtime.ros.node", "runtime.tools.card", "runtime.cluster.app"
    }  # fmt: skip
    bad = []
    for m, ts in graph.items():
        if not m.startswith("runtime.") or m == "runtime.__main__":  # the CLI dispatches to the rooms
            continue
        bad += [
            f"{m} imports {t}"
            for t in ts
            if room(t) and room(t) != room(m) and (room(m), room(t)) not in ROOM_ARROWS
        ]
    assert bad == []


def test_the_benchmark_is_below_train_and_runtime_and_torch_free():
    tasks = sorted((ROOT / "fmvr" / "tasks").glob("*.py"))
    assert len(tasks) >= 5
    graph = import_graph()
    for m, ts in graph.items():
        if m.startswith("fmvr.tasks"):
            assert ts <= {"fmvr.atomic"} | {t for t in ts if t.startswith("fmvr.tasks")}, (m, ts)
    for path in tasks:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            assert not [
                n for n in names if n.split(".")[0] in ("torch", "transformers", "train", "runtime")
            ], path
    users = {m for m, ts in graph.items() for t in ts if t.startswith("fmvr.tasks")}
    assert {"runtime.tools.card", "train.data", "train.eval"} <= users


def test_packages_import_only_what_they_may():
    bad = [
        f"{m} imports {t}"
        for m, ts in import_graph().items()
        for t in ts
        if t.split(".")[0] not in ALLOWED[m.split(".")[0]]
    ]
    assert bad == []
