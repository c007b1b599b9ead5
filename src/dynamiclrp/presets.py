"""Presets: named rule sets, accepted by ``rules=`` as objects or by name.

==============================  ====================================================================================
name                            what it is
==============================  ====================================================================================
``epsilon`` (**the default**)   LRP-ε (ε = 1e-6) on linear/conv layers, sum rule on additions, identity on
                                activations, normaliser constant, uniform rule on products, AttnLRP softmax
``zero``                        LRP-0: ``epsilon`` with ε = 0 (gradient × input on bias-free ReLU networks)
``attnlrp``                     AttnLRP (Achtibat et al., ICML 2024), also on fused attention nodes; LRP-0 on
                                linear layers (LXT's convention)
``cplrp``                       CP-LRP (Ali et al., ICML 2022): attention weights (and MLP gates) constant
``paper``                       the DynamicLRP paper's own rules (magnitude splits), to reproduce it
``epsilon_gamma_box``           Zennit's ``EpsilonGammaBox`` (needs ``low``/``high``: call the function)
``epsilon_plus``                Zennit's ``EpsilonPlus``
``epsilon_plus_flat``           Zennit's ``EpsilonPlusFlat``
``epsilon_alpha2_beta1``        Zennit's ``EpsilonAlpha2Beta1``
``epsilon_alpha2_beta1_flat``   Zennit's ``EpsilonAlpha2Beta1Flat``
==============================  ====================================================================================

The Zennit composites carry Zennit's registry names, parameters and defaults (``epsilon=1e-6``,
``stabilizer=1e-6``, ``gamma=0.25``, ``zero_params``) and give Zennit's numbers without a canonizer.

Why ε is the default: it is the standard LRP rule (Bach et al. 2015) and it applies to every architecture
(no input bounds, no image-specific assumptions); it is conservative up to its bias and stabilizer sinks, which
the ledger names; on bias-free ReLU networks it is gradient × input, so it never invents structure the model does
not have; and together with the identity rule for element-wise non-linearities, the normaliser held constant,
the uniform rule for products of activations and the softmax rule it is AttnLRP on transformers (Achtibat et al.
2024, the best-evaluated rule set there) with ε = 1e-6 instead of LXT's ε = 0 on linear layers. Rules that need input bounds (z^B) or that trade
faithfulness for sharper, more readable heatmaps on CNNs (γ, α-β, flat — Montavon et al. 2019, Kohlbrenner et al.
2020) are opt-in presets. See ``docs/rules.md``.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch

from .errors import RuleError
from .rules import (CPLRP, AlphaBeta, Rule, AttnLRP, Epsilon, Flat, Gamma, Identity, Leaf, MagnitudeSplit, Norm,
                    NormConstant, Pass, Product, Routing, RuleSet, Softmax, Sum, Uniform, ZBox, ZPlus)

Tensor = torch.Tensor
#: Zennit's ``zero_params``: parameter names dropped from the rules (``"bias"``)
ZeroParams = str | Sequence[str] | None


def _base(**over: Rule) -> dict[str, Rule]:
    fam = {
        "linear": Epsilon(1e-6),
        "conv": Epsilon(1e-6),
        "matmul": Uniform(),
        "product": Product(),
        "add": Sum(),
        "reduce": Sum(),
        "pool": Sum(),
        "activation": Identity(),
        "norm": NormConstant(),
        "softmax": Softmax(),
        "attention": AttnLRP(),
        "routing": Routing(),
        "embedding": Routing(),
        "leaf": Leaf(),
    }
    fam.update(over)
    return fam


def epsilon(epsilon: float = 1e-6) -> RuleSet:
    """LRP-ε on every linear, convolution and weight matmul (ε = 1e-6, sign-aware, bias as a sink); the sum
    rule on additions, reductions and average pooling; identity on element-wise non-linearities; normalisers
    held constant; uniform rule on products of two activations; AttnLRP's softmax rule. The default."""
    return RuleSet(_base(linear=Epsilon(epsilon), conv=Epsilon(epsilon)), name="epsilon")


def zero() -> RuleSet:
    """LRP-0: :func:`epsilon` with ε = 0. On bias-free piecewise-linear graphs it equals gradient × input."""
    return RuleSet(_base(linear=Epsilon(0.0), conv=Epsilon(0.0)), name="zero")


def default() -> RuleSet:
    """The rule set used when ``rules=None``: :func:`epsilon`."""
    return epsilon()


