"""Element-wise non-linearities (identity rule, Zennit's ``Pass``, gradient × input) and normalisation layers with
the normaliser held constant (AttnLRP)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..core.graph import call_backward, saved
from ..core.messages import Msg, gmsg
from ..core.step import Site, Step
from ..errors import UnsupportedOperationError, ValueUnavailableError
from ..ops.elementwise import UnaryKernel
from ..ops.norm import NormKernel
from .base import Rule, _child_meta, _fit, _wrong_family
from .sums import Sum, shift_held_constant

if TYPE_CHECKING:  # pragma: no cover
    pass

Tensor = torch.Tensor


class IdentityStep(Step):
    """``R_x = R_y``; in gradient form ``G_x = G_y · y / x``."""

    __slots__ = ("kernel", "meta", "limit", "need_x_value", "f0", "conservative", "explicit_at_zero")
    handles_r = True

    def __init__(self, site: Site):
        super().__init__(site)
        self.kernel: UnaryKernel = site.spec.kernel
        self.meta = _child_meta(site)
        lim = self.kernel.limit_ratio
        self.limit = lim
        f0 = self.kernel.f0
        self.f0 = f0
        # identity is exact except where x == 0 but f(0) != 0 (that relevance cannot be passed to x)
        self.conservative = (f0(None) if callable(f0) else f0) == 0
        k = self.kernel
        self.need_x_value = (k._ratio is None and (k.x_field is None or saved(site.node, k.x_field) is None)
                             and k.inverse is not None and k.y_field is not None and site.edges[0] >= 0
                             and site.type in ("TanhBackward0", "SigmoidBackward0"))
        # a non-linearity that saved neither its input nor its output (sign): the input from the Promise System
        self.need_x_value = self.need_x_value or (k.x_field is None and k.y_field is None and site.edges[0] >= 0)
        if self.need_x_value and k.y_field is not None and not site.planner.can_value(site.edges[0]):
            self.need_x_value = False  # only this node's own output holds x: its inverse (see _inverse)
        if self.need_x_value:
            site.planner.need_value(site.edges[0])
        # exp(x − max) where the sum rule holds the maximum constant (ShiftStep): where x − max == 0 the relevance
        # is handed on in explicit form instead of being lost (the shift step passes it to x whole)
        self.explicit_at_zero = site.type == "ExpBackward0" and _after_held_shift(site)
        if self.explicit_at_zero:
            self.conservative = True

    def _xy(self, run, node) -> tuple[Tensor | None, Tensor | None, bool]:
        """``x``, ``y``, and whether ``x`` is the inverse of the saved ``y`` (``inf`` where that is not exact)."""
        k = self.kernel
        x = saved(node, k.x_field) if k.x_field else None
        y = saved(node, k.y_field) if k.y_field else None
        if x is None and y is None:
            x = run.value(self.in_edges[0], run.graph.describe(self.index))
        if y is None and x is not None:
            y = k.f(node, x)
        inverted = False
        if x is None:
            if self.need_x_value:
                try:
                    x = run.value(self.in_edges[0], run.graph.describe(self.index))
                except ValueUnavailableError:  # fall back to the inverse map
                    x, inverted = _inverse(k, node, y), True
            elif k.inverse is not None:
                x, inverted = _inverse(k, node, y), True
        return x, y, inverted

    def ratio(self, run, node) -> Tensor:
        return self._ratio(run, node)[0]

    def _ratio(self, run, node) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``y / x`` (the limit where ``x == 0``) and, where ``x`` is the inverse of the saved output, the mask of the
        positions where that inverse is not exact (a saturated ``tanh``/``sigmoid``: the ratio is 0 there) and ``y``."""
        k = self.kernel
        if k._ratio is not None and k.x_field is not None:  # a closed form of y / x from the saved input alone
            x = saved(node, k.x_field)
            if x is not None:
                return k._ratio(node, x, None), None, None
        if k._ratio is None or k.x_field is not None or k.y_field is None:
            x, y, inverted = self._xy(run, node)
        else:
            x, y, inverted = None, saved(node, k.y_field), False
        if k._ratio is not None:
            if x is None and k.x_field is not None:
                x = saved(node, k.x_field)
            return k._ratio(node, x, y), None, None
        lim = self.limit(node) if callable(self.limit) else self.limit
        zero = x == 0
        r = y / torch.where(zero, 1, x)
        lim_t = lim.to(dtype=r.dtype, device=r.device) if isinstance(lim, torch.Tensor) else \
            torch.full((), float(lim), dtype=r.dtype, device=r.device)  # a fill, not a copy from the host
        r = torch.where(zero, lim_t, r)
        r = torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)
        if inverted:  # where the inverse is not exact: x unknown, nothing passes (no host sync to ask if any)
            return r, ~torch.isfinite(x) & torch.isfinite(y), y
        return r, None, None

    def g(self, run, gs):
        node = run.graph.nodes[self.index]
        if self.kernel.identity_is_gradient:
            (gx,) = call_backward(node, gs)[:1]
            return [Msg(g=_fit(gx, self.meta[0]))]
        if self.explicit_at_zero:
            x, y, _ = self._xy(run, node)
            zero = x == 0
            g = gs[0]
            r = torch.where(zero, g * y, torch.zeros((), dtype=g.dtype, device=g.device))
            gx = torch.where(zero, torch.zeros((), dtype=g.dtype, device=g.device), g * self.ratio(run, node))
            return [Msg(g=_fit(gx, self.meta[0]), r=_fit(r, self.meta[0]))]  # the shift step takes both forms
        ratio, lost, y = self._ratio(run, node)
        if lost is not None and run.ledger is not None:
            # where x is unknown (the saved output saturated, e.g. tanh = ±1 exactly, and x is in no other place of
            # the graph), gradient form cannot carry R_x = G_y·y: that relevance stops here, and the ledger says so
            kept = torch.where(lost, gs[0] * y, torch.zeros((), dtype=gs[0].dtype, device=gs[0].device))
            run.book_local("rule", self.index, kept.sum(), "a saturated activation whose input is not in the graph: "
                           "the relevance at the saturated positions cannot be passed on")
        return [Msg(g=_fit(gs[0] * ratio, self.meta[0]))]

    def r(self, run, rs):
        return [Msg(r=_fit(rs[0], self.meta[0]))]


