"""The DynamicLRP paper's magnitude splits (Lee & Millan Arias 2025), to reproduce its behaviour."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..core.messages import Msg, safe_div
from ..core.promises import available
from ..core.step import Site, Step
from ..errors import RuleError
from ..ops.elementwise import NegKernel, ProductKernel
from ..ops.reduce import SumKernel
from .base import Rule, _check_stabilizer, _child_meta, _fit, _wrong_family
from .elementwise import PassStep
from .products import _bind_product
from .sums import SumStep

if TYPE_CHECKING:  # pragma: no cover
    pass

Tensor = torch.Tensor


class MagnitudeStep(Step):
    """The DynamicLRP paper's magnitude split: ``R_i = |c_i| / (Σ_j |c_j| + ε) · R`` (explicit relevance)."""

    __slots__ = ("kernel", "eps", "meta", "params")
    handles_r = True

    def __init__(self, site: Site, eps: float):
        super().__init__(site)
        self.kernel: SumKernel = site.spec.kernel
        self.eps = eps
        self.meta = _child_meta(site)
        # a frozen parameter added as a constant (a bias after a matmul) keeps its magnitude share, as it would as a
        # parameter of a trainable model (read through model=); other constants get nothing
        self.params: tuple[int, ...] = ()
        for pos, e in enumerate(site.edges):
            if e >= 0:
                site.planner.need_value(e)
            elif self.kernel.coefficients is not None:
                recipe = site.planner.resolver.const(site.index, pos)
                if available(recipe) and recipe.source[0] == "param":
                    site.planner.need_const(site.index, pos)
                    self.params += (pos,)
        site.planner.need_value(self.out_slots[0])

    def _split(self, run, R: Tensor) -> list[Msg | None]:
        node = run.graph.nodes[self.index]
        vals = [None if e < 0 else run.value(e, "magnitude split") for e in self.in_edges]
        for pos in self.params:
            vals[pos] = run.const(self.index, pos, "magnitude split")
        mags = [None if v is None else v.abs() for v in vals]
        coefs = self.kernel.coefficients(node) if self.kernel.coefficients is not None else None
        if coefs is not None:
            den = None
            for c, mg in zip(coefs, mags):
                if mg is None:
                    continue
                term = abs(c) * mg
                den = term if den is None else den + term
            s = R / (den + self.eps)
            if self.params and run.ledger is not None:
                for pos in self.params:
                    run.book_local("bias", self.index, (abs(coefs[pos]) * mags[pos] * s).sum(),
                                   "a frozen parameter's magnitude share")
            return [None if (mg is None or e < 0) else Msg(r=_fit(abs(c) * mg * s, m))
                    for c, mg, m, e in zip(coefs, mags, self.meta, self.in_edges)]
        den = self.kernel.forward(node, mags, 0)
        s = R / (den + self.eps)
        back = self.kernel.back(node, s)
        # R_x = |x| * back-projected quotient, scaled back from the map's own coefficients (mean divides by N)
        ref = self.kernel.back(node, torch.ones_like(s))
        return [None if mg is None else Msg(r=_fit(mg * safe_div(t, t0) * t0.abs(), m))
                for mg, t, t0, m in zip(mags, back, ref, self.meta)]

    def g(self, run, gs):
        z = run.value(self.out_slots[0], "magnitude split")
        return self._split(run, gs[0] * z)

    def r(self, run, rs):
        return self._split(run, rs[0])

    conservative = False


class MagnitudeProductStep(Step):
    """The DynamicLRP paper's rule for ``a * b`` (``a / b``) of two tensors: ``R_a = |a| / (|a| + |b| + ε) · R``
    and ``R_b = |b| / (|a| + |b| + ε) · R`` (``|1/b|`` in place of ``|b|`` for a division), each reduced to its
    operand's broadcast shape. Explicit relevance; signs are ignored by design."""

    __slots__ = ("kernel", "eps", "meta")
    handles_r = True
    conservative = False

    def __init__(self, site: Site, eps: float):
        super().__init__(site)
        self.kernel: ProductKernel = site.spec.kernel
        self.eps = eps
        self.meta = _child_meta(site)
        for k in (0, 1):
            if self.kernel.operand(site.node, k) is None:
                site.planner.need_value(site.edges[k])

    def _ops(self, run, node):
        out = []
        for k in (0, 1):
            v = self.kernel.operand(node, k)
            out.append(v if v is not None else run.value(self.in_edges[k], run.graph.describe(self.index)))
        return out

    def _split(self, run, node, a, b, R):
        ma = a.abs()
        mb = (1.0 / b).abs() if self.kernel.divide else b.abs()
        s = R / (ma + mb + self.eps)
        return [Msg(r=_fit(ma * s, self.meta[0])), Msg(r=_fit(mb * s, self.meta[1]))] + [None] * (self.n_in - 2)

    def g(self, run, gs):
        node = run.graph.nodes[self.index]
        a, b = self._ops(run, node)
        z = a / b if self.kernel.divide else a * b
        return self._split(run, node, a, b, gs[0] * z)

    def r(self, run, rs):
        node = run.graph.nodes[self.index]
        a, b = self._ops(run, node)
        return self._split(run, node, a, b, rs[0])


class MagnitudeSplit(Rule):
    """The DynamicLRP paper's rule for Add/Sub/Sum/Mean and for products of two tensors (Lee & Millan Arias 2025,
    §2.2 and its code): split relevance by operand magnitude, ``R_a = |a| / (|a| + |b| + ε) · R``.

    Provided to reproduce the paper (its preset :func:`dynamiclrp.presets.paper`); it ignores signs and so
    matches no other reference. Needs the operands' values, which the Promise System recovers. An operand that
    does not require grad (a constant, a scalar) receives nothing: all relevance goes to the tensor, as in the
    paper's code. For a division the divisor's weight is ``|1/b|``.

    Parameters
    ----------
    epsilon : float
        Added to the denominator (the paper's code uses 1e-11).
    """

    families = frozenset({"add", "reduce", "product"})

    def __init__(self, epsilon: float = 1e-11):
        _check_stabilizer(epsilon)
        if callable(epsilon):
            raise RuleError("MagnitudeSplit(epsilon=...) takes a number >= 0, not a callable")
        self.epsilon = float(epsilon)

    def bind(self, site):
        k = site.spec.kernel
        if isinstance(k, SumKernel):
            if not k.linear:
                return SumStep(site, 0.0)  # a homogeneous statistic (std, prod...): Euler's rule, no magnitudes
            if k.forward is None:
                return PassStep(site)  # x + scalar: all relevance to x
            return MagnitudeStep(site, self.epsilon)
        if isinstance(k, ProductKernel) and not k.scalar and len(site.edges) > 1 and all(
                e >= 0 for e in site.edges[:2]):
            return MagnitudeProductStep(site, self.epsilon)
        if isinstance(k, (ProductKernel, NegKernel)):
            return _bind_product(self, site, detect=False)
        raise _wrong_family(self, site, site.spec.family)
