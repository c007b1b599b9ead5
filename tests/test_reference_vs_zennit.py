"""The yardstick is right: reference rules vs Zennit 0.5.1, the composite harness, and the AttnLRP references.

Nothing here imports ``dynamiclrp``.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zennit import rules as zrules
from zennit.core import Composite
from zennit.layer import Sum as ZSum

from reference import attention as at
from reference import rules as rr
from reference import zennit_harness as zh

DT = torch.float64



def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-10) -> None:
    """Element-wise relative tolerance with an absolute floor scaled to the tensor's magnitude."""
    scale = max(float(expected.abs().max()), 1e-300)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def zennit_single(module: nn.Module, rule, x: Tensor, R: Tensor) -> Tensor:
    """Zennit relevance of one module: register ``rule`` on it, backprop ``R`` from its output."""
    composite = Composite(module_map=lambda ctx, name, m: rule if m is module else None)
    inp = x.detach().clone().requires_grad_(True)
    with composite.context(module) as mod:
        out = mod(inp)
        (grad,) = torch.autograd.grad(out, inp, R)
    return grad


# ----------------------------------------------------------------------------------------------------------------
# 1. single-layer rules vs Zennit
# ----------------------------------------------------------------------------------------------------------------
LAYERS: dict[str, tuple[Callable[[bool], nn.Module], tuple[int, ...]]] = {
    "linear": (lambda bias: nn.Linear(7, 5, bias=bias), (2, 7)),
    "conv1d": (lambda bias: nn.Conv1d(3, 4, 3, stride=2, padding=1, bias=bias), (2, 3, 9)),
    "conv2d": (lambda bias: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=bias), (2, 4, 7, 7)),
    "conv3d": (lambda bias: nn.Conv3d(2, 3, 2, padding=1, bias=bias), (2, 2, 3, 3, 3)),
    "conv_transpose2d": (lambda bias: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                                                         bias=bias), (2, 4, 4, 4)),
}


def _layer_case(name: str, bias: bool, seed: int, zeros: bool = True) -> tuple[nn.Module, Tensor, Tensor]:
    build, shape = LAYERS[name]
    torch.manual_seed(seed)
    module = build(bias).to(DT)
    if bias:
        with torch.no_grad():
            module.bias.copy_(0.3 * torch.randn_like(module.bias))
    x = torch.randn(shape, dtype=DT)
    if zeros:  # exact zeros exercise the x+/x- split (and make some z_j == 0 without bias)
        x[torch.rand(shape) < 0.1] = 0.0
    with torch.no_grad():
        R = torch.randn_like(module(x))
    return module, x, R


def _bounds(x: Tensor, per_pixel: bool) -> tuple[object, object]:
    if not per_pixel:
        return -4.0, 4.0
    g = torch.Generator().manual_seed(7)
    lo = x.min(0, keepdim=True).values - torch.rand((1,) + x.shape[1:], generator=g, dtype=DT)
    hi = x.max(0, keepdim=True).values + torch.rand((1,) + x.shape[1:], generator=g, dtype=DT)
    return lo, hi


