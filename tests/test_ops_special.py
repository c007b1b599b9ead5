"""Rules for the node types added for architecture coverage (issue 4), one property per op.

Properties used throughout:

* **LRP-0 = gradient × input** on bias-free piecewise-linear graphs (routing ops, sum-like linear maps, PReLU):
  any other result would mean the op's rule is not the z-rule it claims to be.
* **conservation**, checked through the ledger (``unaccounted`` ≈ 0 and the sinks the rule is expected to have).
* **equality with a reference**: an explicit dense-matrix z-rule (interpolation, cumsum), Zennit-parity reference
  rules (grouped/depth-wise convolution), an independent float64 implementation of Arras et al. (2017) for the
  fused LSTM, or the same computation written with primitive ops (grouped matmul, BLOOM's GELU, SafeSoftmax,
  baddbmm).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dynamiclrp
from dynamiclrp import presets
from dynamiclrp.errors import UnsupportedOperationError
from dynamiclrp.rules import Gamma, Identity, OpSpec, Routing
from dynamiclrp.ops import UnaryKernel
from dynamiclrp.ops import REGISTRY
from dynamiclrp.ops.special import lstm_layer_forward

from reference import rules as ref

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, leaf: bool = True) -> torch.Tensor:
    t = torch.randn(*shape, generator=gen(seed), dtype=DT)
    return t.requires_grad_(True) if leaf else t


def grad_x_input(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    return g * x.detach()


def assert_lrp0_is_gxi(out: torch.Tensor, x: torch.Tensor, node_type: str | None = None,
                       unmeasurable: tuple[str, ...] = ()) -> dynamiclrp.Explanation:
    """LRP-0 equals gradient × input, and the ledger closes with nothing lost but constants' shares.

    ``unmeasurable`` names node types whose relevance totals the ledger may be unable to measure (their forward
    values are not in the graph, e.g. the outputs of in-place writes); every other node must be measured.
    """
    if node_type is not None:
        assert node_type in dynamiclrp.coverage(out).counts(), f"the graph has no {node_type} node"
    ex = dynamiclrp.explain(out, x, rules="zero")
    torch.testing.assert_close(ex.relevance[0], grad_x_input(out, x), rtol=1e-9, atol=1e-10)
    assert abs(ex.unaccounted) <= 1e-9 * (1 + abs(ex.ledger.seed_total))
    assert all(any(m.startswith(t) for t in unmeasurable) for m in ex.ledger.unmeasured), ex.ledger.unmeasured
    return ex


def closes(ex: dynamiclrp.Explanation, tol: float = 1e-9) -> None:
    L = ex.ledger
    scale = abs(L.seed_total) + sum(abs(s.total) for s in L.sinks) + 1e-12
    assert abs(ex.unaccounted) <= tol * scale, L.summary()
    assert not L.unmeasured, L.unmeasured


# ---------------------------------------------------------------------------------------------------------
# The registry covers the census
# ---------------------------------------------------------------------------------------------------------
def test_every_census_node_type_has_a_registry_row():
    census = json.loads((ROOT / "docs/dev/node_census.json").read_text())
    names = [t.split(" (custom")[0] for t in census["node_types"]]
    assert len(names) >= 60
    missing = [t for t in names if t not in REGISTRY]
    assert not missing, missing


# ---------------------------------------------------------------------------------------------------------
# Routing ops: LRP-0 on bias-free piecewise-linear graphs is gradient × input
# ---------------------------------------------------------------------------------------------------------
# parameters (as in a model): autograd saves the activations the linear rules need
W1 = nn.Parameter(randn(6, 8, seed=1, leaf=False))
W2 = nn.Parameter(randn(8, 5, seed=2, leaf=False))


def hidden(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ W1)  # (B, 8)


def head(h: torch.Tensor) -> torch.Tensor:
    return torch.relu(h.reshape(h.shape[0], -1)[:, :8] @ W2).sum(1)


ROUTING_CASES = {
    "UnsafeSplitBackward0": lambda h: torch.cat(torch.ops.aten.unsafe_split(h, 3, 1)[::-1], 1),
    "UnsafeSplitWithSizesBackward0": lambda h: torch.cat(torch.ops.aten.unsafe_split_with_sizes(h, [2, 6], 1)[::-1], 1),
    "TopkBackward0": lambda h: torch.cat([torch.topk(h, 5, dim=1).values, h[:, :3]], 1),
    "SortBackward0": lambda h: torch.sort(h, dim=1, descending=True).values,
    "KthvalueBackward0": lambda h: torch.cat([torch.kthvalue(h, 3, dim=1, keepdim=True).values, h[:, 1:]], 1),
    "AsStridedBackward0": lambda h: h.as_strided((h.shape[0], 4, 2), (8, 1, 4)).flatten(1),
    "AsStridedBackward1": lambda h: nn.AdaptiveAvgPool1d(1)(h.reshape(-1, 2, 4).transpose(1, 2)).reshape(-1, 8),
    "WhereBackward0": lambda h: torch.where(torch.arange(8) % 3 == 0, h, h.flip(1)),
    "IndexBackward0": lambda h: h[:, torch.tensor([3, 1, 1, 7, 0, 2, 5, 4])],
    "IndexPutBackward0": lambda h: torch.index_put(h, (torch.tensor([0, 1]), torch.tensor([2, 5])), h[:, 0] * 3),
    "ScatterBackward0": lambda h: torch.scatter(h, 1, torch.tensor([[1, 4], [0, 6]]), h[:, 2:4]),
    "ScatterBackward1": lambda h: torch.scatter(h, 1, torch.tensor([[1, 4], [0, 6]]), 0.0),
    "ScatterAddBackward0": lambda h: torch.scatter_add(h, 1, torch.tensor([[1, 4], [0, 4]]), h[:, 2:4]),
    "IndexAddBackward0": lambda h: torch.index_add(h, 1, torch.tensor([1, 1, 6]), h[:, 3:6]),
    "MaskedFillBackward0": lambda h: h.masked_fill(torch.arange(8) % 2 == 0, 0.0),
    "GatherBackward0": lambda h: torch.gather(h, 1, torch.tensor([[7, 0, 0, 3, 1, 2, 5, 6]] * 2)),
}


@pytest.mark.parametrize("node_type", sorted(ROUTING_CASES))
def test_routing_op_lrp0_equals_gradient_times_input(node_type):
    x = randn(2, 6)
    out = head(ROUTING_CASES[node_type](hidden(x)))
    assert_lrp0_is_gxi(out, x, node_type)


@pytest.mark.parametrize("write", ["copy", "add", "scale", "relu"])
def test_copy_slices_of_linear_writes_route_like_gradient(write):
    x = randn(2, 6)
    h = hidden(x)
    y = h.clone()
    if write == "copy":
        y[:, :3] = h[:, 5:]
    elif write == "add":
        y[:, 2:5] += h[:, :3]
    elif write == "scale":
        y[:, 1:4] *= 0.5
    else:
        y[:, :4] -= 1.0
        y[:, :4].relu_()
    # ``y[i] op= t`` is an in-place op on the view followed by a copy back: two CopySlices nodes whose outputs
    # (the modified base) autograd does not keep; their totals are known only together (ledger Joint) until the
    # paths from the base meet again, so every node is measured
    ex = assert_lrp0_is_gxi(head(y), x, "CopySlices")
    assert ex.relevance[0].abs().sum() > 0


def test_copy_slices_of_a_nonlinear_inplace_op_is_refused_and_reported():
    x = randn(2, 6)
    y = hidden(x).clone()
    y[:, :4].sigmoid_()
    out = head(y)
    with pytest.raises(UnsupportedOperationError, match="CopySlices.*data-dependent"):
        dynamiclrp.relevance(out, x)
    report = dynamiclrp.coverage(out)
    (row,) = report.uncovered
    assert row.node_type == "CopySlices" and "with_ops" in row.note
    # the documented escape hatch: a rule registered for the node type
    rules = presets.epsilon().with_ops({"CopySlices": dynamiclrp.rules.Gradient()})
    assert dynamiclrp.coverage(out, rules).ok
    assert torch.isfinite(dynamiclrp.relevance(out, x, rules=rules)[0]).all()


def test_index_replay_with_unindexed_leading_dims_recovers_the_forward_value():
    # x[:, idx] saves indices (None, idx): the None is a full slice, not a new axis (found on Falcon's RoPE)
    x = randn(2, 3, 5)
    h = x * 2
    t = h[:, :, torch.tensor([4, 0, 2])]
    out = (t * randn(1, 1, 3, seed=3, leaf=False)).sum((1, 2))
    from dynamiclrp.testing.recover import recover_all

    found = {(id(node), nr): v for node, nr, _, v in recover_all(out, (x,))}
    torch.testing.assert_close(found[(id(t.grad_fn), 0)], t.detach())


def test_as_strided_replay_is_exact_or_declared_unavailable():
    from dynamiclrp.errors import ValueUnavailableError
    from dynamiclrp.ops.routing import replay_as_strided

    x = randn(2, 8)
    h = x * 3
    ht = (x * 3).t()  # a non-contiguous input: as_strided reads its storage, not its logical order
    cases = [h.as_strided((2, 2, 4), (8, 4, 1)), h.as_strided((2, 4, 2), (8, 1, 4)), h.as_strided((3, 2), (1, 5), 2),
             ht.as_strided((4, 4), (1, 4))]
    for t, inp in zip(cases, (h, h, h, ht)):
        torch.testing.assert_close(replay_as_strided(t.grad_fn, [inp.detach()], 0), t.detach())
    windows = h.as_strided((2, 3, 4), (8, 2, 1))  # overlapping sliding windows
    with pytest.raises(ValueUnavailableError, match="overlapping"):
        replay_as_strided(windows.grad_fn, [h.detach()], 0)


# ---------------------------------------------------------------------------------------------------------
# Linear maps with constant weights: the sum rule, against an explicit dense matrix
# ---------------------------------------------------------------------------------------------------------
def dense_z_rule(fn, x: torch.Tensor, R: torch.Tensor, eps: float) -> torch.Tensor:
    """z-rule of the linear map ``fn`` (no bias) from its dense matrix, per sample, float64."""
    xs = x.detach().reshape(x.shape[0], -1)
    n = xs.shape[1]
    basis = torch.eye(n, dtype=DT).reshape(n, *x.shape[1:])
    M = fn(basis).reshape(n, -1).T  # (n_out, n_in)
    out = []
    for s in range(x.shape[0]):
        Z = M * xs[s][None, :]
        z = Z.sum(1)
        den = ref.stabilize(z, eps) if eps else z
        q = torch.where(den == 0, torch.zeros_like(den), R[s].reshape(-1) / torch.where(den == 0, 1, den))
        out.append((Z * q[:, None]).sum(0))
    return torch.stack(out).reshape(x.shape)


INTERPOLATIONS = {
    "UpsampleBilinear2DBackward0": (lambda t: F.interpolate(t, scale_factor=2, mode="bilinear"), (2, 2, 3, 3)),
    "UpsampleBicubic2DBackward0": (lambda t: F.interpolate(t, size=(5, 4), mode="bicubic", align_corners=True),
                                   (2, 2, 3, 3)),
    "UpsampleLinear1DBackward0": (lambda t: F.interpolate(t, scale_factor=1.5, mode="linear"), (2, 2, 4)),
    "UpsampleTrilinear3DBackward0": (lambda t: F.interpolate(t, scale_factor=2, mode="trilinear"), (2, 1, 2, 2, 2)),
    "UpsampleBilinear2DAaBackward0": (lambda t: F.interpolate(t, size=(2, 2), mode="bilinear", antialias=True),
                                      (2, 2, 5, 5)),
    "UpsampleBicubic2DAaBackward0": (lambda t: F.interpolate(t, size=(3, 2), mode="bicubic", antialias=True),
                                     (2, 2, 5, 5)),
    "CumsumBackward0": (lambda t: torch.cumsum(t, dim=-1), (2, 3, 4)),
}


@pytest.mark.parametrize("node_type", sorted(INTERPOLATIONS))
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_interpolation_and_cumsum_follow_the_dense_z_rule(node_type, eps):
    fn, shape = INTERPOLATIONS[node_type]
    x = randn(*shape, seed=4)
    y = fn(x)
    R = torch.randn(y.shape, generator=gen(5), dtype=DT)
    fam = "reduce" if node_type == "CumsumBackward0" else "pool"
    rules = presets.zero().with_families(**{fam: dynamiclrp.rules.Epsilon(eps)})
    assert dynamiclrp.coverage(y, rules).counts().get(node_type) == 1
    got = dynamiclrp.explain(y, x, R, rules=rules)
    torch.testing.assert_close(got.relevance[0], dense_z_rule(fn, x, R, eps), rtol=1e-9, atol=1e-12)
    closes(got)
    if eps == 0:
        # the sum rule is exactly conservative: every unit of relevance reaches the input
        torch.testing.assert_close(got.relevance[0].sum(), R.sum())


def test_unet_style_upsampling_lrp0_equals_gradient_times_input():
    x = randn(2, 2, 4, 4, seed=6)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
    out = torch.relu(conv(up(torch.relu(conv.weight.new_ones(1) * x)))).mean((1, 2, 3))
    assert_lrp0_is_gxi(out, x, "UpsampleBilinear2DBackward0")


# ---------------------------------------------------------------------------------------------------------
# Grouped and depth-wise convolutions: the linear rules match the explicit reference
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("rule", ["epsilon", "zplus", "gamma"])
def test_grouped_and_depthwise_conv_match_reference_rules(groups, rule):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4 if groups == 4 else 6, 3, padding=1, groups=groups).double()  # groups=4: depth-wise
    x = randn(2, 4, 5, 5, seed=7)
    y = conv(x)
    R = torch.randn(y.shape, generator=gen(8), dtype=DT)
    w, b, op = ref.from_module(conv)
    rule_obj, expected = {
        "epsilon": (dynamiclrp.rules.Epsilon(1e-3), ref.epsilon(w, b, op, x.detach(), R, epsilon=1e-3)),
        "zplus": (dynamiclrp.rules.ZPlus(1e-6), ref.zplus(w, b, op, x.detach(), R, stabilizer=1e-6)),
        "gamma": (Gamma(0.25, 1e-6), ref.gamma(w, b, op, x.detach(), R, gamma=0.25, stabilizer=1e-6)),
    }[rule]
    rules = presets.epsilon().with_families(conv=rule_obj)
    (got,) = dynamiclrp.relevance(y, x, R, rules=rules)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# MoE: grouped matmul (Mixtral's default experts), top-k routing, sort/index dispatch
# ---------------------------------------------------------------------------------------------------------
def _grouped(x, w, offs):
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)


def _looped(x, w, offs):
    parts, start = [], 0
    for g, end in enumerate(offs.tolist()):
        parts.append(x[start:end] @ w[g].T)
        start = end
    return torch.cat(parts)


def test_grouped_mm_kernel_matches_the_node():
    torch.manual_seed(0)
    x = torch.randn(7, 8, requires_grad=True)
    w = nn.Parameter(torch.randn(3, 4, 8))
    offs = torch.tensor([3, 3, 7], dtype=torch.int32)
    y = _grouped(x, w, offs)
    node = y.grad_fn
    k = REGISTRY["GroupedMmBackward0"].kernel
    a, b = node._saved_self, node._saved_mat2
    torch.testing.assert_close(k.f(node, a, b), y.detach())
    s = torch.randn(7, 4)
    gx, gw = node(s)
    torch.testing.assert_close(k.f_t(node, 0, a, b, s), gx)
    torch.testing.assert_close(k.f_t(node, 1, a, b, s), gw)


@pytest.mark.parametrize("rules", ["epsilon", "zero", "gamma"])
def test_grouped_mm_equals_the_per_expert_loop(rules):
    torch.manual_seed(0)
    x0 = torch.randn(9, 8)
    w = nn.Parameter(torch.randn(3, 8, 8))
    w2 = nn.Parameter(torch.randn(3, 4, 8))
    offs = torch.tensor([2, 6, 9], dtype=torch.int32)
    rule_set = presets.epsilon().with_families(linear=Gamma(0.25)) if rules == "gamma" else rules
    got = []
    for fn in (_grouped, _looped):
        x = x0.clone().requires_grad_(True)
        out = fn(torch.relu(fn(x, w, offs)), w2, offs).sum(1)
        if fn is _grouped:
            assert dynamiclrp.coverage(out, rule_set).counts()["GroupedMmBackward0"] == 2
        ex = dynamiclrp.explain(out, x, rules=rule_set)
        closes(ex, 1e-5)
        got.append(ex.relevance[0])
    torch.testing.assert_close(got[0], got[1], rtol=1e-4, atol=1e-5)


def test_transformers_grouped_mm_fallback_equals_the_native_grouped_mm():
    pytest.importorskip("transformers")
    import transformers.integrations.moe  # noqa: F401  registers torch.ops.transformers.grouped_mm_fallback

    torch.manual_seed(0)
    x0 = torch.randn(9, 8)
    w = nn.Parameter(torch.randn(3, 8, 8))
    offs = torch.tensor([2, 6, 9], dtype=torch.int32)
    got = []
    for fn in (lambda a, b, o: torch.ops.transformers.grouped_mm_fallback(a, b.transpose(-2, -1), o), _grouped):
        x = x0.clone().requires_grad_(True)
        out = fn(torch.relu(fn(x, w, offs)), w, offs).sum(1)
        assert dynamiclrp.coverage(out).ok
        ex = dynamiclrp.explain(out, x)
        closes(ex, 1e-5)
        got.append(ex.relevance[0])
    torch.testing.assert_close(got[0], got[1], rtol=1e-4, atol=1e-5)


class TinyMoE(nn.Module):
    """Mixtral's sparse block written like transformers' grouped_mm experts: router softmax, top-k, renormalise,
    sort tokens by expert, grouped matmuls, weight and combine."""

    def __init__(self, d=8, f=16, experts=4, k=2, act=F.silu, detach_router=False):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, f, d) / d ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, d, f) / f ** 0.5)
        self.k, self.act, self.detach_router = k, act, detach_router

    def forward(self, x):
        T, d = x.shape
        probs = torch.softmax(self.router(x), -1)
        top_w, top_i = torch.topk(probs, self.k, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        if self.detach_router:
            top_w = top_w.detach()
        ids, perm = torch.sort(top_i.reshape(-1))
        xs = x[perm // self.k]
        offs = torch.cumsum(torch.bincount(ids, minlength=self.up.shape[0]), 0).to(torch.int32)
        h = self.act(_grouped(xs, self.up, offs))
        y = _grouped(h, self.down, offs) * top_w.reshape(-1)[perm][:, None]
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        return y[inv].reshape(T, self.k, d).sum(1)


def test_moe_block_with_constant_routing_weights_lrp0_is_gradient_times_input():
    torch.manual_seed(0)
    moe = TinyMoE(act=torch.relu, detach_router=True)
    x = torch.randn(6, 8, requires_grad=True)
    out = moe(x).sum(1)
    counts = dynamiclrp.coverage(out).counts()
    for t in ("GroupedMmBackward0", "IndexBackward0"):
        assert t in counts
    ex = dynamiclrp.explain(out, x, rules="zero")
    torch.testing.assert_close(ex.relevance[0], grad_x_input(out, x), rtol=1e-4, atol=1e-6)
    closes(ex, 1e-5)


@pytest.mark.parametrize("rules", ["epsilon", "attnlrp", "cplrp"])
def test_moe_block_with_learned_routing_closes_the_ledger(rules):
    torch.manual_seed(1)
    moe = TinyMoE()
    x = torch.randn(6, 8, requires_grad=True)
    out = moe(x).sum(1)
    report = dynamiclrp.coverage(out, rules)
    assert report.ok and "TopkBackward0" in report.counts() and "SortBackward0" not in report.counts()
    ex = dynamiclrp.explain(out, x, rules=rules, model=moe)
    assert torch.isfinite(ex.relevance[0]).all()
    closes(ex, 1e-5)


# ---------------------------------------------------------------------------------------------------------
# Element-wise ops: PReLU, hardswish/hardsigmoid, softplus/exp (identity rule), BLOOM's custom GELU
# ---------------------------------------------------------------------------------------------------------
def test_prelu_lrp0_equals_gradient_times_input():
    x = randn(2, 3, 4, 4, seed=9)
    conv = nn.Conv2d(3, 4, 3, bias=False).double()
    prelu = nn.PReLU(4, init=0.3).double()
    out = nn.Conv2d(4, 2, 2, bias=False).double()(prelu(conv(x))).sum((1, 2, 3))
    ex = assert_lrp0_is_gxi(out, x, "PreluKernelBackward0")
    # scalar slope too
    out2 = (nn.PReLU(init=0.1).double()(conv(x)) * 2).sum((1, 2, 3))
    assert_lrp0_is_gxi(out2, x, "PreluKernelBackward0")
    assert ex.relevance[0].abs().sum() > 0


@pytest.mark.parametrize("fn,node_type", [(F.hardswish, "HardswishBackward0"), (F.hardsigmoid, "HardsigmoidBackward0"),
                                          (F.softplus, "SoftplusBackward0"), (torch.exp, "ExpBackward0"),
                                          (F.prelu, "PreluKernelBackward0")])
def test_identity_rule_passes_relevance_unchanged(fn, node_type):
    # R_x = R_y: with y scaled by a constant, the relevance of x is exactly y * c
    x = randn(3, 7, seed=10)
    with torch.no_grad():
        x[0, 0] = 0.0  # the identity rule cannot pass relevance through x == 0 where f(0) != 0: booked as a sink
    c = randn(1, 7, seed=11, leaf=False)
    y = fn(x, torch.tensor([0.25], dtype=DT)) if fn is F.prelu else fn(x)
    out = (y * c).sum(1)
    assert dynamiclrp.coverage(out).counts()[node_type] == 1
    ex = dynamiclrp.explain(out, x)
    expected = (y * c).detach().clone()
    if float(fn(torch.zeros(1, dtype=DT), *( (torch.tensor([0.25], dtype=DT),) if fn is F.prelu else ()))) != 0:
        expected[0, 0] = 0.0
    torch.testing.assert_close(ex.relevance[0], expected)
    closes(ex)


def test_hardsigmoid_gate_of_squeeze_excitation_gives_the_signal_everything():
    # MobileNetV3's SE block: x * hardsigmoid(fc(pool(x))): the gate is multiplicative, the signal takes all
    x = randn(2, 4, 3, 3, seed=12)
    fc = nn.Conv2d(4, 4, 1).double()

    def se(t, detach):
        g = F.hardsigmoid(fc(t.mean((2, 3), keepdim=True)))
        return t * (g.detach() if detach else g)

    out = se(x, False).sum((1, 2, 3))
    ref_out = se(x, True).sum((1, 2, 3))
    torch.testing.assert_close(dynamiclrp.relevance(out, x)[0], dynamiclrp.relevance(ref_out, x)[0])


def test_bloom_gelu_function_equals_tanh_gelu():
    pytest.importorskip("transformers")
    from transformers.models.bloom.modeling_bloom import GeLUFunction

    x = randn(3, 6, seed=13)
    W = randn(6, 6, seed=14, leaf=False)
    out = (GeLUFunction.apply(x @ W) @ W).sum(1)
    ref_out = (F.gelu(x @ W, approximate="tanh") @ W).sum(1)
    report = dynamiclrp.coverage(out)
    assert report.ok and report.counts()["GeLUFunctionBackward"] == 1
    ex = dynamiclrp.explain(out, x)
    torch.testing.assert_close(ex.relevance[0], dynamiclrp.relevance(ref_out, x)[0], rtol=1e-6, atol=1e-8)
    closes(ex)


class GeLUFunction(torch.autograd.Function):
    """A user Function that happens to share BLOOM's class name (but not its semantics)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def test_known_custom_function_row_checks_the_function_class():
    x = randn(2, 3)
    out = GeLUFunction.apply(x).sum(1)
    with pytest.raises(UnsupportedOperationError, match=r"GeLUFunction.*test_ops_special\.GeLUFunction"):
        dynamiclrp.relevance(out, x)
    assert not dynamiclrp.coverage(out).ok


