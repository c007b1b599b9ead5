"""The example notebooks (jupytext percent scripts under examples/) are notebooks, and they run.

They run as plain Python scripts — no Jupyter kernel needed — in one subprocess (one import of torch and
transformers for all three), each in its own empty working directory, offline.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

#: example -> files it writes into its working directory
WRITES = {
    "image_classifier.py": ["digit_explained.png", "digits_grid.png"],
    "hf_text_classifier.py": ["reviews.html", "review0.pdf", "review1.png"],
    "causal_lm.py": ["next_token.html", "paris_vs_rome.png"],
}


def test_the_three_notebooks_are_there_and_documented():
    assert [p.name for p in EXAMPLES] == sorted(WRITES)
    readme = (ROOT / "examples" / "README.md").read_text(encoding="utf-8")
    assert all(name in readme for name in WRITES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_jupytext_percent_notebooks(path):
    text = path.read_text(encoding="utf-8")
    assert re.search(r"^#\s+formats: py:percent$", text, re.M), "jupytext header missing"
    cells = re.findall(r"^# %%(.*)$", text, re.M)
    assert cells[0].strip() == "[markdown]", "a notebook opens with a markdown cell (its title)"
    assert re.search(r"^# %% \[markdown\]\n# # ", text, re.M), "the first markdown cell has a '# ' title"
    assert sum(c.strip() == "" for c in cells) >= 3 and sum(c.strip() == "[markdown]" for c in cells) >= 3


def test_examples_run_offline(tmp_path):
    for module in ("sklearn", "matplotlib", "PIL", "transformers", "tokenizers"):
        pytest.importorskip(module)
    runner = (
        "import os, runpy, sys, traceback, torch\n"
        "torch.set_num_threads(1)\n"
        "failed = []\n"
        "for path, folder in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    os.makedirs(folder); os.chdir(folder)\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "    except BaseException:\n"
        "        failed.append(path); traceback.print_exc()\n"
        "sys.exit(1 if failed else 0)\n"
    )
    args = [str(a) for p in EXAMPLES for a in (p, tmp_path / p.stem)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    res = subprocess.run([sys.executable, "-c", runner, *args], capture_output=True, text=True, timeout=600,
                         env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    for path in EXAMPLES:
        for name in WRITES[path.name]:
            out = tmp_path / path.stem / name
            assert out.is_file() and out.stat().st_size > 0, f"{path.name} did not write {name}"
    assert "refused: the target token 'berlin' is not in the tokenizer's vocabulary" in res.stdout
    assert "most relevant: france" in res.stdout  # the causal LM learned its capitals, and LRP finds why
