"""The ledger: every unit of seed relevance ends at a requested input or a named sink."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dynamiclrp
from dynamiclrp import presets
from dynamiclrp.testing import zoo

DT = torch.float64


def closes(ex, rel: float = 1e-6) -> None:
    seed = ex.ledger.seed_total
    assert not ex.ledger.unmeasured, ex.ledger.unmeasured
    assert abs(ex.unaccounted) <= rel * max(abs(seed), 1e-12), ex.ledger.summary()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                      nn.Flatten(), nn.Linear(24, 10), nn.ReLU(), nn.Linear(10, 4)).to(DT)
    with torch.no_grad():
        for mod in m:
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    return m.eval()


RULES = {
    "epsilon": "epsilon",
    "zero": "zero",
    "epsilon_plus": presets.epsilon_plus(),
    "epsilon_alpha2_beta1_flat": presets.epsilon_alpha2_beta1_flat(),
    "epsilon_gamma_box": presets.epsilon_gamma_box(-3.0, 3.0),
    "paper": "paper",
}


@pytest.mark.parametrize("rules", sorted(RULES))
def test_cnn_with_biases_and_batchnorm(rules: str) -> None:
    model = cnn()
    x = torch.randn(2, 3, 8, 8, dtype=DT, requires_grad=True)
    y = model(x)[:, 1]
    ex = dynamiclrp.explain(y, x, rules=RULES[rules], model=model)
    closes(ex)
    kinds = ex.ledger.by_kind()
    assert "bias" in kinds  # linear/conv biases and batch-norm shifts absorb relevance
    assert abs(ex.ledger.seed_total - float(y.detach().sum())) < 1e-12


def test_sinks_are_named_after_parameters_when_the_model_is_given() -> None:
    model = cnn()
    x = torch.randn(1, 3, 8, 8, dtype=DT, requires_grad=True)
    ex = dynamiclrp.explain(model(x)[:, 0], x, model=model)
    names = {s.where for s in ex.ledger.sinks if s.kind == "bias"}
    assert "9.bias" in names and "11.bias" in names
    text = ex.ledger.summary()
    assert "unaccounted" in text and "inputs[0]" in text


def test_requested_parameter_receives_its_bias_share() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(4, 3).to(DT)
    x = torch.randn(5, 4, dtype=DT, requires_grad=True)
    y = lin(x)[:, 2]
    ex = dynamiclrp.explain(y, [x, lin.bias], rules="zero")
    rx, rb = ex.relevance
    assert torch.allclose(rb, torch.tensor([0.0, 0.0, 5 * lin.bias[2].item()], dtype=DT))
    closes(ex)
    assert "inputs[1]" in ex.ledger.inputs and not any(s.kind == "bias" for s in ex.ledger.sinks)


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "unet", "lstm", "transformer_encoder"])
def test_zoo_models_close_the_ledger(name: str) -> None:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        entry = zoo.build(name)
        entry.model.double()
        outputs, inputs = entry.run()
    finally:
        torch.set_default_dtype(old)
    ex = dynamiclrp.explain(outputs, inputs, model=entry.model)
    assert torch.isfinite(ex.relevance[0]).all()
    closes(ex)


@pytest.mark.parametrize("name,rules", [("cnn_bn", "epsilon"), ("cnn_bn", "epsilon_plus"), ("bert", "epsilon"),
                                        ("llama", "attnlrp"), ("gpt2", "epsilon")])
def test_relevance_fast_paths_equal_the_ledger_paths(name: str, rules: str) -> None:
    """relevance() takes fast paths (ε in place on z read from saved tensors, dead messages skipped) that
    explain(..., ledger=True) does not; both give the same relevance."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        entry = zoo.build(name)
        entry.model.double()
        outputs, inputs = entry.run()
    finally:
        torch.set_default_dtype(old)
    (fast,) = dynamiclrp.relevance(outputs, inputs, rules=rules)
    slow = dynamiclrp.explain(outputs, inputs, rules=rules).relevance[0]
    assert torch.allclose(fast, slow, rtol=1e-9, atol=1e-12 * float(slow.abs().max()))


@pytest.mark.parametrize("rules", sorted(RULES))
def test_chunked_convolutions_give_the_same_relevance(monkeypatch, rules: str) -> None:
    """Large convolutions are processed in batch chunks (to bound temporaries); with a tiny threshold every
    convolution is chunked, on every path (ε, the non-negative γ/z⁺/α-β path, the general one, the ledger's),
    and nothing changes."""
    from dynamiclrp.rules import linear as library

    model = cnn()
    x = torch.randn(5, 3, 8, 8, dtype=DT, requires_grad=True)
    y = model(x)[:, 2]
    (whole,) = dynamiclrp.relevance(y, x, rules=RULES[rules])
    ex_whole = dynamiclrp.explain(y, x, rules=RULES[rules])
    monkeypatch.setattr(library, "_CHUNK_BYTES", 64)
    (chunked,) = dynamiclrp.relevance(y, x, rules=RULES[rules])
    ex_chunked = dynamiclrp.explain(y, x, rules=RULES[rules])
    assert torch.allclose(chunked, whole, rtol=1e-12, atol=1e-15)
    assert torch.allclose(ex_chunked.relevance[0], ex_whole.relevance[0], rtol=1e-12, atol=1e-15)
    assert abs(ex_chunked.unaccounted) <= 1e-9 * abs(ex_chunked.ledger.seed_total)