def attnlrp(epsilon: float = 0.0) -> RuleSet:
    """AttnLRP (Achtibat et al., ICML 2024): LRP-0 on linear layers with the bias as a sink (LXT's convention,
    ``epsilon=0``), identity on element-wise non-linearities, LayerNorm/RMSNorm with the normaliser constant, the
    uniform rule on products of two activations (gated MLPs, ``A·V``, ``Q·Kᵀ``) and the softmax rule
    ``R_x = x ⊙ (R − s ⊙ Σ_j R_j)`` on the true logits — including fused scaled-dot-product-attention nodes.

    Parameters
    ----------
    epsilon : float
        ε of the linear layers. The default 0 is what LXT's efficient implementation computes (its linear
        rule is ε → 0, 0/0 := 0); ``epsilon=1e-6`` is this library's earlier default and the ``"epsilon"``
        preset's value. With ε = 0 the rule needs no layer output, so frozen models need no ``model=``.
    """
    return RuleSet(_base(linear=Epsilon(epsilon), conv=Epsilon(epsilon), matmul=AttnLRP(),
                         product=AttnLRP(), attention=AttnLRP()), name="attnlrp")


def cplrp(epsilon: float = 0.0, gate_constant: bool = True) -> RuleSet:
    """CP-LRP (Ali et al., ICML 2022): attention weights treated as constants, so all relevance through
    attention goes to the values; otherwise as :func:`attnlrp`. Conservative by construction.

    Parameters
    ----------
    epsilon : float
        ε of the linear layers (default 0, LXT's convention, as in :func:`attnlrp`).
    gate_constant : bool
        Treat the activated gate of gated MLPs as a constant too (LXT's CP-LRP, the default); ``False`` keeps
        AttnLRP's uniform rule there. See :class:`~dynamiclrp.rules.CPLRP`.
    """
    cp = CPLRP(gate_constant)
    return RuleSet(_base(linear=Epsilon(epsilon), conv=Epsilon(epsilon), matmul=cp, product=cp,
                         attention=cp, softmax=cp), name="cplrp")


_ZENNIT_DOC = """

    Parameters
    ----------
    epsilon : float or callable
        ε of the :class:`~dynamiclrp.rules.Epsilon` rule on dense layers (Zennit default 1e-6).
    stabilizer : float or callable
        Stabilizer of every other rule, including the ``Norm`` rule on additions, sums and average pooling
        (Zennit default 1e-6).
    zero_params : sequence of str, optional
        ``("bias",)`` drops the biases of linear and convolution layers from their rules, as Zennit's
        ``zero_params``.

    Returns
    -------
    RuleSet
        Additions and residual ``+`` (Zennit's ``ResNetCanonizer`` sum), sums and average pooling get
        ``Norm(stabilizer)``; element-wise activations and unmerged normalisation layers ``Pass``; max pooling and
        shape ops route like the gradient. Eval-mode batch norms right after a convolution or dense layer are
        merged into it (as ``SequentialMergeBatchNorm``), so no canonizer is needed. "First layer" means the
        first matching module in ``model.named_modules()`` order when the rule set has a model
        (``.with_model(model)``, Zennit's meaning), else the matching op nearest the input in the graph.

    Notes
    -----
    Measured against Zennit 0.5.1 in float64 (``tests/test_zennit_parity.py``): on an MLP, a VGG-style CNN with
    BatchNorm, torchvision VGG-11 and ResNet-18 the relevance equals Zennit's up to rounding (≤ 1e-13 relative)
    when Zennit's merged batch norms are made exact. Stock Zennit leaves each merged batch norm dividing by
    ``sqrt(1 + eps)``, which moves its heatmaps by about ``eps/2`` per batch norm (≈ 1e-5 relative).
"""


def _zennit(name: str, conv: Rule, first: Rule | None = None, kind: str = "linear-type", epsilon: float = 1e-6,
            stabilizer: float = 1e-6, zero_params: ZeroParams = None) -> RuleSet:
    zp = _zero_params(zero_params)
    fam = _base(linear=Epsilon(epsilon, zp), conv=conv, add=Norm(stabilizer), pool=Norm(stabilizer),
                reduce=Norm(stabilizer), norm=Pass())
    return RuleSet(fam, name=name, first_layer=first, first_layer_kind=kind)


def _zero_params(zero_params: ZeroParams) -> tuple[str, ...]:
    if zero_params is None:
        return ()
    if isinstance(zero_params, str):
        return (zero_params,)
    return tuple(zero_params)


def epsilon_gamma_box(low: float | Tensor, high: float | Tensor, epsilon: float = 1e-6, gamma: float = 0.25,
                      stabilizer: float = 1e-6, zero_params: ZeroParams = None) -> RuleSet:
    """Zennit's ``EpsilonGammaBox`` composite: z^B(low, high) on the first convolution, γ on the other
    convolutions (and transposed convolutions), ε on dense layers (Montavon et al. 2017, 2019; Anders et al. 2021).

    ``low``/``high`` bound the input: scalars, per-channel ``(1, C, 1, 1)`` or per-pixel ``(1, C, H, W)`` tensors,
    e.g. the normalised values of pixel 0 and 1. A dense layer before every convolution keeps ε (Zennit's "first
    convolution" is only marked when a convolution matches).
    """
    zp = _zero_params(zero_params)
    return _zennit("epsilon_gamma_box", Gamma(gamma, stabilizer, zp), ZBox(low, high, stabilizer, zp), "conv",
                   epsilon, stabilizer, zp)


