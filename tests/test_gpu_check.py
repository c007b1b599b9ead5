"""``scripts/gpu_check.py`` runs end to end in its CPU dry run (tiny sizes), so the device check cannot rot between
the sessions that have a GPU. The CUDA-only measurements (node types a GPU produces, host syncs, peak memory) are
reported as not measured on a CPU; every comparison, ledger and table is produced."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("gpu_check", None)


def test_the_cpu_dry_run_passes_and_prints_every_table(gpu_check, tmp_path, capsys):
    md, js = tmp_path / "gpu.md", tmp_path / "gpu.json"
    rc = gpu_check.main(["--cpu", "--dtypes", "float32", "--models", "llama", "cnn_bn", "--nets", "lstm 2x", "gru",
                         "rms", "split", "--backends", "math", "flash_attention", "efficient_attention",
                         "--tokens", "8", "--repeats", "1", "--markdown", str(md), "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for title in ("Saved fields", "Fused nets", "Host synchronisation", "Benchmark: LLaMA-shaped", "Zoo entries"):
        assert title in out
    assert "all checks passed" in out and md.read_text() == out.rstrip("\n") + "\n"
    # the CPU flash kernel was forced and explained; a backend the CPU lacks is reported, not failed
    assert "ScaledDotProductFlashAttentionForCpuBackward0" in out
    assert "| llama | attnlrp | float32 | efficient_attention |" in out and "unsupported" in out
    records = json.loads(js.read_text())["records"]
    zoo = [r for r in records if r["section"] == "zoo"]
    assert {r["model"] for r in zoo} == {"llama", "cnn_bn"}
    assert all(r["cosine"] > 0.99999 for r in zoo)
    assert any(r["section"] == "bench" for r in records)


def test_a_failed_check_makes_the_exit_status_non_zero(gpu_check, monkeypatch, capsys):
    monkeypatch.setitem(gpu_check.COSINE, __import__("torch").float32, 1.5)  # no cosine can reach it
    rc = gpu_check.main(["--cpu", "--dtypes", "float32", "--sections", "fused", "--nets", "rms"])
    out = capsys.readouterr().out
    assert rc == 1 and "failed check" in out and "FAIL" in out


def test_without_a_gpu_the_real_run_says_how_to_dry_run(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "--cpu" in capsys.readouterr().err
