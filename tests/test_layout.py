"""The package's structure: the imports of ``moebench`` (module level and inside functions)
form no cycle, no module imports one of a layer above it, no bench imports the job loop or the
app, and no file is over 600 lines."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "moebench"

#: lowest first: a module may import its own layer (without a cycle) and the layers below
LAYERS = [
    ("moebench.errors",),
    ("moebench.routing", "moebench.logits", "moebench.timing", "moebench.results", "moebench.env", "moebench.check",
     "moebench.metrics", "moebench.kernels"),
    ("moebench.impls",),
    ("moebench.ops",),
    ("moebench.job",),
    ("moebench.benches",),
    ("moebench.config",),
    ("moebench.runner",),
    ("moebench.app", "moebench.cli", "moebench.sweep", "moebench.slurm", "moebench.job_process"),
    ("moebench.report", "moebench.timing_check", "moebench.compare"),
]
#: what no bench may import
ABOVE_BENCHES = ("moebench.config", "moebench.runner", "moebench.app", "moebench.cli")


def module_of(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_of(p): p for p in sorted(PKG.rglob("*.py"))}


def _target(name: str) -> str | None:
    """The moebench module an import of ``name`` loads (a name inside a module: the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """Every moebench module this one imports, anywhere in the file."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # ``from pkg import submodule`` imports the submodule; any other name comes from ``base``
            subs = [f"{base}.{a.name}" for a in node.names]
            names = [n for n in subs if n in MODULES] + ([base] if any(n not in MODULES for n in subs) else [])
        for n in names:
            t = _target(n) if n.startswith("moebench") else None
            if t and t != module:
                out.add(t)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def layer(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer of tests/test_layout.py"
    return best[0]


def test_the_graph_sees_the_imports():
    assert "moebench.routing.routers" in GRAPH["moebench.routing"]
    assert "moebench.benches.base" in GRAPH["moebench.benches.stages"]
    assert "moebench.kernels.router" in GRAPH["moebench.impls.cute_impl"]  # imported inside a function


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_no_module_imports_a_layer_above_it():
    bad = [f"{m} (layer {layer(m)}) imports {n} (layer {layer(n)})" for m, deps in GRAPH.items() for n in deps
           if layer(n) > layer(m)]
    assert not bad, bad


def test_no_bench_imports_the_job_loop_or_the_app():
    bad = [(m, n) for m, deps in GRAPH.items() if m.startswith("moebench.benches") for n in deps
           if n.startswith(ABOVE_BENCHES)]
    assert not bad, bad


def test_no_file_over_600_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_the_checks_fail_on_what_they_guard(monkeypatch):
    """The checks themselves: a planted cycle and a planted upward import are found."""
    monkeypatch.setitem(GRAPH, "moebench.errors", {"moebench.job"})
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match="moebench.errors .* imports moebench.job"):
        test_no_module_imports_a_layer_above_it()
