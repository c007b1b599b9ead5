"""The package's layers: imports flow one way (core <- ops <- rules <- applications) with no cycle, torch's
private autograd names are read in one module only, every module imports, and the public API type-checks."""
from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "dynamiclrp"
SCRIPT = ROOT / "scripts" / "check_layers.py"


def _checker():
    spec = importlib.util.spec_from_file_location("check_layers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_imports_flow_one_way_without_cycles() -> None:
    assert _checker().check() == []


def test_the_checker_sees_a_higher_layer_import_a_cycle_and_a_dodged_cycle(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "dynamiclrp"
    for sub in ("core", "rules"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from ..rules import b\n")                 # core imports rules
    (pkg / "rules" / "b.py").write_text("from ..core import a\n")                 # and back: a cycle
    (pkg / "rules" / "c.py").write_text("from . import d\n")
    (pkg / "rules" / "d.py").write_text("def f():\n    from . import c\n")         # a cycle dodged in a function
    (pkg / "rules" / "e.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                        "    from . import f\n")
    (pkg / "rules" / "f.py").write_text("from . import e\n")                      # only a type-checking import
    checker = _checker()
    monkeypatch.setattr(checker, "ROOT", pkg)
    found = "\n".join(checker.check())
    assert "dynamiclrp.core.a imports dynamiclrp.rules.b: a higher layer" in found
    assert "import cycle: dynamiclrp.core.a -> dynamiclrp.rules.b -> dynamiclrp.core.a" in found
    assert "dynamiclrp.rules.d imports dynamiclrp.rules.c inside a function, dodging the cycle" in found
    assert "rules.e" not in found and "rules.f " not in found


def test_the_layer_check_runs_as_a_script() -> None:
    res = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


#: names of torch's autograd internals; only core/graph.py may touch them
PRIVATE = {"_input_metadata", "next_functions", "_forward_cls", "variable", "_base", "_ConvNd", "saved_tensors",
           "_saved_tensors"}


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            name = node.args[1].value
        if name is not None and (name in PRIVATE or name.startswith("_saved_")):
            found.append(f"{path.relative_to(SRC)}:{node.lineno}: {name}")
    return found


def test_torch_private_names_are_read_in_core_graph_only() -> None:
    uses = [u for p in sorted(SRC.rglob("*.py")) if p != SRC / "core" / "graph.py" for u in _private_uses(p)]
    assert uses == [], "\n".join(uses)
    assert _private_uses(SRC / "core" / "graph.py"), "the check must see graph.py's own accesses"


def test_every_module_imports() -> None:
    modules = []
    for p in sorted(SRC.rglob("*.py")):
        rel = p.relative_to(SRC.parent).with_suffix("")
        parts = [x for x in rel.parts if x != "__init__"]
        if parts[-1] == "__main__":
            continue
        modules.append(".".join(parts))
    code = textwrap.dedent(f"""
        import importlib, sys
        bad = []
        for m in {modules!r}:
            try:
                importlib.import_module(m)
            except Exception as err:
                bad.append(f"{{m}}: {{type(err).__name__}}: {{err}}")
        print("\\n".join(bad))
        sys.exit(1 if bad else 0)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_exception_is_defined_in_errors_and_is_a_dynamiclrp_error() -> None:
    import dynamiclrp.errors as errors

    elsewhere = []
    for p in sorted(SRC.rglob("*.py")):
        if p == SRC / "errors.py":
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and (b.id.endswith("Error") or b.id == "Exception") for b in node.bases):
                elsewhere.append(f"{p.relative_to(SRC)}: {node.name}")
    assert elsewhere == []
    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == errors.__name__:
            assert issubclass(obj, errors.DynamicLRPError), name


@pytest.mark.skipif(shutil.which("mypy") is None and importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed")
def test_public_api_passes_mypy_strict() -> None:
    files = [SRC / f for f in ("__init__.py", "api.py", "errors.py", "presets.py", "version.py", "conditions.py",
                               "concepts.py")] + [
        SRC / "core" / f for f in ("results.py", "ledger.py")]
    res = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                          "--ignore-missing-imports", *map(str, files)], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