# ---------------------------------------------------------------------------------------------------------
# Custom autograd Functions: a clear error, and the two documented ways to register a rule
# ---------------------------------------------------------------------------------------------------------
class Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.flip(-1)

    @staticmethod
    def backward(ctx, g):
        return g.flip(-1)


class MySilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * (s + x * s * (1 - s))


def test_unknown_custom_function_raises_a_clear_error():
    x = randn(2, 6)
    out = head(Reverse.apply(hidden(x)))
    with pytest.raises(UnsupportedOperationError) as info:
        dynamiclrp.relevance(out, x)
    msg = str(info.value)
    assert "ReverseBackward" in msg and "test_ops_special.Reverse" in msg and "with_ops" in msg
    report = dynamiclrp.coverage(out)
    assert not report.ok and report.uncovered[0].node_type == "ReverseBackward"
    assert report.share == pytest.approx((report.total - 1) / report.total)


def test_custom_function_registered_with_a_rule():
    x = randn(2, 6)
    out = head(Reverse.apply(hidden(x)))
    rules = presets.zero().with_ops({"ReverseBackward": Routing()})
    assert dynamiclrp.coverage(out, rules).ok
    torch.testing.assert_close(dynamiclrp.relevance(out, x, rules=rules)[0], grad_x_input(out, x))


