"""Products: element-wise ``a * b`` and ``a / b``, and matmuls of two activations (attention's ``Q·Kᵀ`` and
``A·V``): the uniform rule (AttnLRP), the structure-aware default (normalisers, gates and self-gating recognised
from the graph), and scaling by constants."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from ..core.messages import Msg
from ..core.step import Site, Step
from ..errors import RuleError
from ..ops.elementwise import NegKernel, ProductKernel
from ..ops.linear import LinearKernel
from .base import Rule, _child_meta, _fit, _wrong_family
from .linear import BilinearStep, Epsilon, LinearStep
from .structure import Structure, structure_of

if TYPE_CHECKING:  # pragma: no cover
    pass

Tensor = torch.Tensor


class ProductStep(Step):
    """``a * b`` / ``a / b``: each operand gets a fixed share of the relevance, decided at plan time.

    ``give[k]`` is operand ``k``'s share. In gradient form operand ``a`` of ``z = a * b`` receives
    ``G_a = give_a * G * b`` (``R_a = give_a * R``); for ``a / b``: ``G_a = give_a * G / b`` and
    ``G_b = give_b * G * a / b²``.
    """

    __slots__ = ("kernel", "give", "meta", "reason")
    handles_r = True

    def __init__(self, site: Site, give: tuple[float, float], reason: str):
        super().__init__(site)
        self.kernel: ProductKernel = site.spec.kernel
        self.give = give
        self.meta = _child_meta(site)
        self.reason = reason
        for k in (0, 1):
            if give[k] and k < len(site.edges) and site.edges[k] >= 0:
                other = 1 - k
                if self.kernel.operand(site.node, other) is None and site.edges[other] >= 0:
                    site.planner.need_value(site.edges[other])
                if self.kernel.divide and k == 1 and self.kernel.operand(site.node, 0) is None and site.edges[0] >= 0:
                    site.planner.need_value(site.edges[0])

    def _op(self, run, node, k):
        v = self.kernel.operand(node, k)
        if v is None:
            e = self.in_edges[k] if k < len(self.in_edges) else -1
            if e < 0:
                raise RuleError(f"{run.graph.describe(self.index)}: operand {k} is not available")
            v = run.value(e, run.graph.describe(self.index))
        return _conj(v)

    def g(self, run, gs):
        gz = gs[0]
        node = run.graph.nodes[self.index]
        res: list[Msg | None] = [None] * self.n_in
        for k in (0, 1):
            if not self.give[k] or k >= self.n_in or self.in_edges[k] < 0:
                continue
            if self.kernel.divide:
                b = self._op(run, node, 1)
                if k == 0:
                    gk = gz / b
                else:
                    a = self._op(run, node, 0)
                    gk = gz * a / (b * b)
            else:
                gk = gz * self._op(run, node, 1 - k)
            if self.give[k] != 1.0:
                gk = self.give[k] * gk
            res[k] = Msg(g=_fit(gk, self.meta[k]))
        return res

    def r(self, run, rs):
        rz = rs[0]
        res: list[Msg | None] = [None] * self.n_in
        for k in (0, 1):
            if not self.give[k] or k >= self.n_in or self.in_edges[k] < 0:
                continue
            rk = rz if self.give[k] == 1.0 else self.give[k] * rz
            res[k] = Msg(r=_fit(rk, self.meta[k]))
        return res

    def constant_share_zero(self, run, outs):
        return True  # constants never receive relevance from a product (all goes to the activation)


def _conj(v: Any) -> Any:
    """A factor as gradient form needs it: complex factors conjugated (a message ``G`` at a complex slot stands for
    ``Re(conj(G)·v)``, so ``z = a·b`` sends ``G·conj(b)`` to ``a``); real ones unchanged."""
    return v.conj() if isinstance(v, torch.Tensor) and v.is_complex() else v


class ScaleStep(Step):
    """Multiplication by a constant (``x * c``, ``x / c``, ``-x``): all relevance to ``x``."""

    __slots__ = ("factor_fn", "meta")
    handles_r = True

    def __init__(self, site: Site, factor_fn: Callable[[Any], Any]):
        super().__init__(site)
        self.factor_fn = factor_fn
        self.meta = _child_meta(site)

    def g(self, run, gs):
        node = run.graph.nodes[self.index]
        return [Msg(g=_fit(gs[0] * _conj(self.factor_fn(node)), self.meta[0]))] + [None] * (self.n_in - 1)

    def r(self, run, rs):
        return [Msg(r=_fit(rs[0], self.meta[0]))] + [None] * (self.n_in - 1)

    def constant_share_zero(self, run, outs):
        return True  # the constant factor receives nothing


def _scale_factor(kernel: Any) -> Callable[[Any], Any]:
    if isinstance(kernel, NegKernel):
        return lambda node: -1.0
    if isinstance(kernel, ProductKernel):
        if kernel.divide:
            return lambda node: 1.0 / kernel.operand(node, 1)
        return lambda node: kernel.operand(node, 1)
    raise AssertionError(kernel)  # pragma: no cover


class Uniform(Rule):
    """Uniform rule for a product of two activations (AttnLRP, Achtibat et al. 2024): each operand receives half
    of the relevance. For ``a * b``, ``R_a = R_b = R / 2``; for ``A @ V``, ``R_A[j,k] = Σ_p A_jk V_kp R_jp /
    (2 O_jp)``. Exactly conservative. When one operand is a constant or a parameter, it gets nothing and the
    activation everything.
    """

    families = frozenset({"matmul", "product"})

    def bind(self, site):
        return _bind_product(self, site, detect=False)


class Product(Rule):
    """Product of two tensors with the structure recognised from the graph (the default product rule).

    * one operand constant or a parameter → all relevance to the activation;
    * one operand a normaliser (a statistic such as ``rsqrt(mean(x²) + ε)``) → treated as a constant
      (AttnLRP's LayerNorm/RMSNorm rule);
    * one operand a sigmoid gate → the signal takes all (LSTM/GRU gates, squeeze-excitation; Arras et al. 2017);
    * ``x * g(x)`` with ``g`` element-wise (SiLU or tanh-GELU written out) → identity rule: all to ``x``;
    * otherwise the uniform rule (½ each).
    """

    families = frozenset({"matmul", "product"})

    def __init__(self, normalisers: bool = True, gates: bool = True, self_gating: bool = True):
        for name, v in (("normalisers", normalisers), ("gates", gates), ("self_gating", self_gating)):
            if not isinstance(v, bool):
                raise RuleError(f"Product({name}=...) must be True or False, got {v!r}")
        self.normalisers = normalisers
        self.gates = gates
        self.self_gating = self_gating

    def bind(self, site):
        return _bind_product(self, site, detect=True)


def _structure(site: Site) -> Structure:
    return structure_of(site.planner)


def _bind_product(rule: Rule, site: Site, detect: bool, softmax_constant: bool = False) -> Step:
    k = site.spec.kernel
    fam = site.spec.family_of(site) if site.spec.family_of else site.spec.family
    if isinstance(k, NegKernel) or (isinstance(k, ProductKernel) and k.scalar):
        return ScaleStep(site, _scale_factor(k))
    edges = site.edges
    if isinstance(k, LinearKernel):
        p0, p1 = k.operands
        act = (site.active[p0], site.active[p1])
        if act[0] != act[1]:
            # activation times weight: the linear family's rule would apply; matmul family never gets here
            return LinearStep(site, Epsilon(0.0).branches(), 0.0, False, "epsilon")
        give = (0.5, 0.5)
        if softmax_constant:
            st = _structure(site)
            sm = (edges[p0] >= 0 and st.from_softmax(edges[p0]), edges[p1] >= 0 and st.from_softmax(edges[p1]))
            if sm[0] != sm[1]:
                give = (0.0, 1.0) if sm[0] else (1.0, 0.0)
        return BilinearStep(site, give=give)
    if not isinstance(k, ProductKernel):
        raise _wrong_family(rule, site, fam)
    # element-wise product / division
    present = [p < len(edges) and edges[p] >= 0 for p in (0, 1)]
    act = [present[p] and site.active[p] for p in (0, 1)]
    if present[0] and not present[1]:
        return ScaleStep(site, _scale_factor(k)) if not k.divide else ProductStep(site, (1.0, 0.0), "constant")
    if present[1] and not present[0]:
        return ProductStep(site, (0.0, 1.0), "constant")
    if act[0] != act[1]:
        return ProductStep(site, (1.0, 0.0) if act[0] else (0.0, 1.0), "constant operand")
    if detect and act[0] == act[1]:
        st = _structure(site)
        r: Product = rule  # type: ignore[assignment]
        if softmax_constant:
            sm = (st.from_softmax(edges[0]), st.from_softmax(edges[1]))
            if sm[0] != sm[1]:
                return ProductStep(site, (0.0, 1.0) if sm[0] else (1.0, 0.0), "attention weights constant")
        if getattr(r, "normalisers", True):
            nz = (st.is_normaliser(edges[0]), st.is_normaliser(edges[1]))
            if nz[0] != nz[1]:
                return ProductStep(site, (0.0, 1.0) if nz[0] else (1.0, 0.0), "normaliser")
        if getattr(r, "gates", True) and not k.divide:
            gt = (st.is_gate(edges[0]), st.is_gate(edges[1]))
            if gt[0] != gt[1]:
                return ProductStep(site, (0.0, 1.0) if gt[0] else (1.0, 0.0), "gate")
        if getattr(r, "self_gating", True) and not k.divide:
            sig = st.self_gating_signal(edges[0], edges[1])
            if sig is not None:
                return ProductStep(site, (1.0, 0.0) if sig == 0 else (0.0, 1.0), "self-gating")
        if getattr(r, "gate_constant", False) and not k.divide:
            ag = (st.is_activation_output(edges[0]), st.is_activation_output(edges[1]))
            if ag[0] != ag[1]:
                return ProductStep(site, (0.0, 1.0) if ag[0] else (1.0, 0.0), "activation gate constant")
    return ProductStep(site, (0.5, 0.5), "uniform")
