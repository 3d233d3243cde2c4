"""No import circle: every tokeneff module imports on its own in a fresh interpreter, and the graph of imports
between tokeneff modules (module level, and also inside functions) has no cycle beyond the one known below."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import tokeneff

ROOT = Path(tokeneff.__file__).parent
# None: warm-start names are resolved above models (warmstart.model_folder), so models and checks never ask warmstart.
KNOWN_LAZY_CYCLES: set[tuple[str, ...]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return {m: f for m, f in mods.items() if not m.endswith("__main__")}


def test_each_module_imports_alone_in_a_fresh_process():
    """One interpreter: each module is imported with every tokeneff module dropped from sys.modules first, so that
    each is the first of ours to load (after the package itself). A circle fails with 'partially initialized'."""
    code = """
import importlib, json, sys
failed, skipped = {}, []
for name in json.loads(sys.argv[1]):
    for m in [m for m in sys.modules if m == "tokeneff" or m.startswith("tokeneff.")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "tokeneff":
            failed[name] = repr(e)
        else:
            skipped.append(name)  # an optional dependency (e.g. the notebooks' extra) is not installed
    except Exception as e:
        failed[name] = f"{type(e).__name__}: {e}"
print(json.dumps(dict(failed=failed, skipped=skipped)))
"""
    names = list(_modules())
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(names)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["failed"] == {}
    assert len(names) - len(res["skipped"]) >= 20 and "tokeneff.benchmarks.bench" in names


def _imports(module: str, path: Path, mods: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(tokeneff modules imported at module level, those imported only inside functions)."""
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names if a.name in mods]
        base = node.module or ""
        if node.level:
            up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
            base = ".".join(up + ([node.module] if node.module else []))
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                if f"{base}.{a.name}" in mods or base in mods]

    tree = ast.parse(path.read_text())
    top = {t for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) for t in targets(n)}
    every = {t for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for t in targets(n)}
    return top - {module}, every - top - {module}


def _cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    found = set()

    def walk(start, node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                found.add(tuple(path))
            elif nxt not in path and nxt > start:  # each cycle once, from its smallest module
                walk(start, nxt, path + [nxt])

    for m in graph:
        walk(m, m, [m])
    return found


def test_no_import_cycle_between_modules():
    mods = _modules()
    graph = {m: _imports(m, f, mods) for m, f in mods.items()}
    assert _cycles({m: top for m, (top, _) in graph.items()}) == set()
    assert _cycles({m: top | lazy for m, (top, lazy) in graph.items()}) <= KNOWN_LAZY_CYCLES
    bench, versus = graph["tokeneff.benchmarks.bench"], graph["tokeneff.benchmarks.versus_trl"]
    assert "tokeneff.benchmarks.versus_trl" in bench[0]  # bench -> versus_trl -> benchio, one way
    assert "tokeneff.benchmarks.bench" not in versus[0] | versus[1]


def _layer(module: str) -> str:
    for layer in ("analysis", "benchmarks"):
        if module.startswith(f"tokeneff.{layer}"):
            return layer
    return "entry" if module in ("tokeneff.cli", "tokeneff.__main__") else "core"


def test_layers_core_never_imports_the_notebook_or_benchmark_layers():
    """The folders are the layers: core (tokeneff/*.py, algorithms/, tasks/) knows nothing above it; the notebook
    helpers (analysis/) and the benchmarks (benchmarks/) build on it; only the CLI reaches into both."""
    mods = _modules()
    assert {_layer(m) for m in mods} == {"core", "analysis", "benchmarks", "entry"}
    for m, f in mods.items():
        top, lazy = _imports(m, f, mods)
        above = {t for t in top | lazy if _layer(t) in ("analysis", "benchmarks", "entry")}
        if _layer(m) == "core":
            assert not above, f"{m} (core) imports {sorted(above)}"
        if _layer(m) == "analysis":
            assert not {t for t in top | lazy if _layer(t) == "benchmarks"}, m
