"""Every Python code sample in the user docs runs, and the docs site source is consistent.

Convention: each ```python block of a page runs, in page order, in one namespace per page, in a temporary working
directory. A block that must not run (it downloads a checkpoint, needs a GPU...) is preceded by the line
``<!-- docs-test: skip -->`` (invisible on the rendered site). Every page under docs/ and the README is run; no
page is exempt.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SKIP_MARK = "<!-- docs-test: skip -->"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [ROOT / "README.md", ROOT / "CHANGELOG.md"]


def _pages_with_samples() -> list[Path]:
    return [p for p in _pages() if any(not s for _, _, s in python_blocks(p.read_text(encoding="utf-8")))]


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line number, code, skipped)`` for each ```python block of a Markdown page."""
    blocks = []
    for m in FENCE.finditer(text):
        info = m.group("info").strip().split()
        if not info or info[0] not in ("python", "py"):
            continue
        before = text[: m.start()].rstrip().splitlines()
        skipped = bool(before) and before[-1].strip() == SKIP_MARK
        indent = m.group("indent")
        code = "\n".join(line[len(indent):] if line.startswith(indent) else line
                         for line in m.group("body").splitlines())
        blocks.append((text[: m.start()].count("\n") + 1, code, skipped))
    return blocks


def test_extractor_understands_the_convention():
    page = ("x\n```python\na = 1\n```\n<!-- docs-test: skip -->\n```python\nraise SystemExit\n```\n"
            "```bash\nls\n```\n!!! note\n    ```python\n    b = a + 1\n    ```\n")
    blocks = python_blocks(page)
    assert [(code, skipped) for _, code, skipped in blocks] == [
        ("a = 1", False), ("raise SystemExit", True), ("b = a + 1", False)]
    assert blocks[0][0] == 2


@pytest.mark.filterwarnings("ignore:Input Tensor .* did not already require gradients")
@pytest.mark.parametrize("page", _pages_with_samples(), ids=lambda p: str(p.relative_to(ROOT)))
def test_code_samples_run(page, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    runnable = [(line, code) for line, code, skipped in blocks if not skipped]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NO_COLOR", "1")
    namespace: dict = {"__name__": "__docs__"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for line, code in runnable:
            try:
                exec(compile(code, f"{page.name}:{line}", "exec"), namespace)  # noqa: S102 - the docs' own code
            except Exception as err:  # pragma: no cover - the message is the point
                raise AssertionError(f"{page.name}, code block at line {line} failed: {type(err).__name__}: "
                                     f"{err}") from err
    finally:
        torch.set_num_threads(threads)


def test_every_page_has_samples_or_is_reference():
    """A guide without a single runnable sample is probably missing its examples."""
    reference = {"api.md", "benchmarks.md", "cli.md", "index.md", "ARCHITECTURE.md", "CHANGELOG.md",
                 "lxt-notes.md", "lxt-parity.md", "node_census.md"}
    for page in _pages():
        if page.name in reference:
            continue
        blocks = python_blocks(page.read_text(encoding="utf-8"))
        assert any(not skipped for _, _, skipped in blocks), f"{page.name} has no runnable ```python sample"


def _nav_files(nav) -> list[str]:
    out = []
    for item in nav:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                out.extend(_nav_files(value) if isinstance(value, list) else [value])
    return out


def test_nav_and_relative_links_point_to_existing_files():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8").replace("!!python/name:", ""))
    for name in _nav_files(config["nav"]):
        if not name.startswith("http"):
            assert (DOCS / name).is_file(), f"mkdocs.yml nav names a missing page: docs/{name}"
    link = re.compile(r"\]\((?!https?:|mailto:|#)([^)#\s]+)")
    for page in _pages():
        for target in link.findall(page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links to a missing file: {target}"


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
                    reason="mkdocs not installed (pip install .[docs])")
@pytest.mark.skipif(not os.environ.get("DYNAMICLRP_DOCS_BUILD"),
                    reason="set DYNAMICLRP_DOCS_BUILD=1 to build the site (about 10 s)")
def test_mkdocs_build_strict(tmp_path):
    exe = Path(sys.executable).parent / "mkdocs"
    res = subprocess.run([str(exe if exe.exists() else "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "index.html").exists() and (tmp_path / "api" / "index.html").exists()
    assert (tmp_path / "pitfalls" / "index.html").exists()
    raw_role = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`")
    for page in tmp_path.rglob("*.html"):
        assert not raw_role.search(page.read_text(encoding="utf-8")), f"raw Sphinx role in {page}"
    api = (tmp_path / "api" / "index.html").read_text(encoding="utf-8")
    assert api.count("autorefs-internal") > 100  # the roles became links
    assert 'href="#dynamiclrp.hf.text"' in api and 'href="#dynamiclrp.viz.heatmap"' in api


def test_sphinx_roles_become_cross_references():
    """The griffe extension of the API reference (docs/_ext/sphinx_roles.py), without building the site."""
    griffe = pytest.importorskip("griffe")
    import importlib.util

    spec = importlib.util.spec_from_file_location("sphinx_roles", DOCS / "_ext" / "sphinx_roles.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    pkg = griffe.load("dynamiclrp", search_paths=[str(ROOT / "src")], extensions=griffe.load_extensions(
        ext.SphinxRoles()), docstring_parser="numpy")
    hf_doc = pkg["hf"].docstring.value
    assert '<autoref identifier="dynamiclrp.hf.text" optional><code>text()</code></autoref>' in hf_doc
    overlay_doc = pkg["viz.overlay"].docstring.value
    assert '<autoref identifier="dynamiclrp.viz.heatmap" optional>' in overlay_doc
    ruleset = pkg["presets.cplrp"].docstring.value  # ~ keeps only the last component
    assert '<autoref identifier="dynamiclrp.rules.CPLRP" optional><code>CPLRP</code></autoref>' in ruleset
    raw_role = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`")
    assert not any(o.docstring is not None and raw_role.search(o.docstring.value) for o in ext._walk(pkg))
