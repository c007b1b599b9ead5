"""Tests for dynamiclrp.metrics: perturbation curves, ABPC/AOPC, sanity checks."""
from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynamiclrp import metrics as M

F64 = torch.float64


def linear(weight, bias=0.0):
    m = nn.Linear(len(weight), 1).to(F64).eval()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([weight], dtype=F64))
        m.bias.fill_(bias)
    return m


def grad_x_input(model, x, targets):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out = out.gather(1, targets.view(-1, 1)) if out.shape[1] > 1 else out
    (grad,) = torch.autograd.grad(out.sum(), x)
    return (grad * x).detach()


def gradient(model, x, targets):
    return grad_x_input(model, x, targets) / x


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).to(F64).eval()


# --------------------------------------------------------------------------------------------
# pixel flipping: exact values
# --------------------------------------------------------------------------------------------
def test_hand_computed_linear_curves():
    # f(x) = w.x + b with contributions w*x = [1, -2, 6, 2] and f(x) = 7.5
    model = linear([1.0, -1.0, 2.0, 0.5], bias=0.5)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64)
    r = M.pixel_flipping(model, x, model.weight * x, occluder="zero", score="logit", progress=False)
    np.testing.assert_allclose(r.fractions, [0.0, 0.25, 0.5, 0.75, 1.0])
    # MoRF removes 6, 2, 1, -2 in turn; LeRF the reverse
    np.testing.assert_allclose(r.morf, [[7.5, 1.5, -0.5, -1.5, 0.5]])
    np.testing.assert_allclose(r.lerf, [[7.5, 9.5, 8.5, 6.5, 0.5]])
    np.testing.assert_array_equal(r.ranking, [[2, 3, 0, 1]])
    # trapezoid with dx = 1/4
    np.testing.assert_allclose(r.auc_morf, [0.25 * (4.5 + 0.5 - 1.0 - 0.5)])  # 0.875
    np.testing.assert_allclose(r.auc_lerf, [0.25 * (8.5 + 9.0 + 7.5 + 3.5)])  # 7.125
    np.testing.assert_allclose(r.abpc, [6.25])
    np.testing.assert_allclose(r.aopc_morf, [(0 + 6 + 8 + 9 + 7) / 5])
    np.testing.assert_allclose(r.aopc_lerf, [(0 - 2 - 1 + 1 + 7) / 5])
    assert r.summary() == pytest.approx(
        {"auc_morf": 0.875, "auc_lerf": 7.125, "abpc": 6.25, "aopc_morf": 6.0, "aopc_lerf": 1.0}
    )
    assert r.abpc_mean == pytest.approx(6.25)

    # two steps: 0, 2 and 4 features removed
    r2 = M.pixel_flipping(model, x, model.weight * x, occluder="zero", score="logit", steps=2, progress=False)
    np.testing.assert_allclose(r2.fractions, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(r2.morf, [[7.5, -0.5, 0.5]])
    np.testing.assert_allclose(r2.lerf, [[7.5, 8.5, 0.5]])

    # single order: the other curve is unavailable with a clear error
    only = M.pixel_flipping(model, x, model.weight * x, occluder="zero", score="logit", order="morf", progress=False)
    assert only.lerf is None and set(only.summary()) == {"auc_morf", "aopc_morf"}
    with pytest.raises(ValueError, match="LERF"):
        _ = only.abpc
    lerf = M.pixel_flipping(model, x, model.weight * x, occluder="zero", score="logit", order="lerf", progress=False)
    assert lerf.morf is None
    np.testing.assert_allclose(lerf.lerf, r.lerf)


def test_occluders_mean_tensor_callable_and_probability_score():
    model = linear([1.0, -1.0, 2.0, 0.5], bias=0.5)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64)
    a = model.weight * x
    kw = dict(score="logit", progress=False, steps=4)
    full_mean = M.pixel_flipping(model, x, a, occluder="mean", **kw)
    assert full_mean.morf[0, -1] == pytest.approx(2.5 * 2.5 + 0.5)  # every feature replaced by 2.5
    tensor = M.pixel_flipping(model, x, a, occluder=torch.full((4,), 10.0, dtype=F64), **kw)
    assert tensor.morf[0, 1] == pytest.approx(7.5 - 6 + 2 * 10)
    fn = M.pixel_flipping(model, x, a, occluder=lambda z: -z, **kw)
    assert fn.morf[0, -1] == pytest.approx(-7.0 + 0.5)
    prob = M.pixel_flipping(model, x, a, occluder="zero", progress=False)  # single output: sigmoid
    logit = M.pixel_flipping(model, x, a, occluder="zero", **kw)
    np.testing.assert_allclose(prob.morf, torch.sigmoid(torch.tensor(logit.morf)))


