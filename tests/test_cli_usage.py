"""What a new user meets on the command line: every advertised option works, errors are one line, output is clean.

Most checks run the real command in a subprocess, started the way the ``dynamiclrp`` console script starts it
(a script outside the current directory, so the current directory is *not* on ``sys.path`` by itself). Checks of
many variants of one code path run in-process through :func:`dynamiclrp.cli.main` to stay fast; the full
subprocess sweep over every ``--head`` is marked slow.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dynamiclrp import cli, presets
from dynamiclrp.cli.explain import HEADS

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
ESC = "\x1b["


def _slow(request: pytest.FixtureRequest) -> None:
    expr = request.config.getoption("markexpr") or ""
    if not request.config.getoption("--slow") and ("slow" not in expr or "not slow" in expr):
        pytest.skip("slow: select with -m slow (or --slow)")


@pytest.fixture(scope="module")
def entry(tmp_path_factory) -> Path:
    """A stand-in for the installed ``dynamiclrp`` console script: a script in its own directory."""
    folder = tmp_path_factory.mktemp("bin")
    script = folder / "dynamiclrp_entry.py"
    script.write_text("import sys\nfrom dynamiclrp.cli import main\nsys.exit(main())\n")
    return script


def run_cli(entry: Path, *args: str, cwd: Path, block: tuple[str, ...] = (), env: dict | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the command as a user would; ``block`` makes ``import <module>`` fail (module not installed)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    environment["PYTHONPATH"] = os.pathsep.join([str(SRC), environment.get("PYTHONPATH", "")])
    environment.update(env or {})
    if block:
        code = ("import sys, runpy\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in block)
                + f"sys.argv = [{str(entry)!r}] + sys.argv[1:]\nrunpy.run_path({str(entry)!r}, run_name='__main__')\n")
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, str(entry), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment)


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    threads = torch.get_num_threads()
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return code, out, err


MODELS = textwrap.dedent("""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.drop = torch.nn.Dropout(0.5)
            self.fc = torch.nn.Linear(4 * 8 * 8, 5)

        def forward(self, x):
            if self.training:
                raise RuntimeError("explained in training mode")
            return self.fc(self.drop(self.conv(x).relu()).flatten(1))

    class Frozen(Net):
        def forward(self, x):
            if any(p.requires_grad for p in self.parameters()):
                raise RuntimeError("the model was unfrozen")
            return super().forward(x)

    def build():
        torch.manual_seed(0)
        return Net().train()           # as a training script leaves it

    def frozen():
        torch.manual_seed(0)
        return Frozen().train().requires_grad_(False)

    def target():                      # for `dynamiclrp coverage`
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.randn(2, 4)
""")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "mymodels.py").write_text(MODELS)
    img = (np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)
    PIL.fromarray(img).save(tmp_path / "img.png")
    return tmp_path


# ==============================================================================================================
# 1. every --head listed in --help runs
# ==============================================================================================================
HEAD_ARGS = {
    "sequence_classification": ["--text", "paris is nice"],
    "token_classification": ["--text", "paris is nice", "--position", "1"],
    "question_answering": ["--text", "paris is nice", "--question", "what is nice"],
    "causal_lm": ["--text", "the capital of france is"],
    "seq2seq_lm": ["--text", "paris is nice"],
    "masked_lm": ["--text", "paris is [MASK]"],
    "image_classification": ["--image", "img.png"],
}
HEAD_MODEL = {"seq2seq_lm": "t5", "image_classification": "vit", "causal_lm": "gpt2"}
HEAD_TASK = {"sequence_classification": "text_classification", "token_classification": "token_classification",
             "question_answering": "question_answering", "causal_lm": "next_token", "seq2seq_lm": "seq2seq",
             "masked_lm": "fill_mask"}


def test_help_lists_exactly_the_heads_that_are_tested(capsys):
    code, out, _ = _main(capsys, "explain", "--help")
    assert code == 0
    listed = re.search(r"head to build or load, one of: ([\w, ]+) \(default", " ".join(out.split())).group(1)
    assert [h.strip() for h in listed.split(",")] == list(HEADS) == list(HEAD_ARGS)


def _head_argv(head: str, work: Path, ext: str) -> list[str]:
    return ["explain", "--hf", HEAD_MODEL.get(head, "bert"), "--head", head, *HEAD_ARGS[head],
            "--out", str(work / f"{head}.{ext}")]


@pytest.mark.parametrize("head", HEADS)
def test_every_head_runs_end_to_end(head, work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    ext = "png" if head == "image_classification" else "html"
    code, out, err = _main(capsys, *_head_argv(head, work, ext))
    assert code == 0, err
    assert (work / f"{head}.{ext}").stat().st_size > 0
    if head != "image_classification":
        assert out.startswith(f"{HEAD_TASK[head]}: explained")
        assert "paris" in (work / f"{head}.html").read_text(encoding="utf-8") or head == "causal_lm"
    assert ESC not in out  # captured output is not a terminal: no colour codes


def test_question_answering_through_the_real_command(entry, work):
    """The console script, piped: the explanation runs and stdout carries no colour codes."""
    res = run_cli(entry, *_head_argv("question_answering", work, "html"), cwd=work)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("question_answering: explained") and ESC not in res.stdout


@pytest.mark.parametrize("flag,env,coloured", [("always", {}, True), ("never", {"FORCE_COLOR": "1"}, False),
                                               ("auto", {"FORCE_COLOR": "1"}, True), ("auto", {}, False)])
def test_color_option_and_environment(flag, env, coloured, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for key in ("NO_COLOR", "FORCE_COLOR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, out, err = _main(capsys, "explain", "--hf", "bert", "--text", "paris is nice", "--color", flag)
    assert code == 0, err
    assert (ESC in out) == coloured


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS)
def test_every_head_through_the_real_command(head, entry, work, request):
    _slow(request)
    ext = "png" if head == "image_classification" else "html"
    res = run_cli(entry, *_head_argv(head, work, ext), cwd=work)
    assert res.returncode == 0, res.stderr
    assert (work / f"{head}.{ext}").exists() and ESC not in res.stdout


def test_question_answering_needs_a_question(capsys, work, monkeypatch):
    monkeypatch.chdir(work)
    code, _, err = _main(capsys, "explain", "--hf", "bert", "--head", "question_answering", "--text", "paris")
    assert code == 2 and "needs --question" in err


def test_a_head_the_help_does_not_list_is_refused(capsys):
    code, _, err = _main(capsys, "explain", "--hf", "bert", "--head", "ctc", "--text", "hi")
    assert code == 2 and "invalid choice: 'ctc'" in err


# ==============================================================================================================
# 2. --model: eval() by default, parameters untouched, weights
# ==============================================================================================================
def test_model_is_explained_in_eval_mode_unless_no_eval(capsys, work, monkeypatch):
    monkeypatch.chdir(work)
    argv = ["explain", "--model", "mymodels.py:build", "--image", "img.png", "--size", "8", "--out", "a.png"]
    code, out, err = _main(capsys, *argv)
    assert code == 0, err
    code, _, err = _main(capsys, *argv, "--no-eval")
    assert code == 1 and "explained in training mode" in err


def test_frozen_model_is_explained_frozen(capsys, work, monkeypatch):
    """The CLI explains a frozen model as it is: it neither unfreezes it nor needs it unfrozen."""
    monkeypatch.chdir(work)
    code, out, err = _main(capsys, "explain", "--model", "mymodels.py:frozen", "--image", "img.png", "--size", "8",
                           "--out", "f.png", "--ledger")
    assert code == 0, err
    assert "unaccounted" in out


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_weights_state_dict_checkpoint_or_pickled_module(capsys, work, monkeypatch):
    monkeypatch.chdir(work)
    sys.path.insert(0, str(work))
    try:
        import mymodels  # for pickling a module whose class lives in mymodels, as a training script would

        trained = mymodels.Net()
        with torch.no_grad():  # "trained" so that class 3 wins whatever the image
            trained.fc.weight.zero_()
            trained.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0]))
        files = {"sd": _save(trained.state_dict(), work / "sd.pt"),
                 "ckpt": _save({"epoch": 3, "state_dict": trained.state_dict()}, work / "ckpt.pt"),
                 "module": _save(trained, work / "module.pt")}
    finally:
        sys.path.remove(str(work))
        sys.modules.pop("mymodels", None)
    for kind, path in files.items():
        code, out, err = _main(capsys, "explain", "--model", "mymodels.py:build", "--weights", str(path), "--image",
                               "img.png", "--size", "8", "--out", f"{kind}.png")
        assert code == 0, (kind, err)
        assert out.startswith("predicted 3; explained 3"), (kind, out)
    _save({"fc.weight": torch.zeros(2, 2)}, work / "bad.pt")
    code, _, err = _main(capsys, "explain", "--model", "mymodels.py:build", "--weights", "bad.pt", "--image",
                         "img.png", "--size", "8")
    assert code == 2 and "does not fit Net" in err and "missing conv.weight" in err
    code, _, err = _main(capsys, "explain", "--model", "mymodels.py:build", "--weights", "nothing.pt", "--image",
                         "img.png")
    assert code == 2 and "--weights: no such file: nothing.pt" in err


def test_torchvision_weights_by_name_from_the_local_cache(capsys, work, monkeypatch):
    """``--weights IMAGENET1K_V1`` uses torchvision's cached file, its preprocessing and its class names."""
    tvm = pytest.importorskip("torchvision.models")
    monkeypatch.chdir(work)
    monkeypatch.setenv("TORCH_HOME", str(work / "torch-home"))
    argv = ["explain", "--model", "torchvision.models:squeezenet1_1", "--weights", "IMAGENET1K_V1", "--image",
            "img.png", "--target", "tabby", "--out", "tv.png"]
    code, _, err = _main(capsys, *argv)
    assert code == 2 and "is not in the local torch hub cache" in err and "does not download" in err
    weights = tvm.SqueezeNet1_1_Weights.IMAGENET1K_V1
    cache = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    cache.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(tvm.squeezenet1_1().state_dict(), cache)  # stands in for the downloaded file
    code, out, err = _main(capsys, *argv)
    assert code == 0, err
    assert "explained tabby" in out
    code, _, err = _main(capsys, *argv[:4], "IMAGENET1K_V9", *argv[5:])
    assert code == 2 and "has no 'IMAGENET1K_V9'; valid: IMAGENET1K_V1, DEFAULT" in err


