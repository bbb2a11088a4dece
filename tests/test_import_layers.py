"""No import cycle inside jax_refine. Every module's imports are read with `ast`: module-level and function-level
`import` / `from ... import` (relative ones too) and `importlib.import_module("jax_refine....")` (an f-string
names every module under its constant prefix); the graph of jax_refine modules must be acyclic, so the
package has layers, each importing only the ones below it."""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path


PACKAGE_DIR = Path(__file__).resolve().parents[1] / "jax_refine"
CONFIGS_DIR = PACKAGE_DIR.parent / "configs"  # the shipped configs: the top layer, loaded by path (config.py)


def modules_of(package_dir: Path) -> dict[str, Path]:
    """`{dotted module name: file}` of every `.py` file under `package_dir` (a package's name for its `__init__`)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = (package_dir.name, *path.relative_to(package_dir).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """`name` if it is a module of ours, else the nearest enclosing one (`pkg.mod.func` -> `pkg.mod`), else None."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _dynamic_target(call: ast.Call) -> str | None:
    """The constant prefix of `importlib.import_module(<str or f-string>)`'s first argument (None otherwise)."""
    func = call.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called != "import_module" or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return arg.values[0].value
    return None


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that module `name` (file `path`) imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_resolve(alias.name, known) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x`, `from ..a import b`
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import mod` imports the module mod, `from mod import f` mod
                found.add(_resolve(f"{base}.{alias.name}", known) if f"{base}.{alias.name}" in known
                          else _resolve(base, known))
        elif isinstance(node, ast.Call) and (prefix := _dynamic_target(node)) is not None:
            if prefix in known:
                found.add(prefix)
            else:
                found.update(m for m in known if m.startswith(prefix) and prefix.endswith("."))
    return {m for m in found if m is not None and m != name}


def import_graph(*package_dirs: Path) -> dict[str, set[str]]:
    """`{module: modules it imports}` over the modules of `package_dirs` (imports between them included)."""
    known = {name: path for d in package_dirs for name, path in modules_of(d).items()}
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected components of more than one module, sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _describe(found: list[list[str]], graph: dict[str, set[str]]) -> str:
    lines = []
    for component in found:
        members = set(component)
        edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
        lines.append(f"{len(component)} modules: {', '.join(component)}\n    " + "\n    ".join(edges))
    return "\n".join(lines)


def test_the_reader_sees_every_kind_of_import_and_the_check_finds_the_cycle(tmp_path):
    """A made-up package whose cycle runs through a module-level, a function-level, a relative and a dynamic
    import: each edge is read, and the cycle is reported with its modules."""
    files = {
        "__init__.py": "",
        "a.py": "import os\nimport pkg.b\n",
        "b.py": "def f():\n    from . import c  # dodges the cycle at import time\n    return c\n",
        "c.py": "import importlib\n\ndef load(name):\n    return importlib.import_module(f'pkg.sub.{name}')\n",
        "sub/__init__.py": "",
        "sub/d.py": "from ..a import something\n",
        "e.py": "from pkg.sub import d\nfrom pkg import b\n",
    }
    for rel, text in files.items():
        (tmp_path / "pkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / rel).write_text(textwrap.dedent(text))
    graph = import_graph(tmp_path / "pkg")
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.sub.d"},
                     "pkg.sub": set(), "pkg.sub.d": {"pkg.a"}, "pkg.e": {"pkg.sub.d", "pkg.b"}}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.sub.d"]]
    graph["pkg.b"] = set()  # cut one edge of the ring: no cycle left
    assert cycles(graph) == []


def test_no_import_cycle_inside_jax_refine_and_configs():
    graph = import_graph(PACKAGE_DIR, CONFIGS_DIR)
    assert len(graph) > 50 and graph["jax_refine.models.registry"] and graph["configs.clip_refine"]  # all read
    found = cycles(graph)
    assert not found, "import cycles inside jax_refine:\n" + _describe(found, graph)


def test_configs_are_the_top_layer():
    """The package never imports a config (config.py loads them by path); a config builds on config_base."""
    graph = import_graph(PACKAGE_DIR, CONFIGS_DIR)
    upward = {(a, b) for a, targets in graph.items() if a.startswith("jax_refine") for b in targets
              if b.startswith("configs")}
    assert not upward, f"jax_refine modules importing configs: {sorted(upward)}"
    assert "jax_refine.config" not in set().union(*(t for a, t in graph.items() if a.startswith("configs")))
