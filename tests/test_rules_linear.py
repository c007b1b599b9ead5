"""Every linear rule against an independent float64 matrix formula (``tests/reference/rules.py``).

Each case is a one-layer graph (``nn.Linear``, ``Conv1d/2d/3d``, ``ConvTranspose1d/2d``, with and without bias,
strided, padded, dilated and grouped) explained through :func:`dynamiclrp.explain` with ``ledger=True`` and a random
(signed) output relevance as the seed. We check

* the input relevance against the dense-matrix reference (which builds ``Z = M ⊙ x`` explicitly and never uses
  gradients), for several seeds and with exact zeros in the input;
* the rule's non-conserved share: ``Σ R_out − Σ R_in`` of the reference must equal the total of the ledger's sinks
  (biases, stabilizers, rule residuals), and the ledger must account for everything (``unaccounted ≈ 0``).

References: Bach et al. 2015 (ε, α-β); Montavon et al. 2017 (z⁺, z^B, w²); Montavon et al. 2019 and Andéol et al.
2021 (generalised γ); Lapuschkin et al. 2019 (flat); Zennit 0.5.1 (``zennit.rules``) for the exact conventions
(signed stabilizer with ``sign(0) = +1``, bias handling per rule), which ``tests/test_reference_vs_zennit.py`` checks.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dynamiclrp
from dynamiclrp import presets
from dynamiclrp import rules as R
from dynamiclrp.errors import RuleError
from reference import rules as rr

DT = torch.float64



LAYERS: dict[str, tuple[Callable[[bool], nn.Module], tuple[int, ...]]] = {
    "linear": (lambda bias: nn.Linear(7, 5, bias=bias), (3, 7)),
    "conv1d": (lambda bias: nn.Conv1d(3, 4, 3, stride=2, padding=1, bias=bias), (2, 3, 9)),
    "conv2d": (lambda bias: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=bias), (2, 4, 7, 7)),
    "conv3d": (lambda bias: nn.Conv3d(2, 3, 2, padding=1, bias=bias), (2, 2, 3, 3, 3)),
    "conv_transpose1d": (lambda bias: nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1,
                                                         bias=bias), (2, 3, 5)),
    "conv_transpose2d": (lambda bias: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                                                         bias=bias), (2, 4, 4, 4)),
}
SEEDS = (0, 1)


def _callable_eps(z: Tensor) -> Tensor:
    """A user stabilizer: ``z + 0.01·sign(z)`` written as a callable (equals ``Epsilon(0.01)``)."""
    return z + 0.01 * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


#: name -> (our rule, reference(weight, bias, op, x, R)); bounds for ZBox are made per case below
RULES: dict[str, tuple[Callable[[dict], R.Rule], Callable[..., Tensor]]] = {
    "epsilon": (lambda c: R.Epsilon(1e-2), lambda w, b, op, x, Ro, c: rr.epsilon(w, b, op, x, Ro, 1e-2)),
    "epsilon_callable": (lambda c: R.Epsilon(_callable_eps),
                         lambda w, b, op, x, Ro, c: rr.epsilon(w, b, op, x, Ro, 1e-2)),
    "epsilon_no_bias": (lambda c: R.Epsilon(1e-2, zero_params=("bias",)),
                        lambda w, b, op, x, Ro, c: rr.epsilon(w, b, op, x, Ro, 1e-2, zero_params="bias")),
    "lrp0": (lambda c: R.Zero(), lambda w, b, op, x, Ro, c: rr.lrp0(w, b, op, x, Ro)),
    "gamma": (lambda c: R.Gamma(0.25), lambda w, b, op, x, Ro, c: rr.gamma(w, b, op, x, Ro, 0.25)),
    "gamma_no_bias": (lambda c: R.Gamma(0.7, zero_params=("bias",)),
                      lambda w, b, op, x, Ro, c: rr.gamma(w, b, op, x, Ro, 0.7, zero_params="bias")),
    "zplus": (lambda c: R.ZPlus(), lambda w, b, op, x, Ro, c: rr.zplus(w, b, op, x, Ro)),
    "alpha2beta1": (lambda c: R.AlphaBeta(2, 1), lambda w, b, op, x, Ro, c: rr.alpha_beta(w, b, op, x, Ro, 2, 1)),
    "alpha1beta0_no_bias": (lambda c: R.AlphaBeta(1, 0, zero_params=("bias",)),
                            lambda w, b, op, x, Ro, c: rr.alpha_beta(w, b, op, x, Ro, 1, 0, zero_params="bias")),
    "zbox_scalar": (lambda c: R.ZBox(-4.0, 4.0), lambda w, b, op, x, Ro, c: rr.zbox(w, b, op, x, Ro, -4.0, 4.0)),
    "zbox_channel": (lambda c: R.ZBox(c["low_c"], c["high_c"]),
                     lambda w, b, op, x, Ro, c: rr.zbox(w, b, op, x, Ro, c["low_c"], c["high_c"])),
    "zbox_pixel": (lambda c: R.ZBox(c["low_p"], c["high_p"]),
                   lambda w, b, op, x, Ro, c: rr.zbox(w, b, op, x, Ro, c["low_p"], c["high_p"])),
    "wsquare": (lambda c: R.WSquare(), lambda w, b, op, x, Ro, c: rr.wsquare(w, b, op, x, Ro)),
    "flat": (lambda c: R.Flat(), lambda w, b, op, x, Ro, c: rr.flat(w, b, op, x, Ro)),
    "norm": (lambda c: R.Norm(1e-6), lambda w, b, op, x, Ro, c: rr.norm(w, b, op, x, Ro, 1e-6)),
}


def _case(layer: str, bias: bool, seed: int) -> tuple[nn.Module, Tensor, Tensor, dict]:
    build, shape = LAYERS[layer]
    torch.manual_seed(seed)
    module = build(bias).to(DT)
    if bias:
        with torch.no_grad():
            module.bias.copy_(0.3 * torch.randn_like(module.bias))
    x = torch.randn(shape, dtype=DT)
    x[torch.rand(shape) < 0.1] = 0.0  # exact zeros exercise x⁺/x⁻ and z = 0
    with torch.no_grad():
        Rout = torch.randn_like(module(x))
    c = shape[1]
    extra = {
        "low_c": -2.0 - torch.rand((1, c) + (1,) * (len(shape) - 2), dtype=DT),
        "low_p": x.min() - torch.rand((1,) + shape[1:], dtype=DT),
    }
    extra["high_c"] = 2.0 + torch.rand_like(extra["low_c"])
    extra["high_p"] = x.max() + torch.rand_like(extra["low_p"])
    return module, x, Rout, extra


def _ruleset(rule: R.Rule) -> dynamiclrp.RuleSet:
    return presets.epsilon().with_families(linear=rule, conv=rule)


def _assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-9) -> None:
    scale = max(float(expected.abs().max()), 1e-300)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("rule_name", list(RULES))
def test_rule_matches_matrix_reference_and_ledger(rule_name: str, layer: str, bias: bool) -> None:
    make_rule, reference = RULES[rule_name]
    for seed in SEEDS:
        module, x, Rout, extra = _case(layer, bias, seed)
        weight, b, op = rr.from_module(module)
        xi = x.clone().requires_grad_(True)
        ex = dynamiclrp.explain(module(xi), xi, Rout, rules=_ruleset(make_rule(extra)))
        expected = reference(weight, b, op, x, Rout, extra)
        _assert_close(ex.relevance[0], expected)
        # the non-conserved share the ledger reports is the reference's Σ R_out − Σ R_in
        lost = float(rr.non_conserved(Rout, expected).sum())
        scale = max(1.0, float(Rout.abs().sum()))
        assert abs(ex.ledger.sink_total - lost) <= 1e-9 * scale, (ex.ledger.summary(), lost)
        assert abs(ex.unaccounted) <= 1e-9 * scale


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("rule_name", ["lrp0", "epsilon", "gamma", "alpha2beta1", "flat"])
def test_relevance_without_ledger_and_with_frozen_parameters(rule_name: str, layer: str) -> None:
    """``relevance()`` (no ledger; LRP-0 takes its no-division fast path) gives the same numbers, also when the
    layer's parameters do not require grad (the output is known, so z is too)."""
    make_rule, reference = RULES[rule_name]
    module, x, Rout, extra = _case(layer, True, 3)
    module.requires_grad_(False)
    weight, b, op = rr.from_module(module)
    xi = x.clone().requires_grad_(True)
    (ours,) = dynamiclrp.relevance(module(xi), xi, Rout, rules=_ruleset(make_rule(extra)))
    _assert_close(ours, reference(weight, b, op, x, Rout, extra))