def test_multiclass_probability_and_default_targets():
    model = small_cnn()
    x = torch.randn(3, 2, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    r = M.pixel_flipping(model, x, torch.randn_like(x), steps=3, occluder="zero", progress=False)
    with torch.no_grad():
        probs = model(x).softmax(1)
    np.testing.assert_allclose(r.morf[:, 0], probs.max(1).values)  # predicted class by default
    r1 = M.pixel_flipping(model, x, torch.randn_like(x), 1, steps=3, occluder="zero", progress=False)
    np.testing.assert_allclose(r1.lerf[:, 0], probs[:, 1])
    with torch.no_grad():
        zero_prob = model(torch.zeros_like(x)).softmax(1)[:, 1]
    np.testing.assert_allclose(r1.morf[:, -1], zero_prob)


# --------------------------------------------------------------------------------------------
# pixel flipping: statistical behaviour
# --------------------------------------------------------------------------------------------
def test_ground_truth_beats_random_attribution():
    torch.manual_seed(0)
    model = nn.Linear(32, 1).to(F64).eval()
    x = torch.randn(64, 32, dtype=F64)
    kw = dict(occluder="zero", score="logit", progress=False, batch_size=512)
    truth = M.pixel_flipping(model, x, (model.weight * x).detach(), **kw)
    assert truth.abpc_mean > 1.0 and (truth.abpc > 0).all()
    assert (truth.auc_morf < truth.auc_lerf).all()
    randoms = []
    for s in range(5):
        noise = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(100 + s))
        randoms.append(M.pixel_flipping(model, x, noise, seed=s, **kw).abpc_mean)
    # random orderings: MoRF and LeRF have the same expectation, so ABPC ~ 0
    assert abs(np.mean(randoms)) < 0.05 * truth.abpc_mean
    assert max(abs(v) for v in randoms) < 0.1 * truth.abpc_mean


def test_seeded_tie_breaking_is_reproducible():
    model = linear(list(np.linspace(-1, 1, 10)))
    x = torch.ones(2, 10, dtype=F64)
    ties = torch.zeros_like(x)  # every feature equally relevant
    kw = dict(occluder="zero", score="logit", progress=False)
    a, b = M.pixel_flipping(model, x, ties, seed=3, **kw), M.pixel_flipping(model, x, ties, seed=3, **kw)
    np.testing.assert_array_equal(a.morf, b.morf)
    np.testing.assert_array_equal(a.ranking, b.ranking)
    c = M.pixel_flipping(model, x, ties, seed=4, **kw)
    assert not np.array_equal(a.ranking, c.ranking)
    assert not np.array_equal(a.ranking[0], a.ranking[1])  # random per sample
    # ties are broken, genuine differences are not
    partial = torch.zeros_like(x)
    partial[:, 7] = 1.0
    for s in range(5):
        assert (M.pixel_flipping(model, x, partial, seed=s, **kw).ranking[:, 0] == 7).all()


def test_patch_ranking_uses_patch_aggregate():
    # 4x4 image, 2x2 patches numbered 0 1 / 2 3
    attr = torch.zeros(1, 1, 4, 4, dtype=F64)
    attr[0, 0, :2, :2] = 1.0  # patch 0: sum 4, max 1
    attr[0, 0, 0, 2] = 3.0  # patch 1: sum 3, max 3
    attr[0, 0, 2:, :2] = -1.0  # patch 2: sum -4
    x = torch.ones(1, 1, 4, 4, dtype=F64)
    weights = torch.arange(16, dtype=F64)  # removing patch p removes a known sum
    model = nn.Sequential(nn.Flatten(), linear(weights.tolist()))
    kw = dict(occluder="zero", score="logit", patch_size=2, progress=False)
    by_sum = M.pixel_flipping(model, x, attr, patch_reduce="sum", **kw)
    by_max = M.pixel_flipping(model, x, attr, patch_reduce="max", **kw)
    np.testing.assert_array_equal(by_sum.ranking, [[0, 1, 3, 2]])
    assert by_max.ranking[0, 0] == 1 and by_max.ranking[0, -1] == 2
    patch_sum = weights.view(4, 4)
    p0, p1 = patch_sum[:2, :2].sum().item(), patch_sum[:2, 2:].sum().item()
    assert by_sum.morf[0, 1] == pytest.approx(120 - p0)  # f(x) = sum(0..15) = 120
    assert by_max.morf[0, 1] == pytest.approx(120 - p1)
    assert by_sum.n_features.tolist() == [4]
    # rectangular patches and edge patches: a 3x2 patch grid over 4x4 has ceil(4/3) * 2 = 4 patches
    assert M.pixel_flipping(model, x, attr, **{**kw, "patch_size": (3, 2)}).n_features.tolist() == [4]