def _inverse(k: UnaryKernel, node: Any, y: Tensor) -> Tensor:
    """``x`` from a saved output by the kernel's inverse, ``+inf`` where the output is saturated (``exp`` underflowed
    to 0, ``tanh`` at ±1) or so close to it that the inverse is not exact (one ulp of ``y`` moves ``x`` visibly:
    :func:`~dynamiclrp.ops.elementwise.well_conditioned`): there the ratio ``y / x`` is 0, as nothing passes in
    gradient form. The inverse is taken at a harmless point there, so that differentiating the relevance
    (``create_graph=True``) meets no ``log(0)``."""
    with torch.no_grad():
        bad = ~torch.isfinite(k.inverse(node, y)) if k.from_output is None else ~k.from_output(node, y)[1]
    safe = torch.where(bad, k.f(node, torch.ones((), dtype=y.dtype, device=y.device)), y)
    return torch.where(bad, torch.full((), float("inf"), dtype=y.dtype, device=y.device), k.inverse(node, safe))


def _after_held_shift(site: Site) -> bool:
    """Whether the input of this node is ``x − max`` whose maximum the rule set's sum rule holds constant."""
    e = site.edges[0] if site.edges else -1
    if e < 0:
        return False
    p = site.graph.slot_node[e]
    if site.planner.specs[p] is None:
        return False
    psite = site.planner.site(p)
    return isinstance(site.planner.rules.rule_for(psite), Sum) and shift_held_constant(psite)


def _refuse_complex(site: Site) -> None:
    """A non-linearity of a complex tensor (``abs``, ``angle``...) is a function of two real inputs, ``Re`` and
    ``Im``: the identity rule (one input) has no meaning there, and no other rule is derived for it."""
    metas = [site.graph.meta(e) for e in site.edges if e >= 0]
    if any(m[1].is_complex for m in metas):
        raise UnsupportedOperationError(
            f"{site.describe()} applies a non-linear function to a complex tensor; its relevance rule is not defined "
            "(a complex value is two real inputs). Linear complex paths (FFTs, .real, products with constants) are "
            "supported: write the non-linearity on the real view, e.g. torch.view_as_real(z).pow(2).sum(-1).sqrt() "
            "for |z|, and each op gets its rule.")


class Identity(Rule):
    """Identity rule for element-wise non-linearities (AttnLRP; Zennit's ``Pass``): ``R_x = R_y``."""

    families = frozenset({"activation"})

    def bind(self, site):
        if not isinstance(site.spec.kernel, UnaryKernel):
            raise _wrong_family(self, site, site.spec.family)
        _refuse_complex(site)
        return IdentityStep(site)