def test_ledger_splits_bias_and_stabilizer_shares() -> None:
    """ε on a dense layer: the bias sink is Σ_j b_j R_j / stab(z_j), the stabilizer sink the rest."""
    module, x, Rout, _ = _case("linear", True, 5)
    eps = 0.05
    xi = x.clone().requires_grad_(True)
    ex = dynamiclrp.explain(module(xi), xi, Rout, rules=_ruleset(R.Epsilon(eps)))
    z = F.linear(x, module.weight.detach(), module.bias.detach())
    stab = rr.stabilize(z, eps)
    bias_share = float((module.bias.detach() * Rout / stab).sum())
    x_share = float(ex.relevance[0].sum())
    kinds = ex.ledger.by_kind()
    assert kinds["bias"] == pytest.approx(bias_share, rel=1e-10, abs=1e-12)
    assert kinds["stabilizer"] == pytest.approx(float(Rout.sum()) - x_share - bias_share, rel=1e-9, abs=1e-12)
    # zero_params drops the bias from the rule: no bias sink at all
    ex0 = dynamiclrp.explain(module(xi), xi, Rout, rules=_ruleset(R.Epsilon(eps, zero_params=("bias",))))
    assert "bias" not in ex0.ledger.by_kind() or ex0.ledger.by_kind()["bias"] == 0.0