def epsilon_plus(epsilon: float = 1e-6, stabilizer: float = 1e-6, zero_params: ZeroParams = None) -> RuleSet:
    """Zennit's ``EpsilonPlus`` composite: z⁺ on convolutions, ε on dense layers."""
    zp = _zero_params(zero_params)
    return _zennit("epsilon_plus", ZPlus(stabilizer, zp), None, "linear-type", epsilon, stabilizer, zp)


def epsilon_plus_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6, zero_params: ZeroParams = None) -> RuleSet:
    """Zennit's ``EpsilonPlusFlat`` composite: flat on the first linear-type layer (convolution or dense), z⁺ on
    convolutions, ε on dense layers."""
    zp = _zero_params(zero_params)
    return _zennit("epsilon_plus_flat", ZPlus(stabilizer, zp), Flat(stabilizer), "linear-type", epsilon,
                   stabilizer, zp)


def epsilon_alpha2_beta1(epsilon: float = 1e-6, stabilizer: float = 1e-6, zero_params: ZeroParams = None) -> RuleSet:
    """Zennit's ``EpsilonAlpha2Beta1`` composite: α2β1 on convolutions, ε on dense layers (Bach et al. 2015)."""
    zp = _zero_params(zero_params)
    return _zennit("epsilon_alpha2_beta1", AlphaBeta(2.0, 1.0, stabilizer, zp), None, "linear-type", epsilon,
                   stabilizer, zp)


def epsilon_alpha2_beta1_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6, zero_params: ZeroParams = None) -> RuleSet:
    """Zennit's ``EpsilonAlpha2Beta1Flat`` composite: flat on the first linear-type layer, α2β1 on convolutions,
    ε on dense layers."""
    zp = _zero_params(zero_params)
    return _zennit("epsilon_alpha2_beta1_flat", AlphaBeta(2.0, 1.0, stabilizer, zp), Flat(stabilizer),
                   "linear-type", epsilon, stabilizer, zp)


for _f in (epsilon_gamma_box, epsilon_plus, epsilon_plus_flat, epsilon_alpha2_beta1, epsilon_alpha2_beta1_flat):
    _f.__doc__ = (_f.__doc__ or "") + _ZENNIT_DOC
del _f


def paper(epsilon: float = 1e-11) -> RuleSet:
    """The DynamicLRP paper's own rules (Lee & Millan Arias 2025, arXiv 2512.07010, §2.2 and its rule table),
    for reproducing its behaviour — not the default.

    * magnitude splits ``R_a = |a| / (|a| + |b| + ε) · R`` on additions, subtractions, sums, means and products
      of two tensors (:class:`~dynamiclrp.rules.MagnitudeSplit`); a constant operand gets nothing;
    * ε (1e-11, the paper code's value) on linear layers and convolutions;
    * identity on element-wise non-linearities and normalisation layers (:class:`~dynamiclrp.rules.Pass`);
    * AttnLRP's bilinear rule on products of two activations (``A·V``, ``Q·Kᵀ``) and its softmax rule — on the
      true logits, without the lower-triangular mask the paper's code applies to every softmax;
    * average pooling keeps the sum rule (the code's uniform split differs only in sign handling).

    These rules ignore signs (relevance never flips sign at an addition) and match no other reference; see
    ``docs/rules.md``. They need the operands of additions, which autograd does not keep: the Promise System
    recovers them.
    """
    return RuleSet(_base(linear=Epsilon(epsilon), conv=Epsilon(epsilon), add=MagnitudeSplit(epsilon),
                         reduce=MagnitudeSplit(epsilon), product=MagnitudeSplit(epsilon), norm=Pass(),
                         matmul=AttnLRP(), attention=AttnLRP()), name="paper")


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
    """Preset names accepted by ``rules="..."`` as they are (``epsilon_gamma_box`` needs bounds: see
    :func:`parse`)."""
    return list(_PRESETS)


def all_names() -> list[str]:
    """Every preset name :func:`parse` knows, including ``epsilon_gamma_box`` (which needs input bounds)."""
    return [*_PRESETS, "epsilon_gamma_box"]


