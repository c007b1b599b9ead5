"""The sum rule for additions, reductions and average pooling: every operand gets relevance in proportion to its
signed contribution (``R_i = c_i / z · R``), ε-stabilized where asked."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..core.messages import gmsg, safe_div
from ..core.step import Site, Step
from ..ops.reduce import SumKernel
from .base import Rule, Stabilizer, _child_meta, _fit, _message, _stab
from .structure import Structure, structure_of

if TYPE_CHECKING:  # pragma: no cover
    pass

Tensor = torch.Tensor


class SumStep(Step):
    """The z-rule on a linear map with unit coefficients: ``R_i = c_i / z · R`` (signed), ε-stabilized.

    In gradient form with ε = 0 this is the map's transpose applied to ``G``, with no value needed.
    """

    __slots__ = ("kernel", "stabilizer", "meta", "conservative", "eps0", "sink_kind", "implicit_constant")
    handles_r = True

    def __init__(self, site: Site, stabilizer: Stabilizer):
        super().__init__(site)
        self.kernel: SumKernel = site.spec.kernel
        self.stabilizer = stabilizer
        self.meta = _child_meta(site)
        self.eps0 = (not callable(stabilizer)) and float(stabilizer) == 0.0
        self.conservative = self.eps0
        self.sink_kind = "stabilizer"
        # ``x + c``, ``x - c``, ``c - x`` with a Python scalar c autograd did not keep (AddBackward1, SubBackward1,
        # RsubBackward1): the sum rule gives c its share c·G, which the ledger books as a constant's
        self.implicit_constant = self.kernel.forward is None and self.kernel.coefficients is not None
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
        r = rs[0]
        z = run.value_under(self.out_slots[0], r, run.graph.describe(self.index))
        if self.eps0:
            s = safe_div(r, z)
            if run.ledger is not None:  # R_i = c_i / z · R is undefined on a zero sum: that relevance stops here
                lost = torch.where(z == 0, r, torch.zeros((), dtype=r.dtype, device=r.device)).sum()
                run.book_local("conversion", self.index, lost, "explicit relevance on a sum whose value is 0")
        else:
            s = r / _stab(self.stabilizer, z)
        return [gmsg(t) for t in self._transpose(run, s)]


class ShiftStep(Step):
    """``z = x − m`` where ``m`` is a maximum subtracted before an ``exp`` (the exp-normalisation trick): ``m`` is
    held constant and ``R_x = R_z``.

    The shift only keeps ``exp`` in range: ``exp(x − m) = e^{−m}·exp(x)`` and the normalised result (softmax, a
    WKV ratio) does not depend on ``m``. Held constant, as AttnLRP holds normalisers constant, ``x`` takes all the
    relevance — also where ``x − m`` is exactly 0 (``x`` is the maximum), which the signed sum rule cannot divide
    by; the ``exp`` there hands its relevance on in explicit form (:class:`~dynamiclrp.rules.elementwise.IdentityStep`).
    """

    __slots__ = ("meta",)
    handles_r = True

    def __init__(self, site: Site):
        super().__init__(site)
        self.meta = _child_meta(site)
        site.planner.need_support(site.edges[0])
        site.planner.need_support(self.out_slots[0])

    def _send(self, run, R: Tensor) -> list:
        # x on the support of the relevance (= z + max where autograd kept neither, e.g. a frozen bias was added)
        x = run.support(self.in_edges[0], run.graph.describe(self.index))
        return [_message(R, x.to(R.dtype), self.meta[0])] + [None] * (self.n_in - 1)

    def g(self, run, gs):
        z = run.support(self.out_slots[0], run.graph.describe(self.index))
        return self._send(run, gs[0] * z)

    def r(self, run, rs):
        return self._send(run, rs[0])

    def constant_share_zero(self, run, outs):
        return True


def _structure(site: Site) -> Structure:
    return structure_of(site.planner)


def shift_held_constant(site: Site) -> bool:
    """Whether the sum rule holds the maximum of ``x − max`` constant at this node (see :class:`ShiftStep`): the
    structure matches and the values the step reads can be had."""
    p = site.planner
    return (_structure(site).stabilising_shift(site.index) and p.can_support(site.edges[0])
            and p.can_support(site.graph.slot_base[site.index]))


class Sum(Rule):
    """The sum rule (z-rule without stabilizer) for additions and reductions: every operand gets relevance in
    proportion to its signed contribution, ``R_i = c_i / Σ_j c_j · R``. Exactly conservative.

    A maximum subtracted before an exponential (``exp(x − max)``: softmax written out, WKV kernels, GAT's edge
    softmax) is a numerical stabiliser: it is held constant and ``x`` takes the relevance (:class:`ShiftStep`).
    """

    families = frozenset({"add", "reduce", "pool"})

    def bind(self, site):
        if shift_held_constant(site):
            return ShiftStep(site)
        return SumStep(site, 0.0)