def test_conservative_rules_conserve_exactly_without_bias() -> None:
    """Flat, w², z^B, z⁺ and γ redistribute all relevance when there is no bias (no sink but ~ε stabilizer)."""
    for rule in (R.Flat(), R.WSquare(), R.ZBox(-4.0, 4.0), R.Gamma(0.5, 0.0), R.ZPlus(0.0)):
        module, x, Rout, _ = _case("conv2d", False, 7)
        x = x.abs() + 0.1  # positive inputs: z⁺/γ denominators are non-zero
        xi = x.clone().requires_grad_(True)
        Rout = Rout.abs()
        with torch.no_grad():
            z = module(x)
        mask = (z > 0).to(DT) if isinstance(rule, (R.Gamma, R.ZPlus)) else torch.ones_like(z)
        ex = dynamiclrp.explain(module(xi), xi, Rout * mask, rules=_ruleset(rule))
        total = float((Rout * mask).sum())
        assert float(ex.relevance[0].sum()) == pytest.approx(total, rel=1e-5), rule


# --------------------------------------------------------------------------------------------------------------
# matmul / einsum with a parameter operand use the same rules
# --------------------------------------------------------------------------------------------------------------
class MatmulLayer(nn.Module):
    """``x @ Wᵀ + b`` written with matmul, einsum or the weight as the *first* operand (``W @ xᵀ``)."""

    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(11)
        self.weight = nn.Parameter(torch.randn(5, 7, dtype=DT))
        self.bias = nn.Parameter(0.3 * torch.randn(5, dtype=DT))
        self.how = how

    def forward(self, x: Tensor) -> Tensor:
        if self.how == "matmul3d":
            return x @ self.weight.t() + self.bias
        if self.how == "einsum":
            return torch.einsum("btf,of->bto", x, self.weight) + self.bias
        if self.how == "weight_first":
            return (self.weight @ x.transpose(-1, -2)).transpose(-1, -2) + self.bias
        raise ValueError(self.how)


