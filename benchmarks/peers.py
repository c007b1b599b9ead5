"""Rule sets for dynamiclrp and the equivalent configurations of the peers (Zennit 0.5.1, autoLRP 0.2.0).

Benchmark presets (``--presets``):

==============  ===========================================  ===========================================  ============================
preset          dynamiclrp                                   Zennit (composite + canonizers)              autoLRP (``LRPConfig``)
==============  ===========================================  ===========================================  ============================
``epsilon``     ``"epsilon"``                                LayerMapComposite: base map + ε on conv and  ``BASE``, eps=1e-6
                                                             Linear; SequentialMergeBatchNorm (CNN)
``attnlrp``     ``"attnlrp"`` (transformers)                 n/a (no attention rules)                     ``{**BASE, **ATTNLRP}``
``cplrp``       ``"cplrp"`` (transformers)                   n/a                                          ``{**BASE, **CPLRP}``
``gamma_box``   CNN: ``epsilon_gamma_box(low, high)``;       CNN: ``EpsilonGammaBox``; MLP: γ on Linear,  γ(0.25) on conv (CNN) or
                MLP: γ(0.25) on Linear, z^B on the first     z^B on the first Linear                      Addmm (MLP); autoLRP cannot
                                                                                                           put z^B on the first layer only
``plus``        CNN: ``epsilon_plus``; MLP: z⁺ on Linear     CNN: ``EpsilonPlus``; MLP: z⁺ on Linear      z⁺ on conv / Addmm
``alpha2beta1`` CNN: ``epsilon_alpha2_beta1``; MLP: α2β1     CNN: ``EpsilonAlpha2Beta1``; MLP: α2β1 on    α2β1 on conv / Addmm
                on Linear                                    Linear
==============  ===========================================  ===========================================  ============================

Each peer function returns ``(prepare, run)`` callables, or a string saying why the peer does not apply. ``prepare()``
does the peer's forward pass (through Zennit's hooked copy of the model, or on autoLRP's wrapped input) and
returns the state ``run(state)`` needs to finish the explanation, so the memory measurement can tell the
forward from the explanation; the timing loop calls both.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn

from models import Case, clone_model

PRESETS_VISION = ("epsilon", "gamma_box", "plus", "alpha2beta1")
PRESETS_TEXT = ("epsilon", "attnlrp")
ALL_PRESETS = ("epsilon", "attnlrp", "cplrp", "gamma_box", "plus", "alpha2beta1")


def applies(case: Case, preset: str) -> bool:
    if case.kind == "text":
        return preset in ("epsilon", "attnlrp", "cplrp")
    return preset in ("epsilon", "gamma_box", "plus", "alpha2beta1")


def default_presets(case: Case) -> tuple[str, ...]:
    return PRESETS_TEXT if case.kind == "text" else PRESETS_VISION


def _channel_bounds(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = case.bounds
    if case.kind == "cnn":  # per-channel (1, C, 1, 1)
        return lo[:, :, :1, :1].contiguous(), hi[:, :, :1, :1].contiguous()
    return lo, hi


# ---------------------------------------------------------------------------------------------------------
# dynamiclrp
# ---------------------------------------------------------------------------------------------------------
def our_rules(case: Case, preset: str) -> Any:
    """The ``rules=`` argument for dynamiclrp."""
    from dynamiclrp import presets as P
    from dynamiclrp import rules as L

    if preset in ("epsilon", "attnlrp", "cplrp"):
        return preset
    if case.kind == "cnn":
        if preset == "gamma_box":
            return P.epsilon_gamma_box(*_channel_bounds(case))
        if preset == "plus":
            return P.epsilon_plus()
        if preset == "alpha2beta1":
            return P.epsilon_alpha2_beta1()
    if case.kind == "mlp":
        base = P.epsilon()
        if preset == "gamma_box":
            lo, hi = case.bounds
            return base.with_families(linear=L.Gamma(0.25, 1e-6)).with_first_layer(
                L.ZBox(float(lo), float(hi), 1e-6), kind="linear", by="graph")
        if preset == "plus":
            return base.with_families(linear=L.ZPlus(1e-6))
        if preset == "alpha2beta1":
            return base.with_families(linear=L.AlphaBeta(2.0, 1.0, 1e-6))
    raise ValueError(f"preset {preset!r} does not apply to {case.name}")


# ---------------------------------------------------------------------------------------------------------
# Zennit
# ---------------------------------------------------------------------------------------------------------
def _zennit_composite(case: Case, preset: str):
    from zennit import composites as C
    from zennit import rules as R
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.types import Convolution

    canon = [SequentialMergeBatchNorm()] if case.kind == "cnn" else []
    base = C.layer_map_base(1e-6)
    if preset == "epsilon":
        return C.LayerMapComposite(layer_map=base + [(Convolution, R.Epsilon(1e-6)), (nn.Linear, R.Epsilon(1e-6))],
                                   canonizers=canon)
    if case.kind == "cnn":
        if preset == "gamma_box":
            lo, hi = _channel_bounds(case)
            return C.EpsilonGammaBox(low=lo, high=hi, canonizers=canon)
        if preset == "plus":
            return C.EpsilonPlus(canonizers=canon)
        if preset == "alpha2beta1":
            return C.EpsilonAlpha2Beta1(canonizers=canon)
    if case.kind == "mlp":
        if preset == "gamma_box":
            lo, hi = case.bounds
            return C.SpecialFirstLayerMapComposite(
                layer_map=base + [(nn.Linear, R.Gamma(gamma=0.25, stabilizer=1e-6))],
                first_map=[(nn.Linear, R.ZBox(low=float(lo), high=float(hi), stabilizer=1e-6))])
        if preset == "plus":
            return C.LayerMapComposite(layer_map=base + [(nn.Linear, R.ZPlus(stabilizer=1e-6))])
        if preset == "alpha2beta1":
            return C.LayerMapComposite(layer_map=base + [(nn.Linear, R.AlphaBeta(alpha=2.0, beta=1.0,
                                                                                    stabilizer=1e-6))])
    return None


class ZennitRunner:
    """Zennit on a deep copy of the model with the composite (and canonizers) registered once, as inside
    ``with zennit.attribution.Gradient(model, composite) as attributor``; one explanation is what the attributor's
    ``forward`` does: ``model(x)`` and ``torch.autograd.grad(out, x, grad_outputs=logit * one_hot)``."""

    def __init__(self, case: Case, composite):
        self.case = case
        self.model = clone_model(case.model)
        self.composite = composite
        composite.register(self.model)
        self.target = case.target

    def prepare(self):
        x = self.case.x.detach().requires_grad_(True)
        out = self.case.logits(x, self.model)
        seed = torch.zeros_like(out)
        seed.scatter_(1, self.target[:, None], out.detach().gather(1, self.target[:, None]))
        return x, out, seed

    @staticmethod
    def run(state):
        x, out, seed = state
        (rel,) = torch.autograd.grad((out,), (x,), grad_outputs=(seed,))
        return rel

    def close(self) -> None:
        self.composite.remove()


def zennit_for(case: Case, preset: str) -> ZennitRunner | str:
    if case.kind == "text":
        return "n/a: Zennit has no rules for attention/LayerNorm graphs"
    try:
        import zennit  # noqa: F401
    except Exception as err:  # pragma: no cover - optional extra
        return f"not installed ({type(err).__name__})"
    comp = _zennit_composite(case, preset)
    if comp is None:
        return "n/a"
    return ZennitRunner(case, comp)


# ---------------------------------------------------------------------------------------------------------
# autoLRP
# ---------------------------------------------------------------------------------------------------------
def _autolrp_config(case: Case, preset: str):
    import autolrp
    from autolrp import ATTNLRP, BASE, CPLRP, LRPConfig

    eps = 1e-6
    lin = "ConvolutionBackward" if case.kind == "cnn" else "AddmmBackward"
    if preset == "epsilon":
        return LRPConfig(eps=eps)
    if preset == "attnlrp":
        return LRPConfig(rule={**BASE, **ATTNLRP}, eps=eps)
    if preset == "cplrp":
        return LRPConfig(rule={**BASE, **CPLRP}, eps=eps)
    if preset == "gamma_box":
        return LRPConfig(rule={**BASE, lin: ("gamma", {"gamma": 0.25})}, eps=eps)
    if preset == "plus":
        return LRPConfig(rule={**BASE, lin: "zplus"}, eps=eps)
    if preset == "alpha2beta1":
        return LRPConfig(rule={**BASE, lin: ("alpha_beta", {"alpha": 2.0, "beta": 1.0})}, eps=eps)
    del autolrp
    return None


class AutoLRPRunner:
    """autoLRP as its README shows: wrap the input with ``autolrp.tensor``, run the model, call ``.lrp()`` on
    the explained scalar (here the sum over rows of the gathered logits; autoLRP always seeds +1)."""

    def __init__(self, case: Case, config):
        self.case = case
        self.config = config

    def prepare(self):
        import autolrp
        x = autolrp.tensor(self.case.x.detach())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = self.case.forward(x)
        return x, y.sum()

    def run(self, state):
        x, y = state
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y.lrp(config=self.config)
        return x.relevance

    def close(self) -> None:
        pass


def autolrp_for(case: Case, preset: str) -> AutoLRPRunner | str:
    try:
        import autolrp  # noqa: F401
    except Exception as err:  # pragma: no cover - optional extra
        return f"not installed ({type(err).__name__})"
    cfg = _autolrp_config(case, preset)
    if cfg is None:
        return "n/a"
    return AutoLRPRunner(case, cfg)


def check_runner(runner: Any) -> str | None:
    """Run a peer once; return an error description when it fails (the peer is then left out)."""
    try:
        with torch.enable_grad():
            rel = runner.run(runner.prepare())
        if rel is None:
            return "returned no relevance"
        if not torch.isfinite(rel).all():
            return "non-finite relevance"
    except Exception as err:  # noqa: BLE001
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"fails: {type(err).__name__}: {msg[:80]}"
    return None


Runner = Callable[[], Any]