# (id, zennit rule factory, reference call (w, b, op, x, R) -> Tensor)
RULE_CASES: list[tuple[str, Callable[[Tensor], object], Callable[..., Tensor]]] = [
    ("epsilon", lambda x: zrules.Epsilon(1e-6), lambda w, b, op, x, R: rr.epsilon(w, b, op, x, R, epsilon=1e-6)),
    ("epsilon_0.25", lambda x: zrules.Epsilon(0.25), lambda w, b, op, x, R: rr.epsilon(w, b, op, x, R, epsilon=0.25)),
    ("lrp0", lambda x: zrules.Epsilon(0.0), lambda w, b, op, x, R: rr.lrp0(w, b, op, x, R)),
    ("epsilon_nobias", lambda x: zrules.Epsilon(1e-3, zero_params=["bias"]),
     lambda w, b, op, x, R: rr.epsilon(w, b, op, x, R, epsilon=1e-3, zero_params="bias")),
    ("gamma", lambda x: zrules.Gamma(0.25), lambda w, b, op, x, R: rr.gamma(w, b, op, x, R, gamma=0.25)),
    ("gamma_1", lambda x: zrules.Gamma(1.0, stabilizer=1e-4),
     lambda w, b, op, x, R: rr.gamma(w, b, op, x, R, gamma=1.0, stabilizer=1e-4)),
    ("gamma_nobias", lambda x: zrules.Gamma(0.25, zero_params=["bias"]),
     lambda w, b, op, x, R: rr.gamma(w, b, op, x, R, gamma=0.25, zero_params=["bias"])),
    ("zplus", lambda x: zrules.ZPlus(), lambda w, b, op, x, R: rr.zplus(w, b, op, x, R)),
    ("zplus_nobias", lambda x: zrules.ZPlus(zero_params="bias"),
     lambda w, b, op, x, R: rr.zplus(w, b, op, x, R, zero_params="bias")),
    ("alpha2_beta1", lambda x: zrules.AlphaBeta(2.0, 1.0),
     lambda w, b, op, x, R: rr.alpha_beta(w, b, op, x, R, 2.0, 1.0)),
    ("alpha1_beta0", lambda x: zrules.AlphaBeta(1.0, 0.0),
     lambda w, b, op, x, R: rr.alpha_beta(w, b, op, x, R, 1.0, 0.0)),
    ("alpha_beta_nobias", lambda x: zrules.AlphaBeta(2.0, 1.0, zero_params=["bias"]),
     lambda w, b, op, x, R: rr.alpha_beta(w, b, op, x, R, 2.0, 1.0, zero_params=["bias"])),
    ("zbox_scalar", lambda x: zrules.ZBox(*_bounds(x, False)),
     lambda w, b, op, x, R: rr.zbox(w, b, op, x, R, *_bounds(x, False))),
    ("zbox_pixel", lambda x: zrules.ZBox(*_bounds(x, True)),
     lambda w, b, op, x, R: rr.zbox(w, b, op, x, R, *_bounds(x, True))),
    ("wsquare", lambda x: zrules.WSquare(), lambda w, b, op, x, R: rr.wsquare(w, b, op, x, R)),
    ("wsquare_nobias", lambda x: zrules.WSquare(zero_params=["bias"]),
     lambda w, b, op, x, R: rr.wsquare(w, b, op, x, R, zero_params=["bias"])),
    ("flat", lambda x: zrules.Flat(), lambda w, b, op, x, R: rr.flat(w, b, op, x, R)),
    ("norm", lambda x: zrules.Norm(), lambda w, b, op, x, R: rr.norm(w, b, op, x, R)),
]


@pytest.mark.parametrize("rule_id,zrule,ref", RULE_CASES, ids=[c[0] for c in RULE_CASES])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_rule_matches_zennit(layer: str, bias: bool, rule_id: str, zrule, ref) -> None:
    for seed in range(3):
        # LRP-0: Zennit divides by z unstabilized, so avoid inputs that make some z_j exactly 0
        module, x, R = _layer_case(layer, bias, seed, zeros=rule_id != "lrp0")
        w, b, op = rr.from_module(module)
        expected = zennit_single(module, zrule(x), x, R)
        actual = ref(w, b, op, x, R)
        assert actual.dtype == DT and actual.shape == x.shape
        assert_close(actual, expected)


def test_dense_matrix_reproduces_layer() -> None:
    for name in LAYERS:
        module, x, _ = _layer_case(name, True, 0)
        w, b, op = rr.from_module(module)
        M, out_shape = rr.dense_matrix(op, w, x.shape[1:])
        y = x.reshape(x.shape[0], -1) @ M.T + rr.bias_vector(op, b, out_shape)
        assert_close(y.reshape((x.shape[0],) + out_shape), module(x).detach())
        # every entry is a single weight (or 0): clamping the matrix == the matrix of the clamped weight
        Mp, _ = rr.dense_matrix(op, w.clamp(min=0), x.shape[1:])
        assert torch.equal(Mp, M.clamp(min=0))