class PassStep(Step):
    """``R_x = R_y`` for a shape-preserving op that is not element-wise (a normalisation layer): the relevance
    itself is handed through, in explicit form (gradient-form input is converted with the output's value)."""

    __slots__ = ("meta",)
    handles_r = True
    conservative = True

    def __init__(self, site: Site):
        super().__init__(site)
        self.meta = _child_meta(site)
        site.planner.need_support(self.out_slots[0])

    def g(self, run, gs):
        # R = G·y needs y only where G is non-zero: the output's value on its support
        y = run.support(self.out_slots[0], run.graph.describe(self.index))
        return [Msg(r=_fit(gs[0] * y, self.meta[0]))] + [None] * (self.n_in - 1)

    def r(self, run, rs):
        return [Msg(r=_fit(rs[0], self.meta[0]))] + [None] * (self.n_in - 1)


class Pass(Identity):
    """Zennit's ``Pass`` rule: the output relevance is handed to the input unchanged, ``R_x = R_y``.

    On element-wise non-linearities it is the :class:`Identity` rule (Achtibat et al. 2024); on normalisation
    layers (Zennit gives ``BatchNorm`` the ``Pass`` rule when it is not merged into the layer before it) the
    whole layer, affine part and bias included, passes relevance through. Conservative.
    """

    families = frozenset({"activation", "norm"})

    def bind(self, site):
        if isinstance(site.spec.kernel, NormKernel):
            return PassStep(site)
        return super().bind(site)


class GradientStep(Step):
    """Relevance as gradient × input through this node: ``G_x = Jᵀ G`` (the node's own backward)."""

    __slots__ = ("meta",)

    def __init__(self, site):
        super().__init__(site)
        self.meta = _child_meta(site)

    def g(self, run, gs):
        node = run.graph.nodes[self.index]
        return [gmsg(_fit(t, m)) for t, m in zip(call_backward(node, gs), self.meta)]

    conservative = False


class Gradient(Rule):
    """Treat the node like plain gradient × input (``G_x = Jᵀ G``). Not conservative in general; for piecewise
    linear homogeneous ops (ReLU, LeakyReLU, max) it equals the identity rule."""

    families = frozenset({"activation", "any", "norm", "softmax", "product", "matmul", "routing"})

    def bind(self, site):
        return GradientStep(site)


class NormStep(Step):
    """LayerNorm / BatchNorm / GroupNorm with the normaliser held constant (AttnLRP, Achtibat et al. 2024).

    The remaining map ``y = (x - μ) · rstd · γ + β`` is linear in ``x``; the z-rule on it gives
    ``G_x = rstd · (γG − mean(γG))`` (no centring for batch norm in eval mode, whose mean is a constant) and
    books ``β`` (minus the scaled running mean) as a bias sink.
    """

    __slots__ = ("kernel", "meta")

    def __init__(self, site):
        super().__init__(site)
        self.kernel: NormKernel = site.spec.kernel
        self.meta = _child_meta(site)
        if len(site.edges) > 2 and site.edges[2] >= 0:
            site.planner.mark_bias(site.edges[2])

    def g(self, run, gs):
        node = run.graph.nodes[self.index]
        gx = self.kernel.grad_const(node, gs[0])
        res: list[Msg | None] = [Msg(g=_fit(gx, self.meta[0]))] + [None] * (self.n_in - 1)
        # the bias (input 2) is a sink: route its share (G summed to its shape) so a requested bias sees it
        if self.n_in > 2 and self.in_edges[2] >= 0 and self.meta[2] is not None:
            res[2] = Msg(g=_fit(_per_channel(gs[0], self.kernel, node), self.meta[2]))
        return res

    conservative = False
    sink_kind = "bias"  # batch norm's running-mean shift, or a bias that does not require grad


def _per_channel(g: Tensor, kernel: NormKernel, node: Any) -> Tensor:
    if kernel.kind == "layer":
        return g
    dims = (0,) + tuple(range(2, g.dim()))
    return g.sum(dim=dims)


class NormConstant(Rule):
    """Normalisation layers with the normaliser (mean / variance / rms statistics) treated as a constant."""

    families = frozenset({"norm"})

    def bind(self, site):
        if not isinstance(site.spec.kernel, NormKernel):
            raise _wrong_family(self, site, site.spec.family)
        return NormStep(site)