def _tiny_tokenizer(folder: Path):
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "paris", "is", "nice", "the", "capital", "of", "##s"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return transformers.BertTokenizer(str(folder / "vocab.txt"))


def test_hf_checkpoint_directory(capsys, tmp_path, monkeypatch):
    """``--hf DIR`` loads what save_pretrained wrote: the model class, its weights and its tokenizer."""
    pytest.importorskip("transformers")
    from dynamiclrp.testing import zoo

    monkeypatch.chdir(tmp_path)
    model = zoo.build_hf("bert", head="sequence_classification", seed=3).model
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    _tiny_tokenizer(tmp_path).save_pretrained(ckpt)
    code, out, err = _main(capsys, "explain", "--hf", str(ckpt), "--text", "paris is nice", "--target", "pos",
                           "--out", "c.html")
    assert code == 0, err
    assert out.startswith("text_classification: explained pos")
    assert "[CLS]" in out and "paris" in out  # the checkpoint's WordPiece tokenizer, not the stand-in
    code, _, err = _main(capsys, "explain", "--hf", str(tmp_path / "nope"), "--text", "hi")
    assert code == 2 and "no such directory" in err


# ==============================================================================================================
# 3. one preset parser for every command
# ==============================================================================================================
@pytest.mark.parametrize("argv", [
    ["explain", "--hf", "bert", "--text", "hi", "--rules", "bogus"],
    ["demo", "--rules", "bogus", "--no-progress"],
    ["coverage", "mlp", "--rules", "bogus"],
])
def test_bad_preset_lists_every_valid_name(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(capsys, *argv)
    assert code == 2 and "unknown preset 'bogus'" in err
    assert all(name in err for name in presets.all_names())
    assert not (tmp_path / "dynamiclrp-demo").exists()  # the demo stopped before writing anything


def test_every_command_accepts_epsilon_gamma_box_and_parameters(capsys, work, monkeypatch):
    monkeypatch.chdir(work)
    for rules in ("epsilon_gamma_box", "epsilon_gamma_box:low=-1,high=2", "epsilon:epsilon=0.25"):
        code, out, err = _main(capsys, "explain", "--model", "mymodels.py:build", "--image", "img.png", "--size",
                               "8", "--rules", rules, "--out", "g.png")
        assert code == 0, (rules, err)
        code, out, err = _main(capsys, "coverage", "mymodels.py:target", "--rules", rules, "--explain")
        assert code == 0, (rules, err)
    code, _, err = _main(capsys, "explain", "--hf", "bert", "--text", "hi", "--rules", "epsilon_gamma_box")
    assert code == 2 and "epsilon_gamma_box needs the input bounds" in err  # a text has no pixel range


def test_preset_parser_grammar():
    from dynamiclrp.errors import RuleError

    assert presets.parse("epsilon:epsilon=0.25") == presets.epsilon(0.25)
    assert presets.parse(" cplrp : gate_constant=false ") == presets.cplrp(gate_constant=False)
    assert presets.parse("epsilon_plus:zero_params=bias") == presets.epsilon_plus(zero_params="bias")
    assert presets.parse("epsilon_gamma_box:low=-1,high=2") == presets.epsilon_gamma_box(-1.0, 2.0)
    assert presets.parse("epsilon_gamma_box", low=0.0, high=1.0) == presets.epsilon_gamma_box(0.0, 1.0)
    assert presets.parse("epsilon_gamma_box:high=3", low=0.0, high=1.0) == presets.epsilon_gamma_box(0.0, 3.0)
    assert presets.by_name("zero:") == presets.zero()  # rules="..." in Python takes the same strings
    for spec, message in [("epsilon:eps=1", "has no parameter 'eps'; its parameters are: epsilon"),
                          ("epsilon:epsilon", "is not key=value"),
                          ("epsilon_gamma_box", "epsilon_gamma_box needs the input bounds"),
                          ("epsilon_gamma_box:low=a,high=b", "bounds must be numbers")]:
        with pytest.raises(RuleError, match=message):
            presets.parse(spec)


# ==============================================================================================================
# 4. module:function and file.py:function everywhere, the current directory on sys.path
# ==============================================================================================================
def test_module_spec_from_the_current_directory(entry, work):
    """The console script does not put the current directory on sys.path; ``mymodels:build`` still works."""
    res = run_cli(entry, "explain", "--model", "mymodels:build", "--image", "img.png", "--size", "8",
                  "--out", "m.png", cwd=work)
    assert res.returncode == 0, res.stderr
    assert (work / "m.png").exists()


def test_module_spec_for_coverage_without_cwd_on_sys_path(capsys, work, monkeypatch):
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(work))])
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)  # loaded from a file by an earlier test
    code, out, err = _main(capsys, "coverage", "mymodels:target")
    assert code == 0, err
    assert "nodes covered (100.00 %)" in out
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)