@pytest.mark.parametrize("module,shape", [
    (nn.AvgPool2d(2), (2, 3, 4, 4)),
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (2, 2, 5, 5)),
    (nn.AdaptiveAvgPool2d((3, 3)), (2, 2, 5, 5)),
    (nn.AvgPool1d(3, stride=1), (2, 2, 6)),
    (ZSum(dim=-1), (2, 3, 4, 2)),
], ids=["avgpool2", "avgpool3_pad", "adaptive", "avgpool1d", "sum"])
def test_norm_on_weightless_ops(module: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=DT)
    R = torch.randn_like(module(x))
    w, b, op = rr.from_module(module)
    for stab in (1e-6, 0.1):
        assert_close(rr.norm(w, b, op, x, R, stabilizer=stab), zennit_single(module, zrules.Norm(stab), x, R))


@pytest.mark.parametrize("module", [nn.ReLU(), nn.GELU(), nn.BatchNorm2d(3).eval()], ids=["relu", "gelu", "bn"])
def test_pass_matches_zennit(module: nn.Module) -> None:
    module = module.to(DT)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    R = torch.randn_like(x)
    assert_close(rr.pass_rule(None, None, None, x, R), zennit_single(module, zrules.Pass(), x, R))


def test_zero_output_edge_cases() -> None:
    """Outputs with z_j == 0 exactly: Zennit's LRP-0 gives non-finite values, the reference 0; Gamma agrees."""
    lin = nn.Linear(4, 3).to(DT)
    with torch.no_grad():
        lin.weight[1].zero_()
        lin.bias.copy_(torch.tensor([0.2, 0.0, -0.1], dtype=DT))
    x = torch.randn(2, 4, dtype=DT)
    R = torch.ones(2, 3, dtype=DT)
    w, b, op = rr.from_module(lin)
    ref = rr.lrp0(w, b, op, x, R)
    assert torch.isfinite(ref).all()
    assert not torch.isfinite(zennit_single(lin, zrules.Epsilon(0.0), x, R)).all()  # documented Zennit behaviour
    # ref equals LRP-0 on the two non-degenerate outputs
    keep = torch.tensor([1.0, 0.0, 1.0], dtype=DT)
    assert_close(ref, rr.lrp0(w, b, op, x, R * keep))
    # Gamma: z == 0 selects neither branch -> output 1 contributes nothing, in both implementations
    assert_close(rr.gamma(w, b, op, x, R), zennit_single(lin, zrules.Gamma(0.25), x, R))


def test_gamma_nobias_branch_uses_biased_output() -> None:
    """With zero_params='bias' Zennit still picks the branch by the sign of the output *with* bias."""
    lin = nn.Linear(2, 1).to(DT)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0]], dtype=DT))
        lin.bias.fill_(-5.0)
    x = torch.tensor([[3.0, -1.0]], dtype=DT)  # z_ij = [3, -1]: z without bias = 2 > 0, with bias = -3 < 0
    R = torch.ones(1, 1, dtype=DT)
    w, b, op = rr.from_module(lin)
    ref = rr.gamma(w, b, op, x, R, gamma=0.5, zero_params="bias")
    assert_close(ref, zennit_single(lin, zrules.Gamma(0.5, zero_params=["bias"]), x, R))
    # negative branch: numerators z + γ z⁻ = [3, -1.5], denominator 1.5 (bias zeroed), stabilized to 1.5 + eps
    # (the positive branch would give [4.5, -1] / 3.5)
    assert_close(ref, torch.tensor([[3.0, -1.5]], dtype=DT) / (1.5 + 1e-6))