def test_batched_and_unbatched_agree():
    model = small_cnn(1)
    x = torch.randn(4, 2, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    attr = torch.randn_like(x)
    kw = dict(steps=16, patch_size=2, progress=False, blur_sigma=1.0)
    one = M.pixel_flipping(model, x, attr, batch_size=1, **kw)
    many = M.pixel_flipping(model, x, attr, batch_size=1000, **kw)
    odd = M.pixel_flipping(model, x, attr, batch_size=7, **kw)
    for r in (many, odd):
        np.testing.assert_allclose(r.morf, one.morf, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(r.lerf, one.lerf, rtol=1e-12, atol=1e-14)
    # one sample at a time gives the same curves as the batch
    np.testing.assert_allclose(M.pixel_flipping(model, x[2:3], attr[2:3], **kw).morf[0], one.morf[2], atol=1e-14)


def test_inputs_attributions_and_model_not_mutated():
    model = small_cnn(2)
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 2, 8, 8, dtype=F64)
    attr = torch.randn_like(x)
    x0, a0 = x.clone(), attr.clone()

    def greedy(z):  # an occluder that (wrongly) modifies its argument in place
        return z.mul_(0.0)

    for occ in ("blur", "zero", "mean", greedy):
        M.pixel_flipping(model, x, attr, occluder=occ, steps=4, progress=False)
    assert torch.equal(x, x0) and torch.equal(attr, a0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model.training


def test_blur_occluder():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 9, 11, dtype=F64, generator=g)
    blurred = M.gaussian_blur(x, sigma=1.5, kernel_size=7)
    # separable blur equals the 2-D convolution with the outer-product kernel
    t = torch.arange(7, dtype=F64) - 3
    k1 = torch.exp(-(t**2) / (2 * 1.5**2))
    k1 = k1 / k1.sum()
    k2 = (k1[:, None] * k1[None, :]).expand(3, 1, 7, 7)
    ref = F.conv2d(F.pad(x, (3, 3, 3, 3), mode="reflect"), k2, groups=3)
    torch.testing.assert_close(blurred, ref)
    const = torch.full((1, 1, 4, 4), 2.0, dtype=F64)
    torch.testing.assert_close(M.gaussian_blur(const, sigma=5.0), const)  # replicate fallback
    with pytest.raises(ValueError, match="odd"):
        M.gaussian_blur(x, 1.0, kernel_size=4)
    # removing everything = the blurred input
    model = small_cnn(3)
    xi = torch.rand(2, 2, 8, 8, dtype=F64, generator=g)
    r = M.pixel_flipping(model, xi, torch.randn_like(xi), occluder="blur", blur_sigma=1.0, score="logit",
                         targets=0, steps=4, progress=False)
    with torch.no_grad():
        expected = model(M.gaussian_blur(xi, 1.0))[:, 0]
    np.testing.assert_allclose(r.morf[:, -1], expected)
    np.testing.assert_allclose(r.lerf[:, -1], expected)


def test_clear_errors():
    model = linear([1.0, 2.0])
    x = torch.ones(1, 2, dtype=F64)
    with pytest.raises(ValueError, match="'blur', 'zero', 'mean'"):
        M.pixel_flipping(model, x, x, occluder="noise", progress=False)
    with pytest.raises(ValueError, match="attributions must have the inputs' shape"):
        M.pixel_flipping(model, x, torch.ones(1, 3), progress=False)
    with pytest.raises(ValueError, match="order"):
        M.pixel_flipping(model, x, x, order="random", progress=False)
    with pytest.raises(ValueError, match="score"):
        M.pixel_flipping(model, x, x, score="loss", progress=False)
    with pytest.raises(ValueError, match="targets"):
        M.pixel_flipping(model, torch.ones(2, 2, dtype=F64), torch.ones(2, 2), targets=[0, 0, 0], progress=False)
    with pytest.raises(ValueError, match="NaN"):
        M.pixel_flipping(model, x, torch.tensor([[float("nan"), 0.0]]), progress=False)
    with pytest.raises(ValueError, match="broadcast"):
        M.pixel_flipping(model, x, x, occluder=torch.zeros(3), progress=False)
    with pytest.raises(TypeError, match="token_deletion"):
        M.pixel_flipping(model, torch.ones(1, 2, dtype=torch.long), x, progress=False)


def test_progress_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    model = linear([1.0, 2.0])
    x = torch.ones(1, 2, dtype=F64)
    r = M.pixel_flipping(model, x, x, occluder="zero", score="logit", progress=True)
    np.testing.assert_allclose(r.morf, [[3.0, 1.0, 0.0]])


def test_training_mode_warns_only_when_it_matters(recwarn):
    x = torch.ones(1, 2, dtype=F64)
    M.pixel_flipping(linear([1.0, 2.0]).train(), x, x, progress=False)  # no dropout / batch norm
    assert not [w for w in recwarn if "eval" in str(w.message)]
    model = nn.Sequential(nn.Dropout(0.0), linear([1.0, 2.0])).train()
    with pytest.warns(UserWarning, match=r"model.eval\(\)"):
        M.pixel_flipping(model, x, x, progress=False)
    assert model.training  # warned, not switched


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------
CLS, SEP, PAD, MASK = 1, 2, 0, 3


class BagOfTokens(nn.Module):
    """Score = sum of per-token values of the attended tokens; ids 0-3 are worth 0."""

    def __init__(self):
        super().__init__()
        self.value = nn.Embedding(10, 1).to(F64)
        with torch.no_grad():
            self.value.weight.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 4.0, -1.0, 2.0, 1.0, 3.0, 0.5]).view(10, 1))

    def forward(self, ids, attention_mask=None):
        v = self.value(ids).squeeze(-1)
        if attention_mask is not None:
            v = v * attention_mask
        return v.sum(1, keepdim=True)