def test_relative_file_spec_in_a_folder_for_coverage(capsys, work, monkeypatch):
    """``dynamiclrp coverage folder/file.py:function``, like ``explain --model``, with a model of issue 11's ops."""
    (work / "sub").mkdir()
    (work / "sub" / "glu_models.py").write_text(
        "import torch\n"
        "def target():\n"
        "    torch.manual_seed(0)\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GLU(), torch.nn.Linear(4, 2))\n"
        "    return model, torch.randn(3, 4)\n")
    monkeypatch.chdir(work)
    code, out, err = _main(capsys, "coverage", "sub/glu_models.py:target", "--explain")
    assert code == 0, err
    assert "GluBackward0" in out and "100.00 %" in out


def test_file_spec_for_coverage_and_errors(capsys, work, monkeypatch):
    monkeypatch.chdir(work)
    code, out, _ = _main(capsys, "coverage", f"{work / 'mymodels.py'}:target")
    assert code == 0 and "100.00 %" in out
    code, _, err = _main(capsys, "coverage", "mymodels.py:nothing")
    assert code == 2 and "has no attribute 'nothing'; callables there:" in err and "target" in err
    code, _, err = _main(capsys, "coverage", "missing.py:build")
    assert code == 2 and "no such file: missing.py" in err
    assert str(work) not in sys.path  # the current directory was only on sys.path while loading


