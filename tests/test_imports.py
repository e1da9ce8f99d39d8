"""The package's import graph has no cycles, counting imports inside functions too (issue 20):
a cycle hidden in a function-level import still ties two modules into one unit that cannot
be read, tested or changed apart. Built by parsing every module with `ast`, not importing."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "kdcache"
SKIP = {"tests", "benchmarks"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP or any(p.startswith(".") for p in rel.parts):
            continue
        parts = [PACKAGE, *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from P import N`: the submodule P.N when N is one, else P itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules and "." in t:  # `import kdcache.x.y` -> the module
                    t = t.rpartition(".")[0]
                if t in modules and t != name:
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_the_graph_is_built():
    graph = _graph(_modules())
    assert f"{PACKAGE}.store.reader" in graph[f"{PACKAGE}.train.trainer"] or \
        f"{PACKAGE}.store" in graph[f"{PACKAGE}.train.trainer"]
    assert f"{PACKAGE}.train.checkpoint" in graph[f"{PACKAGE}.train.trainer"]
    assert f"{PACKAGE}.precompute.storeapi" in graph[f"{PACKAGE}.precompute.checks"]  # function-level


def test_no_import_cycles():
    cycles = _cycles(_graph(_modules()))
    assert not cycles, "import cycles (modules that import each other, maybe inside functions):\n" + \
        "\n".join(" <-> ".join(c) for c in cycles)


def test_precompute_and_train_stay_apart():
    graph = _graph(_modules())
    for side, other in (("precompute", "train"), ("train", "precompute"), ("store", "precompute"),
                        ("store", "train")):
        bad = sorted((m, t) for m, ts in graph.items() if m.startswith(f"{PACKAGE}.{side}")
                     for t in ts if t.startswith(f"{PACKAGE}.{other}"))
        assert not bad, f"{side} imports {other}: {bad}"
