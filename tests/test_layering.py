"""The package's dependency direction, checked on the source (every import, inside functions too).

Layers, each importing only from itself and those below it (``docs/architecture.md``):

    5  cli                                    the ``straightflow`` command
    3  straighten control align images stream interop nf    features (library code)
    2  train trainlog recipe runs optimize report hub  training and its logs, the recipe value, cached runs,
                                              calibration, evaluation, Hub directories
    1  models data metrics solvers flow oracle checkpoint    building blocks
    0  registry io paths time grids losses coupling plotting system    foundations

The package root (``straightflow/__init__.py``) is the public facade: it may import any library
layer (0-3), never ``cli``. Nothing outside ``cli`` imports it, and there is no import cycle between
modules. The benchmark suites live outside the library, in ``benchmarks/`` beside ``src/`` (not in
the wheel): no library module imports them (``cli/bench.py`` finds and imports them by name at run
time), and they import the library, never the other way round.
"""
from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Dict, List, Set

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = "straightflow"

LAYERS: Dict[str, int] = {
    **{m: 0 for m in ("registry", "io", "paths", "time", "grids", "losses", "coupling", "plotting", "system")},
    **{m: 1 for m in ("models", "data", "metrics", "solvers", "flow", "oracle", "checkpoint")},
    **{m: 2 for m in ("train", "trainlog", "recipe", "runs", "optimize", "report", "hub")},
    **{m: 3 for m in ("straighten", "control", "align", "images", "stream", "interop", "nf")},
    "cli": 5,
    "__main__": 6,  # `python -m straightflow`: the entry point, calls cli.main
}
FACADE = PKG  # the package root


def _modules() -> Dict[str, Path]:
    out = {}
    for p in sorted((SRC / PKG).rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, node: ast.AST) -> List[str]:
    """Our modules that an import statement loads (``from PKG import name`` -> ``PKG.name`` when a module)."""
    targets = []
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        for a in node.names:
            sub = f"{mod}.{a.name}"
            targets.append(sub if sub in MODULES else mod)
    out = []
    for t in targets:
        if not (t == PKG or t.startswith(PKG + ".")):
            continue
        while t not in MODULES and "." in t:  # ``import straightflow.solvers.base.x`` -> the module part
            t = t.rsplit(".", 1)[0]
        if t in MODULES:
            out.append(t)
    return out


def _graph() -> Dict[str, Set[str]]:
    g: Dict[str, Set[str]] = {}
    for name, path in MODULES.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):  # every import, in functions too
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(d for d in _resolve(name, node) if d != name)
        g[name] = deps
    return g


GRAPH = _graph()


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACADE


def test_every_part_of_the_package_has_a_layer():
    unknown = sorted({_top(m) for m in MODULES} - set(LAYERS) - {FACADE})
    assert not unknown, f"modules with no layer (add them to LAYERS and to docs/architecture.md): {unknown}"


def test_nothing_outside_cli_and_bench_imports_them():
    bad = [(m, d) for m, deps in GRAPH.items() for d in deps
           if _top(d) in ("cli", "bench") and _top(m) not in ("cli", "bench", "__main__") and _top(m) != _top(d)]
    bad += [(m, d) for m, deps in GRAPH.items() for d in deps if _top(m) == "bench" and _top(d) == "cli"]
    assert not bad, "library code imports the command line or the benchmarks: " + ", ".join(f"{a} -> {b}" for a, b in bad)


def test_library_code_never_imports_the_benchmarks():
    """``benchmarks/`` is outside the library: no module of ``src/`` imports it (statically)."""
    assert not (SRC / PKG / "bench").exists(), "the benchmarks live in benchmarks/ beside src/, not in the package"
    bad = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{name} -> {m}" for m in mods if m.split(".")[0] == "benchmarks"]
    assert not bad, "library code imports the benchmarks: " + ", ".join(bad)


def test_no_lower_layer_imports_a_higher_one():
    bad = []
    for m, deps in GRAPH.items():
        tm = _top(m)
        for d in deps:
            td = _top(d)
            if td == FACADE:
                if tm != FACADE:
                    bad.append((m, d, "imports the package facade; import the module that defines the name"))
            elif tm == FACADE:
                if LAYERS[td] > 3:
                    bad.append((m, d, "the facade imports bench/cli"))
            elif LAYERS[td] > LAYERS[tm]:
                bad.append((m, d, f"layer {LAYERS[tm]} imports layer {LAYERS[td]}"))
    assert not bad, "imports running back up:\n" + "\n".join(f"  {a} -> {b} ({why})" for a, b, why in bad)