def token_batch():
    ids = torch.tensor([[CLS, 4, 5, 6, 7, SEP], [CLS, 8, 9, SEP, PAD, PAD]])
    am = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    special = torch.tensor([[1, 0, 0, 0, 0, 1], [1, 0, 0, 1, 0, 0]])
    return ids, am, special


def test_token_deletion_hand_computed():
    model = BagOfTokens().eval()
    ids, am, special = token_batch()
    attr = model.value(ids).squeeze(-1).detach()
    attr[:, 0] = 100.0  # a huge [CLS] relevance must be ignored: special tokens are not ranked
    r = M.token_deletion(model, ids, attr, attention_mask=am, special_tokens_mask=special,
                         replacement=MASK, score="logit", steps=4, progress=False)
    # sample 0 contributions 4, -1, 2, 1 (total 6); sample 1: 3, 0.5 (total 3.5), floor(k * 2 / 4) removed
    np.testing.assert_allclose(r.morf, [[6, 2, 0, -1, 0], [3.5, 3.5, 0.5, 0.5, 0]])
    np.testing.assert_allclose(r.lerf, [[6, 7, 6, 4, 0], [3.5, 3.5, 3, 3, 0]])
    assert r.n_features.tolist() == [4, 2]
    np.testing.assert_array_equal(r.ranking, [[1, 3, 4, 2, -1, -1], [1, 2, -1, -1, -1, -1]])
    assert (r.abpc > 0).all()
    # removing by attention mask gives the same curves for this additive model
    ra = M.token_deletion(model, ids, attr, attention_mask=am, special_tokens_mask=special,
                          replacement="attention", score="logit", steps=4, progress=False)
    np.testing.assert_allclose(ra.morf, r.morf)


