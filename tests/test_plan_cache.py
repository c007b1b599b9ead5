"""Plans are cached by graph signature: reused for same-shaped graphs, never for different ones."""
from __future__ import annotations

import gc
import weakref

import torch
import torch.nn as nn

import dynamiclrp

DT = torch.float64


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3)).to(DT).eval()


def test_repeated_calls_hit_the_cache_and_equal_uncached_results() -> None:
    model = net()
    ex = dynamiclrp.Explainer("epsilon_plus")
    for k in range(4):
        x = torch.randn(2, 2, 6, 6, dtype=DT, requires_grad=True)
        y = model(x)[:, 1]
        (cached,) = ex.relevance(y, x)
        (fresh,) = dynamiclrp.relevance(y, x, rules="epsilon_plus")
        assert torch.equal(cached, fresh)
    info = ex.cache_info()
    assert info["misses"] == 1 and info["hits"] == 3 and info["plans"] == 1


def test_different_graphs_never_share_a_plan() -> None:
    model = net()
    ex = dynamiclrp.Explainer()
    x = torch.randn(2, 2, 6, 6, dtype=DT, requires_grad=True)
    ex.relevance(model(x)[:, 1], x)
    # another batch size, another output, a model in training mode, a frozen bias: all new plans
    x3 = torch.randn(3, 2, 6, 6, dtype=DT, requires_grad=True)
    (r3,) = ex.relevance(model(x3)[:, 1], x3)
    assert torch.equal(r3, dynamiclrp.relevance(model(x3)[:, 1], x3)[0])
    (r0,) = ex.relevance(model(x)[:, 0], x)
    assert torch.equal(r0, dynamiclrp.relevance(model(x)[:, 0], x)[0])
    model.train()
    yt = model(x)[:, 1]
    (rt,) = ex.relevance(yt, x)
    assert torch.equal(rt, dynamiclrp.relevance(yt, x)[0])
    model.eval()
    y2 = torch.relu(model[0](x)).sum((1, 2, 3)) + (x * 2).sum((1, 2, 3))
    (r2,) = ex.relevance(y2, x)
    assert torch.equal(r2, dynamiclrp.relevance(y2, x)[0])
    # [:, 0] and [:, 1] are the same graph (the index is read from the node when it runs): one plan serves both
    assert ex.cache_info()["misses"] == 4 and ex.cache_info()["hits"] == 1


def test_the_cache_keeps_no_graph_alive() -> None:
    model = net()
    ex = dynamiclrp.Explainer()
    x = torch.randn(2, 2, 6, 6, dtype=DT, requires_grad=True)
    h = model[0](x)                       # saved by the batch norm node, so the graph keeps it alive
    y = model[4](model[3](model[2](model[1](h))))[:, 1]
    ex.explain(y, x)
    ref = weakref.ref(h)
    del y, h
    gc.collect()
    assert ref() is None


def test_ledger_and_plain_calls_use_separate_plans() -> None:
    model = net()
    ex = dynamiclrp.Explainer()
    x = torch.randn(2, 2, 6, 6, dtype=DT, requires_grad=True)
    y = model(x)[:, 1]
    r_plain = ex.relevance(y, x)[0]
    e = ex.explain(y, x)
    assert torch.allclose(e.relevance[0], r_plain)
    assert abs(e.unaccounted) < 1e-10
    e2 = ex.explain(y, x)
    assert torch.equal(e2.relevance[0], e.relevance[0]) and ex.cache_info()["hits"] == 1