def test_ledger_epsilon() -> None:
    module, x, R = _layer_case("conv2d", True, 0)
    w, b, op = rr.from_module(module)
    R_in = rr.lrp0(w, None, op, x, R)
    torch.testing.assert_close(rr.non_conserved(R, R_in), torch.zeros(2, dtype=DT), rtol=0, atol=1e-10)
    R_in = rr.lrp0(w, b, op, x, R)
    z = module(x).detach()
    bias_share = (torch.broadcast_to(b.view(-1, 1, 1), z.shape[1:]) * R / z).flatten(1).sum(1)
    assert_close(rr.non_conserved(R, R_in), bias_share, rtol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# 2. the composite harness
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: build() for name, build in zh.MODEL_BUILDERS.items()}


def _kwargs(model_name: str, composite: str) -> dict:
    if composite != "epsilon_gamma_box":
        return {}
    low, high = zh.image_bounds() if model_name != "mlp" else (-4.0, 4.0)
    return {"low": low, "high": high}


@pytest.mark.parametrize("model_name", list(zh.MODEL_BUILDERS))
def test_harness_runs_on_all_models(models, model_name: str) -> None:
    model = models[model_name]
    x = zh.example_input(model_name, batch=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(x)
    target = logits.argmax(1)
    for composite in zh.COMPOSITE_NAMES:
        out, R = zh.zennit_forward_and_attribution(model, x, target, composite, **_kwargs(model_name, composite))
        assert R.shape == x.shape and R.dtype == DT and torch.isfinite(R).all() and R.abs().sum() > 0
        # canonizers keep the function up to Zennit's merged-BN factor 1/sqrt(1 + bn.eps) per BatchNorm
        assert_close(out, logits, rtol=1e-3)
        # relevance roughly sums to the explained logit (biases and non-conservative rules take a share)
        explained = logits[torch.arange(2), target]
        assert (R.flatten(1).sum(1) - explained).abs().max() < 0.5 * explained.abs().max() + 0.05
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # canonizers reverted


def test_rule_maps(models) -> None:
    m = zh.zennit_rule_map(models["mlp"], "epsilon_plus_flat")
    assert m == {"0": "Flat", "1": "Pass", "2": "Epsilon", "3": "Pass", "4": "Epsilon"}
    assert set(zh.zennit_rule_map(models["mlp"], "epsilon_gamma_box").values()) == {"Epsilon", "Pass"}
    m = zh.zennit_rule_map(models["resnet18"], "epsilon_gamma_box")
    assert m["conv1"] == "ZBox" and m["layer2.0.downsample.0"] == "Gamma" and m["fc"] == "Epsilon"
    assert m["layer1.0.canonizer_sum"] == "Norm" and m["avgpool"] == "Norm" and m["bn1"] == "Pass"
    assert "maxpool" not in m
    m = zh.zennit_rule_map(models["resnet18"], "epsilon_plus", canonizers=None)
    assert not any("canonizer_sum" in k for k in m)
    m = zh.zennit_rule_map(models["vgg11"], "epsilon_alpha2_beta1_flat")
    assert m["features.0"] == "Flat" and m["features.4"] == "AlphaBeta" and m["classifier.0"] == "Epsilon"
    assert m["avgpool"] == "Norm"


def test_canonizer_matters_for_bn_models(models) -> None:
    model, x = models["vgg_bn_cnn"], zh.example_input("vgg_bn_cnn")
    a = zh.zennit_attribution(model, x, 3, "epsilon_plus")
    b = zh.zennit_attribution(model, x, 3, "epsilon_plus", canonizers=None)
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


# --- the harness equals a hand-built chain of reference rules --------------------------------------------------
class _ZennitMergedBN(nn.Module):
    """What Zennit leaves of a merged BatchNorm: mean 0, var 1, affine identity, but the *original eps*, so it
    still scales by 1/sqrt(1 + eps) (it gets the Pass rule)."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x / math.sqrt(1.0 + self.eps)


def _merge_bn(model: nn.Sequential) -> list[nn.Module]:
    """Own BatchNorm merge (w' = w·γ/σ, b' = (b-μ)·γ/σ + β) into the preceding conv."""
    layers, out = list(copy.deepcopy(model)), []
    for layer in layers:
        if isinstance(layer, nn.BatchNorm2d):
            prev = out[-1]
            s = layer.weight / torch.sqrt(layer.running_var + layer.eps)
            with torch.no_grad():
                prev.weight.mul_(s.view(-1, 1, 1, 1))
                prev.bias.copy_((prev.bias - layer.running_mean) * s + layer.bias)
            out.append(_ZennitMergedBN(layer.eps))
            continue
        out.append(layer)
    return out


def _chain_relevance(layers: list[nn.Module], x: Tensor, target: int, composite: str, low=None, high=None) -> Tensor:
    """Reference LRP through a sequential model with the rule table documented in zennit_harness."""
    conv_rule = {"epsilon_gamma_box": "gamma", "epsilon_plus": "zplus", "epsilon_plus_flat": "zplus",
                 "epsilon_alpha2_beta1": "alpha_beta", "epsilon_alpha2_beta1_flat": "alpha_beta"}[composite]
    inputs, h = [], x
    for layer in layers:
        inputs.append(h)
        h = layer(h)
    seed = torch.zeros_like(h)
    seed[:, target] = h[:, target]
    R, first_done = seed, False
    rules_used = [None] * len(layers)
    for i, layer in enumerate(layers):  # assign in named_modules order
        is_conv = isinstance(layer, nn.Conv2d)
        if not first_done and composite == "epsilon_gamma_box" and is_conv:
            rules_used[i], first_done = "zbox", True
        elif not first_done and composite.endswith("_flat") and isinstance(layer, (nn.Conv2d, nn.Linear)):
            rules_used[i], first_done = "flat", True
        elif is_conv:
            rules_used[i] = conv_rule
        elif isinstance(layer, nn.Linear):
            rules_used[i] = "epsilon"
    for i in reversed(range(len(layers))):
        layer, xin = layers[i], inputs[i]
        if isinstance(layer, (nn.Conv2d, nn.Linear, nn.AdaptiveAvgPool2d)):
            w, b, op = rr.from_module(layer)
            name = rules_used[i] or "norm"
            if name == "zbox":
                R = rr.zbox(w, b, op, xin, R, low, high)
            elif name == "alpha_beta":
                R = rr.alpha_beta(w, b, op, xin, R, 2.0, 1.0)
            else:
                R = rr.RULES[name](w, b, op, xin, R)
        elif isinstance(layer, (nn.ReLU, _ZennitMergedBN)):
            R = rr.pass_rule(None, None, None, xin, R)
        else:  # MaxPool, Flatten: no rule in Zennit -> plain gradient (vector-Jacobian product)
            xi = xin.detach().requires_grad_(True)
            (R,) = torch.autograd.grad(layer(xi), xi, R)
    return R


@pytest.mark.parametrize("composite", zh.COMPOSITE_NAMES)
@pytest.mark.parametrize("model_name", ["mlp", "vgg_bn_cnn"])
def test_harness_equals_reference_chain(models, model_name: str, composite: str) -> None:
    model = models[model_name]
    x = zh.example_input(model_name, seed=3, size=16)  # dense reference matrices stay small
    kw = _kwargs(model_name, composite)
    target = 2
    expected = _chain_relevance(_merge_bn(model), x, target, composite, kw.get("low"), kw.get("high"))
    actual = zh.zennit_attribution(model, x, target, composite, **kw)
    assert_close(actual, expected, rtol=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# 3. attention references
# ----------------------------------------------------------------------------------------------------------------
B, T, D = 2, 5, 16


def _x(seed: int = 0) -> Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _pad_mask() -> Tensor:
    m = torch.zeros(B, 1, 1, T, dtype=DT)
    m[1, ..., -2:] = torch.finfo(DT).min  # HF-style padding mask on the second sample
    return m


def test_softmax_rule_hand_made() -> None:
    x = torch.tensor([0.0, math.log(2.0), math.log(5.0)], dtype=DT)  # softmax = [1/8, 2/8, 5/8]
    R = torch.tensor([0.5, 1.0, 2.0], dtype=DT)  # sum 3.5
    expected = torch.tensor([0.0, math.log(2.0) * (1.0 - 0.25 * 3.5), math.log(5.0) * (2.0 - 0.625 * 3.5)], dtype=DT)
    assert_close(at.softmax_relevance(x, R), expected)
    # masked entry (-inf) gets 0; the others are computed with the renormalised softmax
    xm = torch.tensor([0.0, math.log(2.0), float("-inf"), math.log(5.0)], dtype=DT)
    Rm = torch.tensor([0.5, 1.0, 0.0, 2.0], dtype=DT)
    s = torch.tensor([1 / 8, 2 / 8, 0.0, 5 / 8], dtype=DT)
    out = at.softmax_relevance(xm, Rm)
    assert out[2] == 0.0
    assert_close(out[[0, 1, 3]], expected)
    # it is Taylor at x with bias: x ⊙ Jᵀ(R ⊘ s)
    xi = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.softmax(xi, -1), xi, R / torch.softmax(x, -1))
    assert_close(at.softmax_relevance(x, R), x * g)
    assert_close(torch.softmax(xm, -1), s)


def test_block_forwards_match_torch() -> None:
    x = _x()
    for n_kv in (4, 2, 1):
        w = at.make_attention(D, 4, n_kv)
        for mask, causal in ((None, False), (None, True), (_pad_mask(), False), (_pad_mask(), True)):
            f = at.attention_forward(x, w, mask, causal)
            bool_mask = None
            if mask is not None:
                bool_mask = (mask > at.MASK_THRESHOLD).expand(B, 1, T, T)
                if causal:
                    bool_mask = bool_mask & torch.ones(T, T, dtype=torch.bool).tril()
            ref = F.scaled_dot_product_attention(f["Q"], f["K"], f["V"], attn_mask=bool_mask,
                                                 is_causal=causal and mask is None, enable_gqa=True)
            assert_close(f["O"], ref)
    nw = at.make_norm("layer", D)
    assert_close(at.norm_forward(x, nw), F.layer_norm(x, (D,), nw.weight, nw.bias, nw.eps))
    nw = at.make_norm("rms", D)
    assert_close(at.norm_forward(x, nw), F.rms_norm(x, (D,), nw.weight, nw.eps))


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("n_kv", [4, 2])
def test_cplrp_conserves_exactly(norm: str, n_kv: int) -> None:
    x = _x(1)
    w = at.make_transformer_layer(D, 4, n_kv, norm=norm, bias=False)
    y = at.transformer_layer_forward(x, w, causal=True)["y"]
    R = y * torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    r = at.transformer_layer_relevance(x, w, R, "cplrp", at.Eps.zero(), causal=True)
    assert math.isclose(r.totals["x"], r.totals["out"], rel_tol=1e-10)
    assert r.totals["attn.Q"] == 0.0 and r.totals["attn.K"] == 0.0 and r.totals["mlp.gate"] == 0.0
    # every stage is conservative
    for key in ("m", "a", "n1", "n2", "attn.V", "mlp.up"):
        assert math.isfinite(r.totals[key])
    assert math.isclose(r.totals["attn.V"], r.totals["a"], rel_tol=1e-10)
    # per-position conservation of a single attention block too
    ra = at.attention_relevance(x, w.attn, R, "cplrp", at.Eps.zero(), _pad_mask())
    assert math.isclose(ra.totals["x"], ra.totals["out"], rel_tol=1e-10)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_attnlrp_conservation_ledger(norm: str) -> None:
    """ε = 0, no biases: every rule conserves except the softmax; the layer's leak equals the softmax's."""
    x = _x(2)
    w = at.make_transformer_layer(D, 4, 2, norm=norm, bias=False)
    y = at.transformer_layer_forward(x, w, causal=True)["y"]
    r = at.transformer_layer_relevance(x, w, y, "attnlrp", at.Eps.zero(), causal=True)
    t = r.totals
    close = lambda a, b: math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-10 * abs(t["out"]))  # noqa: E731
    assert close(t["h_residual"] + t["m"], t["out"])
    assert close(t["mlp.x"], t["m"])  # gated MLP: ε-rule, uniform (halves), identity
    assert close(t["mlp.act"], t["mlp.up"]) and close(t["mlp.act"] + t["mlp.up"], t["mlp.h"])
    assert close(t["h_from_norm"], t["n2"])  # normaliser constant, no bias
    assert close(t["attn.A"] + t["attn.V"], t["attn.O"])  # uniform rule on A·V
    assert close(t["attn.Q"] + t["attn.K"], t["attn.X"])  # uniform rule on Q·Kᵀ
    assert close(t["attn.x"], t["attn.V"] + t["attn.X"])
    assert close(t["out"] - t["x"], t["attn.A"] - t["attn.X"])  # the only leak: softmax
    assert not close(t["attn.A"], t["attn.X"])


def test_bias_and_mask_are_sinks() -> None:
    x = _x(3)
    w = at.make_attention(D, 4, 2, bias=True)
    f = at.attention_forward(x, w, _pad_mask())
    R = f["y"].clone()
    r = at.attention_relevance(x, w, R, "cplrp", at.Eps.zero(), _pad_mask())
    ratio = R / f["y"]
    assert math.isclose(r.totals["out"] - r.totals["o"], float((w.bo * ratio).sum()), rel_tol=1e-9)
    # softmax relevance of masked (padded) keys is zero; the mask add keeps relevance off the mask in mask=0 rows
    ra = at.attention_relevance(x, w, R, "attnlrp", at.Eps.zero(), _pad_mask())
    assert (ra["X"][1, ..., -2:] == 0).all() and (ra["S"][1, ..., -2:] == 0).all()
    assert_close(ra["S"][0], ra["X"][0])


def test_uniform_mul_halves_and_eps_continuity() -> None:
    a, b = torch.randn(3, 4, dtype=DT), torch.randn(3, 4, dtype=DT)
    R = torch.randn(3, 4, dtype=DT)
    ra, rb = at.mul_uniform_relevance(a, b, R, 0.0)
    assert_close(ra, R / 2) and assert_close(rb, R / 2)
    x, w = _x(4), at.make_transformer_layer(D, 4, 2, norm="layer", bias=True)
    y = at.transformer_layer_forward(x, w)["y"]
    r0 = at.transformer_layer_relevance(x, w, y, "attnlrp", at.Eps.zero())["x"]
    r1 = at.transformer_layer_relevance(x, w, y, "attnlrp", at.Eps(1e-9, 1e-9, 1e-9, 1e-9))["x"]
    assert_close(r1, r0, rtol=1e-5)


# --- R-form equals LXT's efficient Gradient×Input formulation (derived independently here) ---------------------
class _GradScale(torch.autograd.Function):
    """Identity forward; gradient multiplied by a constant (the uniform rule's 1/2, 1/4 factors)."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return g * ctx.factor, None


class _IdentityRuleAct(torch.autograd.Function):
    """act(x) forward; d/dx := act(x)/x so that x ⊙ grad_x = act(x) ⊙ grad_out (identity rule)."""

    @staticmethod
    def forward(ctx, x: Tensor, name: str) -> Tensor:  # type: ignore[override]
        y = F.silu(x) if name == "silu" else F.gelu(x)
        ctx.save_for_backward(y / x)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (r,) = ctx.saved_tensors
        return g * r, None


def _gi_norm(x: Tensor, w: at.NormWeights) -> Tensor:
    if w.kind == "rms":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + w.eps).detach() * w.weight
    mu = x.mean(-1, keepdim=True)
    sigma = torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + w.eps).detach()
    y = (x - mu) / sigma * w.weight
    return y if w.bias is None else y + w.bias


