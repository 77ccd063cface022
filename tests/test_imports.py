"""No import cycles between kvsweep's modules, hidden or not.

A cycle that Python tolerates today (one of its imports sits inside a function, or comes after the names
the other module needs) breaks on the next reordering. Two checks:

- statically: every ``from .x import y`` / ``import kvsweep.x`` in a module, at module level or inside a
  function, is an edge of kvsweep's import graph; the graph must have no cycle, neither between modules
  nor between the top-level modules and packages they lie in (``latent/``, ``tune/``, ...: a package's
  modules sit at one layer). An import inside a function is fine (e.g. a heavy module the CLI loads only
  when a command needs it) as long as it closes no cycle.
- dynamically: each module imports on its own, with no other kvsweep module imported before it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules(root: Path = SRC) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / "kvsweep").rglob("*.py"))}


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The kvsweep modules that ``name`` imports anywhere in its file (module level or in a function).

    ``from .a import b`` counts ``a``, and ``a.b`` when ``b`` is a module; importing ``a.b`` also runs the
    package ``a``'s ``__init__`` first, unless ``a`` is a package that ``name`` itself lies in (it is being
    imported already when ``name`` runs).
    """
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets.add(origin)
            targets.update(f"{origin}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    found = {t for t in targets if t in modules}
    found |= {a for t in found for a in _ancestors(t)}
    own = set(_ancestors(name)) | {name}
    return {t for t in found if t not in own}


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``graph`` between top-level units: ``kvsweep.latent.cli -> kvsweep.cli`` becomes ``kvsweep.latent -> kvsweep.cli``."""
    def unit(name: str) -> str:
        return ".".join(name.split(".")[:2])

    out: dict[str, set[str]] = {}
    for a, targets in graph.items():
        out.setdefault(unit(a), set()).update(unit(b) for b in targets if unit(b) != unit(a))
    return out


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (or a module importing itself): Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(component: frozenset[str], graph: dict[str, set[str]]) -> str:
    edges = sorted(f"{a} -> {b}" for a in component for b in graph[a] if b in component)
    return "{" + ", ".join(sorted(component)) + "}: " + "; ".join(edges)


def test_graph_sees_imports_inside_functions(tmp_path) -> None:
    pkg = tmp_path / "kvsweep"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .sub.c import g\n    return g\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import g\n")
    (pkg / "sub" / "c.py").write_text("import json\n\ndef g():\n    import kvsweep.a\n    from .. import b\n")
    modules = all_modules(tmp_path)
    graph = {n: imported_modules(n, p, modules) for n, p in modules.items()}
    assert graph["kvsweep.a"] == {"kvsweep.b"}
    assert graph["kvsweep.b"] == {"kvsweep.sub", "kvsweep.sub.c"}
    assert graph["kvsweep.sub"] == {"kvsweep.sub.c"}
    assert graph["kvsweep.sub.c"] == {"kvsweep.a", "kvsweep.b"}
    # b -> sub.c runs sub's __init__ first, which imports c: sub is in the cycle too
    assert cycles(graph) == [frozenset({"kvsweep.a", "kvsweep.b", "kvsweep.sub", "kvsweep.sub.c"})]


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = [describe(c, graph) for c in cycles(graph)]
    assert not found, "import cycles between modules (imports inside functions included):\n" + "\n".join(found)
    packages = package_graph(graph)
    found = [describe(c, packages) for c in cycles(packages)]
    assert not found, "import cycles between packages (imports inside functions included):\n" + "\n".join(found)


def test_every_module_imports_alone() -> None:
    """Each module imported first, in a process where no kvsweep module was imported before it (heavy
    third-party modules stay loaded between modules, so this takes seconds, not minutes)."""
    names = sorted(all_modules())
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'kvsweep' or m.startswith('kvsweep.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=-3))\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"modules that do not import alone:\n{done.stdout}\n{done.stderr[-3000:]}"
