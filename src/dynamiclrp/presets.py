"""Presets: named rule sets.

``epsilon`` (the default), ``zero``, ``attnlrp``, ``cplrp`` and ``paper``, plus Zennit's composites under their
registry names with Zennit's parameters and defaults: ``epsilon_gamma_box``, ``epsilon_plus``,
``epsilon_plus_flat``, ``epsilon_alpha2_beta1``, ``epsilon_alpha2_beta1_flat``.

Why ε is the default: it is the standard LRP rule (Bach et al. 2015) for every layer type, conservative up to
its bias and stabiliser sinks, close to gradient × input on the upper layers where that is faithful, and —
with the identity rule for element-wise non-linearities, the normaliser held constant and the uniform rule for
products of activations — it *is* AttnLRP on transformers. Rules that need image-specific bounds (z^B) or that
trade faithfulness for sharper heatmaps (γ, α-β, flat) are opt-in presets.
"""
from __future__ import annotations

from typing import Callable

import torch

from .errors import RuleError
from .rules import library as L
from .rules.ruleset import RuleSet

Tensor = torch.Tensor


def _base(**over) -> dict:
    fam = {
        "linear": L.Epsilon(1e-6),
        "conv": L.Epsilon(1e-6),
        "matmul": L.Uniform(),
        "product": L.Product(),
        "add": L.Sum(),
        "reduce": L.Sum(),
        "pool": L.Sum(),
        "activation": L.Identity(),
        "norm": L.NormConstant(),
        "softmax": L.Softmax(),
        "attention": L.AttnLRP(),
        "routing": L.Routing(),
        "embedding": L.Routing(),
        "leaf": L.Leaf(),
    }
    fam.update(over)
    return fam


def epsilon(epsilon: float = 1e-6) -> RuleSet:
    """LRP-ε on every linear, convolution and weight matmul (ε = 1e-6, sign-aware, bias as a sink); the sum
    rule on additions, reductions and average pooling; identity on element-wise non-linearities; normalisers
    held constant; uniform rule on products of two activations; AttnLRP's softmax rule. The default."""
    return RuleSet(_base(linear=L.Epsilon(epsilon), conv=L.Epsilon(epsilon)), name="epsilon")


def zero() -> RuleSet:
    """LRP-0: :func:`epsilon` with ε = 0. On bias-free piecewise-linear graphs it equals gradient × input."""
    return RuleSet(_base(linear=L.Epsilon(0.0), conv=L.Epsilon(0.0)), name="zero")


def default() -> RuleSet:
    """The rule set used when ``rules=None``: :func:`epsilon`."""
    return epsilon()


def attnlrp(epsilon: float = 1e-6) -> RuleSet:
    """AttnLRP (Achtibat et al., ICML 2024): ε on linear layers, identity on element-wise non-linearities,
    LayerNorm/RMSNorm with the normaliser constant, the uniform rule on products of two activations (gated
    MLPs, ``A·V``, ``Q·Kᵀ``) and the softmax rule ``R_x = x ⊙ (R − s ⊙ Σ_j R_j)`` on the true logits —
    including fused scaled-dot-product-attention nodes."""
    return RuleSet(_base(linear=L.Epsilon(epsilon), conv=L.Epsilon(epsilon), matmul=L.AttnLRP(),
                         product=L.AttnLRP(), attention=L.AttnLRP()), name="attnlrp")


def cplrp(epsilon: float = 1e-6) -> RuleSet:
    """CP-LRP (Ali et al., ICML 2022): attention weights treated as constants, so all relevance through
    attention goes to the values; otherwise as :func:`attnlrp`. Conservative by construction."""
    return RuleSet(_base(linear=L.Epsilon(epsilon), conv=L.Epsilon(epsilon), matmul=L.CPLRP(), product=L.CPLRP(),
                         attention=L.CPLRP(), softmax=L.CPLRP()), name="cplrp")


