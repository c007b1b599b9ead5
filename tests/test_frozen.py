"""Frozen models (parameters that do not require grad) are explained exactly like trainable ones.

Autograd then keeps neither the layers' inputs nor their biases; the Promise System rebuilds the inputs from
Arg Nodes, and the ε rule reads z on the support of the relevance it receives (through ReLUs and routing ops)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import dynamiclrp
from dynamiclrp import zoo

DT = torch.float64


def cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(5, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT)
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.2, 0.2)
        m[1].running_var.uniform_(0.5, 2)
        m[1].bias.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.mark.parametrize("rules", ["epsilon", "zero", "epsilon_plus", "epsilon_alpha2_beta1"])
def test_frozen_cnn_equals_trainable_cnn(rules: str) -> None:
    model = cnn()
    frozen = copy.deepcopy(model).requires_grad_(False)
    x = torch.randn(2, 3, 8, 8, dtype=DT, requires_grad=True)
    (ref,) = dynamiclrp.relevance(model(x)[:, 1], x, rules=rules)
    (got,) = dynamiclrp.relevance(frozen(x)[:, 1], x, rules=rules)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-13)
    ex = dynamiclrp.explain(frozen(x)[:, 1], x, rules=rules)
    assert not ex.ledger.unmeasured
    assert abs(ex.unaccounted) <= 1e-9 * abs(ex.ledger.seed_total)
    assert "constant" in ex.ledger.by_kind()  # the frozen biases


def test_frozen_transformer_equals_trainable_transformer() -> None:
    old = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        entry = zoo.build("bert", attn_implementation="sdpa")
        model = entry.model.double()
        frozen = copy.deepcopy(model).requires_grad_(False)
        ids = torch.randint(4, 100, (2, 7))
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        (ref,) = dynamiclrp.relevance(model(inputs_embeds=emb).logits[:, 0], emb)
        (got,) = dynamiclrp.relevance(frozen(inputs_embeds=emb).logits[:, 0], emb)
    finally:
        torch.set_default_dtype(old)
    assert torch.allclose(got, ref, rtol=1e-8, atol=1e-12)
