"""Rules for the node types added for coverage beyond the zoo (issue 11), one property per op.

Each rule is checked against an independent float64 reference — an explicit formula (Euler's decomposition of a
homogeneous statistic, the soft-max routing of ``logsumexp``, the dense z-rule of a linear map with fixed
coefficients), or the same computation written with other ops whose rules are already tested — and with a closing
ledger that has no unmeasured entry. Ops that are piecewise linear also satisfy LRP-0 = gradient × input.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dynamiclrp
from dynamiclrp import presets
from dynamiclrp.errors import UnsupportedOperationError
from dynamiclrp.rules import Decompose

from reference import rules as ref
from test_ops_special import DT, assert_lrp0_is_gxi, closes, dense_z_rule, gen, grad_x_input, head, hidden, randn


def explicit(ex: dynamiclrp.Explanation) -> torch.Tensor:
    return ex.relevance[0]


# ---------------------------------------------------------------------------------------------------------
# Element-wise non-linearities: the identity rule R_x = R_y; RReLU is piecewise linear (LRP-0 = gradient × input)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn,node_type,f0", [
    (lambda t: F.celu(t, 0.7), "CeluBackward0", 0.0),
    (F.logsigmoid, "LogSigmoidBackward0", -math.log(2.0)),
    (torch.sign, "SignBackward0", 0.0),
])
def test_identity_rule_on_new_elementwise_ops(fn, node_type, f0):
    x = randn(3, 7, seed=40)
    with torch.no_grad():
        x[0, 0] = 0.0  # where f(0) != 0 the identity rule cannot reach x: booked as the rule's sink
    c = randn(1, 7, seed=41, leaf=False)
    y = fn(x)
    out = (y * c).sum(1)
    assert dynamiclrp.coverage(out).counts()[node_type] == 1
    ex = dynamiclrp.explain(out, x)
    expected = (y * c).detach().clone()
    if f0 != 0:
        expected[0, 0] = 0.0
    torch.testing.assert_close(ex.relevance[0], expected)
    closes(ex)
    if f0 != 0:
        assert ex.ledger.by_kind()["rule"] == pytest.approx(float((y * c)[0, 0].detach()))


@pytest.mark.parametrize("training", [False, True])
def test_rrelu_lrp0_equals_gradient_times_input(training):
    x = randn(2, 6)
    torch.manual_seed(0)
    h = F.rrelu(hidden(x) - 0.5, training=training)
    ex = assert_lrp0_is_gxi(head(h), x, "RreluWithNoiseBackward0")
    assert ex.relevance[0].abs().sum() > 0


def test_nonlinear_function_of_a_complex_tensor_is_refused_with_the_reason():
    x = randn(3, 8, seed=42)
    out = torch.fft.fft(x * 2).abs().sum(1)
    with pytest.raises(UnsupportedOperationError, match="complex tensor.*view_as_real"):
        dynamiclrp.relevance(out, x)


# ---------------------------------------------------------------------------------------------------------
# Homogeneous statistics: Euler's decomposition R_i = x_i ∂f/∂x_i / k, written out explicitly
# ---------------------------------------------------------------------------------------------------------
def test_std_and_var_follow_eulers_decomposition():
    x = randn(3, 6, seed=43)
    xd = x.detach()
    mu = xd.mean(1, keepdim=True)
    for correction in (0, 1):
        n = xd.shape[1] - correction
        var = ((xd - mu) ** 2).sum(1) / n
        ex = dynamiclrp.explain(x.var(1, correction=correction), x)
        torch.testing.assert_close(ex.relevance[0], xd * (xd - mu) / n)  # x_i ∂var/∂x_i / 2
        torch.testing.assert_close(ex.relevance[0].sum(1), var)
        closes(ex)
        ex = dynamiclrp.explain(x.std(1, correction=correction), x)
        torch.testing.assert_close(ex.relevance[0], xd * (xd - mu) / (n * var.sqrt()[:, None]))
        closes(ex)
    ex = dynamiclrp.explain(x.var().reshape(1), x)  # over every dimension
    torch.testing.assert_close(ex.relevance[0].sum(), x.var().detach())


def test_prod_gives_every_factor_an_equal_share():
    x = randn(3, 4, seed=44)
    for y, n, counts in ((x.prod(1), 4, "ProdBackward1"), (x.prod().reshape(1), 12, "ProdBackward0")):
        assert counts in dynamiclrp.coverage(y).counts()
        ex = dynamiclrp.explain(y, x)
        share = y.detach() / n
        expected = share[:, None].expand(3, 4) if y.shape[0] == 3 else share.expand(3, 4)
        torch.testing.assert_close(ex.relevance[0], expected)  # AttnLRP's uniform rule: R / n each
        closes(ex)
    # two factors: the same as the uniform rule on a * b
    a = randn(5, seed=45)
    torch.testing.assert_close(dynamiclrp.relevance(torch.stack([a, a * 2], 1).prod(1), a)[0],
                               dynamiclrp.relevance(a * (a * 2), a, rules="attnlrp")[0])


def test_cumprod_splits_each_partial_product_uniformly():
    x = randn(2, 5, seed=46)
    R = torch.randn(2, 5, generator=gen(47), dtype=DT)
    y = torch.cumprod(x, 1)
    ex = dynamiclrp.explain(y, x, R)
    # output k is a product of k + 1 factors: each gets R_k / (k + 1)
    share = R / torch.arange(1, 6, dtype=DT)
    expected = torch.flip(torch.cumsum(torch.flip(share, [1]), 1), [1])
    torch.testing.assert_close(ex.relevance[0], expected)
    closes(ex)


def test_std_is_a_normaliser_in_a_hand_written_layer_norm():
    x = randn(3, 6, seed=48)
    W = nn.Parameter(randn(6, 4, seed=49, leaf=False))
    for stat in (lambda t: t.std(-1, keepdim=True), lambda t: (t.var(-1, keepdim=True) + 1e-5).sqrt()):
        c = x - x.mean(-1, keepdim=True)
        out = (c / stat(x) @ W).sum(1)
        ref_out = (c / stat(x).detach() @ W).sum(1)  # the statistic held constant explicitly
        torch.testing.assert_close(dynamiclrp.relevance(out, x, rules="zero")[0],
                                   dynamiclrp.relevance(ref_out, x, rules="zero")[0])


def test_logsumexp_routes_relevance_by_the_softmax_weights():
    x = randn(3, 5, seed=50)
    R = torch.randn(3, generator=gen(51), dtype=DT)
    y = torch.logsumexp(x, 1)
    assert dynamiclrp.coverage(y).counts()["LogsumexpBackward0"] == 1
    for rules in ("epsilon", "attnlrp", "cplrp"):
        ex = dynamiclrp.explain(y, x, R, rules=rules)
        torch.testing.assert_close(ex.relevance[0], torch.softmax(x.detach(), 1) * R[:, None])
        closes(ex)


def test_logsumexp_normaliser_in_log_softmax_gives_everything_to_x():
    # x - logsumexp(x) is log_softmax: the statistic is a maximum subtracted like the log-softmax rule's normaliser
    x = randn(3, 5, seed=52)
    W = nn.Parameter(randn(5, 5, seed=53, leaf=False))
    h = x @ W
    out = (h - torch.logsumexp(h, -1, keepdim=True))[:, 2]
    assert "LogsumexpBackward0" in dynamiclrp.coverage(out).counts()
    ex = dynamiclrp.explain(out, x, rules="zero")
    closes(ex)


# ---------------------------------------------------------------------------------------------------------
# Selections: LRP-0 = gradient × input
# ---------------------------------------------------------------------------------------------------------
SELECTIONS = {
    "MaskedScatterBackward0": lambda h: h.masked_scatter(torch.arange(8) % 3 == 0, h[:, 5:].flip(1).reshape(-1)),
    "CopyBackwards": lambda h: torch.zeros(2, 8, dtype=DT).copy_(h.flip(1)),
    "MaxUnpool2DBackward0": lambda h: F.max_unpool2d(
        *F.max_pool2d(h.reshape(2, 1, 2, 4), 2, return_indices=True), 2).reshape(2, 8),
    "ScatterReduceBackward0": lambda h: h.scatter_reduce(1, torch.tensor([[1, 4, 1], [0, 6, 6]]), h[:, 2:5] * 2, "amax"),
}


@pytest.mark.parametrize("node_type", sorted(SELECTIONS))
def test_new_selection_ops_lrp0_equals_gradient_times_input(node_type):
    x = randn(2, 6)
    assert_lrp0_is_gxi(head(SELECTIONS[node_type](hidden(x))), x, node_type)


def test_masked_scatter_into_constant_embeddings_books_nothing_for_the_constant():
    # LLaVA-style: image features scattered into text embeddings; here the text part is a constant
    x = randn(2, 6)
    base = torch.randn(2, 8, generator=gen(54), dtype=DT)
    mask = torch.tensor([[False, True, True, False, False, False, False, False]] * 2)
    y = base.masked_scatter(mask, hidden(x)[:, :2])
    ex = dynamiclrp.explain(head(y), x, rules="zero")
    closes(ex)
    assert abs(ex.ledger.by_kind().get("constant", 0.0) - float(
        (base * ~mask * grad_of(head, y)).sum())) < 1e-9


def grad_of(fn, t: torch.Tensor) -> torch.Tensor:
    t = t.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(t).sum(), t)
    return g


@pytest.mark.parametrize("reduce", ["sum", "mean", "amin"])
def test_scatter_reduce_linear_and_selecting_modes_are_gradient_times_input(reduce):
    x = randn(2, 6)
    idx = torch.tensor([[1, 4, 1], [0, 6, 6]])
    out = head(hidden(x).scatter_reduce(1, idx, hidden(x)[:, 2:5] * 2, reduce, include_self=reduce != "mean"))
    assert_lrp0_is_gxi(out, x, "ScatterReduceBackward0")


def test_scatter_reduce_prod_splits_uniformly():
    x = randn(6, seed=55)
    idx = torch.tensor([0, 1, 0, 0, 2, 1])
    y = torch.ones(3, dtype=DT).scatter_reduce(0, idx, x, "prod", include_self=False)
    ex = dynamiclrp.explain(y, x)
    counts = torch.bincount(idx).to(DT)
    torch.testing.assert_close(ex.relevance[0], (y.detach() / counts)[idx])
    closes(ex)


# ---------------------------------------------------------------------------------------------------------
# Packed recurrent layers: a packed batch explains like each sequence on its own
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell,bidirectional", [(nn.LSTM, True), (nn.GRU, False)])
def test_packed_rnn_equals_each_sequence_alone(cell, bidirectional):
    """A packed batch explains like each sequence packed alone. (A bidirectional GRU is the exception — measured: the
    relevance of the shorter sequences changes by up to a third — because its reverse pass concatenates the zero initial state of sequences that join
    later with the running states of the others, and a product rule sees one tensor — an activation — where the
    sequence alone has a constant. Its ledger still closes: see the zoo entry ``packed_gru``.)"""
    torch.manual_seed(0)
    rnn = cell(3, 4, num_layers=2, bidirectional=bidirectional, batch_first=True).double()
    lin = nn.Linear(8 if bidirectional else 4, 2).double()
    lengths = [5, 2, 3]
    x = randn(3, 5, 3, seed=56)

    def score(h):
        h = h[0] if isinstance(h, tuple) else h
        return lin(torch.cat([h[-2], h[-1]], -1) if bidirectional else h[-1])[:, 1]

    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
    out = score(rnn(packed)[1])
    assert "PackPaddedSequenceBackward0" in dynamiclrp.coverage(out).counts()
    ex = dynamiclrp.explain(out, x)
    closes(ex, 1e-9)
    for b, n in enumerate(lengths):
        # the same sequence packed alone (packed and padded inputs take different cell code paths for a GRU)
        xb = x[b:b + 1, :n].detach().clone().requires_grad_(True)
        alone = nn.utils.rnn.pack_padded_sequence(xb, torch.tensor([n]), batch_first=True)
        (rb,) = dynamiclrp.relevance(score(rnn(alone)[1]), xb)
        torch.testing.assert_close(ex.relevance[0][b, :n], rb[0], rtol=1e-9, atol=1e-12)
        assert torch.count_nonzero(ex.relevance[0][b, n:]) == 0  # padding receives nothing


# ---------------------------------------------------------------------------------------------------------
# Embedding bags
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_routes_to_the_weight_rows(mode):
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(10, 4, mode=mode).double()
    ids = torch.tensor([[1, 2, 3, 2], [4, 5, 1, 9]])
    W = randn(4, 3, seed=57, leaf=False)
    out = (bag(ids) @ W).relu().sum(1)
    assert_lrp0_is_gxi(out, bag.weight, "EmbeddingBagBackward0")


def test_embedding_bag_with_per_token_weights_gives_relevance_to_the_tokens():
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(10, 4, mode="sum").double()
    ids = torch.tensor([[1, 2, 3, 2], [4, 5, 1, 9]])
    p = torch.ones(2, 4, dtype=DT, requires_grad=True)
    W = randn(4, 3, seed=58, leaf=False)
    out = (bag(ids, per_sample_weights=p) @ W).relu().sum(1)
    ex = dynamiclrp.explain(out, (p, bag.weight), rules="zero")
    # the bag is linear in p with the selected rows as weights: LRP-0 is gradient × input, and the rows get nothing
    torch.testing.assert_close(ex.relevance[0], grad_x_input(out, p))
    assert torch.count_nonzero(ex.relevance[1]) == 0
    torch.testing.assert_close(ex.relevance[0].sum(), out.detach().sum())


# ---------------------------------------------------------------------------------------------------------
# Linear maps with coefficients fixed by another operand: the dense z-rule
# ---------------------------------------------------------------------------------------------------------
def _grid(seed: int) -> torch.Tensor:
    theta = torch.tensor([[[0.8, 0.3, 0.1], [-0.2, 0.9, 0.05]]], dtype=DT)
    return F.affine_grid(theta.expand(2, 2, 3), [2, 2, 5, 4], align_corners=False) + 0.05 * torch.randn(
        2, 5, 4, 2, generator=gen(seed), dtype=DT)


@pytest.mark.parametrize("mode,padding", [("bilinear", "zeros"), ("bicubic", "border"), ("nearest", "reflection")])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_grid_sample_follows_the_dense_z_rule_and_gives_the_grid_nothing(mode, padding, eps):
    x = randn(2, 2, 4, 5, seed=59)
    grid = _grid(60).requires_grad_(True)

    def fn(t):
        g = grid.detach()[:1].expand(t.shape[0], -1, -1, -1) if t.shape[0] != 2 else grid.detach()
        return F.grid_sample(t, g, mode=mode, padding_mode=padding, align_corners=False)

    y = F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=False)
    R = torch.randn(y.shape, generator=gen(61), dtype=DT)
    rules = presets.zero().with_families(pool=dynamiclrp.rules.Epsilon(eps))
    ex = dynamiclrp.explain(y, (x, grid), R, rules=rules)
    for s in range(2):  # the grid differs per sample: one dense matrix each
        xs = x[s:s + 1].detach()
        gs = grid.detach()[s:s + 1]
        expected = dense_z_rule(lambda t: F.grid_sample(t, gs.expand(t.shape[0], -1, -1, -1), mode=mode,
                                                         padding_mode=padding, align_corners=False), xs, R[s:s + 1], eps)
        torch.testing.assert_close(ex.relevance[0][s:s + 1], expected, rtol=1e-9, atol=1e-12)
    assert torch.count_nonzero(ex.relevance[1]) == 0
    closes(ex)


def test_affine_grid_is_a_linear_map_of_theta():
    theta = randn(2, 2, 3, seed=62)
    R = torch.randn(2, 4, 5, 2, generator=gen(63), dtype=DT)
    y = F.affine_grid(theta, [2, 1, 4, 5], align_corners=True)
    ex = dynamiclrp.explain(y, theta, R)
    expected = dense_z_rule(lambda t: F.affine_grid(t, [t.shape[0], 1, 4, 5], align_corners=True), theta, R, 0.0)
    torch.testing.assert_close(ex.relevance[0], expected)
    closes(ex)


def test_spatial_transformer_relevance_equals_the_warp_with_a_fixed_grid():
    torch.manual_seed(0)
    loc = nn.Linear(2 * 6 * 6, 6).double()
    with torch.no_grad():
        loc.weight.mul_(0.05)
        loc.bias.copy_(torch.tensor([1.0, 0.1, 0.0, -0.1, 0.9, 0.0]))
    conv = nn.Conv2d(2, 3, 3).double()
    x = randn(2, 2, 6, 6, seed=64)

    def net(detach_grid: bool) -> torch.Tensor:
        grid = F.affine_grid(loc(x.flatten(1)).view(2, 2, 3), [2, 2, 6, 6], align_corners=False)
        grid = grid.detach() if detach_grid else grid
        return conv(F.grid_sample(x, grid, align_corners=False)).relu().mean((1, 2, 3))

    out = net(False)
    counts = dynamiclrp.coverage(out).counts()
    assert "GridSampler2DBackward0" in counts and "AffineGridGeneratorBackward0" in counts
    for rules in ("epsilon", "zero"):
        ex = dynamiclrp.explain(out, x, rules=rules)
        torch.testing.assert_close(ex.relevance[0], dynamiclrp.relevance(net(True), x, rules=rules)[0])
        closes(ex)


def test_roi_align_follows_the_dense_z_rule():
    pytest.importorskip("torchvision")
    from torchvision.ops import roi_align

    x = randn(1, 2, 6, 7, seed=65)
    boxes = torch.tensor([[0, 0.5, 1.0, 4.5, 5.0], [0, 2.0, 0.0, 6.5, 3.5]], dtype=DT)
    y = roi_align(x, boxes, (2, 3), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    assert dynamiclrp.coverage(y).counts()["GeneratedBackwardFor_torchvision_roi_align_defaultBackward"] == 1
    R = torch.randn(y.shape, generator=gen(66), dtype=DT)
    for eps in (0.0, 0.1):
        rules = presets.zero().with_families(pool=dynamiclrp.rules.Epsilon(eps))
        ex = dynamiclrp.explain(y, x, R, rules=rules)
        # the dense map from the image's features to every box's bins, one basis vector at a time
        xs = x.detach()
        n = xs.numel()
        basis = torch.eye(n, dtype=DT).reshape(n, *xs.shape[1:])
        M = torch.stack([roi_align(b[None], boxes, (2, 3), 1.0, 2, True).reshape(-1) for b in basis], 1)
        Z = M * xs.reshape(-1)[None, :]
        z = Z.sum(1)
        den = ref.stabilize(z, eps) if eps else z
        q = torch.where(den == 0, torch.zeros_like(den), R.reshape(-1) / torch.where(den == 0, 1, den))
        torch.testing.assert_close(ex.relevance[0], (Z * q[:, None]).sum(0).reshape(xs.shape), rtol=1e-9, atol=1e-12)
        closes(ex)


# ---------------------------------------------------------------------------------------------------------
# Ops re-expressed with primitive ops (Decompose): GLU, nn.Bilinear, reentrant checkpointing
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rules", ["epsilon", "zero", "attnlrp", "cplrp"])
def test_glu_equals_its_decomposition(rules):
    x = randn(3, 4, seed=67)
    lin = nn.Linear(4, 8).double()
    out = (F.glu(lin(x), -1) ** 1).sum(1)
    a, b = lin(x).chunk(2, -1)
    ref_out = (a * torch.sigmoid(b)).sum(1)
    assert dynamiclrp.coverage(out, rules).counts()["GluBackward0"] == 1
    ex = dynamiclrp.explain(out, x, rules=rules)
    torch.testing.assert_close(ex.relevance[0], dynamiclrp.relevance(ref_out, x, rules=rules)[0])
    closes(ex)


def test_glu_default_rule_gives_the_gated_signal_everything():
    h = randn(2, 6, seed=68)
    y = F.glu(h, -1)
    R = torch.randn(2, 3, generator=gen(69), dtype=DT)
    ex = dynamiclrp.explain(y, h, R)
    expected = torch.cat([R, torch.zeros_like(R)], 1)  # a sigmoid gate: the signal takes all (Arras et al. 2017)
    torch.testing.assert_close(ex.relevance[0], expected)
    closes(ex)


def _bilinear_reference(x1, x2, W, b, R):
    """Independent LRP-0 for y_k = x1ᵀ W_k x2 + b_k with both inputs activations: the sum rule puts t_k/(t_k+b_k)
    of R_k on the product, which the uniform rule splits between x1 and x2 over the terms x1_i W_kij x2_j."""
    t = torch.einsum("bi,kij,bj->bk", x1, W, x2)
    q = R / (t + b)
    terms = torch.einsum("bi,kij,bj->bkij", x1, W, x2) * q[:, :, None, None]
    return terms.sum((1, 3)) / 2, terms.sum((1, 2)) / 2


def test_bilinear_layer_with_two_activations_follows_the_uniform_rule():
    torch.manual_seed(0)
    bil = nn.Bilinear(4, 3, 2).double()
    x1, x2 = randn(5, 4, seed=70), randn(5, 3, seed=71)
    y = bil(x1, x2)
    R = torch.randn(5, 2, generator=gen(72), dtype=DT)
    assert dynamiclrp.coverage(y).counts()["TrilinearBackward0"] == 1
    ex = dynamiclrp.explain(y, (x1, x2), R, rules="zero")
    e1, e2 = _bilinear_reference(x1.detach(), x2.detach(), bil.weight.detach(), bil.bias.detach(), R)
    torch.testing.assert_close(ex.relevance[0], e1)
    torch.testing.assert_close(ex.relevance[1], e2)
    closes(ex)


def test_bilinear_layer_with_one_constant_input_is_a_linear_layer():
    torch.manual_seed(0)
    bil = nn.Bilinear(4, 3, 2).double()
    x1, x2 = randn(5, 4, seed=73), torch.randn(5, 3, generator=gen(74), dtype=DT)
    R = torch.randn(5, 2, generator=gen(75), dtype=DT)
    ex = dynamiclrp.explain(bil(x1, x2), x1, R, rules=presets.epsilon(0.01))
    # W x2 is the effective weight of a linear layer in x1 (ε rule); nn.Bilinear adds its bias in a node of its own,
    # whose sum rule gives the product t/(t + b) of R (independent reference)
    W_eff = torch.einsum("kij,bj->bki", bil.weight.detach(), x2)
    t = torch.einsum("bi,bki->bk", x1.detach(), W_eff)
    R_t = t / (t + bil.bias.detach()) * R
    expected = x1.detach() * torch.einsum("bk,bki->bi", R_t / ref.stabilize(t, 0.01), W_eff)
    torch.testing.assert_close(ex.relevance[0], expected)
    closes(ex)


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("rules", ["epsilon", "zero", "attnlrp"])
def test_checkpointed_blocks_explain_like_plain_ones(reentrant, rules):
    torch.manual_seed(0)
    block = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6)).double()
    head_ = nn.Linear(6, 3).double()
    x = randn(4, 6, seed=76)
    out = head_(x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=reentrant))[:, 0]
    plain = head_(x + block(x))[:, 0]
    if reentrant:
        assert "CheckpointFunctionBackward" in dynamiclrp.coverage(out).counts()
    ex = dynamiclrp.explain(out, x, rules=rules, model=head_)
    torch.testing.assert_close(ex.relevance[0], dynamiclrp.relevance(plain, x, rules=rules)[0])
    closes(ex)


def test_reentrant_checkpoint_replays_dropout_with_the_forward_random_state():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(6, 12), nn.Dropout(0.5), nn.ReLU(), nn.Linear(12, 6)).double().train()
    x = randn(4, 6, seed=77)
    torch.manual_seed(123)
    out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True).sum(1)
    torch.manual_seed(123)
    plain = block(x).sum(1)  # the same dropout mask
    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(dynamiclrp.relevance(out, x, rules="zero")[0],
                               dynamiclrp.relevance(plain, x, rules="zero")[0])


def test_frozen_reentrant_checkpoint_equals_trainable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).double().eval()
    frozen = copy.deepcopy(model).requires_grad_(False)
    x = randn(4, 6, seed=78)
    got = {}
    for name, m in (("trainable", model), ("frozen", frozen)):
        out = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=True)[:, 1]
        ex = dynamiclrp.explain(out, x, model=m)
        closes(ex)
        got[name] = ex.relevance[0]
    torch.testing.assert_close(got["frozen"], got["trainable"], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Custom autograd Functions: the Decompose recipe, on two Functions from transformers
# ---------------------------------------------------------------------------------------------------------
def test_decompose_recipe_for_a_disentangled_attention_softmax():
    pytest.importorskip("transformers")
    from transformers.models.sew_d.modeling_sew_d import XSoftmax

    q, k = randn(2, 4, 3, seed=79), randn(2, 4, 3, seed=80, leaf=False)
    v = randn(2, 4, 3, seed=81, leaf=False)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).int()[:, None, :].expand(2, 4, 4)
    scores = q @ k.transpose(1, 2)
    out = (XSoftmax.apply(scores, mask, -1) @ v).sum((1, 2))
    with pytest.raises(UnsupportedOperationError, match="XSoftmaxBackward"):
        dynamiclrp.relevance(out, q)

    def xsoftmax(ctx, x, *_):  # the Function's math with ordinary ops; ctx.dim is what its forward stored
        return torch.softmax(x.masked_fill(~mask.bool(), torch.finfo(x.dtype).min), ctx.dim).masked_fill(~mask.bool(), 0)

    rules = presets.attnlrp().with_ops({"XSoftmaxBackward": Decompose(xsoftmax)})
    ex = dynamiclrp.explain(out, q, rules=rules)
    plain = (xsoftmax(type("ctx", (), {"dim": -1}), scores) @ v).sum((1, 2))
    torch.testing.assert_close(ex.relevance[0], dynamiclrp.relevance(plain, q, rules="attnlrp")[0])
    closes(ex)


def test_decompose_recipe_for_reversible_layers(monkeypatch):
    pytest.importorskip("transformers")
    from transformers.models.reformer import modeling_reformer

    from dynamiclrp.testing import zoo

    def reversible(ctx, hidden_states):  # RevNet: Y1 = X1 + Attention(X2), Y2 = X2 + FeedForward(Y1)
        h, attn = torch.chunk(hidden_states, 2, dim=-1)
        for layer in ctx.layers:  # (a layer's forward runs under no_grad: its two halves are called directly)
            attn = attn + layer.attention(hidden_states=h, attention_mask=ctx.attention_mask).hidden_states
            h = h + layer.feed_forward(attn)
        return torch.cat([attn, h], dim=-1)

    entry = zoo.build_hf("reformer", axial_pos_embds=False, attn_layers=["local", "local"], is_decoder=True,
                         local_attn_chunk_length=4, num_buckets=2, chunk_size_lm_head=0)
    entry.model.double()
    old = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        out, x = entry.run()
        assert "_ReversibleFunctionBackward" in dynamiclrp.coverage(out).counts()
        rules = presets.epsilon().with_ops({"_ReversibleFunctionBackward": Decompose(reversible)})
        ex = dynamiclrp.explain(out, x, rules=rules, model=entry.model)
        closes(ex, 1e-9)
        # reference: the same model with the Function replaced by its math, so every op is in the outer graph
        layers = entry.model.reformer.encoder.layers

        def plain_apply(hidden_states, layers_, attention_mask, *args):
            ctx = type("ctx", (), {"layers": layers_, "attention_mask": attention_mask})
            return reversible(ctx, hidden_states)

        monkeypatch.setattr(modeling_reformer._ReversibleFunction, "apply", staticmethod(plain_apply))
        out2, x2 = entry.run()
    finally:
        torch.set_default_dtype(old)
    assert "_ReversibleFunctionBackward" not in dynamiclrp.coverage(out2).counts() and len(layers) == 2
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(ex.relevance[0], dynamiclrp.relevance(out2, x2, model=entry.model)[0])


# ---------------------------------------------------------------------------------------------------------
# Spectral normalisation (vdot) and complex-valued linear paths (FFT)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_spectral_norm_equals_the_normalised_weight_as_a_constant(training):
    torch.manual_seed(0)
    lin = nn.utils.parametrizations.spectral_norm(nn.Linear(5, 4)).double().train(training)
    x = randn(3, 5, seed=82)
    out = lin(x).relu().sum(1)
    assert "VdotBackward0" in dynamiclrp.coverage(out).counts()
    W = lin.weight.detach()  # the normalised weight of this forward pass (power iteration already ran)
    plain = F.linear(x, nn.Parameter(W.clone()), nn.Parameter(lin.bias.detach().clone())).relu().sum(1)
    ex = dynamiclrp.explain(out, x)
    torch.testing.assert_close(ex.relevance[0], dynamiclrp.relevance(plain, x)[0])
    closes(ex)


FOURIER = {
    "fnet": lambda h: torch.fft.fftn(h, dim=(1, 2)).real,
    "imag": lambda h: torch.fft.fft(h).imag,
    "gfnet": lambda h: torch.fft.irfft2(torch.fft.rfft2(h, dim=(1, 2)) * torch.view_as_complex(
        torch.randn(4, 4, 2, generator=gen(83), dtype=DT)), s=(4, 6), dim=(1, 2)),
}


@pytest.mark.parametrize("mix", sorted(FOURIER))
def test_fourier_mixing_lrp0_equals_gradient_times_input(mix):
    torch.manual_seed(0)
    W1, W2 = (nn.Parameter(randn(6, 6, seed=s, leaf=False)) for s in (84, 85))
    x = randn(2, 4, 6, seed=86)
    out = torch.relu(FOURIER[mix](torch.relu(x @ W1)) @ W2).sum((1, 2))
    ex = assert_lrp0_is_gxi(out, x)
    assert ex.relevance[0].abs().sum() > 0
    # with biases and ε the path is still measured and closes
    lin = nn.Linear(6, 6).double()
    ex = dynamiclrp.explain(torch.relu(lin(FOURIER[mix](lin(x)))).sum((1, 2)), x)
    closes(ex)


# ---------------------------------------------------------------------------------------------------------
# Ledger leaks that raised nothing
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn,const", [(lambda v: 1 - v, 8.0), (lambda v: torch.rsub(v, 2.0, alpha=3), 16.0),
                                      (lambda v: v + 1, 8.0), (lambda v: -v + 1, 8.0)])
def test_scalar_shift_books_the_constants_share(fn, const):
    v = torch.randn(8, generator=gen(87), dtype=DT, requires_grad=True)
    ex = dynamiclrp.explain(fn(v).sum(), v)
    assert ex.unaccounted == pytest.approx(0.0, abs=1e-12)  # RsubBackward1 left 8.0 unaccounted
    assert ex.ledger.by_kind()["constant"] == pytest.approx(const)


@pytest.mark.parametrize("rules", ["epsilon", "zero", "attnlrp"])
def test_exp_minus_max_loses_nothing_at_the_maximum(rules):
    w = torch.randn(8, generator=gen(88), dtype=DT, requires_grad=True)
    c = torch.full((8,), -1e38, dtype=DT)
    y = (torch.exp(w - torch.maximum(w, c)) * w).sum()
    ex = dynamiclrp.explain(y, w, rules=rules)
    closes(ex)
    assert ex.ledger.by_kind().get("rule", 0.0) == 0.0  # half of it was the Exp node's sink
    # the stabilising maximum held constant: exp(w - m) = exp(w) · exp(-m)
    m = torch.maximum(w, c).detach()
    ref_y = (torch.exp(w) * torch.exp(-m) * w).sum()
    torch.testing.assert_close(ex.relevance[0], dynamiclrp.relevance(ref_y, w, rules=rules)[0])
    torch.testing.assert_close(ex.relevance[0].sum(), y.detach())


def test_edge_softmax_with_scatter_max_holds_the_maximum_constant():
    # GAT's edge softmax: exp(score - max over each node's edges) / sum over the node's edges
    s = torch.randn(7, generator=gen(89), dtype=DT, requires_grad=True)
    dst = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    v = torch.randn(7, generator=gen(90), dtype=DT)

    def net(held: bool):
        m = torch.zeros(3, dtype=DT).scatter_reduce(0, dst, s, "amax", include_self=False)[dst]
        w = torch.exp(s) * torch.exp(-m.detach()) if held else torch.exp(s - m)
        z = torch.zeros(3, dtype=DT).scatter_reduce(0, dst, w, "sum", include_self=False)[dst]
        return torch.zeros(3, dtype=DT).index_add(0, dst, w / z * v)

    for rules in ("epsilon", "attnlrp"):
        ex = dynamiclrp.explain(net(False), s, rules=rules)
        torch.testing.assert_close(ex.relevance[0], dynamiclrp.relevance(net(True), s, rules=rules)[0])
        closes(ex)


def test_explicit_relevance_on_a_zero_sum_is_booked():
    a = randn(3, 4, seed=91)
    b = torch.zeros(3, 4, dtype=DT)
    b[:, 0] = -a[:, 0].detach()  # a + b is exactly 0 in column 0
    y = torch.logsumexp(a + b, 1)  # logsumexp sends explicit relevance
    ex = dynamiclrp.explain(y, a)
    closes(ex)
    lost = ex.ledger.by_kind()["conversion"]
    assert lost == pytest.approx(float((torch.softmax((a + b).detach(), 1)[:, 0] * y.detach()).sum()))


def test_circular_padding_and_in_place_writes_are_measured():
    torch.manual_seed(0)
    for mode in ("circular", "reflect", "replicate"):
        conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode).double()
        x = randn(2, 2, 5, 5, seed=92)
        frozen = copy.deepcopy(conv).requires_grad_(False)
        for m in (conv, frozen):
            ex = dynamiclrp.explain(m(x).relu().sum((1, 2, 3)), x, model=m)
            closes(ex)


@pytest.mark.parametrize("variant", [0, 1])
def test_cat_of_where_and_masked_fill_outputs_is_measured_on_frozen_layers(variant):
    torch.manual_seed(0)
    l1, l2, l3 = (nn.Linear(6, 6).double(), nn.Linear(6, 6).double(), nn.Linear(12, 3).double())
    model = nn.ModuleList([l1, l2, l3]).requires_grad_(False)
    x = randn(4, 6, seed=93)
    m = x.detach() > 0
    if variant == 0:
        a, b = torch.where(m, l1(x), 0.0), l2(x).masked_fill(~m, -1.0)
    else:
        a, b = torch.where(m, torch.tanh(l1(x)), -1.0), torch.sigmoid(l2(x)).masked_fill(m, 0.5)
    out = l3(torch.cat([a, b], -1))[:, 0]
    ex = dynamiclrp.explain(out, x, model=model)
    closes(ex)  # was unaccounted by 0.6 with "not measurable" entries
    assert ex.ledger.by_kind()["constant"] != 0


def test_bias_built_by_in_place_slicing_swin_v2_style():
    # torchvision's Swin-V2: qkv_bias = qkv.bias.clone(); qkv_bias[k:2k].zero_()
    torch.manual_seed(0)
    lin = nn.Linear(6, 6).double()
    x = randn(3, 6, seed=94)
    b = lin.bias.clone()
    b[2:4].zero_()
    out = F.linear(torch.relu(x @ lin.weight.T), lin.weight, b).relu().sum(1)
    keep = torch.ones(6, dtype=DT)
    keep[2:4] = 0
    plain = F.linear(torch.relu(x @ lin.weight.T), lin.weight, lin.bias * keep).relu().sum(1)
    for rules in ("epsilon", "zero", "epsilon_plus"):
        ex = dynamiclrp.explain(out, x, rules=rules)
        torch.testing.assert_close(ex.relevance[0], dynamiclrp.relevance(plain, x, rules=rules)[0])
        closes(ex)


def test_coverage_reads_frozen_biases_through_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double().requires_grad_(False)
    x = randn(3, 4, seed=95)
    out = model(x)[:, 0]
    assert dynamiclrp.coverage(out, inputs=x, model=model).ok  # as explain(..., model=model) plans it
    closes(dynamiclrp.explain(out, x, model=model))


SUMMING = {
    "IndexAddBackward0": lambda h: torch.index_add(h, 1, torch.tensor([1, 1, 6]), h[:, 3:6]),
    "ScatterAddBackward0": lambda h: torch.scatter_add(h, 1, torch.tensor([[1, 4], [0, 4]]), h[:, 2:4]),
    "ScatterReduceBackward0": lambda h: h.scatter_reduce(1, torch.tensor([[1, 4, 1], [0, 6, 6]]), h[:, 2:5], "mean"),
}


@pytest.mark.parametrize("node_type", sorted(SUMMING))
def test_explicit_relevance_is_not_copied_through_summing_routing_ops(node_type):
    # flat sends explicit relevance; a sum of copies must pass it on in proportion to each copy, not whole to each
    x = randn(2, 6)
    W2 = nn.Parameter(randn(8, 3, seed=96, leaf=False))
    out = (SUMMING[node_type](hidden(x)) @ W2).relu().sum(1)
    assert node_type in dynamiclrp.coverage(out).counts()
    ex = dynamiclrp.explain(out, x, rules=presets.epsilon().with_families(linear=dynamiclrp.rules.Flat()))
    closes(ex)


def test_saturated_gates_after_a_layer_close_the_ledger_in_float32():
    # the layer's output is recomputed rather than read back as logit(σ) from the saturated gate (digits lost in float32)
    torch.manual_seed(0)
    lin, out_lin = nn.Linear(8, 16), nn.Linear(16, 1)
    with torch.no_grad():
        lin.weight.mul_(12.0)
    x = torch.randn(64, 8, requires_grad=True)
    h = torch.sigmoid(lin(x))
    assert float(((h > 0.9999) | (h < 1e-4)).float().mean()) > 0.2  # many saturated gates
    for rules in ("epsilon", "cplrp"):
        ex = dynamiclrp.explain(out_lin(h * torch.tanh(lin(x))).sum(1), x, rules=rules)
        L = ex.ledger
        scale = abs(L.seed_total) + sum(abs(s.total) for s in L.sinks)
        assert abs(ex.unaccounted) <= 1e-6 * scale, L.summary()