def _zennit(name: str, conv, first=None, kind: str = "linear-type", epsilon: float = 1e-6,
            stabilizer: float = 1e-6) -> RuleSet:
    fam = _base(linear=L.Epsilon(epsilon), conv=conv, add=L.Norm(stabilizer), pool=L.Norm(stabilizer),
                reduce=L.Norm(stabilizer))
    return RuleSet(fam, name=name, first_layer=first, first_layer_kind=kind)


def epsilon_gamma_box(low: float | Tensor, high: float | Tensor, epsilon: float = 1e-6, gamma: float = 0.25,
                      stabilizer: float = 1e-6) -> RuleSet:
    """Zennit's ``EpsilonGammaBox``: z^B(low, high) on the first convolution, γ on convolutions, ε on dense
    layers. ``low``/``high`` bound the input (e.g. the normalised values of pixel 0 and 1, per channel)."""
    return _zennit("epsilon_gamma_box", L.Gamma(gamma, stabilizer), L.ZBox(low, high, stabilizer), "conv",
                   epsilon, stabilizer)


def epsilon_plus(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> RuleSet:
    """Zennit's ``EpsilonPlus``: z⁺ on convolutions, ε on dense layers."""
    return _zennit("epsilon_plus", L.ZPlus(stabilizer), None, "linear-type", epsilon, stabilizer)


def epsilon_plus_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> RuleSet:
    """Zennit's ``EpsilonPlusFlat``: flat on the first linear-type layer, z⁺ on convolutions, ε on dense."""
    return _zennit("epsilon_plus_flat", L.ZPlus(stabilizer), L.Flat(stabilizer), "linear-type", epsilon,
                   stabilizer)


def epsilon_alpha2_beta1(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> RuleSet:
    """Zennit's ``EpsilonAlpha2Beta1``: α2β1 on convolutions, ε on dense layers."""
    return _zennit("epsilon_alpha2_beta1", L.AlphaBeta(2.0, 1.0, stabilizer), None, "linear-type", epsilon,
                   stabilizer)


def epsilon_alpha2_beta1_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> RuleSet:
    """Zennit's ``EpsilonAlpha2Beta1Flat``: flat on the first linear-type layer, α2β1 on convolutions, ε on
    dense layers."""
    return _zennit("epsilon_alpha2_beta1_flat", L.AlphaBeta(2.0, 1.0, stabilizer), L.Flat(stabilizer),
                   "linear-type", epsilon, stabilizer)


def paper(epsilon: float = 1e-11) -> RuleSet:
    """The DynamicLRP paper's own rules (Lee & Millan Arias 2025), for reproducing its behaviour: magnitude
    splits ``|a| / (|a| + |b|)`` on additions, sums and means, ε on linear layers, identity elsewhere. These
    rules ignore signs and match no other reference; they are not the default."""
    return RuleSet(_base(linear=L.Epsilon(epsilon), conv=L.Epsilon(epsilon), add=L.MagnitudeSplit(epsilon),
                         reduce=L.MagnitudeSplit(epsilon)), name="paper")


_PRESETS: dict[str, Callable[[], RuleSet]] = {
    "epsilon": epsilon,
    "zero": zero,
    "attnlrp": attnlrp,
    "cplrp": cplrp,
    "paper": paper,
    "epsilon_plus": epsilon_plus,
    "epsilon_plus_flat": epsilon_plus_flat,
    "epsilon_alpha2_beta1": epsilon_alpha2_beta1,
    "epsilon_alpha2_beta1_flat": epsilon_alpha2_beta1_flat,
}


def names() -> list[str]:
    """Preset names accepted by ``rules="..."`` (``epsilon_gamma_box`` needs bounds: call the function)."""
    return list(_PRESETS)


def by_name(name: str) -> RuleSet:
    """The preset called ``name``."""
    fn = _PRESETS.get(name)
    if fn is None:
        hint = (" (epsilon_gamma_box needs the input bounds: pass "
                "rules=dynamiclrp.presets.epsilon_gamma_box(low, high))") if name == "epsilon_gamma_box" else ""
        raise RuleError(f"unknown preset {name!r}{hint}; valid names are: {', '.join(_PRESETS)}")
    return fn()
