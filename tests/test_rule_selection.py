"""Choosing rules: by family, by layer name (and prefix), first layer, per node, custom ops; BatchNorm merging;
the presets' Zennit names and defaults; and every configuration error, with the valid choices in its message.

Expected values come from layer-by-layer compositions of the float64 matrix references in
``tests/reference/rules.py`` (one reference rule per layer, ``Pass`` through ReLU) or from Zennit 0.5.1 itself.
"""
from __future__ import annotations

import copy
import inspect
from typing import Callable

import pytest
import torch
from torch import Tensor, nn

import dynamiclrp
from dynamiclrp import presets
from dynamiclrp import rules as R
from dynamiclrp.errors import RuleError, UnsupportedOperationError
from dynamiclrp.rules import NodeInfo, RuleSet
from reference import rules as rr
from reference import zennit_harness as zh

DT = torch.float64
RefRule = Callable[..., Tensor]



def eps_ref(e: float = 1e-6) -> RefRule:
    return lambda w, b, op, x, r: rr.epsilon(w, b, op, x, r, e)


def zplus_ref() -> RefRule:
    return lambda w, b, op, x, r: rr.zplus(w, b, op, x, r)


def gamma_ref(g: float) -> RefRule:
    return lambda w, b, op, x, r: rr.gamma(w, b, op, x, r, g)


def flat_ref() -> RefRule:
    return lambda w, b, op, x, r: rr.flat(w, b, op, x, r)


def manual(modules: list[nn.Module], x: Tensor, seed: Tensor, rule_of: dict[int, RefRule]) -> Tensor:
    """Layer-by-layer reference LRP through a chain of Linear/Conv (rule per position), ReLU (Pass), Flatten."""
    acts = [x]
    with torch.no_grad():
        for m in modules:
            acts.append(m(acts[-1]))
    rel = seed
    for i in reversed(range(len(modules))):
        m, xin = modules[i], acts[i]
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w, b, op = rr.from_module(m)
            rel = rule_of[i](w, b, op, xin, rel)
        elif isinstance(m, nn.Flatten):
            rel = rel.reshape(xin.shape)
        elif not isinstance(m, nn.ReLU):
            raise TypeError(m)
    return rel


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).to(DT).eval()
    with torch.no_grad():
        for m in model:
            if hasattr(m, "bias"):
                m.bias.uniform_(-0.2, 0.2)
    return model


def run(model: nn.Module, x: Tensor, rules, c: int = 1) -> tuple[Tensor, Tensor]:
    xi = x.clone().requires_grad_(True)
    y = model(xi)
    seed = torch.zeros_like(y)
    seed[:, c] = y[:, c].detach()
    (rel,) = dynamiclrp.relevance(y, xi, seed, rules=rules)
    return rel, seed


def close(a: Tensor, b: Tensor, rtol: float = 1e-9) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


X = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=DT) * 2 - 0.5


# --------------------------------------------------------------------------------------------------------------
# By family, by layer, per node
# --------------------------------------------------------------------------------------------------------------
def test_by_family() -> None:
    model = small_cnn()
    rules = presets.epsilon(1e-3).with_families(conv=R.ZPlus())
    rel, seed = run(model, X, rules)
    close(rel, manual(list(model), X, seed, {0: zplus_ref(), 2: zplus_ref(), 5: eps_ref(1e-3), 7: eps_ref(1e-3)}))


def test_by_layer_name_and_prefix() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.features = small_cnn()[:4]
    model.head = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).to(DT)
    chain = list(model.features) + list(model.head)
    # exact name: only features.2
    rules = presets.epsilon().with_layers({"features.2": R.Gamma(0.5)}, model)
    rel, seed = run(model, X, rules)
    close(rel, manual(chain, X, seed, {0: eps_ref(), 2: gamma_ref(0.5), 5: eps_ref(), 7: eps_ref()}))
    # a prefix covers every layer under it; the longest matching key wins
    rules = presets.epsilon().with_layers({"features": R.ZPlus(), "features.0": R.Flat(), "head.3": R.Epsilon(0.1)},
                                          model)
    rel, seed = run(model, X, rules)
    close(rel, manual(chain, X, seed, {0: flat_ref(), 2: zplus_ref(), 5: eps_ref(), 7: eps_ref(0.1)}))


