"""The ``dynamiclrp`` command line: help everywhere, the demo, ``explain``, and clear errors with exit codes."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dynamiclrp import cli

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    threads = torch.get_num_threads()
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse: --help exits 0, usage errors exit 2
        code = int(exc.code or 0)
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["explain", "--help"]])
def test_help_everywhere(capsys, argv):
    code, out, _ = _main(capsys, *argv)
    assert code == 0
    assert out.startswith("usage: dynamiclrp")
    if argv[0] == "explain":
        assert "--model MODULE:FUNCTION" in out and "--hf MODEL_TYPE" in out and "examples:" in out
    if argv[0] == "demo":
        assert "--out" in out and "--seed" in out


def test_console_entry_point_runs(capsys):
    res = subprocess.run([sys.executable, "-m", "dynamiclrp", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "demo" in res.stdout and "explain" in res.stdout
    code, out, _ = _main(capsys)
    assert code == 2 and "usage: dynamiclrp" in out  # no command: help and a non-zero exit


# --------------------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buf = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(buf):
        code = cli.main(["demo", "--out", str(out), "--no-progress"])
    torch.set_num_threads(threads)
    return code, buf.getvalue(), out


def test_demo_writes_heatmaps_html_and_prints_ledger_and_abpc(demo_run):
    code, text, out = demo_run
    assert code == 0
    acc = float(re.search(r"test accuracy ([\d.]+)%", text).group(1))
    assert acc > 90.0
    # the ledger accounts for the explained logits
    assert "seed relevance" in text and "sink: bias" in text
    unaccounted = float(re.search(r"unaccounted\s+(\S+)", text).group(1))
    seed = float(re.search(r"seed relevance\s+(\S+)", text).group(1))
    assert abs(unaccounted) < 1e-4 * abs(seed)
    # faithfulness: LRP far above a random attribution, which scores about 0
    abpc = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s+(\w+)\s+\S+\s+\S+\s+(-?[\d.]+)$", text, re.M)}
    assert set(abpc) >= {"epsilon", "epsilon_plus", "epsilon_gamma_box", "random"}
    assert abs(abpc["random"]) < 1.0 and abpc["epsilon"] > 5.0
    png = PIL.open(out / "digits.png")
    assert png.size[0] > 3 * png.size[1] > 0  # 8 digits in a row above a row of their heatmaps
    arr = np.asarray(png.convert("RGB")).astype(int)
    red = ((arr[..., 0] > 200) & (arr[..., 1] < 120) & (arr[..., 2] < 120)).sum()
    assert red > 50, "the heatmaps should show positive (red) relevance"
    assert PIL.open(out / "pixel_flipping.png").size[0] > 300
    html = (out / "sentiment.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "superb" in html and "background-color:#" in html
    assert "<script" not in html and "http" not in html.split("</title>")[1]  # self-contained


def _cli_docs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "cli_docs.py"
    spec = importlib.util.spec_from_file_location("cli_docs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_docs_show_what_the_commands_print(demo_run):
    """docs/cli.md's sample outputs are generated (scripts/cli_docs.py); they must match the commands today."""
    docs = _cli_docs()
    documented = docs.samples(docs.DOC.read_text(encoding="utf-8"))
    assert set(documented) == set(docs.COMMANDS)
    for name, printed in (("demo", docs.clean(demo_run[1])), ("explain", docs.run("explain"))):
        problems = docs.drift(documented[name], printed)
        assert not problems, f"docs/cli.md: the {name} sample has drifted; run python scripts/cli_docs.py\n" + \
            "\n".join(problems)
    assert docs.drift("a 1.00 b\n", "a 1.01 b\n") == []  # numbers within tolerance
    assert docs.drift("a 1.00 b\n", "a 2.00 b\n") and docs.drift("a 1 b\n", "a 1 c\n")  # but not more


def test_demo_is_deterministic(capsys, tmp_path):
    args = ["demo", "--no-text", "--epochs", "1", "--digits", "2", "--no-progress"]
    c1, o1, _ = _main(capsys, *args, "--out", str(tmp_path / "a"))
    c2, o2, _ = _main(capsys, *args, "--out", str(tmp_path / "b"))
    assert c1 == c2 == 0
    strip = lambda s: re.sub(r"\(\d+\.\d s\)|/\S+", "", s)  # noqa: E731 - timings and paths differ
    assert strip(o1) == strip(o2)
    assert (tmp_path / "a" / "digits.png").read_bytes() == (tmp_path / "b" / "digits.png").read_bytes()


def test_demo_rejects_bad_options(capsys, tmp_path):
    code, _, err = _main(capsys, "demo", "--rules", "nonsense", "--out", str(tmp_path))
    assert code == 2 and "unknown preset 'nonsense'" in err
    code, _, err = _main(capsys, "demo", "--digits", "0", "--out", str(tmp_path))
    assert code == 2 and "--digits" in err