def test_custom_function_registered_with_an_opspec_reading_ctx_saved_tensors():
    x = randn(3, 6, seed=15)
    W = randn(6, 6, seed=16, leaf=False)
    out = (MySilu.apply(x @ W) @ W).sum(1)
    kernel = UnaryKernel(lambda node, t: t * torch.sigmoid(t), x_field="saved_tensors.0")
    spec = OpSpec("activation", kernel, inputs_saved=((0, "saved_tensors.0"),), rebuild=kernel.rebuild,
                  replay=kernel.replay)
    rules = presets.epsilon().with_ops({"MySiluBackward": (spec, Identity())})
    ex = dynamiclrp.explain(out, x, rules=rules)
    expected = dynamiclrp.relevance((F.silu(x @ W) @ W).sum(1), x)[0]
    torch.testing.assert_close(ex.relevance[0], expected, rtol=1e-6, atol=1e-9)
    closes(ex)


# ---------------------------------------------------------------------------------------------------------
# Weight normalisation
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [0, 2])
def test_weight_norm_sends_all_relevance_to_the_direction(dim):
    v = randn(4, 3, 5, seed=17)
    g = torch.randn(*[s if k == dim else 1 for k, s in enumerate(v.shape)], generator=gen(18), dtype=DT)
    g.requires_grad_(True)
    w = torch._weight_norm(v, g, dim)
    c = randn(*v.shape, seed=19, leaf=False)
    out = (w * c).sum().reshape(1)
    assert dynamiclrp.coverage(out).counts()["WeightNormInterfaceBackward0"] == 1
    ex = dynamiclrp.explain(out, (v, g))
    torch.testing.assert_close(ex.relevance[0], (w * c).detach())  # R_v = R_w
    assert torch.count_nonzero(ex.relevance[1]) == 0  # the magnitude g gets nothing
    closes(ex)