def test_token_insertion_mirrors_deletion():
    model = BagOfTokens().eval()
    ids, am, special = token_batch()
    attr = model.value(ids).squeeze(-1).detach()
    kw = dict(attention_mask=am, special_tokens_mask=special, replacement=MASK, score="logit", progress=False)
    ins = M.token_insertion(model, ids, attr, steps=4, **kw)
    np.testing.assert_allclose(ins.morf, [[0, 4, 6, 7, 6], [0, 0, 3, 3, 3.5]])
    np.testing.assert_allclose(ins.lerf, [[0, -1, 0, 2, 6], [0, 0, 0.5, 0.5, 3.5]])
    assert ins.mode == "insertion" and (ins.abpc > 0).all()  # larger is better in both modes
    np.testing.assert_allclose(ins.aopc_morf, ins.morf.mean(1))  # gain over the empty input
    # inserting MoRF-first after k steps == deleting LeRF-first after (steps - k) steps
    dele = M.token_deletion(model, ids[:1], attr[:1], steps=4, **{**kw, "attention_mask": am[:1],
                                                                    "special_tokens_mask": special[:1]})
    np.testing.assert_allclose(ins.morf[0], dele.lerf[0, ::-1])


def test_token_embeddings_and_errors():
    torch.manual_seed(0)
    emb = torch.randn(2, 5, 3, dtype=F64)
    w = torch.randn(3, dtype=F64)

    def model(e):
        return (e @ w).sum(1, keepdim=True)

    attr = emb * w  # (N, L, D): summed over D for ranking
    emb0 = emb.clone()
    r = M.token_deletion(model, emb, attr, score="logit", progress=False)
    contrib = (emb @ w)
    expected_first = contrib.sum(1) - contrib.max(1).values
    np.testing.assert_allclose(r.morf[:, 1], expected_first)
    np.testing.assert_allclose(r.morf[:, -1], [0.0, 0.0], atol=1e-12)  # zero embedding by default
    assert torch.equal(emb, emb0)
    ids, am, special = token_batch()
    with pytest.raises(ValueError, match="mask_token_id"):
        M.token_deletion(BagOfTokens(), ids, torch.zeros(2, 6), progress=False)
    with pytest.raises(ValueError, match="attention_mask"):
        M.token_deletion(BagOfTokens(), ids, torch.zeros(2, 6), replacement="attention", progress=False)
    with pytest.raises(ValueError, match="shape"):
        M.token_deletion(BagOfTokens(), ids, torch.zeros(2, 5), replacement=MASK, progress=False)


def test_token_deletion_hf_style_output_and_forward():
    class Out:
        def __init__(self, logits):
            self.logits = logits

    class Classifier(nn.Module):
        def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
            x = inputs_embeds.sum(1)
            return Out(torch.stack([x[:, 0], x[:, 1]], 1))

    e = torch.rand(3, 4, 2, dtype=F64)
    r = M.token_deletion(Classifier().eval(), e, e[..., 1], targets=1, order="morf", progress=False,
                         forward=lambda m, x, am: m(inputs_embeds=x, attention_mask=am))
    with torch.no_grad():
        np.testing.assert_allclose(r.morf[:, 0], e.sum(1).softmax(1)[:, 1])


# --------------------------------------------------------------------------------------------
# sanity checks
# --------------------------------------------------------------------------------------------
def test_linear_model_check():
    def exact(model, x, t):
        return model.weight[t] * x

    assert M.linear_model_check(exact) < 1e-12
    assert M.linear_model_check(grad_x_input) < 1e-12
    assert M.linear_model_check(grad_x_input, n_outputs=1) < 1e-12
    assert M.linear_model_check(gradient) > 0.1  # gradients are not LRP-0
    assert M.linear_model_check(lambda m, x, t: 2 * exact(m, x, t)) > 0.1

    def ratio(model, x, t):  # unit seed distributed as fractions of f_t(x)
        return exact(model, x, t) / model(x).gather(1, t.view(-1, 1))

    assert M.linear_model_check(ratio) > 0.1
    assert M.linear_model_check(ratio, scale=lambda out: 1 / out) < 1e-10
    state = torch.get_rng_state()
    M.linear_model_check(exact, seed=5)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    with pytest.raises(ValueError, match="shape"):
        M.linear_model_check(lambda m, x, t: x[:, :2])


def mlp_factory():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(F64).eval()