# --------------------------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------------------------
MODEL_FILE = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                             nn.Linear(64, 5)).eval()

    def with_preprocess():
        import numpy as np
        def prep(img):
            return torch.from_numpy(np.asarray(img.resize((16, 16)), dtype=np.float32) / 255).permute(2, 0, 1)
        return build(), prep

    def not_a_model():
        return 42
""")


@pytest.fixture
def files(tmp_path):
    (tmp_path / "mymodels.py").write_text(MODEL_FILE)
    img = (np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)
    PIL.fromarray(img).save(tmp_path / "img.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_explain_own_model_on_an_image(capsys, files):
    out = files / "out" / "rel.png"
    code, text, err = _main(capsys, "explain", "--model", f"{files / 'mymodels.py'}:build", "--image",
                            str(files / "img.png"), "--size", "12", "--target", "3", "--out", str(out), "--ledger")
    assert code == 0, err
    assert "explained 3" in text and "seed relevance" in text and out.exists()
    assert PIL.open(out).size[0] > 2 * PIL.open(out).size[1]  # image | heatmap | overlay
    code, text, err = _main(capsys, "explain", "--model", f"{files / 'mymodels.py'}:with_preprocess", "--image",
                            str(files / "img.png"), "--out", str(files / "b.png"))
    assert code == 0, err


def test_explain_random_transformers_models(capsys, files):
    code, text, err = _main(capsys, "explain", "--hf", "bert", "--text", "a gripping beautifully shot film",
                            "--out", str(files / "bert.html"))
    assert code == 0, err
    html = (files / "bert.html").read_text(encoding="utf-8")
    assert "gripping" in html and "text_classification" in text
    code, text, err = _main(capsys, "explain", "--hf", "gpt2", "--text", "the capital of France is", "--target", "5",
                            "--contrast", "7", "--out", str(files / "gpt2.html"))
    assert code == 0, err
    assert "next_token" in text and "vs" in text
    code, text, err = _main(capsys, "explain", "--hf", "vit", "--image", str(files / "img.png"),
                            "--out", str(files / "vit.png"))
    assert code == 0, err
    assert PIL.open(files / "vit.png").size[0] > 0


@pytest.mark.parametrize("argv,message", [
    (["--hf", "bert", "--image", "missing.png"], "no such file: missing.png"),
    (["--hf", "vit", "--image", "notes.txt"], "cannot read notes.txt as an image"),
    (["--hf", "bert", "--text", "hello", "--target", "9"], "target 9 is out of range: the model has 2 outputs"),
    (["--hf", "bert", "--text", "hello", "--target", "positive"], "unknown label 'positive'"),
    (["--hf", "gpt2", "--text", "hello", "--target", "999999"], "out of range for a vocabulary"),
    (["--hf", "no_such_type", "--text", "hello"], "--hf no_such_type"),
    (["--model", "no_such_module:build", "--image", "img.png"], "cannot import module 'no_such_module'"),
    (["--model", "mymodels.py:nothing", "--image", "img.png"], "has no attribute 'nothing'"),
    (["--model", "mymodels.py:not_a_model", "--image", "img.png"], "not a torch.nn.Module"),
    (["--model", "missing.py:build", "--image", "img.png"], "no such file: missing.py"),
    (["--model", "no_colon", "--image", "img.png"], "expected 'package.module:function'"),
    (["--model", "mymodels.py:build", "--image", "img.png", "--target", "7"], "out of range: the model has 5"),
    (["--model", "mymodels.py:build", "--image", "img.png", "--out", "x.html"], "written as .png, .pdf or .svg"),
    (["--hf", "bert", "--text", "hi", "--rules", "bogus"], "unknown preset 'bogus'"),
    (["--hf", "bert", "--text", "hi", "--contrast", "3"], "--contrast is for language models"),
])
def test_explain_errors_are_clear_and_exit_2(capsys, files, monkeypatch, argv, message):
    monkeypatch.chdir(files)
    code, _, err = _main(capsys, "explain", *argv)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_explain_needs_a_model_and_an_input(capsys):
    code, _, err = _main(capsys, "explain", "--text", "hi")
    assert code == 2 and "one of the arguments --model --hf is required" in err


def test_explain_model_without_rules_exits_1(capsys, files):
    """An operation without a relevance rule is a failure of the explanation (exit 1), reported in one line."""
    (files / "custom.py").write_text(textwrap.dedent("""
        import torch
        class Odd(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x * 2
            @staticmethod
            def backward(ctx, g):
                return g * 2
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(3 * 8 * 8, 2)
            def forward(self, x):
                return self.lin(Odd.apply(x).flatten(1))
        def build():
            return M().eval()
    """))
    code, _, err = _main(capsys, "explain", "--model", f"{files / 'custom.py'}:build", "--image",
                         str(files / "img.png"), "--size", "8", "--out", str(files / "c.png"))
    assert code == 1
    assert "UnsupportedOperationError" in err and "Traceback" not in err
