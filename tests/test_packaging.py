"""Packaging: one version number, type information shipped, a changelog, extras that match what the code asks for."""
from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import dynamiclrp
from dynamiclrp import extras

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def _project_version() -> str:
    return re.search(r'^version = "([^"]+)"$', PYPROJECT, re.M).group(1)


def test_version_has_one_source():
    assert dynamiclrp.__version__ == importlib.metadata.version("dynamiclrp") == _project_version()
    assert _project_version() not in (ROOT / "src/dynamiclrp/__init__.py").read_text()  # not written twice


def test_changelog_has_an_unreleased_section_and_the_current_version():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in text and f"## [{_project_version()}]" in text


def test_every_optional_module_belongs_to_a_declared_extra():
    declared = {m.group(1): m.group(2) for m in re.finditer(r'^(\w+) = \[([^\]]*)\]', PYPROJECT, re.M)}
    for module, (package, extra) in extras.EXTRAS.items():
        if extra is not None:
            assert extra in declared, f"{module}: extra {extra!r} is not in pyproject.toml"
            assert package.lower() in declared[extra].lower(), f"{package} is not in the {extra!r} extra"


def test_missing_extra_message_names_both_install_commands():
    message = extras.missing_extra_message("sklearn.datasets", "dynamiclrp demo")
    assert message.startswith("dynamiclrp demo needs scikit-learn, which is not installed")
    assert 'pip install "dynamiclrp[demo]"' in message and 'pip install ".[demo]"' in message
    assert extras.missing_extra_message("torchvision").endswith("pip install torchvision")


def test_wheel_ships_py_typed(tmp_path):
    if not shutil.which("pip") and subprocess.run([sys.executable, "-m", "pip", "--version"],
                                                  capture_output=True).returncode:
        pytest.skip("pip is not available")
    pytest.importorskip("setuptools")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path / "dist"), str(tmp_path)], capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "No module named" in res.stderr:
        pytest.skip(f"cannot build a wheel here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr
    (wheel,) = (tmp_path / "dist").glob("dynamiclrp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dynamiclrp/py.typed" in names and "dynamiclrp/extras.py" in names
