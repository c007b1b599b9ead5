"""The benchmark harness runs end to end on toy sizes (no timing assertions)."""
from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        run = importlib.import_module("run")
        yield run
    finally:
        sys.path.remove(str(BENCH))
        for name in ("run", "models", "peers"):
            sys.modules.pop(name, None)


def _ratios(text: str) -> list[float]:
    return [float(m) for m in re.findall(r"(\d+\.\d+)x", text)]


def test_quick_run_prints_every_table(bench, tmp_path, capsys):
    md = tmp_path / "bench.md"
    rc = bench.main(["--quick", "--models", "mlp", "llama", "--presets", "epsilon", "--repeats", "1",
                     "--depths", "1", "2", "--batch", "2", "--thread-models", "mlp", "--peers", "--quiet",
                     "--markdown", str(md)])
    assert rc == 0
    out = capsys.readouterr().out
    for title in ("Cost of one explanation", "Planning vs execution", "Depth scaling", "Batch:", "Threads:"):
        assert title in out
    assert "torch " in out and "machine:" in out and "date:" in out
    assert re.search(r"^mlp\s+\d+\s+epsilon", out, re.M)
    assert re.search(r"^llama-2\s+\d+\s+epsilon", out, re.M)
    ratios = _ratios(out)
    assert ratios and all(math.isfinite(r) and r > 0 for r in ratios)
    assert md.read_text().startswith("## dynamiclrp benchmark")
    # the phase timers are removed again: the engine's classes are the originals
    import dynamiclrp.core.prepare as P
    import dynamiclrp.core.run as E
    assert E.Planner.__module__ == "dynamiclrp.core.plan" and P.GraphView.__module__ == "dynamiclrp.core.graph"


def test_peers_and_memory_on_the_mlp(bench):
    pytest.importorskip("zennit")
    pytest.importorskip("autolrp")
    import dynamiclrp
    import torch

    case = bench.M.build("mlp", quick=True)
    for preset in ("epsilon", "plus"):
        z = bench.P.zennit_for(case, preset)
        a = bench.P.autolrp_for(case, preset)
        assert not isinstance(z, str) and not isinstance(a, str)
        assert bench.P.check_runner(z) is None and bench.P.check_runner(a) is None
        # Zennit's composite is the same explanation as ours
        (ours,) = dynamiclrp.relevance(case.forward(), case.x, rules=bench.P.our_rules(case, preset))
        theirs = z.run(z.prepare())
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-6)
        z.close()
    params = bench.graph_params(case)
    base = bench.v_base(case, params)
    peak, level, above = bench.measure_memory(base)
    assert peak > 0 and level > 0 and above > 0