def test_input_invariance_check():
    x = torch.randn(5, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    grad = M.input_invariance_check(gradient, mlp_factory, x, shift=torch.linspace(-1, 2, 6))
    assert grad.output_difference < 1e-12
    assert grad.max_abs_difference < 1e-12  # gradients are input invariant
    gxi = M.input_invariance_check(grad_x_input, mlp_factory, x, shift=3.0)
    assert gxi.relative_difference > 0.5  # gradient x input is not (Kindermans et al. 2017)
    # a module instead of a factory is deep-copied and left unchanged
    model = mlp_factory()
    state = copy.deepcopy(model.state_dict())
    M.input_invariance_check(gradient, model, x)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_input_invariance_conv_padding():
    torch.manual_seed(0)
    x = torch.rand(2, 2, 6, 6, dtype=F64)

    def conv(padding):
        return lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=padding), nn.ReLU(), nn.Flatten(),
                                     nn.LazyLinear(2)).to(F64)

    for_valid = conv(0)
    model = for_valid()
    model(x)  # materialise the lazy layer
    res = M.input_invariance_check(gradient, model, x, shift=torch.tensor([0.5, -1.0]))
    assert res.output_difference < 1e-10 and res.max_abs_difference < 1e-10
    padded = conv(1)()
    padded(x)
    with pytest.raises(ValueError, match="padding"):
        M.input_invariance_check(gradient, padded, x)


def test_spearman_rank_correlation():
    a = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 3.0]])
    np.testing.assert_allclose(M.spearman_rank_correlation(a, a), [1.0, 1.0])
    np.testing.assert_allclose(M.spearman_rank_correlation(a, -a), [-1.0, -1.0])
    np.testing.assert_allclose(M.spearman_rank_correlation(a, a**3 + 5), [1.0, 1.0])  # monotone
    assert np.isnan(M.spearman_rank_correlation(np.ones((1, 3)), a[:1, :3]))[0]
    stats = pytest.importorskip("scipy.stats")
    g = np.random.default_rng(0)
    x, y = g.integers(0, 5, (4, 30)).astype(float), g.normal(size=(4, 30))  # with ties
    expected = [stats.spearmanr(x[i], y[i]).statistic for i in range(4)]
    np.testing.assert_allclose(M.spearman_rank_correlation(torch.tensor(x), torch.tensor(y)), expected)


@pytest.fixture(scope="module")
def trained_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    X = torch.randn(256, 16)
    y = (X[:, 0] + X[:, 1] - X[:, 2] > 0).long()  # only features 0-2 matter
    for _ in range(100):  # plain gradient descent
        net.zero_grad()
        F.cross_entropy(net(X), y).backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.5 * p.grad
    assert (net(X).argmax(1) == y).float().mean() > 0.95
    return net.eval(), X[:32]


def test_model_parameter_randomisation_decorrelates(trained_mlp):
    net, x = trained_mlp
    state = copy.deepcopy(net.state_dict())
    rng = torch.get_rng_state()
    res = M.model_parameter_randomisation(grad_x_input, net, x, absolute=True)
    assert res.layers == ["4", "2", "0"] and res.correlations.shape == (3, 32)
    mean = res.mean
    assert mean[0] < 0.95 and all(np.diff(mean) < 0)  # cascading top-down: steadily less similar
    assert mean[-1] < 0.5
    signed = M.model_parameter_randomisation(grad_x_input, net, x)
    assert abs(signed.mean[-1]) < 0.3
    # the user's model and the global RNG are untouched; the result is deterministic
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    np.testing.assert_array_equal(M.model_parameter_randomisation(grad_x_input, net, x, absolute=True).correlations,
                                  res.correlations)


def test_model_parameter_randomisation_options(trained_mlp):
    net, x = trained_mlp
    bottom = M.model_parameter_randomisation(grad_x_input, net, x, layer_order="bottom_up")
    assert bottom.layers == ["0", "2", "4"]
    indep = M.model_parameter_randomisation(grad_x_input, net, x, layer_order=["2"], mode="independent")
    assert indep.layers == ["2"] and set(indep.as_dict()) == {"2"}
    with pytest.raises(ValueError, match="unknown module names"):
        M.model_parameter_randomisation(grad_x_input, net, x, layer_order=["fc9"])
    with pytest.raises(ValueError, match="mode"):
        M.model_parameter_randomisation(grad_x_input, net, x, mode="sometimes")
