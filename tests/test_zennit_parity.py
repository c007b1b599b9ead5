"""Zennit parity: our presets give Zennit 0.5.1's composites' relevance, without a model argument or canonizer.

For each of the five composites (``epsilon_gamma_box``, ``epsilon_plus``, ``epsilon_plus_flat``,
``epsilon_alpha2_beta1``, ``epsilon_alpha2_beta1_flat``) and each model of ``tests/reference/zennit_harness.py``
(an MLP, a VGG-style CNN with BatchNorm, torchvision VGG-11 with BatchNorm and ResNet-18, random weights and
BatchNorm statistics, float64) we compute

    ours = dynamiclrp.relevance(logits[:, c], x, rules=dynamiclrp.presets.<composite>(...))

on the *unmodified* model — no ``model=`` argument, no canonizer: batch norms are merged by the engine, the first
layer is the conv nearest the input in the graph, ResNet's plain ``out += identity`` gets the ``Norm`` rule from the
``add`` family — and compare with Zennit seeded with ``logit · one_hot(c)``.

The BatchNorm subtlety, handled honestly
----------------------------------------
Zennit's ``SequentialMergeBatchNorm`` writes ``W' = W·γ/σ``, ``b' = (b − μ)·γ/σ + β`` into the conv, then turns the
batch norm into an "identity" with mean 0, variance 1, weight 1, bias 0 — but keeps its ``eps``, so the canonized
model still divides by ``sqrt(1 + eps)`` after every merged batch norm. Its logits drift by about ``eps/2`` per
batch norm and the heatmap moves by ≈ 1e-5 relative (measured up to 5.1e-5 on ResNet-18). We therefore test three
things:

1. ``test_parity_with_exact_merge``: Zennit with the same canonizers, except that the merged batch norm's ``eps``
   is set to 0 (so the canonized model computes exactly the original function): max |ours − Zennit| ≤ 1e-13 ·
   max |Zennit| (the README's bound; measured ≤ 2.0e-14, 0 for the MLP).
2. ``test_stock_zennit_difference_is_its_eps_leftover``: our engine run *on Zennit's own canonized model* (stock
   canonizers, eps left in place) with ``merge_batchnorm=False`` — so each leftover batch norm gets ``Pass``, as in
   Zennit — equals stock Zennit to ≤ 1e-13. So the whole remaining difference is the canonizer's eps, not a rule.
3. ``test_parity_with_stock_zennit``: ours on the untouched model vs stock Zennit is within 1e-4 (measured, all five
   composites: VGG-style CNN ≤ 1.4e-5, VGG-11 ≤ 5.4e-6, ResNet-18 ≤ 5.1e-5); exact (0) for the MLP, which has no
   batch norm.

The harness builds models with ``requires_grad=False`` parameters. Autograd then keeps neither a frozen bias nor the
pre-activation of a biased layer followed by ReLU; the parity tests let the parameters require grad (Zennit's result
does not depend on it), and ``test_frozen_parameters_give_the_same_answer`` shows the frozen model gives the same
answer (z is read on the support of the relevance).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from zennit.canonizers import CompositeCanonizer, SequentialMergeBatchNorm
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

import dynamiclrp
from dynamiclrp import presets
from reference import zennit_harness as zh

DT = torch.float64
TARGET = 3
MODELS = ("mlp", "vgg_bn_cnn", "vgg11", "resnet18")
WITH_BN = ("vgg_bn_cnn", "resnet18")  # the stock-Zennit checks (vgg11 is the slowest, and like vgg_bn_cnn)



class ExactMergeBatchNorm(SequentialMergeBatchNorm):
    """Zennit's merge, plus ``eps = 0`` on the batch norm it leaves behind (restored on removal), so that the
    canonized model computes exactly the original function."""

    def register(self, linears, batch_norm):
        self._eps = batch_norm.eps
        super().register(linears, batch_norm)
        batch_norm.eps = 0.0

    def remove(self):
        super().remove()
        self.batch_norm.eps = self._eps


def exact_canonizers(model: torch.nn.Module) -> list:
    if isinstance(model, torchvision.models.ResNet):
        return [CompositeCanonizer((ExactMergeBatchNorm(), ResNetBottleneckCanonizer(),
                                    ResNetBasicBlockCanonizer()))]
    return [ExactMergeBatchNorm()]


_CACHE: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}


def model_and_input(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if name not in _CACHE:
        model = zh.MODEL_BUILDERS[name]()
        model.requires_grad_(True)  # see the module docstring
        batch = 2 if name in ("mlp", "vgg_bn_cnn") else 1
        _CACHE[name] = model, zh.example_input(name, batch=batch)
    return _CACHE[name]


def composite_kwargs(name: str) -> dict:
    if name == "epsilon_gamma_box":
        low, high = zh.image_bounds()
        return {"low": low, "high": high}
    return {}


def preset(name: str, model_name: str) -> dynamiclrp.RuleSet:
    if name == "epsilon_gamma_box":
        low, high = zh.image_bounds()
        if model_name == "mlp":  # never used: the MLP has no convolution (Zennit puts ZBox on the first conv)
            low, high = -10.0, 10.0
        return presets.epsilon_gamma_box(low, high)
    return getattr(presets, name)()


def ours(model: torch.nn.Module, x: torch.Tensor, rules: dynamiclrp.RuleSet) -> torch.Tensor:
    xi = x.clone().requires_grad_(True)
    logits = model(xi)
    (rel,) = dynamiclrp.relevance(logits[:, TARGET], xi, rules=rules)
    return rel


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


#: the bound the README states for the composites against Zennit with an exact merge (measured: <= 2.0e-14)
PARITY = 1e-13


@pytest.mark.parametrize("composite", zh.COMPOSITE_NAMES)
@pytest.mark.parametrize("model_name", MODELS)
def test_parity_with_exact_merge(model_name: str, composite: str) -> None:
    model, x = model_and_input(model_name)
    kw = composite_kwargs(composite) if model_name != "mlp" or composite != "epsilon_gamma_box" else \
        {"low": -10.0, "high": 10.0}
    z_out, z_rel = zh.zennit_forward_and_attribution(model, x, TARGET, composite,
                                                     canonizers=exact_canonizers(model), **kw)
    with torch.no_grad():
        torch.testing.assert_close(z_out, model(x), rtol=1e-12, atol=1e-12)  # the exact merge is exact
    err = rel_err(ours(model, x, preset(composite, model_name)), z_rel)
    assert err <= PARITY, f"{model_name}/{composite}: max rel. error {err:.2e}"


@pytest.mark.parametrize("composite", zh.COMPOSITE_NAMES)
@pytest.mark.parametrize("model_name", WITH_BN)
def test_stock_zennit_difference_is_its_eps_leftover(model_name: str, composite: str) -> None:
    model, x = model_and_input(model_name)
    kw = composite_kwargs(composite)
    _, z_rel = zh.zennit_forward_and_attribution(model, x, TARGET, composite, **kw)
    canonized = copy.deepcopy(model)
    handles = []
    for canonizer in zh.default_canonizers(canonized):
        handles += canonizer.apply(canonized)
    try:
        got = ours(canonized, x, preset(composite, model_name).with_merge_batchnorm(False))
    finally:
        for h in handles:
            h.remove()
    err = rel_err(got, z_rel)
    assert err <= PARITY, f"{model_name}/{composite}: max rel. error {err:.2e}"


@pytest.mark.parametrize("model_name", MODELS)
def test_parity_with_stock_zennit(model_name: str) -> None:
    model, x = model_and_input(model_name)
    composite = "epsilon_plus_flat"
    _, z_rel = zh.zennit_forward_and_attribution(model, x, TARGET, composite)
    err = rel_err(ours(model, x, preset(composite, model_name)), z_rel)
    if model_name == "mlp":
        assert err <= 1e-12
    else:
        assert 0 < err <= 1e-4, f"{model_name}: {err:.2e}"


def test_frozen_parameters_give_the_same_answer() -> None:
    """The harness builds frozen models (``requires_grad=False``): autograd then keeps neither the layers' inputs
    nor their biases. The inputs are rebuilt by the Promise System and z is read on the support of the relevance
    (through the ReLUs), so a frozen model is explained exactly like a trainable one — and like Zennit."""
    model = zh.mlp()
    x = zh.example_input("mlp", batch=2).requires_grad_(True)
    (frozen,) = dynamiclrp.relevance(model(x)[:, TARGET], x, rules=presets.epsilon_plus())
    trainable = copy.deepcopy(model).requires_grad_(True)
    (ref,) = dynamiclrp.relevance(trainable(x)[:, TARGET], x, rules=presets.epsilon_plus())
    assert rel_err(frozen, ref) <= 1e-12
    _, z_rel = zh.zennit_forward_and_attribution(model, x, TARGET, "epsilon_plus")
    assert rel_err(frozen, z_rel) <= PARITY


def test_frozen_batchnorm_bias_still_merges() -> None:
    model = zh.vgg_bn_cnn()  # frozen: the merged bias needs β, recovered on the relevance's support
    x = zh.example_input("vgg_bn_cnn").requires_grad_(True)
    low, high = zh.image_bounds()
    rules = presets.epsilon_gamma_box(low, high)
    (frozen,) = dynamiclrp.relevance(model(x)[:, TARGET], x, rules=rules)
    trainable = copy.deepcopy(model).requires_grad_(True)
    (ref,) = dynamiclrp.relevance(trainable(x)[:, TARGET], x, rules=rules)
    assert rel_err(frozen, ref) <= 1e-10
