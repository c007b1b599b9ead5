"""Tiny random-weight transformers built from configs: explanations are finite, the ledger closes, and eager
and SDPA attention give the same relevance."""
from __future__ import annotations

import contextlib

import pytest
import torch

import dynamiclrp
from dynamiclrp.testing import zoo

MODELS = ["bert", "gpt2", "llama", "t5", "vit"]


@contextlib.contextmanager
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def explain(name: str, impl: str, rules: str = "epsilon"):
    with float64():
        entry = zoo.build(name, attn_implementation=impl)
        entry.model.double()
        outputs, inputs = entry.run()
    assert outputs.dtype == torch.float64
    ex = dynamiclrp.explain(outputs, inputs, rules=rules, model=entry.model)
    return entry, outputs, inputs, ex


@pytest.mark.parametrize("name", MODELS)
def test_eager_and_sdpa_agree_and_the_ledger_closes(name: str) -> None:
    results = {}
    for impl in ("eager", "sdpa"):
        entry, outputs, inputs, ex = explain(name, impl)
        r = ex.relevance[0]
        assert r.shape == inputs.shape and torch.isfinite(r).all()
        assert r.abs().sum() > 0
        seed = ex.ledger.seed_total
        assert abs(ex.unaccounted) <= 1e-6 * max(abs(seed), 1.0), ex.ledger.summary()
        assert not ex.ledger.unmeasured, ex.ledger.unmeasured
        results[impl] = r
    a, b = results["eager"], results["sdpa"]
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5


def test_llama_uses_grouped_query_attention() -> None:
    entry = zoo.build("llama")
    cfg = entry.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads


@pytest.mark.parametrize("rules", ["attnlrp", "cplrp", "zero"])
def test_other_presets_run_on_llama(rules: str) -> None:
    entry, outputs, inputs, ex = explain("llama", "sdpa", rules)
    assert torch.isfinite(ex.relevance[0]).all()
    assert abs(ex.unaccounted) <= 1e-6 * max(abs(ex.ledger.seed_total), 1.0)
    if rules == "cplrp":
        # CP-LRP is conservative by construction: no rule sink
        assert abs(ex.ledger.by_kind().get("rule", 0.0)) <= 1e-9 * abs(ex.ledger.seed_total)
