"""Routing rules: selection, permutation, copy and broadcast ops move relevance exactly like gradient (the node's
own backward, in both message forms); leaves end every path; ``Block`` stops relevance."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..core.graph import call_backward, output_meta, saved
from ..core.messages import gmsg, rmsg
from ..core.step import Site, Step
from .base import Rule, _child_meta, _fit

if TYPE_CHECKING:  # pragma: no cover
    from ..core.run import Run

Tensor = torch.Tensor


#: routing ops whose output has positions that come from no input (a fill value autograd does not keep): the
#: relevance arriving there is the fill value's share, booked under this ledger kind
_FILLS = {"ConstantPadNdBackward0": "padding", "MaskedFillBackward0": "constant"}


class RoutingStep(Step):
    """Selection, permutation, copy and broadcast ops: relevance moves exactly like gradient, in both forms.

    A constant padding (or ``masked_fill`` with a scalar) also has output positions that hold a fill value, not a
    copy of the input: relevance arriving there stays with the fill value, and the ledger books it (``"padding"``,
    ``"constant"``)."""

    __slots__ = ("meta", "dropped", "fill", "implicit_constant")
    handles_r = True

    def __init__(self, site: Site):
        super().__init__(site)
        self.meta = _child_meta(site)
        # inputs the kernel says receive nothing (the weight of an embedding bag with per-index weights)
        dropped = getattr(site.spec.kernel, "dropped", None)
        self.dropped = frozenset(dropped(site.edges, site.active)) if dropped is not None else frozenset()
        self.fill = _FILLS.get(site.type)
        self.implicit_constant = self.fill is not None  # the fill value: a constant operand without an edge

    @property
    def constant_kind(self) -> str:  # type: ignore[override]
        return self.fill or "constant"

    def _route(self, run: "Run", parts: list[Tensor | None]) -> list[Tensor | None]:
        node = run.graph.nodes[self.index]
        try:
            grads = call_backward(node, parts)
        except (RuntimeError, TypeError):
            if all(p is not None for p in parts):
                raise
            metas = output_meta(node)
            filled = [p if p is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device)
                      for p, m in zip(parts, metas)]
            grads = call_backward(node, filled)
        return [None if k in self.dropped else _fit(t, m) for k, (t, m) in enumerate(zip(grads, self.meta))]

    def g(self, run, gs):
        return [gmsg(t) for t in self._route(run, gs)]

    def r(self, run, rs):
        return [rmsg(t) for t in self._route(run, rs)]

    def constant_share_zero(self, run, outs):
        t = run.graph.types[self.index]
        if t == "CatBackward0":
            return self._constant_parts_empty(run, outs)
        if t in ("WhereBackward0", "MaskedFillBackward0", "MaskedFillBackward1", "MaskedScatterBackward0"):
            return self._fill_share_zero(run, outs)
        if t == "CopyBackwards":
            return True  # dst.copy_(src): dst is overwritten, its value carries nothing
        return False

    def _fill_share_zero(self, run, outs) -> bool:
        """``where(c, a, const)`` / ``masked_fill(mask, v)``: the constant positions carry no relevance."""
        node = run.graph.nodes[self.index]
        m = outs[0]
        if m is None:
            return True
        if run.graph.types[self.index] == "WhereBackward0":
            cond = saved(node, "condition")
            keep = []
            if self.in_edges[0] < 0:
                keep.append(cond)
            if len(self.in_edges) > 1 and self.in_edges[1] < 0:
                keep.append(~cond)
            if not keep:
                return True
        elif run.graph.types[self.index] == "MaskedScatterBackward0":
            mask = saved(node, "mask")
            # the constant operand's positions: self where the mask is off, the source where it is on
            keep = ([~mask] if self.in_edges[0] < 0 else []) + (
                [mask] if len(self.in_edges) > 1 and self.in_edges[1] < 0 else [])
            if not keep:
                return True
        else:
            mask = saved(node, "mask")
            if mask is None:
                return False
            keep = [mask]
        for part in (m.g, m.r):
            if part is None:
                continue
            for sel in keep:
                if bool((part * sel.to(part.dtype)).any()):
                    return False
        return True

    def _constant_parts_empty(self, run, outs) -> bool:
        """A ``cat`` whose constant inputs carry no relevance (e.g. an empty key/value cache)."""
        node = run.graph.nodes[self.index]
        m = outs[0]
        if m is None:
            return True
        dim = saved(node, "dim")
        out_shape = output_meta(node)[0].shape
        dim = dim + len(out_shape) if dim < 0 else dim
        known = [None if meta is None else meta[0][dim] for meta in self.meta]
        if sum(1 for k in known if k is None) != 1:
            return False
        pos = known.index(None)
        size = out_shape[dim] - sum(k for k in known if k is not None)
        if size == 0:
            return True
        offset = sum(k for k in known[:pos])
        for part in (m.g, m.r):
            if part is not None and bool(part.narrow(dim, offset, size).any()):
                return False
        return True


class Routing(Rule):
    """Route relevance like the gradient: for ops whose forward only selects, permutes, copies or broadcasts
    (view, permute, slice, index, gather, cat, split, expand, max-pool's winner-take-all...). Conservative."""

    families = frozenset({"routing", "embedding", "any"})

    def bind(self, site):
        if getattr(site.spec.kernel, "gradient_only", False) or not site.spec.selection:
            return LinearMapStep(site)
        return RoutingStep(site)


class LinearMapStep(RoutingStep):
    """A routing op that is a linear map with fixed coefficients but not a selection (``scatter_add``,
    ``index_add``, ``fold``, an embedding bag, dropout's scaling, complex-valued FFT paths): the node's backward on
    the gradient-form message ``G`` is the z-rule, but explicit relevance must not be pushed through it (summed
    copies would each receive the whole of it, scaled copies a scaled share), so it is first divided by the output's
    value (:meth:`Step.__call__`)."""

    __slots__ = ()
    handles_r = False


class LeafStep(Step):
    __slots__ = ("slot",)
    handles_r = True

    def __init__(self, site):
        super().__init__(site)
        self.slot = self.out_slots[0]

    def g(self, run, gs):
        return []

    def r(self, run, rs):
        return []

    def book(self, run, t_out, t_ins, outs):
        # measured directly at the leaf (its value is always known), whatever arrived upstream
        if self.slot in run.planner.requested:
            return t_ins
        total = run.total(self.slot, outs[0])
        if total is not None:
            if self.slot in run.planner.bias_slots:
                run.ledger.book("bias", run.planner.leaf_label(self.index), total, "a bias parameter")
            else:
                run.ledger.book("leaf", run.planner.leaf_label(self.index), total,
                                "relevance reaching a leaf that was not requested")
        return t_ins


class Leaf(Rule):
    """``AccumulateGrad``: the end of every path. Unrequested leaves are ledger sinks."""

    families = frozenset({"leaf"})

    def bind(self, site):
        return LeafStep(site)


class Block(Rule):
    """Send no relevance through the node at all (everything arriving here is booked as a rule sink)."""

    families = frozenset({"any", "routing", "activation", "norm", "softmax", "product", "matmul", "attention",
                          "add", "reduce", "pool", "linear", "conv", "embedding"})

    def bind(self, site):
        return BlockStep(site)


class BlockStep(Step):
    handles_r = True

    def g(self, run, gs):
        return [None] * self.n_in

    def r(self, run, rs):
        return [None] * self.n_in

    conservative = False