def test_prefix_rule_skips_ops_of_other_families_in_the_layer() -> None:
    """A conv rule given to a block also containing BatchNorm and ReLU applies to the conv only (the batch norm,
    merged, and the ReLU keep their rules)."""
    torch.manual_seed(2)
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).to(DT).eval()
    zh.randomize_batchnorm(block, torch.Generator().manual_seed(3))
    model = nn.Sequential(block, nn.Flatten(), nn.Linear(64, 3)).to(DT).eval()
    by_layer = presets.epsilon().with_layers({"0": R.Gamma(0.25)}, model)
    by_family = presets.epsilon().with_families(conv=R.Gamma(0.25))
    close(run(model, X, by_layer)[0], run(model, X, by_family)[0], rtol=1e-12)


def test_per_node_override_sees_node_info() -> None:
    model = small_cnn()
    seen: list[NodeInfo] = []

    def override(info: NodeInfo):
        seen.append(info)
        return R.Gamma(1.0) if info.module == "2" else None

    rel, seed = run(model, X, presets.epsilon().with_model(model).with_override(override))
    close(rel, manual(list(model), X, seed, {0: eps_ref(), 2: gamma_ref(1.0), 5: eps_ref(), 7: eps_ref()}))
    conv2 = [i for i in seen if i.module == "2"]
    assert conv2 and conv2[0].type == "ConvolutionBackward0" and conv2[0].family == "conv"
    assert {i.module for i in seen if i.family == "linear"} == {"5", "7"}


def test_with_nodes_by_node_and_by_tensor() -> None:
    model = small_cnn()
    xi = X.clone().requires_grad_(True)
    h = model[:3](xi)  # output of the second conv
    y = model[3:](h)
    seed = torch.zeros_like(y)
    seed[:, 1] = y[:, 1].detach()
    expected = manual(list(model), X, seed, {0: eps_ref(), 2: gamma_ref(0.5), 5: eps_ref(), 7: eps_ref()})
    for key in (h.grad_fn, h):
        (rel,) = dynamiclrp.relevance(y, xi, seed, rules=presets.epsilon().with_nodes({key: R.Gamma(0.5)}))
        close(rel, expected)