def _cycles() -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
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
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles()
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


# Every rule above, each with a synthetic violation: (rule, edges added to GRAPH, modules added to
# MODULES, a string its failure message must name). One ``pytest.raises`` per case, so a rule that
# stops failing cannot hide behind another one that still does.
VIOLATIONS = {
    "a module with no layer": (
        "test_every_part_of_the_package_has_a_layer", [], ["straightflow.mystery"], "mystery"),
    "library code imports cli": (
        "test_nothing_outside_cli_and_bench_imports_them",
        [("straightflow.solvers.base", "straightflow.cli.main")], [],
        "straightflow.solvers.base -> straightflow.cli.main"),
    "library code imports bench": (
        "test_nothing_outside_cli_and_bench_imports_them",
        [("straightflow.metrics.distances", "straightflow.bench.harness")], [],
        "straightflow.metrics.distances -> straightflow.bench.harness"),
    "bench imports cli": (
        "test_nothing_outside_cli_and_bench_imports_them",
        [("straightflow.bench.harness", "straightflow.cli.main")], [],
        "straightflow.bench.harness -> straightflow.cli.main"),
    "a lower layer imports a higher one": (
        "test_no_lower_layer_imports_a_higher_one",
        [("straightflow.paths", "straightflow.train")], [], "straightflow.paths -> straightflow.train"),
    "a module imports the facade": (
        "test_no_lower_layer_imports_a_higher_one",
        [("straightflow.flow", "straightflow")], [], "straightflow.flow -> straightflow (imports the package facade"),
    "the facade imports cli": (
        "test_no_lower_layer_imports_a_higher_one",
        [("straightflow", "straightflow.cli.main")], [],
        "straightflow -> straightflow.cli.main (the facade imports bench/cli"),
    "library code imports the benchmarks": (
        "test_library_code_never_imports_the_benchmarks", [],
        [("straightflow.metrics.leaky", "from benchmarks.harness import table\n")],
        "straightflow.metrics.leaky -> benchmarks.harness"),
    "an import cycle": (
        "test_no_import_cycles",
        [("straightflow.registry", "straightflow.io"), ("straightflow.io", "straightflow.registry")], [],
        "straightflow.io <-> straightflow.registry"),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_the_checks_catch_a_violation(case, monkeypatch, tmp_path):
    """Each rule fails on a synthetic edge (or module) that breaks it (the checker itself is tested).
    A module given as ``(name, source)`` is written to a temporary file (rules that read the source)."""
    rule, edges, modules, names = VIOLATIONS[case]
    for m in modules:
        if isinstance(m, tuple):
            m, text = m
            f = tmp_path / (m.replace(".", "_") + ".py")
            f.write_text(text)
            monkeypatch.setitem(MODULES, m, f)
            continue
        monkeypatch.setitem(MODULES, m, SRC / (m.replace(".", "/") + ".py"))
    for a, b in edges:
        monkeypatch.setitem(GRAPH, a, GRAPH.get(a, set()) | {b})
    with pytest.raises(AssertionError) as caught:
        globals()[rule]()
    assert names in str(caught.value)


def test_every_rule_has_a_synthetic_violation():
    """A new rule (a test here that takes no fixture) must get its own case in VIOLATIONS."""
    rules = {name for name, f in globals().items()
             if name.startswith("test_") and callable(f) and not inspect.signature(f).parameters}
    rules.discard("test_every_rule_has_a_synthetic_violation")
    covered = {rule for rule, *_ in VIOLATIONS.values()}
    assert rules == covered, f"rules with no synthetic violation: {sorted(rules - covered)}"


def test_a_cycle_is_caught(monkeypatch):
    monkeypatch.setitem(GRAPH, "straightflow.registry", GRAPH["straightflow.registry"] | {"straightflow.io"})
    monkeypatch.setitem(GRAPH, "straightflow.io", GRAPH["straightflow.io"] | {"straightflow.registry"})
    assert ["straightflow.io", "straightflow.registry"] in _cycles()