_FUNCTIONS: dict[str, Callable[..., RuleSet]] = {**_PRESETS, "epsilon_gamma_box": epsilon_gamma_box}
_BOUNDS_HINT = ("epsilon_gamma_box needs the input bounds: pass rules=dynamiclrp.presets.epsilon_gamma_box(low, "
                "high), or the spec 'epsilon_gamma_box:low=L,high=H' (the lowest and highest value an input "
                "feature can take, e.g. the normalised values of a black and a white pixel)")


def _value(text: str) -> float | bool | str | tuple[str, ...]:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return float(text)
    except ValueError:
        pass
    parts = [t for t in text.replace("+", " ").split() if t]
    return tuple(parts) if len(parts) > 1 else text.strip()


def parse(spec: str, *, low: float | Tensor | None = None, high: float | Tensor | None = None) -> RuleSet:
    """The rule set named by ``spec``: a preset name, optionally with parameters.

    This is the one parser of preset names: ``rules="..."`` in Python and ``--rules`` of every command line
    sub-command go through it.

    Parameters
    ----------
    spec : str
        A name from :func:`all_names`, optionally followed by ``:`` and comma-separated ``key=value``
        parameters of the preset function, e.g. ``"epsilon:epsilon=0.25"``, ``"cplrp:gate_constant=false"``,
        ``"epsilon_gamma_box:low=-2.1,high=2.6"`` or ``"epsilon_plus:zero_params=bias"``. Values are numbers,
        ``true``/``false`` or words; several words are joined with ``+`` (``zero_params=bias+weight``).
    low, high : float or torch.Tensor, optional
        Default input bounds of ``epsilon_gamma_box`` (z^B on the first convolution), used when ``spec`` does
        not give them. The command line passes the range its inputs can take (e.g. the normalised values of a
        black and a white pixel); without bounds from either source ``epsilon_gamma_box`` is an error.

    Returns
    -------
    RuleSet
        The preset, ``rule_set.name`` being the preset name.

    Raises
    ------
    RuleError
        Unknown name (the message lists the valid names), unknown parameter (it lists the preset's
        parameters), a malformed ``key=value`` or missing bounds.

    Examples
    --------
    >>> from dynamiclrp import presets
    >>> presets.parse("epsilon:epsilon=0.25").name
    'epsilon'
    >>> presets.parse("epsilon_gamma_box", low=0.0, high=1.0).name
    'epsilon_gamma_box'
    """
    if not isinstance(spec, str):
        raise RuleError(f"a preset spec must be a string, got {type(spec).__name__}")
    name, _, params = spec.strip().partition(":")
    name = name.strip()
    fn = _FUNCTIONS.get(name)
    if fn is None:
        raise RuleError(f"unknown preset {name!r}; valid names are: {', '.join(_PRESETS)}, epsilon_gamma_box "
                        "(with bounds: 'epsilon_gamma_box:low=L,high=H')")
    accepted = list(inspect.signature(fn).parameters)
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key or not value.strip():
            raise RuleError(f"preset parameter {item!r} in {spec!r} is not key=value (e.g. 'epsilon:epsilon=0.25')")
        if key not in accepted:
            raise RuleError(f"preset {name!r} has no parameter {key!r}; its parameters are: "
                            f"{', '.join(accepted) or '(none)'}")
        kwargs[key] = _value(value)
    if name == "epsilon_gamma_box":
        kwargs.setdefault("low", low)
        kwargs.setdefault("high", high)
        if kwargs["low"] is None or kwargs["high"] is None:
            raise RuleError(_BOUNDS_HINT)
        if isinstance(kwargs["low"], (str, bool)) or isinstance(kwargs["high"], (str, bool)):
            raise RuleError(f"epsilon_gamma_box bounds must be numbers, got low={kwargs['low']!r}, "
                            f"high={kwargs['high']!r}")
    try:
        return fn(**kwargs)
    except (TypeError, ValueError) as err:
        raise RuleError(f"preset spec {spec!r}: {err}") from None


def by_name(name: str) -> RuleSet:
    """The preset called ``name`` (the grammar of :func:`parse`, without default input bounds)."""
    fn = _PRESETS.get(name)
    if fn is not None:
        return fn()
    if name == "epsilon_gamma_box":
        raise RuleError(f"{_BOUNDS_HINT}; valid names are: {', '.join(_PRESETS)}")
    return parse(name)


#: what ``rules=`` accepts: ``None`` (the default preset), a preset name or spec (see :func:`parse`), a rule set
Rules = RuleSet | str | None


def resolve(rules: Rules) -> RuleSet:
    """Turn the ``rules=`` argument into a :class:`~dynamiclrp.rules.RuleSet`: ``None`` -> :func:`default`, a name
    or spec -> :func:`parse`, a rule set as it is."""
    if rules is None:
        return default()
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, str):
        return by_name(rules)
    raise RuleError(f"rules must be None, a preset name ({', '.join(names())}) or a RuleSet, "
                    f"got {type(rules).__name__}")