# --------------------------------------------------------------------------------------------------------------
# First layer: Zennit's meaning (module order) with a model, the op nearest the input without one
# --------------------------------------------------------------------------------------------------------------
class Reordered(nn.Module):
    """The dense head is registered before the convolutions, but runs after them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.head = nn.Linear(16, 3)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
        with torch.no_grad():
            for m in self.modules():
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.2, 0.2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).flatten(1))


def test_first_layer_with_model_follows_zennit_module_order() -> None:
    model = Reordered().to(DT).eval()
    for name, ours in (("epsilon_plus_flat", presets.epsilon_plus_flat()),
                       ("epsilon_gamma_box", presets.epsilon_gamma_box(-1.0, 2.0))):
        kw = {"low": -1.0, "high": 2.0} if name == "epsilon_gamma_box" else {}
        z = zh.zennit_attribution(model, X, 1, name, canonizers=None, **kw)
        rel, _ = run(model, X, ours.with_model(model))
        close(rel, z)
    # Zennit's map, for the record: Flat went to the head, the dense layer registered first
    assert zh.zennit_rule_map(model, "epsilon_plus_flat", canonizers=None)["head"] == "Flat"


def test_first_layer_without_model_is_the_op_nearest_the_input() -> None:
    model = Reordered().to(DT).eval()
    chain = [model.body[0], model.body[1], model.body[2], model.body[3], nn.Flatten(), model.head]
    rel, seed = run(model, X, presets.epsilon_plus_flat())
    close(rel, manual(chain, X, seed, {0: flat_ref(), 2: zplus_ref(), 5: eps_ref()}))
    # the same with a model, asking for the graph meaning explicitly
    rules = presets.epsilon_plus_flat().with_model(model).with_first_layer(R.Flat(), by="graph")
    close(run(model, X, rules)[0], rel, rtol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------------------
class Passthrough(torch.autograd.Function):
    """A custom autograd Function the registry cannot know (an identity with a hand-written backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


def test_custom_ops_need_a_rule_and_accept_one() -> None:
    model = small_cnn()
    xi = X.clone().requires_grad_(True)
    h = Passthrough.apply(model[:4](xi))
    y = model[4:](h)
    with pytest.raises(UnsupportedOperationError, match=r"(?s)PassthroughBackward.*with_ops"):
        dynamiclrp.relevance(y[:, 1], xi)
    seed = torch.zeros_like(y)
    seed[:, 1] = y[:, 1].detach()
    rules = presets.epsilon().with_ops({"PassthroughBackward": R.Gradient()})
    (rel,) = dynamiclrp.relevance(y, xi, seed, rules=rules)
    close(rel, run(model, X, "epsilon")[0], rtol=1e-12)  # its own backward moves relevance like the identity


def test_with_ops_replaces_a_builtin_rule() -> None:
    model = small_cnn()
    grad_relu = presets.zero().with_ops({"ReluBackward0": R.Gradient()})
    rel_a, _ = run(model, X, grad_relu)
    rel_b, _ = run(model, X, presets.zero())
    close(rel_a, rel_b, rtol=1e-12)  # on ReLU, gradient and identity coincide (Pass = LRP-0 on x·1[x>0])


# --------------------------------------------------------------------------------------------------------------
# BatchNorm merging
# --------------------------------------------------------------------------------------------------------------
def _bn(n: int, dims: int, seed: int, negative: bool = True) -> nn.Module:
    bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(n).to(DT).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(0.3 * torch.randn(n, generator=g, dtype=DT))
        bn.running_var.copy_(0.5 + torch.rand(n, generator=g, dtype=DT))
        w = 0.5 + torch.rand(n, generator=g, dtype=DT)
        if negative:
            w[::2] *= -1  # a negative γ flips the sign of a channel: W'⁺ comes from W⁻
        bn.weight.copy_(w)
        bn.bias.copy_(0.2 * torch.randn(n, generator=g, dtype=DT))
    return bn


def merged(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """The layer with the batch norm folded in, written independently of the library."""
    out = copy.deepcopy(layer)
    s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        w = out.weight
        if isinstance(out, nn.ConvTranspose2d):
            g = out.groups
            cin, cout_g = w.shape[0], w.shape[1]
            w.copy_((w.reshape(g, cin // g, cout_g, *w.shape[2:]) * s.reshape(g, 1, cout_g, 1, 1)).reshape(w.shape))
        else:
            w.mul_(s.reshape((-1,) + (1,) * (w.dim() - 1)))
        b = out.bias.detach() if out.bias is not None else torch.zeros_like(s)
        out.bias = nn.Parameter((b - bn.running_mean) * s + bn.bias.detach())
    return out


@pytest.mark.parametrize("kind", ["conv2d", "conv_transpose2d_grouped", "linear", "conv2d_nobias"])
@pytest.mark.parametrize("rule_name", ["gamma", "alpha_beta", "zplus", "epsilon"])
def test_batchnorm_merged_into_the_op_before_it(kind: str, rule_name: str) -> None:
    torch.manual_seed(5)
    if kind == "linear":
        layer, bn, x = nn.Linear(6, 5).to(DT), _bn(5, 1, 6), torch.randn(4, 6, dtype=DT)
    elif kind == "conv_transpose2d_grouped":
        layer = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2).to(DT)
        bn, x = _bn(6, 2, 6), torch.randn(2, 4, 3, 3, dtype=DT)
    else:
        layer = nn.Conv2d(3, 4, 3, bias=kind == "conv2d").to(DT)
        bn, x = _bn(4, 2, 6), torch.randn(2, 3, 5, 5, dtype=DT)
    rule, ref = {"gamma": (R.Gamma(0.3), lambda w, b, op, x_, r: rr.gamma(w, b, op, x_, r, 0.3)),
                 "alpha_beta": (R.AlphaBeta(2, 1), lambda w, b, op, x_, r: rr.alpha_beta(w, b, op, x_, r, 2, 1)),
                 "zplus": (R.ZPlus(), lambda w, b, op, x_, r: rr.zplus(w, b, op, x_, r)),
                 "epsilon": (R.Epsilon(1e-3), lambda w, b, op, x_, r: rr.epsilon(w, b, op, x_, r, 1e-3))}[rule_name]
    xi = x.clone().requires_grad_(True)
    y = bn(layer(xi))
    seed = torch.randn_like(y)
    rules = presets.epsilon().with_families(conv=rule, linear=rule)
    ex = dynamiclrp.explain(y, xi, seed, rules=rules)
    w, b, op = rr.from_module(merged(layer, bn))
    close(ex.relevance[0], ref(w, b, op, x, seed))
    assert abs(ex.unaccounted) < 1e-9 * float(seed.abs().sum())
    assert "bias" in ex.ledger.by_kind()  # the merged bias (b − μ)·γ/σ + β is a named sink
    # switched off: the rule sees the bare op and the batch norm keeps its own rule — a different explanation
    off = dynamiclrp.relevance(bn(layer(xi)), xi, seed, rules=rules.with_merge_batchnorm(False))[0]
    if rule_name != "epsilon":
        assert (off - ex.relevance[0]).abs().max() > 1e-6


def test_batchnorm_not_merged_when_not_directly_after_a_single_consumer_op() -> None:
    torch.manual_seed(7)
    conv, bn = nn.Conv2d(3, 4, 3).to(DT), _bn(4, 2, 8)
    xi = X.clone().requires_grad_(True)
    rules = presets.epsilon().with_families(conv=R.Gamma(0.3))
    # the conv output also feeds another op: merging would change what that consumer sees, so no merge
    h = conv(xi)
    y = bn(h) + 0.1 * h
    seed = torch.randn_like(y)
    a = dynamiclrp.relevance(y, xi, seed, rules=rules)[0]
    b = dynamiclrp.relevance(y, xi, seed, rules=rules.with_merge_batchnorm(False))[0]
    close(a, b, rtol=1e-13)
    # a batch norm given its own rule explicitly stays separate
    model = nn.Sequential(conv, bn).eval()
    y = model(xi)
    seed = torch.randn_like(y)
    a = dynamiclrp.relevance(y, xi, seed, rules=rules.with_layers({"1": R.NormConstant()}, model))[0]
    b = dynamiclrp.relevance(y, xi, seed, rules=rules.with_merge_batchnorm(False))[0]
    c = dynamiclrp.relevance(y, xi, seed, rules=rules)[0]
    close(a, b, rtol=1e-13)
    assert (a - c).abs().max() > 1e-6
    # a training-mode batch norm normalises with batch statistics: nothing to fold in
    bn.train()
    y = bn(conv(xi))
    a = dynamiclrp.relevance(y, xi, seed, rules=rules)[0]
    b = dynamiclrp.relevance(y, xi, seed, rules=rules.with_merge_batchnorm(False))[0]
    close(a, b, rtol=1e-13)


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------
def test_presets_have_zennit_names_parameters_and_defaults() -> None:
    from zennit.composites import COMPOSITES

    skip = {"self", "layer_map", "first_map", "canonizers"}
    for name in zh.COMPOSITE_NAMES:
        theirs = {k: p.default for k, p in inspect.signature(COMPOSITES[name].__init__).parameters.items()
                  if k not in skip}
        ours = {k: p.default for k, p in inspect.signature(getattr(presets, name)).parameters.items()}
        assert ours == theirs, name
        assert name in presets.names() or name == "epsilon_gamma_box"
    for name in presets.names():
        assert presets.by_name(name).name == name


def test_default_preset_is_epsilon() -> None:
    assert presets.default() == presets.epsilon()
    model = small_cnn()
    close(run(model, X, None)[0], run(model, X, "epsilon")[0], rtol=0)
    assert "default" in (presets.__doc__ or "").lower()


# --------------------------------------------------------------------------------------------------------------
# Every configuration error names the valid choices
# --------------------------------------------------------------------------------------------------------------
def _families_listed(msg: str) -> bool:
    return all(f in msg for f in R.FAMILIES)


def test_error_messages() -> None:
    model = small_cnn()
    base = presets.epsilon()

    with pytest.raises(RuleError) as e:
        RuleSet({"linear": R.Epsilon()})
    assert "has no rule for families" in str(e.value) and _families_listed(str(e.value))

    with pytest.raises(RuleError) as e:
        base.with_families(convolution=R.Gamma())
    assert "unknown families ['convolution']" in str(e.value) and _families_listed(str(e.value))

    with pytest.raises(RuleError, match=r"must be a dynamiclrp Rule instance.*Epsilon.*Gamma.*ZPlus"):
        base.with_families(conv="gamma")
    with pytest.raises(RuleError, match=r"a rule class, not an instance: add parentheses"):
        base.with_families(conv=R.Gamma)
    with pytest.raises(RuleError, match=r"cannot handle family 'activation'; it applies to \['conv', 'linear'\]"):
        base.with_families(activation=R.Gamma())

    with pytest.raises(RuleError, match=r"per-layer rules need the model"):
        base.with_layers({"0": R.Gamma()})
    nested = nn.Sequential()
    nested.features, nested.head = small_cnn()[:4], nn.Linear(16, 3)
    with pytest.raises(RuleError, match=r"no module named \['feature.2'\] in the model \('feature.2': did you mean "
                                        r"\['features.2'.*module names are: features, features.0, features.1"):
        base.with_layers({"feature.2": R.Gamma()}, nested)
    with pytest.raises(RuleError, match=r"layers \['1'\] have no parameters.*Modules with parameters: 0, 2, 5, 7"):
        base.with_layers({"1": R.Gamma()}, model)  # a ReLU
    xi = X.clone().requires_grad_(True)
    with_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2)).to(DT).eval()
    with pytest.raises(RuleError, match=r"layers\['1'\] = Gamma.*applies to families \['conv', 'linear'\].*ops of "
                                        r"layer '1' in this graph are of families \['norm'\]"):
        dynamiclrp.relevance(with_bn(xi)[:, 0], xi, rules=base.with_layers({"1": R.Gamma()}, with_bn))

    with pytest.raises(RuleError, match=r"first_layer_kind must be one of \['conv', 'linear', 'linear-type'\]"):
        base.with_first_layer(R.Flat(), kind="dense")
    with pytest.raises(RuleError, match=r"first_layer_by must be 'auto', 'module' or 'graph'"):
        base.with_first_layer(R.Flat(), by="order")
    with pytest.raises(RuleError, match=r"first_layer_by='module' needs the model"):
        base.with_first_layer(R.Flat(), by="module")

    with pytest.raises(RuleError, match=r"keys must be autograd nodes.*got str"):
        base.with_nodes({"features.0": R.Gamma()})
    with pytest.raises(RuleError, match=r"without a grad_fn"):
        base.with_nodes({xi: R.Gamma()})
    with pytest.raises(RuleError, match=r"ops keys are autograd node type names"):
        base.with_ops({1: R.Routing()})
    with pytest.raises(RuleError, match=r"must be a Rule or an \(OpSpec, Rule\) pair"):
        base.with_ops({"MyFunctionBackward": (1, 2)})

    with pytest.raises(RuleError, match=r"override\(\.\.\.\) must be a dynamiclrp Rule instance"):
        dynamiclrp.relevance(model(xi)[:, 0], xi, rules=base.with_override(lambda info: "eps"))

    with pytest.raises(RuleError) as e:
        dynamiclrp.relevance(model(xi)[:, 0], xi, rules="lrp-epsilon")
    assert all(n in str(e.value) for n in presets.names())
    with pytest.raises(RuleError, match=r"epsilon_gamma_box needs the input bounds"):
        presets.by_name("epsilon_gamma_box")
    with pytest.raises(RuleError, match=r"a preset name \(epsilon, zero, attnlrp"):
        dynamiclrp.relevance(model(xi)[:, 0], xi, rules=42)
    with pytest.raises(RuleError, match=r"zero_params may only contain 'bias'"):
        presets.epsilon_plus(zero_params="weight")