@pytest.mark.parametrize("how", ["matmul3d", "einsum", "weight_first"])
def test_matmul_with_parameter_operand(how: str) -> None:
    """Without a fused bias the rule sees the bias as a separate addition (sum rule): we compare with the
    bias-free reference on the matmul and check that the sum rule split the rest, signed."""
    layer = MatmulLayer(how)
    x = torch.randn(2, 3, 7, dtype=DT) if how != "weight_first" else torch.randn(3, 7, dtype=DT)
    torch.manual_seed(12)
    for rule, ref in ((R.Epsilon(1e-2), lambda w, op, x2, R2: rr.epsilon(w, None, op, x2, R2, 1e-2)),
                      (R.Gamma(0.25), lambda w, op, x2, R2: rr.gamma(w, None, op, x2, R2, 0.25)),
                      (R.AlphaBeta(2, 1), lambda w, op, x2, R2: rr.alpha_beta(w, None, op, x2, R2, 2, 1))):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        Rout = torch.randn_like(y)
        (ours,) = dynamiclrp.relevance(y, xi, Rout, rules=_ruleset(rule))
        # reference: the sum rule (ε = 0) gives the matmul output z = xWᵀ the share z·R/(z + b)
        x2 = x.reshape(-1, 7)
        z = x2 @ layer.weight.detach().t()
        R_z = (z * Rout.reshape(-1, 5) / (z + layer.bias.detach()))
        expected = ref(layer.weight.detach(), rr.Op("linear"), x2, R_z).reshape(x.shape)
        _assert_close(ours, expected)


# --------------------------------------------------------------------------------------------------------------
# Pass / identity
# --------------------------------------------------------------------------------------------------------------
def test_pass_hands_relevance_through_activations_and_unmerged_batchnorm() -> None:
    """Zennit's Pass: ``R_in = R_out`` (``reference.rules.pass_rule``) on an activation and on a batch norm that
    is not merged (it is the first op, so there is no layer to merge it into)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    bn = nn.BatchNorm2d(3).to(DT).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3, dtype=DT))
        bn.running_var.copy_(torch.rand(3, dtype=DT) + 0.5)
        bn.weight.copy_(torch.rand(3, dtype=DT) + 0.5)
        bn.bias.copy_(torch.randn(3, dtype=DT))
    rules = presets.epsilon().with_families(norm=R.Pass(), activation=R.Pass())
    for module in (bn, nn.Tanh(), nn.GELU()):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        Rout = torch.randn_like(y)
        ex = dynamiclrp.explain(y, xi, Rout, rules=rules)
        _assert_close(ex.relevance[0], rr.pass_rule(None, None, None, x, Rout), rtol=1e-12)
        assert abs(ex.unaccounted) < 1e-10


# --------------------------------------------------------------------------------------------------------------
# Validation: every invalid parameter is an error that says what is valid
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: R.AlphaBeta(2, 2), r"alpha - beta must equal 1"),
    (lambda: R.AlphaBeta(-1, -2), r"alpha and beta must both be >= 0"),
    (lambda: R.AlphaBeta(0.5, -0.5), r"alpha and beta must both be >= 0"),
    (lambda: R.Gamma(-0.1), r"gamma must be >= 0"),
    (lambda: R.Gamma("big"), r"gamma must be a number >= 0"),
    (lambda: R.Epsilon(-1e-6), r"stabilizer must be >= 0"),
    (lambda: R.Epsilon(float("nan")), r"stabilizer must be >= 0"),
    (lambda: R.Epsilon("tiny"), r"a float >= 0 or a callable"),
    (lambda: R.ZPlus(zero_params=("weight",)), r"zero_params may only contain 'bias'"),
    (lambda: R.ZBox(1.0, -1.0), r"low <= high"),
    (lambda: R.ZBox(torch.zeros(1, 3, 1, 1), torch.tensor([1.0, -1.0, 1.0]).reshape(1, 3, 1, 1)), r"low <= high"),
    (lambda: R.ZBox("0", 1.0), r"must be a number or a tensor"),
    (lambda: R.MagnitudeSplit(-1.0), r"stabilizer must be >= 0"),
    (lambda: R.CPLRP(gate_constant="yes"), r"gate_constant must be True or False"),
])
def test_invalid_rule_parameters(make: Callable[[], R.Rule], message: str) -> None:
    with pytest.raises(RuleError, match=message):
        make()


def test_rule_on_wrong_family_lists_valid_families() -> None:
    x = torch.randn(2, 3, dtype=DT, requires_grad=True)
    rules = presets.epsilon().with_override(lambda info: R.Gamma() if info.family == "activation" else None)
    with pytest.raises(RuleError, match=r"Gamma does not apply to ReluBackward0.*it applies to: conv, linear"):
        dynamiclrp.relevance(torch.relu(x).sum(), x, rules=rules)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("rule_name", ["gamma", "gamma_no_bias", "zplus", "alpha2beta1", "alpha1beta0_no_bias"])
def test_nonnegative_input_fast_path_matches_reference(rule_name: str, layer: str, bias: bool) -> None:
    """With a non-negative input (after a ReLU) ``relevance()`` takes a path with fewer convolutions (the x⁻
    terms vanish and W⁻ is W − W⁺); it must give the reference's numbers all the same."""
    make_rule, reference = RULES[rule_name]
    for seed in SEEDS:
        module, x, Rout, extra = _case(layer, bias, seed)
        x = x.abs()
        weight, b, op = rr.from_module(module)
        xi = x.clone().requires_grad_(True)
        (ours,) = dynamiclrp.relevance(module(xi), xi, Rout, rules=_ruleset(make_rule(extra)))
        _assert_close(ours, reference(weight, b, op, x, Rout, extra))