def _gi_layer(x: Tensor, w: at.TransformerLayerWeights, mode: str, mask: Optional[Tensor], causal: bool) -> Tensor:
    a_w, m_w = w.attn, w.mlp
    n1 = _gi_norm(x, w.norm1)
    Bx, Tx, _ = x.shape
    H, Hkv, dh = a_w.n_heads, a_w.n_kv_heads, a_w.head_dim
    Q = F.linear(n1, a_w.wq, a_w.bq).view(Bx, Tx, H, dh).transpose(1, 2)
    K = F.linear(n1, a_w.wk, a_w.bk).view(Bx, Tx, Hkv, dh).transpose(1, 2)
    V = F.linear(n1, a_w.wv, a_w.bv).view(Bx, Tx, Hkv, dh).transpose(1, 2)
    if mode == "attnlrp":  # 1/2 (A·V) × 1/2 (Q·Kᵀ) for q and k, 1/2 for v
        Q, K, V = _GradScale.apply(Q, 0.25), _GradScale.apply(K, 0.25), _GradScale.apply(V, 0.5)
    else:  # CP-LRP: attention weights are constants
        Q, K = Q.detach(), K.detach()
    K, V = K.repeat_interleave(H // Hkv, 1), V.repeat_interleave(H // Hkv, 1)
    X = (Q @ K.transpose(-1, -2)) * a_w.scale
    masked = torch.zeros(Bx, H, Tx, Tx, dtype=torch.bool)
    if mask is not None:
        X = X + mask
        masked = masked | (mask <= at.MASK_THRESHOLD)
    if causal:
        masked = masked | torch.ones(Tx, Tx, dtype=torch.bool).triu(1)
    A = torch.softmax(X.masked_fill(masked, float("-inf")), -1)
    o = (A @ V).transpose(1, 2).reshape(Bx, Tx, H * dh)
    h = x + F.linear(o, a_w.wo, a_w.bo)
    n2 = _gi_norm(h, w.norm2)
    gate = F.linear(n2, m_w.w_gate, m_w.b_gate)
    if mode == "attnlrp":
        act = _IdentityRuleAct.apply(gate, m_w.act)
        prod = _GradScale.apply(act * F.linear(n2, m_w.w_up, m_w.b_up), 0.5)
    else:
        prod = F.silu(gate).detach() * F.linear(n2, m_w.w_up, m_w.b_up)
    return h + F.linear(prod, m_w.w_down, m_w.b_down)


@pytest.mark.parametrize("mode", ["attnlrp", "cplrp"])
@pytest.mark.parametrize("norm,n_kv,masking", [("rms", 2, "causal"), ("layer", 4, "pad"), ("layer", 1, "both")])
def test_rform_equals_gradient_x_input(mode: str, norm: str, n_kv: int, masking: str) -> None:
    """With ε = 0 the explicit rules equal LXT's efficient x ⊙ modified-gradient scheme (biases included)."""
    x = _x(6)
    w = at.make_transformer_layer(D, 4, n_kv, norm=norm, bias=True, seed=11)
    mask = _pad_mask() if masking in ("pad", "both") else None
    causal = masking in ("causal", "both")
    xi = x.clone().requires_grad_(True)
    y = _gi_layer(xi, w, mode, mask, causal)
    R = y.detach() * torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=DT)
    (g,) = torch.autograd.grad(y, xi, R / y.detach())
    expected = x * g
    actual = at.transformer_layer_relevance(x, w, R, mode, at.Eps.zero(), mask, causal)["x"]
    assert_close(actual, expected, rtol=1e-9)