def test_weight_normed_conv_model_is_covered_and_closes():
    torch.manual_seed(0)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(3, 4, 3, padding=1), dim=2).double()
    x = randn(2, 3, 6, seed=20)
    out = F.gelu(conv(x)).mean((1, 2))
    report = dynamiclrp.coverage(out)
    assert report.ok and "WeightNormInterfaceBackward0" in report.counts()
    ex = dynamiclrp.explain(out, x)
    closes(ex)


# ---------------------------------------------------------------------------------------------------------
# Fused LSTM (MkldnnRnnLayerBackward0)
# ---------------------------------------------------------------------------------------------------------
def _fused_lstm(bidirectional=False, layers=1, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.LSTM(3, 4, num_layers=layers, bias=bias, bidirectional=bidirectional)


def _mkldnn_available(lstm, x) -> bool:
    out, _ = lstm(x)
    return "MkldnnRnnLayerBackward0" in dynamiclrp.coverage(out.sum((0, 2))).counts()


@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_re_expression_reproduces_the_fused_layer(reverse):
    lstm = _fused_lstm(bidirectional=True)
    x = torch.randn(5, 2, 3)
    h0, c0 = torch.randn(2, 2, 4), torch.randn(2, 2, 4)
    out, (h, c) = lstm(x, (h0, c0))
    k = 1 if reverse else 0
    sfx = "_reverse" if reverse else ""
    W = torch.cat([getattr(lstm, "weight_ih_l0" + sfx), getattr(lstm, "weight_hh_l0" + sfx)], 1).detach()
    b = (getattr(lstm, "bias_ih_l0" + sfx) + getattr(lstm, "bias_hh_l0" + sfx)).detach()
    o, hT, cT = lstm_layer_forward(x, h0[k], c0[k], W, b, reverse=reverse)
    torch.testing.assert_close(o, out[..., 4 * k:4 * k + 4].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hT, h[k].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cT, c[k].detach(), rtol=1e-5, atol=1e-6)


def arras_lstm_lrp(x, W, b, R_h_last, eps):
    """Independent float64 LRP for one LSTM layer (Arras et al. 2017): ε on the gate pre-activation (one
    denominator over input, recurrent and bias terms, bias a sink), the signal takes all the relevance of a
    gated product, the sum rule on ``c = f·c + i·g``, identity on tanh. Returns the relevance of ``x``."""
    x, W, b = x.double(), W.double(), b.double()
    T, B, I = x.shape
    H = W.shape[0] // 4
    h = torch.zeros(B, H, dtype=DT)
    c = torch.zeros(B, H, dtype=DT)
    cache = []
    for t in range(T):
        inp = torch.cat([x[t], h], 1)
        z = inp @ W.T + b
        i, f, g, o = z.split(H, 1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_prev = c
        c = f * c_prev + i * g
        h = o * torch.tanh(c)
        cache.append((inp, z, f * c_prev, i * g, c))
    R_x = torch.zeros_like(x)
    R_h = R_h_last.double()
    R_c = torch.zeros(B, H, dtype=DT)
    for t in range(T - 1, -1, -1):
        inp, z, fc, ig, c_t = cache[t]
        R_c = R_c + R_h  # h = o * tanh(c): all to tanh(c), identity through tanh
        q = torch.where(c_t == 0, torch.zeros_like(c_t), R_c / torch.where(c_t == 0, 1, c_t))
        R_cprev, R_g = fc * q, ig * q  # sum rule; i * g: all to g; tanh: identity
        R_z = torch.zeros_like(z)
        R_z[:, 2 * H:3 * H] = R_g
        den = ref.stabilize(z, eps)
        R_inp = inp * ((R_z / den) @ W)  # ε rule over [x_t, h_{t-1}]
        R_x[t] = R_inp[:, :I]
        R_h, R_c = R_inp[:, I:], R_cprev
    return R_x


@pytest.mark.parametrize("eps", [1e-6, 0.05])
def test_fused_lstm_matches_the_arras_reference(eps):
    lstm = _fused_lstm(seed=3)
    x = torch.randn(6, 2, 3, requires_grad=True)
    if not _mkldnn_available(lstm, x):
        pytest.skip("nn.LSTM is not fused by oneDNN on this machine")
    out, (h, _) = lstm(x)
    seed = h[0].detach().clone()
    rules = presets.epsilon(eps)
    ex = dynamiclrp.explain(h[0], x, seed, rules=rules)
    W = torch.cat([lstm.weight_ih_l0, lstm.weight_hh_l0], 1).detach()
    b = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach()
    expected = arras_lstm_lrp(x.detach(), W, b, seed, eps)
    torch.testing.assert_close(ex.relevance[0].double(), expected, rtol=2e-4, atol=1e-6)
    closes(ex, 1e-5)
    kinds = ex.ledger.by_kind()
    assert kinds.get("bias", 0) != 0  # the bias share reaches the two bias parameters
    names = {s.where for s in ex.ledger.sinks if s.kind == "bias"}
    assert any("AccumulateGrad" in n or "bias" in n for n in names)


@pytest.mark.parametrize("rules", ["epsilon", "zero", "attnlrp", "cplrp", "epsilon_plus"])
def test_fused_lstm_equals_the_same_layers_written_with_primitive_ops(rules):
    lstm = _fused_lstm(bidirectional=True, layers=2, seed=4)
    x = torch.randn(5, 2, 3, requires_grad=True)
    if not _mkldnn_available(lstm, x):
        pytest.skip("nn.LSTM is not fused by oneDNN on this machine")
    out, _ = lstm(x)
    y = out[-1].sum(1)
    assert dynamiclrp.coverage(y, rules).counts()["MkldnnRnnLayerBackward0"] == 4
    ex = dynamiclrp.explain(y, x, rules=rules)
    closes(ex, 1e-5)
    # the same network with explicit ops: a layer's input is the concatenation of both directions below
    x2 = x.detach().clone().requires_grad_(True)
    inp = x2
    for layer in range(2):
        outs = []
        for sfx, rev in (("", False), ("_reverse", True)):
            p = {n: getattr(lstm, f"{n}_l{layer}{sfx}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            W = nn.Parameter(torch.cat([p["weight_ih"], p["weight_hh"]], 1).detach())
            b = nn.Parameter((p["bias_ih"] + p["bias_hh"]).detach())
            zeros = torch.zeros(2, 4)
            outs.append(lstm_layer_forward(inp, zeros, zeros, W, b, reverse=rev)[0])
        inp = torch.cat(outs, -1)
    y2 = inp[-1].sum(1)
    torch.testing.assert_close(y2, y.detach(), rtol=1e-5, atol=1e-6)
    expected = dynamiclrp.relevance(y2, x2, rules=rules)[0]
    torch.testing.assert_close(ex.relevance[0], expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("rules", ["zero", "epsilon", "epsilon_plus"])
def test_fused_lstm_relevance_of_every_parameter_equals_the_explicit_ops(rules):
    """Each tensor's relevance, not only their sum: input, initial states, both weights and both biases of both
    directions. The explicit reference keeps ``b_ih`` and ``b_hh`` separate leaves added in the graph, so the sum
    rule splits the bias relevance between them (``b_ih / (b_ih + b_hh)``), and ``W_ih``/``W_hh`` concatenated."""
    lstm = _fused_lstm(bidirectional=True, seed=7)  # oneDNN fuses float32 layers
    x = torch.randn(5, 2, 3, requires_grad=True)
    h0 = torch.randn(2, 2, 4, requires_grad=True)
    c0 = torch.randn(2, 2, 4, requires_grad=True)
    if not _mkldnn_available(lstm, x):
        pytest.skip("nn.LSTM is not fused by oneDNN on this machine")
    out, _ = lstm(x, (h0, c0))
    y = out[-1].sum(1)
    names = [f"{n}_l0{sfx}" for sfx in ("", "_reverse") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    params = [getattr(lstm, n) for n in names]
    got = dynamiclrp.relevance(y, (x, h0, c0, *params), rules=rules)
    # the same layer with explicit ops, each parameter its own leaf
    x2, h2, c2 = (t.detach().clone().requires_grad_(True) for t in (x, h0, c0))
    leaves = [nn.Parameter(p.detach().clone()) for p in params]
    outs = []
    for k, rev in ((0, False), (1, True)):
        w_ih, w_hh, b_ih, b_hh = leaves[4 * k:4 * k + 4]
        outs.append(lstm_layer_forward(x2, h2[k], c2[k], torch.cat([w_ih, w_hh], 1), b_ih + b_hh, reverse=rev)[0])
    y2 = torch.cat(outs, -1)[-1].sum(1)
    torch.testing.assert_close(y2, y.detach(), rtol=1e-5, atol=1e-6)
    expected = dynamiclrp.relevance(y2, (x2, h2, c2, *leaves), rules=rules)
    for name, a, b in zip(["x", "h0", "c0", *names], got, expected):  # float32: the fused kernel's rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    for k in (0, 1):  # the bias relevance is real and split unevenly: a half/half split would not pass
        r_ih, r_hh = got[3 + 4 * k + 2], got[3 + 4 * k + 3]
        assert r_ih.abs().sum() > 0 and r_hh.abs().sum() > 0
        assert not torch.allclose(r_ih, r_hh)


def test_bias_free_lstm_under_lrp0_is_conservative():
    lstm = _fused_lstm(bias=False, seed=5)
    x = torch.randn(4, 3, 3, requires_grad=True)
    if not _mkldnn_available(lstm, x):
        pytest.skip("nn.LSTM is not fused by oneDNN on this machine")
    out, (h, c) = lstm(x)
    y = h[0].sum(1) + c[0].sum(1)  # seeds both final states
    ex = dynamiclrp.explain(y, x, rules="zero")
    torch.testing.assert_close(ex.relevance[0].sum(), y.detach().sum(), rtol=1e-5, atol=1e-6)
    closes(ex, 1e-5)


def test_lstm_initial_states_receive_relevance_when_requested():
    lstm = _fused_lstm(seed=6)
    x = torch.randn(4, 2, 3, requires_grad=True)
    h0 = torch.randn(1, 2, 4, requires_grad=True)
    c0 = torch.randn(1, 2, 4, requires_grad=True)
    if not _mkldnn_available(lstm, x):
        pytest.skip("nn.LSTM is not fused by oneDNN on this machine")
    out, _ = lstm(x, (h0, c0))
    y = out[-1].sum(1)
    ex = dynamiclrp.explain(y, (x, h0, c0), rules="zero")
    assert ex.relevance[1].abs().sum() > 0 and ex.relevance[2].abs().sum() > 0
    closes(ex, 1e-5)
    # the same states as constants: their share is booked as a 'constant' sink
    out, _ = lstm(x, (h0.detach(), c0.detach()))
    ex2 = dynamiclrp.explain(out[-1].sum(1), x, rules="zero")
    closes(ex2, 1e-5)
    assert ex2.ledger.by_kind().get("constant", 0) == pytest.approx(
        float(ex.relevance[1].sum() + ex.relevance[2].sum()), rel=1e-4, abs=1e-7)


def test_gru_cell_ops_under_lrp0_with_zero_biases_are_conservative():
    # nn.GRU on CPU is decomposed (UnsafeSplit, sigmoid gates, 1 - z): gates are recognised, signal takes all
    torch.manual_seed(7)
    gru = nn.GRU(3, 4, bias=False)
    x = torch.randn(5, 2, 3, requires_grad=True)
    out, _ = gru(x)
    y = out[-1].sum(1)
    counts = dynamiclrp.coverage(y).counts()
    assert "UnsafeSplitBackward0" in counts
    ex = dynamiclrp.explain(y, x, rules="zero")
    closes(ex, 1e-5)
    # h = (1 - z) * n + z * h_prev: with h_0 = 0 and no biases, nothing leaves the propagation
    torch.testing.assert_close(ex.relevance[0].sum(), y.detach().sum(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Attention-side ops
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rules", ["attnlrp", "cplrp", "epsilon"])
def test_safe_softmax_equals_softmax(rules):
    q = randn(2, 4, 3, seed=21)
    k = randn(2, 4, 3, seed=22, leaf=False)
    v = randn(2, 4, 3, seed=23, leaf=False)
    outs = []
    for sm in (torch._safe_softmax, torch.softmax):
        A = sm(q @ k.transpose(1, 2), -1)
        outs.append(((A @ (q * v)).sum((1, 2))))
    assert "SafeSoftmaxBackward0" in dynamiclrp.coverage(outs[0]).counts()
    torch.testing.assert_close(dynamiclrp.relevance(outs[0], q, rules=rules)[0],
                               dynamiclrp.relevance(outs[1], q, rules=rules)[0])


@pytest.mark.parametrize("rules", ["attnlrp", "cplrp", "epsilon"])
def test_baddbmm_with_a_constant_bias_equals_its_decomposition(rules):
    # BLOOM's ALiBi: scores = beta * alibi + alpha * q @ k^T, alibi a constant
    x = randn(2, 4, 6, seed=24)
    Wq, Wk, Wv = (randn(6, 6, seed=s, leaf=False) for s in (25, 26, 27))
    alibi = randn(2, 1, 4, seed=28, leaf=False)
    outs = []
    for fused in (True, False):
        q, k, v = x @ Wq, x @ Wk, x @ Wv
        if fused:
            s = torch.baddbmm(alibi.expand(2, 4, 4), q, k.transpose(1, 2), beta=1.0, alpha=0.5)
        else:
            s = alibi + 0.5 * torch.bmm(q, k.transpose(1, 2))
        outs.append((torch.softmax(s, -1) @ v).sum((1, 2)))
    assert "BaddbmmBackward0" in dynamiclrp.coverage(outs[0]).counts()
    torch.testing.assert_close(dynamiclrp.relevance(outs[0], x, rules=rules)[0],
                               dynamiclrp.relevance(outs[1], x, rules=rules)[0], rtol=1e-7, atol=1e-9)


def test_mamba_style_selective_scan_closes_the_ledger():
    # discretisation exp(dt * A) with dt = softplus(...), state h = dA * h + dB * u, cumulative products
    torch.manual_seed(8)
    x = torch.randn(2, 5, 4, dtype=DT, requires_grad=True)
    Wdt, WB = torch.randn(4, 4, dtype=DT), torch.randn(4, 3, dtype=DT)
    A = -torch.rand(4, 3, dtype=DT)
    dt = F.softplus(x @ Wdt)
    dA = torch.exp(dt[..., None] * A)
    dBu = dt[..., None] * (x @ WB)[:, :, None, :] * x[..., None]
    h = torch.zeros(2, 4, 3, dtype=DT)
    ys = []
    for t in range(5):
        h = dA[:, t] * h + dBu[:, t]
        ys.append(h.sum(-1))
    y = torch.stack(ys, 1).cumsum(1)[:, -1].sum(1)
    counts = dynamiclrp.coverage(y).counts()
    for t in ("ExpBackward0", "SoftplusBackward0", "CumsumBackward0", "StackBackward0"):
        assert t in counts
    for rules in ("epsilon", "attnlrp"):
        ex = dynamiclrp.explain(y, x, rules=rules)
        assert torch.isfinite(ex.relevance[0]).all()
        closes(ex, 1e-8)


# ---------------------------------------------------------------------------------------------------------
# Vector norms and RecurrentGemma's custom sqrt
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ord_", [2, 1, float("inf")])
def test_vector_norm_sum_rule_is_exactly_conservative(ord_):
    # ‖x‖ is homogeneous of degree 1: Σ_i x_i ∂‖x‖/∂x_i = ‖x‖ (Euler), so the z-rule in gradient form conserves
    x = randn(3, 5, seed=30)
    y = torch.linalg.vector_norm(x, ord=ord_, dim=-1)
    assert dynamiclrp.coverage(y).counts()["LinalgVectorNormBackward0"] == 1
    ex = dynamiclrp.explain(y, x)
    torch.testing.assert_close(ex.relevance[0].sum(1), y.detach())
    if ord_ == 2:
        torch.testing.assert_close(ex.relevance[0], x.detach() ** 2 / y.detach()[:, None])  # R_i = x_i²/‖x‖² · R
    closes(ex)


def test_normalize_treats_the_norm_as_a_normaliser():
    # F.normalize(x) = x / max(‖x‖, eps): the norm is a normaliser, so x takes all the relevance
    x = randn(3, 5, seed=31)
    W = nn.Parameter(randn(5, 4, seed=32, leaf=False))
    y = (F.normalize(x, dim=-1) @ W).sum(1)
    assert "LinalgVectorNormBackward0" in dynamiclrp.coverage(y).counts()
    ex = dynamiclrp.explain(y, x, rules="zero")
    torch.testing.assert_close(ex.relevance[0].sum(1), y.detach())
    closes(ex)


def test_recurrent_gemma_sqrt_function_equals_sqrt():
    pytest.importorskip("transformers")
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import SqrtBoundDerivative

    x = randn(3, 6, seed=33)
    W = nn.Parameter(randn(6, 6, seed=34, leaf=False))
    out = (SqrtBoundDerivative.apply(torch.relu(x @ W) + 0.1) @ W).sum(1)
    ref_out = (torch.sqrt(torch.relu(x @ W) + 0.1) @ W).sum(1)
    assert dynamiclrp.coverage(out).counts()["SqrtBoundDerivativeBackward"] == 1
    torch.testing.assert_close(dynamiclrp.relevance(out, x)[0], dynamiclrp.relevance(ref_out, x)[0])


def test_copy_slices_check_also_runs_when_a_cached_plan_is_reused():
    # `y[:, :3] += t` and `y[:, :3] *= t` give graphs of the same signature; the second must still be refused
    x = randn(2, 6)
    explainer = dynamiclrp.Explainer("zero")

    def net(op):
        h = hidden(x)
        y = h.clone()
        if op == "add":
            y[:, :3] += h[:, 5:]
        else:
            y[:, :3] *= h[:, 5:]
        return head(y)

    out = net("add")
    torch.testing.assert_close(explainer.relevance(out, x)[0], grad_x_input(out, x))
    with pytest.raises(UnsupportedOperationError, match="data-dependent"):
        explainer.relevance(net("mul"), x)
    assert explainer.cache_info()["hits"] == 1  # the plan of the first graph was reused: the step checked again


def test_recurrent_rule_can_use_its_own_inner_rule_set():
    from dynamiclrp.rules import Recurrent

    lstm = _fused_lstm(seed=9)
    x = torch.randn(4, 2, 3, requires_grad=True)
    if not _mkldnn_available(lstm, x):
        pytest.skip("nn.LSTM is not fused by oneDNN on this machine")
    out, _ = lstm(x)
    y = out[-1].sum(1)  # only routing and a sum outside the LSTM: the outer rule set does not matter there
    inner_zero = presets.epsilon(0.5).with_ops({"MkldnnRnnLayerBackward0": Recurrent(presets.zero())})
    torch.testing.assert_close(dynamiclrp.relevance(y, x, rules=inner_zero)[0], dynamiclrp.relevance(y, x, rules="zero")[0])
    assert not torch.allclose(dynamiclrp.relevance(y, x, rules=presets.epsilon(0.5))[0],
                              dynamiclrp.relevance(y, x, rules="zero")[0])