# ---------------------------------------------------------------------------------------------------------
# Large convolutions run in batch chunks (rules/linear.py, _CHUNK_BYTES): the chunks must add up to the whole
# ---------------------------------------------------------------------------------------------------------
def _chunk_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).to(DT).eval()


@pytest.mark.parametrize("rules", [
    "epsilon", "zero", "epsilon_plus", "epsilon_alpha2_beta1", "epsilon_gamma_box",
    "conv_flat",  # the second convolution sends explicit relevance to the first: the general path in r-form
])
def test_chunked_convolution_equals_unchunked_for_every_requested_tensor(rules: str, monkeypatch) -> None:
    from dynamiclrp.rules import linear as L

    net = _chunk_net()
    if rules == "epsilon_gamma_box":
        rs = presets.epsilon_gamma_box(-4.0, 4.0)
    elif rules == "conv_flat":
        rs = presets.epsilon().with_layers({"2": R.Flat()}, model=net)
    else:
        rs = presets.by_name(rules)
    x = torch.randn(6, 2, 5, 5, dtype=DT, requires_grad=True)
    wanted = (x, net[0].weight, net[0].bias, net[2].weight, net[2].bias, net[6].bias)
    y = net(x)[:, 1]
    whole = dynamiclrp.relevance(y, wanted, rules=rs)
    chunked_calls = []
    original = L._batch_chunks

    def spy(kernel, g, t):
        out = original(kernel, g, t)
        chunked_calls.append(out is not None and len(out) > 1)
        return out

    monkeypatch.setattr(L, "_CHUNK_BYTES", 64)  # every convolution output is "large": one sample per chunk
    monkeypatch.setattr(L, "_batch_chunks", spy)
    chunked = dynamiclrp.relevance(y, wanted, rules=rs)
    assert any(chunked_calls), "the chunked path was not taken"
    for name, a, b in zip(["x", "conv0.weight", "conv0.bias", "conv2.weight", "conv2.bias", "head.bias"],
                          chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda m, name=name: f"{name}: {m}")
    # the biases do receive relevance (except under flat, which has no bias term, and z^B, whose bias terms cancel)
    assert whole[2].abs().sum() > 0 or rules == "epsilon_gamma_box"
    assert whole[4].abs().sum() > 0 or rules == "conv_flat"
