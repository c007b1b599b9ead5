"""The sum rule for additions, reductions and average pooling: every operand gets relevance in proportion to its
signed contribution (``R_i = c_i / z · R``), ε-stabilized where asked."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..core.messages import gmsg, safe_div
from ..core.step import Site, Step
from ..ops.reduce import SumKernel
from .base import Rule, Stabilizer, _child_meta, _fit, _stab

if TYPE_CHECKING:  # pragma: no cover
    pass

Tensor = torch.Tensor


class SumStep(Step):
    """The z-rule on a linear map with unit coefficients: ``R_i = c_i / z · R`` (signed), ε-stabilized.

    In gradient form with ε = 0 this is the map's transpose applied to ``G``, with no value needed.
    """

    __slots__ = ("kernel", "stabilizer", "meta", "conservative", "eps0", "sink_kind")
    handles_r = True

    def __init__(self, site: Site, stabilizer: Stabilizer):
        super().__init__(site)
        self.kernel: SumKernel = site.spec.kernel
        self.stabilizer = stabilizer
        self.meta = _child_meta(site)
        self.eps0 = (not callable(stabilizer)) and float(stabilizer) == 0.0
        self.conservative = self.eps0
        self.sink_kind = "stabilizer"
        if not self.eps0:
            site.planner.need_support(self.out_slots[0])

    def _transpose(self, run, s: Tensor) -> list[Tensor | None]:
        node = run.graph.nodes[self.index]
        coefs = self.kernel.coefficients(node) if self.kernel.coefficients is not None else None
        if coefs is not None:
            return [None if (m is None) else _fit(s if c == 1 else c * s, m) for c, m in zip(coefs, self.meta)]
        return [_fit(t, m) for t, m in zip(self.kernel.back(node, s), self.meta)]

    def g(self, run, gs):
        s = gs[0]
        if not self.eps0:
            z = run.support(self.out_slots[0], run.graph.describe(self.index))  # read where G is non-zero
            s = s * z / _stab(self.stabilizer, z)
        return [gmsg(t) for t in self._transpose(run, s)]

    def r(self, run, rs):
        z = run.value(self.out_slots[0], run.graph.describe(self.index))
        s = safe_div(rs[0], z) if self.eps0 else rs[0] / _stab(self.stabilizer, z)
        return [gmsg(t) for t in self._transpose(run, s)]


class Sum(Rule):
    """The sum rule (z-rule without stabilizer) for additions and reductions: every operand gets relevance in
    proportion to its signed contribution, ``R_i = c_i / Σ_j c_j · R``. Exactly conservative."""

    families = frozenset({"add", "reduce", "pool"})

    def bind(self, site):
        return SumStep(site, 0.0)