# ==============================================================================================================
# 5. a missing optional dependency: one line, exit 2, the extra and both install commands
# ==============================================================================================================
@pytest.mark.parametrize("argv,blocked,extra", [
    (["demo", "--no-progress"], ("matplotlib",), "viz"),
    (["explain", "--hf", "bert", "--text", "hi"], ("transformers",), "hf"),
])
def test_missing_extra_is_one_line_with_the_install_command(argv, blocked, extra, entry, tmp_path):
    res = run_cli(entry, *argv, cwd=tmp_path, block=blocked)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert f'pip install "dynamiclrp[{extra}]"' in lines[0] and f'pip install ".[{extra}]"' in lines[0]
    assert not (tmp_path / "dynamiclrp-demo").exists()


def test_missing_scikit_learn_for_the_demo(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    code, _, err = _main(capsys, "demo", "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert "needs scikit-learn" in err and 'pip install "dynamiclrp[demo]"' in err


# ==============================================================================================================
# 10. --help shows no reStructuredText markup
# ==============================================================================================================
@pytest.mark.parametrize("command", [[], ["demo"], ["explain"], ["coverage"]])
def test_help_has_no_rst_markup(command, capsys):
    code, out, _ = _main(capsys, *command, "--help")
    assert code == 0 and out.startswith("usage: dynamiclrp")
    assert "``" not in out and not re.search(r":(func|class|mod|meth|attr|data):`", out), out


# ==============================================================================================================
# 14. the demo's default output stays out of git
# ==============================================================================================================
def test_default_outputs_are_ignored_by_git():
    if not (ROOT / ".git").exists() or subprocess.run(["git", "--version"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    import argparse

    from dynamiclrp.cli import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    out = parser.parse_args([]).out
    assert not out.is_absolute()  # relative to where the command runs, e.g. the checkout
    written = [out / "digits.png", out / "pixel_flipping.png", out / "sentiment.html", Path("relevance.png"),
               Path("relevance.html")]
    res = subprocess.run(["git", "check-ignore", "--no-index", *map(str, written)], cwd=ROOT, capture_output=True,
                         text=True)
    assert sorted(res.stdout.split()) == sorted(map(str, written))
