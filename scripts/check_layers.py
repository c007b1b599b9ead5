#!/usr/bin/env python3
"""Check that imports inside ``src/dynamiclrp`` flow one way and form no cycle.

Layers, lowest first: ``core`` ← ``ops`` ← ``rules`` ← everything else (the applications: ``api``, ``presets``,
``hf``, ``viz``, ``metrics``, ``dataset``, ``cli``...). ``errors`` sits below every layer. A module may import
from its own layer or a lower one, never a higher one. Two more rules:

* no cycle among module-level imports (``if TYPE_CHECKING:`` imports, which never run, are ignored);
* no import inside a function that exists to dodge a cycle: an internal import made inside a function must not
  close a cycle with the module-level ones (imports of optional third-party packages inside functions are fine).

Exit status 1 with one line per violation; 0 and "ok" otherwise. Run by ``tests/test_layers.py``.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src" / "dynamiclrp"
LAYERS = {"errors": 0, "core": 1, "ops": 2, "rules": 3}
APPS = 4


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself: its __init__ is the public face, above everything
        return APPS + 1
    return LAYERS.get(parts[1], APPS)


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = module.split(".") if is_pkg else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if not base.startswith("dynamiclrp"):
        return []
    # "from pkg import name" imports the submodule pkg.name, or the attribute name of pkg's __init__
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_pkg: bool, known: set[str]):
        self.module, self.is_pkg, self.known = module, is_pkg, known
        self.top: set[str] = set()
        self.inner: set[str] = set()
        self.depth = 0

    def _add(self, names: list[str]) -> None:
        if len(names) > 1 and any(n in self.known for n in names[1:]):
            names = names[1:]  # "from pkg import submodule": the submodule, not pkg's __init__
        for n in names:
            if n in self.known and n != self.module:
                (self.inner if self.depth else self.top).add(n)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        self._add([a.name for a in node.names if a.name.startswith("dynamiclrp")])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self._add(_resolve(self.module, self.is_pkg, node))


def collect() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = sorted(ROOT.rglob("*.py"))
    names = {module_name(p): p for p in files}
    top: dict[str, set[str]] = {}
    inner: dict[str, set[str]] = {}
    for mod, path in names.items():
        v = _Imports(mod, path.name == "__init__.py", set(names))
        v.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        top[mod], inner[mod] = v.top, v.inner
    return top, inner


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A path start -> ... -> goal along module-level imports, or None."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen = {start}
    while stack:
        m, path = stack.pop()
        for n in graph.get(m, ()):
            if n == goal:
                return path + [n]
            if n not in seen:
                seen.add(n)
                stack.append((n, path + [n]))
    return None


def _is_package(mod: str, graph: dict[str, set[str]]) -> bool:
    return any(other.startswith(mod + ".") for other in graph)


def check() -> list[str]:
    top, inner = collect()
    problems: list[str] = []
    for mod, deps in sorted(top.items()):
        for dep in sorted(deps | inner[mod]):
            if _is_package(dep, top) and dep != "dynamiclrp" and mod.startswith(dep + "."):
                continue  # a module importing its own package's __init__ (re-exports) is not a layer question
            if layer(dep) > layer(mod):
                problems.append(f"{mod} imports {dep}: a higher layer ({_layer_name(dep)} above {_layer_name(mod)})")
    # cycles among module-level imports (a package __init__ re-exporting its submodules is fine: skip those edges)
    graph = {m: {d for d in deps if not (m.startswith(d + ".") and _is_package(d, top))} for m, deps in top.items()}
    for mod, deps in sorted(graph.items()):
        for dep in sorted(deps):
            path = _reaches(graph, dep, mod)
            if path is not None:
                problems.append("import cycle: " + " -> ".join([mod] + path))
    # function-level imports that dodge a cycle
    for mod, deps in sorted(inner.items()):
        for dep in sorted(deps):
            if dep == "dynamiclrp" or mod.startswith(dep + "."):
                continue
            path = _reaches(graph, dep, mod)
            if path is not None:
                problems.append(f"{mod} imports {dep} inside a function, dodging the cycle "
                                + " -> ".join([mod] + path))
    return sorted(set(problems))


def _layer_name(mod: str) -> str:
    n = layer(mod)
    return {0: "errors", 1: "core", 2: "ops", 3: "rules"}.get(n, "applications")


def main() -> int:
    problems = check()
    for p in problems:
        print(p)
    if not problems:
        print("ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
