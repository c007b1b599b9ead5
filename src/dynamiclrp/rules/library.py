"""The rule catalogue.

Every rule is an immutable object whose :meth:`~dynamiclrp.rules.base.Rule.bind` compiles it for one node into a
:class:`~dynamiclrp.rules.base.Step`. Rules are written against the kernel interfaces of
:mod:`dynamiclrp.rules.kernels`, so one rule serves every op of its family (``Epsilon`` serves ``addmm``,
``mm``, ``bmm``, ``conv1d/2d/3d`` and transposed convolutions alike).

Linear rules follow Zennit's algebra (Anders et al. 2021): a rule is a list of *branches*; each branch sums
*terms* ``f(x_k, w_k) + b_k`` built with input and parameter modifiers, divides the incoming relevance by the
stabilised branch output (optionally only where the unmodified output is positive or negative), and sends the
quotient back through each term's Jacobian transpose, multiplied by the modified input. ε, γ, z⁺, α-β, z^B,
w² and flat are all instances.

Notation: ``R`` relevance, ``G`` its gradient form (``R = value * G``), ``z`` an op's output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .. import graph as G
from ..errors import RuleError, ValueUnavailableError
from ..promises import available
from .base import Msg, Rule, Site, Step, finite_sum as _finite_sum, gmsg, rmsg, safe_div, stabilize
from .kernels import (ConvKernel, LinearKernel, NegKernel, NormKernel, ProductKernel, SoftmaxKernel, SumKernel,
                      UnaryKernel)

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Run

Tensor = torch.Tensor
Stabiliser = float | Callable[[Tensor], Tensor]

__all__ = [
    "Epsilon", "Zero", "Gamma", "ZPlus", "AlphaBeta", "ZBox", "WSquare", "Flat", "Pass", "Norm",
    "Identity", "Gradient", "Uniform", "Product", "NormConstant", "Softmax", "AttnLRP", "CPLRP", "Routing",
    "Block", "Sum", "MagnitudeSplit",
]


def _stab(stabiliser: Stabiliser, z: Tensor) -> Tensor:
    if callable(stabiliser):
        return stabiliser(z)
    return stabilize(z, float(stabiliser))


def _zero(t: Tensor) -> Tensor:
    return torch.zeros((), dtype=t.dtype, device=t.device)


def _wrong_family(rule: Rule, site: Site, family: str) -> RuleError:
    return RuleError(f"{type(rule).__name__} does not apply to {site.describe()} (family '{family}'); it "
                     f"applies to: {', '.join(sorted(rule.families))}")


def _child_meta(site: Site) -> list[tuple[torch.Size, torch.dtype] | None]:
    g = site.graph
    return [None if e < 0 else g.meta(e) for e in site.edges]


def _fit(t: Tensor | None, meta: tuple[torch.Size, torch.dtype] | None) -> Tensor | None:
    if t is None or meta is None:
        return None
    return G.fit_to(t, meta[0], meta[1])


# ===========================================================================================================
# Routing: the node's own backward
# ===========================================================================================================
class RoutingStep(Step):
    """Selection, permutation, copy and broadcast ops: relevance moves exactly like gradient, in both forms."""

    __slots__ = ("meta",)
    handles_r = True

    def __init__(self, site: Site):
        super().__init__(site)
        self.meta = _child_meta(site)

    def _route(self, run: "Run", parts: list[Tensor | None]) -> list[Tensor | None]:
        node = run.graph.nodes[self.index]
        try:
            grads = G.call_backward(node, parts)
        except (RuntimeError, TypeError):
            if all(p is not None for p in parts):
                raise
            metas = G.output_meta(node)
            filled = [p if p is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device)
                      for p, m in zip(parts, metas)]
            grads = G.call_backward(node, filled)
        return [_fit(t, m) for t, m in zip(grads, self.meta)]

    def g(self, run, gs):
        return [gmsg(t) for t in self._route(run, gs)]

    def r(self, run, rs):
        return [rmsg(t) for t in self._route(run, rs)]

    def constant_share_zero(self, run, outs):
        t = run.graph.types[self.index]
        if t == "CatBackward0":
            return self._constant_parts_empty(run, outs)
        if t in ("WhereBackward0", "MaskedFillBackward0", "MaskedFillBackward1"):
            return self._fill_share_zero(run, outs)
        return False

    def _fill_share_zero(self, run, outs) -> bool:
        """``where(c, a, const)`` / ``masked_fill(mask, v)``: the constant positions carry no relevance."""
        node = run.graph.nodes[self.index]
        m = outs[0]
        if m is None:
            return True
        if run.graph.types[self.index] == "WhereBackward0":
            cond = G.saved(node, "condition")
            keep = []
            if self.in_edges[0] < 0:
                keep.append(cond)
            if len(self.in_edges) > 1 and self.in_edges[1] < 0:
                keep.append(~cond)
            if not keep:
                return True
        else:
            mask = G.saved(node, "mask")
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
        dim = G.saved(node, "dim")
        out_shape = G.output_meta(node)[0].shape
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
        return RoutingStep(site)


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
                run.ledger.book("bias", run.ledger.leaf_name(run, self.index), total, "a bias parameter")
            else:
                run.ledger.book("leaf", run.ledger.leaf_name(run, self.index), total,
                                "relevance reaching a leaf that was not requested")
        return t_ins


class Leaf(Rule):
    """``AccumulateGrad``: the end of every path. Unrequested leaves are ledger sinks."""

    families = frozenset({"leaf"})

    def bind(self, site):
        return LeafStep(site)


# ===========================================================================================================
# Linear rules (ε, γ, z+, α-β, z^B, w², flat) for linear / conv / matmul-with-weight ops
# ===========================================================================================================
XMod = str | Callable[[Tensor], Tensor]  # "id" | "pos" | "neg" (homogeneous) or a callable / "ones"


@dataclass(frozen=True)
class Term:
    """``coef * (f(x_mod(x), w_mod(w)) + b_mod(b))``.

    ``x`` is ``"id"``, ``"pos"`` (x⁺), ``"neg"`` (x⁻), ``"ones"`` or a callable ``x -> tensor``; homogeneous
    modifiers (id/pos/neg) keep the result in gradient form.
    """

    x: Any = "id"
    w: Callable[[Tensor], Tensor] | None = None
    b: Callable[[Tensor], Tensor] | None = None  # None: bias dropped from this term
    coef: float = 1.0


@dataclass(frozen=True)
class Branch:
    terms: tuple[Term, ...]
    coef: float = 1.0
    where: str | None = None  # "pos" / "neg": only outputs whose unmodified z is > 0 / < 0


def _identity(t: Tensor) -> Tensor:
    return t


def _pos(t: Tensor) -> Tensor:
    return t.clamp(min=0)


def _neg(t: Tensor) -> Tensor:
    return t.clamp(max=0)


def _apply_x(mod: Any, x: Tensor) -> Tensor:
    if mod == "id":
        return x
    if mod == "pos":
        return x.clamp(min=0)
    if mod == "neg":
        return x.clamp(max=0)
    if mod == "ones":
        return torch.ones_like(x)
    return mod(x)


def _x_mask(mod: Any, x: Tensor) -> Tensor | None:
    """For homogeneous modifiers m(x) = x * mask: the mask (None for identity)."""
    if mod == "id":
        return None
    if mod == "pos":
        return (x > 0).to(x.dtype)
    if mod == "neg":
        return (x < 0).to(x.dtype)
    raise AssertionError(mod)  # pragma: no cover


class LinearStep(Step):
    """A linear rule compiled for one ``z = alpha * f(a, b) + beta * bias`` node."""

    __slots__ = ("kernel", "which", "x_pos", "w_pos", "bias_pos", "branches", "stabiliser", "zero_bias",
                 "x_field", "w_field", "x_meta", "b_meta", "kind", "needs_z", "conservative",
                 "sink_kind", "bn", "fast_eps", "z_source", "bias_wanted", "params", "bias_kind", "z_plan",
                 "lean_ledger", "x_ok")
    handles_r = True

    def __init__(self, site: Site, branches: Sequence[Branch], stabiliser: Stabiliser, zero_bias: bool,
                 kind: str, params: dict | None = None):
        super().__init__(site)
        self.params = dict(params or {})
        k: LinearKernel = site.spec.kernel
        self.kernel = k
        act = [site.active[p] if p < len(site.active) else False for p in k.operands]
        # the activation operand; with none or two active (matmul family handled elsewhere) take the first
        self.which = 1 if (act[1] and not act[0]) else 0
        self.x_pos = k.operands[self.which]
        self.w_pos = k.operands[1 - self.which]
        self.x_field = k.saved_fields[self.which]
        self.w_field = k.saved_fields[1 - self.which]
        self.bias_pos = k.bias_pos if (k.bias_pos is not None and k.bias_pos < len(site.edges)) else None
        self.branches = tuple(branches)
        self.stabiliser = stabiliser
        self.zero_bias = zero_bias
        self.kind = kind
        self.conservative = False
        self.sink_kind = "stabiliser" if kind == "epsilon" else "rule"
        metas = _child_meta(site)
        self.x_meta = metas[self.x_pos]
        self.b_meta = metas[self.bias_pos] if self.bias_pos is not None else None
        single = len(self.branches) == 1 and len(self.branches[0].terms) == 1
        eps0 = (not callable(stabiliser)) and float(stabiliser) == 0.0
        # LRP-0 in gradient form needs no z at all
        self.needs_z = not (single and eps0 and kind == "epsilon")
        planner = site.planner
        node = site.node
        # an eval-mode batch norm right after this op is merged into it (Zennit's SequentialMergeBatchNorm)
        self.bn = _MergedBN.plan(site, self) if self.which == 0 else None
        self.bias_kind = self._bias_kind(site)
        # the fast ε path (gradient-form messages): s = G·|z|/(|z| + ε), z read where autograd kept it
        self.fast_eps = (kind == "epsilon" and single and not callable(stabiliser) and float(stabiliser) > 0
                         and not zero_bias)
        out = self.out_slots[0] if self.bn is None else self.bn.out_slot
        self.z_source = _cheap_output_source(site, out)
        self.bias_wanted = (self.bias_pos is not None and site.edges[self.bias_pos] >= 0
                            and (planner.everywhere or site.edges[self.bias_pos] in planner.requested))
        if self.bias_kind == "edge":
            planner.mark_bias(site.edges[self.bias_pos])
        # plan the values the expected path reads: the lean path (gradient form) for LRP-0 and ε, the full
        # algebra (which needs the input) otherwise. With a ledger the lean path also books the stabiliser and
        # bias shares it can measure; what it cannot (a frozen bias of an op whose input is lost) travels on
        # inside the input's derived total (Step.book)
        lean = not self.needs_z or self.fast_eps
        self.lean_ledger = lean and planner.everywhere
        x_edge, w_edge = site.edges[self.x_pos], site.edges[self.w_pos]
        x_ok = G.saved(node, self.x_field) is not None or (x_edge >= 0 and planner.can_value(x_edge))
        self.x_ok = x_ok
        known_bias = self.bn.known if self.bn is not None else self.bias_kind != "lost"
        self.z_plan = None
        if lean and self.needs_z and self.z_source is None:
            if x_ok and known_bias:
                self.z_plan = "compute"
            elif planner.can_value(out):
                self.z_plan = "value"
            elif planner.can_support(out):
                self.z_plan = "support"
            else:
                raise self._lost(site, out, "z = x·W + b (the ε rule's denominator)")
        elif not lean:
            if not x_ok:
                raise self._lost(site, x_edge, "the layer's input (the rule's terms, or the ledger's measure)")
            if not known_bias and not (planner.can_value(out) or planner.can_support(out)):
                raise self._lost(site, out, "the bias, or the layer's output to derive it from")
        if G.saved(node, self.w_field) is None and w_edge >= 0:
            planner.need_value(w_edge)
        if ((not lean or self.z_plan == "compute" or (self.lean_ledger and x_ok))
                and G.saved(node, self.x_field) is None and x_edge >= 0):
            planner.need_value(x_edge)
        if self.lean_ledger and known_bias and self.bias_kind != "edge":
            self._request_bias(planner, site)  # the bias share, booked by the ledger
        if self.z_plan == "compute" or (not lean and known_bias):
            self._request_bias(planner, site)
        elif self.z_plan == "value" or (not lean and planner.can_value(out)):
            planner.need_value(out)
        elif self.z_plan == "support" or not lean:
            planner.need_support(out)

    def _bias_kind(self, site: Site) -> str:
        """``"none"`` (no additive term), ``"edge"`` (a bias that requires grad), ``"const"`` (a frozen bias the
        Promise System can read: saved, or through ``model=``) or ``"lost"`` (to be derived from the output)."""
        if self.bias_pos is None:
            return "none"
        e = site.edges[self.bias_pos]
        if e >= 0:
            return "edge"
        recipe = site.planner.resolver.const(site.index, self.bias_pos)
        if not available(recipe):
            return "lost"
        return "none" if recipe.source[0] == "absent" else "const"

    def _request_bias(self, planner, site: Site) -> None:
        if self.bn is not None:
            self.bn.request(planner)
        elif self.bias_kind == "edge":
            planner.need_value(site.edges[self.bias_pos])
        elif self.bias_kind == "const":
            planner.need_const(site.index, self.bias_pos)

    def _lost(self, site: Site, slot: int, what: str) -> ValueUnavailableError:
        planner = site.planner
        if slot >= 0:
            recipe = planner.resolver.support(slot)
            reason = getattr(recipe, "reason", "")
        else:
            reason = "an input that does not require grad and is not saved"
        bias = ""
        if self.bias_kind == "lost":
            lost = planner.resolver.const(site.index, self.bias_pos)
            bias = f"; {lost.reason}"
        elif self.bn is not None and not self.bn.known:
            bias = f"; {self.bn.reason}"
        model_hint = (" Pass model= (relevance(..., model=model) or explain(..., model=model)) so that frozen "
                      "biases are read from the modules that own the saved weights." if (
                          planner.resolver.params is None and "pass model=" in bias) else "")
        bias = bias.replace("; pass model= to read it from the module that owns the layer's weight", "")
        return ValueUnavailableError(
            f"{site.describe()} ({_rule_name(self)}) needs {what}, which the graph does not hold: {reason}{bias}."
            f"{model_hint} LRP-0 (rules='zero') needs no such value when no ledger is requested.")

    # -- operand access -------------------------------------------------------------------------------------
    def _operands(self, run: "Run", node: Any, need_x: bool = True) -> tuple[Tensor | None, Tensor]:
        x = G.saved(node, self.x_field)
        if x is None and need_x:
            x = run.value(self.in_edges[self.x_pos], run.graph.describe(self.index))
        w = G.saved(node, self.w_field)
        if w is None:
            w = run.value(self.in_edges[self.w_pos], run.graph.describe(self.index))
        return x, w

    def _bias(self, run: "Run", node: Any, z: Tensor, gradient_form_only: bool = False) -> Tensor | None:
        """The additive term of ``z = alpha·f(x, W)`` (already scaled by ``beta`` and broadcast against it), or
        ``None``. A frozen bias autograd did not keep is read through ``model=`` or derived from the op's output
        (its value, or, for gradient-form messages, its value on the support)."""
        kind = self.bias_kind
        if kind == "none":
            return None
        where = run.graph.describe(self.index)
        if kind == "edge":
            b = run.value(self.in_edges[self.bias_pos], where)
        elif kind == "const":
            b = run.const(self.index, self.bias_pos, where)
        else:
            return self._output(run, self.out_slots[0], gradient_form_only) - z
        return self.kernel.beta(node) * self.kernel.bias_view(node, b.to(z.dtype), z.shape)

    def _output(self, run: "Run", slot: int, gradient_form_only: bool) -> Tensor:
        """The op's output (or the merged batch norm's): its full value, or its value on the support."""
        where = run.graph.describe(self.index)
        if run.planner.can_value(slot) or not gradient_form_only:
            return run.value(slot, where)
        return run.support(slot, where)

    def _fast(self, run, node, m, x, w, w_orig, alpha, res, has_bias_edge):
        """LRP-0 and ε on gradient-form messages, lean on memory: ``s = G`` (LRP-0) or ``s = G / (1 + ε/|z|)``
        (ε, the same as ``G·z/(z + ε·sign z)``) in one buffer, with z read where autograd kept it. The incoming
        message is released as soon as ``s`` exists, and a large convolution is processed in batch chunks so
        its backward's workspace stays small (plain backward frees the graph as it goes; we cannot)."""
        g = m.g
        m.g = None  # the engine holds no other reference: freeing it early lowers the pass's peak
        z_full = None
        if self.needs_z:
            z_full = self._z_from_source(run)
            if z_full is None and self.z_plan in ("value", "support"):
                out = self.out_slots[0] if self.bn is None else self.bn.out_slot
                z_full = self._output(run, out, gradient_form_only=True)
            elif z_full is None:
                z = alpha * self._f(node, x, w)
                bias = (self._bias(run, node, z, gradient_form_only=True) if self.bn is None
                        else self.bn.bias(run, self, node, x, z, w_orig, gradient_form_only=True))
                z_full = z if bias is None else z.add_(bias)
        eps = float(self.stabiliser) if self.needs_z else 0.0
        chunks = _batch_chunks(self.kernel, g, x) if run.ledger is None else None
        if chunks is None:
            s = _eps_quotient(g, z_full, eps)
            if run.ledger is not None:
                self._book_lean(run, node, x, w, w_orig, alpha, g, s, z_full, has_bias_edge)
            del g, z_full
            gx = alpha * self._ft(node, x, w, s) if alpha != 1 else self._ft(node, x, w, s)
            res[self.x_pos] = Msg(g=_fit(gx, self.x_meta))
            if has_bias_edge and self.bias_wanted:
                res[self.bias_pos] = Msg(g=self._to_bias(node, self.kernel.beta(node) * s))
            return res
        gx = torch.empty(x.shape, dtype=g.dtype, device=g.device)
        bias_acc = None
        for sl in chunks:
            s = _eps_quotient(g[sl], None if z_full is None else z_full[sl], eps)
            part = self._ft(node, x[sl], w, s)
            gx[sl] = part if alpha == 1 else alpha * part
            if has_bias_edge and self.bias_wanted:
                b = self._to_bias(node, s)
                bias_acc = b if bias_acc is None else bias_acc + b
            del s, part
        del g, z_full
        res[self.x_pos] = Msg(g=_fit(gx, self.x_meta))
        if bias_acc is not None:
            res[self.bias_pos] = Msg(g=self.kernel.beta(node) * bias_acc)
        return res

    def _book_lean(self, run, node, x, w, w_orig, alpha, g, s, z, has_bias_edge) -> None:
        """Ledger of the lean path: the ε stabiliser's share ``Σ (G − s)·z`` and the share of a bias that is not
        an edge of the graph, ``Σ s·b`` (a frozen bias, or the merged bias of a batch norm), where it can be
        computed. What remains is exactly what the input received (``Step.book``, conservatively)."""
        if z is not None and self.needs_z:
            run.book_local("stabiliser", self.index, _finite_sum((g - s) * z), "the ε stabiliser")
        if has_bias_edge:
            return  # the bias leaf measures its own share
        ref = z if z is not None else g  # z's shape and dtype
        b = None
        try:
            if self.bn is not None:
                kind, note = "bias", "the merged bias (b - mean)·γ/σ + β of an op and the batch norm after it"
                if self.bn.known and (x is not None or self.bn.l_bias != "value"):
                    b = self.bn.bias(run, self, node, x, ref, w_orig, gradient_form_only=True)
                elif not self.bn.known and x is not None:
                    b = self.bn.bias(run, self, node, x, alpha * self._f(node, x, w), w_orig, gradient_form_only=True)
            elif self.bias_kind in ("const", "lost"):
                kind, note = "constant", "a bias that does not require grad"
                if self.bias_kind == "const":
                    b = self._bias(run, node, ref, gradient_form_only=True)
                elif x is not None:
                    b = self._bias(run, node, alpha * self._f(node, x, w), gradient_form_only=True)
        except ValueUnavailableError:
            b = None  # not measurable here: it travels on inside the input's derived total
        if b is not None:
            run.book_local(kind, self.index, _finite_sum(s * b), note)

    def book(self, run, t_out, t_ins, outs):
        m = outs[0] if outs else None
        if self.lean_ledger and m is not None and m.r is None:
            return self._book(run, t_out, t_ins, outs, conservative=True)
        return self._book(run, t_out, t_ins, outs, self.conservative)

    def _fast_nonnegative(self, run, node, m, x, w, w_orig, alpha, res, has_bias_edge):
        """γ, z⁺ and α-β when the input is non-negative (after a ReLU): the x⁻ terms vanish and, by linearity,
        ``f(x, W⁻) = f(x, W) − f(x, W⁺)`` and ``Jᵀ_{W⁻} = Jᵀ_W − Jᵀ_{W⁺}``, so one extra forward op
        (``f(x, W⁺)``) and two transposed ops replace Zennit's four of each. Same numbers as the general path.
        """
        g = m.g
        m.g = None
        eps = float(self.stabiliser)
        z_full = self._z_from_source(run)
        # the bias (broadcast against z); only a bias autograd did not keep needs z = f(x, W) to be derived
        derive = self._derives_bias()
        z0 = alpha * self._f(node, x, w) if (z_full is None or derive) else None
        ref = z0 if z0 is not None else z_full
        if self.bn is not None:
            b = self.bn.bias(run, self, node, x, ref, w_orig, gradient_form_only=True)
        else:
            b = self._bias(run, node, ref, gradient_form_only=True)
        if z_full is None:
            z_full = z0 if b is None else z0 + b
        del z0, ref
        bz = None if self.zero_bias else b                # the bias as the rule sees it
        wp = w.clamp(min=0)
        want_bias = has_bias_edge and self.bias_wanted and bz is not None
        chunks = _batch_chunks(self.kernel, g, x) or [slice(None)]
        whole = len(chunks) == 1
        gx = None if whole else torch.empty(x.shape, dtype=g.dtype, device=g.device)
        bias_r = None
        for sl in chunks:
            def cut(t):
                if t is None or whole or t.dim() == 0 or t.shape[0] != x.shape[0]:
                    return t
                return t[sl]
            g_c, r_b = self._nonnegative_core(node, alpha, cut(x), w, wp, cut(b), cut(bz), cut(z_full), cut(g), eps)
            if whole:
                gx = g_c
            else:
                gx[sl] = g_c
            if want_bias and r_b is not None:
                part = self._to_bias(node, r_b)
                bias_r = part if bias_r is None else bias_r + part
            del g_c, r_b
        del g, z_full
        res[self.x_pos] = Msg(g=_fit(gx, self.x_meta))
        if bias_r is not None:
            res[self.bias_pos] = Msg(r=bias_r)
        return res

    def _nonnegative_core(self, node, alpha, x, w, wp, b, bz, z_full, g, eps):
        """One (chunk of a) batch of :meth:`_fast_nonnegative`: the input's gradient-form relevance and the
        bias's share (z-shaped, or ``None``)."""
        zn = z_full if b is None else z_full - b        # f(x, W): the op without its bias

        def stab(d):
            return stabilize(d, eps)

        def plus(t, extra):
            return t if extra is None else t + extra

        R = g * z_full
        kind = self.kind
        if kind == "zplus":
            den = plus(alpha * self._f(node, x, wp), None if bz is None else bz.clamp(min=0))
            s_x = R / stab(den)
            del R, den
            gx = alpha * self._ft(node, x, wp, s_x)
            bias_r = None if bz is None else s_x * bz.clamp(min=0)
        elif kind == "alphabeta":
            a, be = self.params["alpha"], self.params["beta"]
            P = alpha * self._f(node, x, wp)
            den_p = plus(P, None if bz is None else bz.clamp(min=0))
            den_n = plus(zn - P, None if bz is None else bz.clamp(max=0))
            sp = (a * R) / stab(den_p)
            sn = (-be * R) / stab(den_n)
            del R, den_p, den_n, P
            gx = alpha * (self._ft(node, x, wp, sp - sn) + self._ft(node, x, w, sn))
            bias_r = None if bz is None else sp * bz.clamp(min=0) + sn * bz.clamp(max=0)
        else:  # gamma: where z > 0 terms x(W + γW⁺) + b + γb⁺, where z < 0 terms x(W + γW⁻) + b + γb⁻
            gam = self.params["gamma"]
            P = alpha * self._f(node, x, wp)
            den_p = plus(zn + gam * P, None if bz is None else bz + gam * bz.clamp(min=0))
            den_n = plus((1.0 + gam) * zn - gam * P, None if bz is None else bz + gam * bz.clamp(max=0))
            del P
            sp = R * (z_full > 0).to(R.dtype) / stab(den_p)
            sn = R * (z_full < 0).to(R.dtype) / stab(den_n)
            del R, den_p, den_n
            gx = alpha * (self._ft(node, x, w, sp + (1.0 + gam) * sn) + gam * self._ft(node, x, wp, sp - sn))
            bias_r = (None if bz is None else
                      sp * (bz + gam * bz.clamp(min=0)) + sn * (bz + gam * bz.clamp(max=0)))
        del zn
        pos_x = (x > 0).to(gx.dtype)
        return gx * _fit_mask(pos_x, gx), bias_r

    def _derives_bias(self) -> bool:
        """Whether the bias is derived from the op's output (a frozen bias neither saved nor read from a model)."""
        return (not self.bn.known) if self.bn is not None else self.bias_kind == "lost"

    def _z_from_source(self, run: "Run") -> Tensor | None:
        """The op's output (the merged batch norm's, when merged) where autograd kept it: a consumer's saved
        input, or a ReLU's saved output (exact wherever a gradient-form message can be non-zero)."""
        src = self.z_source
        if src is None:
            return None
        node_i, fld = src
        return G.saved(run.graph.nodes[node_i], fld)

    def _to_bias(self, node, t: Tensor) -> Tensor:
        shape, dtype = self.b_meta
        out = self.kernel.bias_reduce(node, t, shape)
        return out if out.dtype == dtype else out.to(dtype)

    def _f(self, node, x, w):
        return self.kernel.f(node, x, w) if self.which == 0 else self.kernel.f(node, w, x)

    def _ft(self, node, x, w, s):
        if self.which == 0:
            return self.kernel.f_t(node, 0, x, w, s)
        return self.kernel.f_t(node, 1, w, x, s)

    # -- the rule -----------------------------------------------------------------------------------------
    def __call__(self, run, outs):
        m = outs[0]
        if m is None:
            return [None] * self.n_in
        node = run.graph.nodes[self.index]
        alpha = self.kernel.alpha(node)
        lean = m.r is None and (not self.needs_z or self.fast_eps)
        x, w = self._operands(run, node, need_x=not lean or (
            self.needs_z and self.z_source is None and self.z_plan == "compute") or (
            run.ledger is not None and self.x_ok))
        res: list[Msg | None] = [None] * self.n_in
        has_bias_edge = self.bias_pos is not None and self.in_edges[self.bias_pos] >= 0
        w_orig = w
        if self.bn is not None:
            # the message at this op's output is the batch norm's output message: rule on z' = W'x + b'
            w = self.bn.weight(run, node, w)
            has_bias_edge = False
        if lean:
            return self._fast(run, node, m, x, w, w_orig, alpha, res, has_bias_edge)
        if (m.r is None and run.ledger is None and self.kind in ("gamma", "zplus", "alphabeta")
                and not callable(self.stabiliser) and not bool((x < 0).any())):
            return self._fast_nonnegative(run, node, m, x, w, w_orig, alpha, res, has_bias_edge)
        return self._general(run, node, m, x, w, w_orig, alpha, res, has_bias_edge)

    def _general(self, run, node, m, x, w, w_orig, alpha, res, has_bias_edge):
        """Every linear rule, in both message forms: Zennit's branch/term algebra (module docstring). A large
        convolution runs in batch chunks, which keeps its temporaries (and the cost of fresh pages) small."""
        ref_msg = m.g if m.g is not None else m.r
        derive = self._derives_bias()
        gform = m.r is None
        if derive:
            # a bias autograd did not keep is derived from z, which then has to exist in full
            z_all = alpha * self._f(node, x, w)
            bias = (self._bias(run, node, z_all, gradient_form_only=gform) if self.bn is None
                    else self.bn.bias(run, self, node, x, z_all, w_orig, gradient_form_only=gform))
            del z_all
        else:
            shape_ref = torch.empty((1,) * ref_msg.dim(), dtype=ref_msg.dtype, device=ref_msg.device).expand(
                ref_msg.shape)
            bias = (self._bias(run, node, shape_ref) if self.bn is None
                    else self.bn.bias(run, self, node, x, shape_ref, w_orig))
        chunks = _batch_chunks(self.kernel, ref_msg, x) or [slice(None)]
        whole = len(chunks) == 1
        gx = rx = None
        rb_parts: list[Tensor] = []
        for sl in chunks:
            xs = x if whole else x[sl]
            bs = bias if (bias is None or whole or bias.dim() == 0 or bias.shape[0] != x.shape[0]) else bias[sl]
            gs = None if m.g is None else (m.g if whole else m.g[sl])
            rs = None if m.r is None else (m.r if whole else m.r[sl])
            g_c, r_c, rb_c = self._terms(node, alpha, xs, w, bs, gs, rs)
            if whole:
                gx, rx = g_c, r_c
            else:
                if g_c is not None:
                    if gx is None:
                        gx = torch.zeros(x.shape, dtype=g_c.dtype, device=g_c.device)
                    gx[sl] = g_c
                if r_c is not None:
                    if rx is None:
                        rx = torch.zeros(x.shape, dtype=r_c.dtype, device=r_c.device)
                    rx[sl] = r_c
            if rb_c is not None:
                rb_parts.append(self._to_bias(node, rb_c) if has_bias_edge else rb_c.sum())
            del g_c, r_c, rb_c
        res[self.x_pos] = Msg(g=_fit(gx, self.x_meta), r=_fit(rx, self.x_meta))
        rb = None
        if rb_parts:
            rb = rb_parts[0]
            for part in rb_parts[1:]:
                rb = rb + part
        if has_bias_edge and rb is not None:
            # the bias's own share, as explicit relevance (a sink unless the bias is requested)
            res[self.bias_pos] = Msg(r=rb)
        if run.ledger is not None and rb is not None and self.bn is not None:
            run.book_local("bias", self.index, rb.sum(), "the merged bias (b - mean)·γ/σ + β of an op and the "
                           "batch norm after it")
        elif run.ledger is not None and rb is not None and not has_bias_edge:
            run.book_local("constant", self.index, rb.sum(), "a bias that does not require grad")
        return res

    def _terms(self, node, alpha, x, w, bias, g, r):
        """The branch/term algebra on one (chunk of a) batch: returns the gradient-form and explicit input
        relevance and the bias's share (z-shaped)."""
        z = alpha * self._f(node, x, w)
        z_full = z if bias is None else z + bias
        # relevance arriving at z
        if g is not None:
            R = g * z_full
            if r is not None:
                R = R + r
        else:
            R = r
        eps0 = (not callable(self.stabiliser)) and float(self.stabiliser) == 0.0
        use_bias = bias is not None and not self.zero_bias
        gx: Tensor | None = None
        rx: Tensor | None = None
        rb: Tensor | None = None
        for br in self.branches:
            zb = None
            for t in br.terms:
                if t.x == "id" and t.w is None:
                    zt = z  # the unmodified term is the op's own output: computed once
                else:
                    zt = alpha * self._f(node, _apply_x(t.x, x), w if t.w is None else t.w(w))
                if use_bias and t.b is not None:
                    zt = zt + t.b(bias)
                if t.coef != 1.0:
                    zt = t.coef * zt
                zb = zt if zb is None else zb + zt
            s = safe_div(R, zb) if eps0 else R / _stab(self.stabiliser, zb)
            if br.where == "pos":
                s = s * (z_full > 0).to(s.dtype)
            elif br.where == "neg":
                s = s * (z_full < 0).to(s.dtype)
            if br.coef != 1.0:
                s = br.coef * s
            for t in br.terms:
                xm = _apply_x(t.x, x)
                back = (t.coef * alpha) * self._ft(node, xm, w if t.w is None else t.w(w), s)
                if t.x in ("id", "pos", "neg"):
                    mask = _x_mask(t.x, x)
                    contrib = back if mask is None else back * _fit_mask(mask, back)
                    gx = contrib if gx is None else gx + contrib
                else:
                    contrib = xm * back
                    rx = contrib if rx is None else rx + contrib
                if use_bias and t.b is not None:
                    share = t.coef * s * t.b(bias)
                    rb = share if rb is None else rb + share
        return gx, rx, rb


#: outputs above this size (bytes) are processed in batch chunks by the lean linear path
_CHUNK_BYTES = 4 * 2 ** 20


def _batch_chunks(kernel: Any, g: Tensor, x: Tensor) -> list[slice] | None:
    """Batch slices for a convolution whose output is large, so that per-chunk temporaries stay small."""
    if not isinstance(kernel, ConvKernel) or g.dim() < 3 or g.shape[0] < 2 or x.shape[0] != g.shape[0]:
        return None
    nbytes = g.numel() * g.element_size()
    if nbytes <= _CHUNK_BYTES:
        return None
    per = max(1, int(g.shape[0] * _CHUNK_BYTES // nbytes))
    return [slice(i, min(i + per, g.shape[0])) for i in range(0, g.shape[0], per)]


def _eps_quotient(g: Tensor, z: Tensor | None, eps: float) -> Tensor:
    """``g·|z|/(|z| + ε)`` in one new buffer (``g`` itself for LRP-0): ``g / (1 + ε/|z|)``, 0 where z = 0."""
    if z is None or eps == 0:
        return g
    s = z.abs()
    s.reciprocal_().mul_(eps).add_(1.0)
    torch.div(g, s, out=s)
    return s


def _cheap_output_source(site: Site, slot: int) -> tuple[int, str] | None:
    """``(node, saved field)`` holding the value of ``slot`` at no cost: a consumer that saved it as an input,
    or its only consumer being a ReLU (whose saved output equals it wherever the ReLU sends relevance back)."""
    from ..promises import Saved

    g = site.graph
    recipe = site.planner.resolver.recipe(slot)
    if isinstance(recipe, Saved):
        return recipe.node, recipe.field
    cons = g.consumers[slot]
    if len(cons) == 1 and g.types[cons[0][0]] == "ReluBackward0":
        return cons[0][0], "result"
    return None


def _rule_name(step: "LinearStep") -> str:
    names = {"epsilon": "LRP-ε" if step.needs_z else "LRP-0", "gamma": "LRP-γ", "zplus": "LRP-z⁺",
             "alphabeta": "LRP-αβ", "zbox": "LRP-z^B", "wsquare": "LRP-w²", "flat": "LRP-flat"}
    return names.get(step.kind, step.kind)


class _MergedBN:
    """An eval-mode batch norm merged into the linear/conv op before it, for that op's rule.

    ``W' = W·s`` and ``b' = (b − μ)·s + β`` per output channel with ``s = γ / sqrt(running_var + eps)``, exactly the
    parameters Zennit's ``SequentialMergeBatchNorm`` canonizer writes into the model (Anders et al. 2021), so that
    ``W'x + b'`` is the batch norm's output. Which batch norms merge is decided by
    :func:`dynamiclrp.rules.structure.batchnorm_merges`; the batch norm's own step
    (:class:`MergedBatchNormStep`) hands its output message to this op unchanged.
    """

    __slots__ = ("bn", "l_bias", "beta_kind", "known", "reason", "out_slot", "op_out", "op", "bias_pos",
                 "transposed")

    @staticmethod
    def plan(site: Site, step: "LinearStep") -> "_MergedBN | None":
        fn = getattr(site.planner.rules, "batchnorm_merges", None)
        if fn is None:
            return None
        bn = fn(site.planner).bn_of.get(site.index)
        return None if bn is None else _MergedBN(site, step, bn)

    def __init__(self, site: Site, step: "LinearStep", bn: int):
        g = site.graph
        resolver = site.planner.resolver
        self.bn = bn
        self.op = site.index
        self.out_slot = g.slot_base[bn]
        self.op_out = step.out_slots[0]
        self.bias_pos = step.bias_pos
        self.transposed = G.node_type(site.node) == "ConvolutionBackward0" and bool(G.saved(site.node, "transposed"))
        bn_edges = g.edges[bn]
        self.reason = ""
        # β: a parameter that requires grad, a constant (absent, or read through model=), or lost
        if len(bn_edges) > 2 and bn_edges[2] >= 0:
            self.beta_kind = "edge"
        else:
            recipe = resolver.const(bn, 2)
            if available(recipe):
                self.beta_kind = "none" if recipe.source[0] == "absent" else "const"
            else:
                self.beta_kind = "lost"
                self.reason = recipe.reason
        # the op's own bias b: an edge, a readable constant, none, or b = z_op − f(x, W) with z_op the batch
        # norm's saved input (exact, element-wise)
        if step.bias_pos is None:
            self.l_bias = None
        elif site.edges[step.bias_pos] >= 0:
            self.l_bias = "edge"
        else:
            recipe = resolver.const(site.index, step.bias_pos)
            if available(recipe):
                self.l_bias = None if recipe.source[0] == "absent" else "const"
            else:
                self.l_bias = "value"
        # with β lost the whole merged bias is derived from the batch norm's output
        self.known = self.beta_kind != "lost"

    def request(self, planner) -> None:
        """Declare the values :meth:`bias` reads when ``β`` is known."""
        if self.beta_kind == "edge":
            planner.need_value(planner.graph.edges[self.bn][2])
        elif self.beta_kind == "const":
            planner.need_const(self.bn, 2)
        if self.l_bias == "edge":
            planner.need_value(planner.graph.edges[self.op][self.bias_pos])
        elif self.l_bias == "const":
            planner.need_const(self.op, self.bias_pos)
        elif self.l_bias == "value":
            planner.need_value(self.op_out)  # the batch norm saved it as its input

    def _scale(self, run: "Run") -> Tensor:
        node = run.graph.nodes[self.bn]
        s = 1.0 / torch.sqrt(G.saved(node, "running_var") + G.saved(node, "eps"))
        gamma = G.saved(node, "weight")
        return s if gamma is None else gamma * s

    def weight(self, run: "Run", node: Any, w: Tensor) -> Tensor:
        """``W'``: the op's weight (in the layout the kernel's ``f`` takes) scaled per output channel."""
        s = self._scale(run).to(w.dtype)
        if G.node_type(node) != "ConvolutionBackward0":
            return w * s  # dense: (in, out), the output channel is the last dimension
        if not self.transposed:
            return w * s.reshape((-1,) + (1,) * (w.dim() - 1))
        groups = int(G.saved(node, "groups"))
        cin, cout_g = w.shape[0], w.shape[1]
        ws = w.reshape((groups, cin // groups, cout_g) + tuple(w.shape[2:]))
        ss = s.reshape((groups, 1, cout_g) + (1,) * (w.dim() - 2))
        return (ws * ss).reshape(w.shape)

    def bias(self, run: "Run", step: "LinearStep", node: Any, x: Tensor, z: Tensor, w: Tensor,
             gradient_form_only: bool = False) -> Tensor | None:
        """``b'`` broadcast against ``z = alpha·f(x, W')`` (per channel, or element-wise when read from values)."""
        where = run.graph.describe(step.index)
        if not self.known:
            return step._output(run, self.out_slot, gradient_form_only) - z
        bn_node = run.graph.nodes[self.bn]
        s = self._scale(run).to(z.dtype)
        mu = G.saved(bn_node, "running_mean").to(z.dtype)
        kernel = step.kernel
        if self.l_bias == "value":
            # element-wise: b = z_op − alpha·f(x, W) with z_op the op's output (the batch norm's saved input)
            b_el = run.value(self.op_out, where) - kernel.alpha(node) * step._f(node, x, w)
            out = (b_el - kernel.bias_view(node, mu, z.shape)) * kernel.bias_view(node, s, z.shape)
        else:
            b = -mu
            if self.l_bias == "edge":
                b = kernel.beta(node) * run.value(step.in_edges[self.bias_pos], where).to(z.dtype) - mu
            elif self.l_bias == "const":
                b = kernel.beta(node) * run.const(self.op, self.bias_pos, where).to(z.dtype) - mu
            out = kernel.bias_view(node, b * s, z.shape)
        beta = None
        if self.beta_kind == "edge":
            beta = run.value(run.graph.edges[self.bn][2], where)
        elif self.beta_kind == "const":
            beta = run.const(self.bn, 2, where)
        if beta is not None:
            out = out + kernel.bias_view(node, beta.to(z.dtype), z.shape)
        return out


class MergedBatchNormStep(Step):
    """A batch norm merged into the op before it: its output message is handed to that op unchanged.

    The message keeps its meaning (``R = value_of_this_output · G``): the op's linear rule reads it as the
    relevance of the merged map ``W'x + b'``, whose value is this batch norm's output. Nothing is sent to the
    batch norm's parameters; the op's rule books the merged bias.
    """

    __slots__ = ()
    handles_r = True
    conservative = True

    def g(self, run, gs):
        return [gmsg(gs[0])] + [None] * (self.n_in - 1)

    def r(self, run, rs):
        return [rmsg(rs[0])] + [None] * (self.n_in - 1)

    def input_totals(self, run, ins):
        return [None] * len(ins)

    def book(self, run, t_out, t_ins, outs):
        return [t_out] + [None] * (len(t_ins) - 1)


class MergedBatchNorm(Rule):
    """Rule the rule set gives an eval-mode batch norm that is merged into the linear/conv op before it (see
    :class:`dynamiclrp.rules.structure.BatchNormMerges`). Not meant to be chosen by hand."""

    families = frozenset({"norm"})

    def bind(self, site):
        return MergedBatchNormStep(site)


def _fit_mask(mask: Tensor, like: Tensor) -> Tensor:
    return mask if mask.shape == like.shape else mask.expand_as(like)


class _LinearRule(Rule):
    families = frozenset({"linear", "conv"})
    kind = "generic"

    def __init__(self, stabiliser: Stabiliser = 1e-6, zero_params: Sequence[str] = ()):
        _check_stabiliser(stabiliser)
        zp = tuple(zero_params)
        bad = [p for p in zp if p != "bias"]
        if bad:
            raise RuleError(f"zero_params may only contain 'bias' (op-level rules see no other parameter), got {bad}")
        self.stabiliser = stabiliser
        self.zero_params = zp

    def branches(self) -> tuple[Branch, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def bind(self, site):
        fam = site.spec.family_of(site) if site.spec.family_of else site.spec.family
        if fam in ("linear", "conv") or (fam == "matmul" and self.kind == "epsilon"):
            if fam == "matmul":
                return BilinearStep(site, share=0.5, stabiliser=self.stabiliser)
            return LinearStep(site, self.branches(), self.stabiliser, "bias" in self.zero_params, self.kind,
                              params={k: getattr(self, k) for k in ("gamma", "alpha", "beta") if hasattr(self, k)})
        if fam in ("add", "reduce", "pool") and self.kind == "epsilon":
            return SumStep(site, self.stabiliser)
        raise _wrong_family(self, site, fam)


def _check_stabiliser(stabiliser: Any) -> None:
    if callable(stabiliser):
        return
    try:
        v = float(stabiliser)
    except (TypeError, ValueError):
        raise RuleError(f"a stabiliser must be a float >= 0 or a callable z -> stabilised z, got {stabiliser!r}") from None
    if v < 0 or v != v:
        raise RuleError(f"a stabiliser must be >= 0, got {v}")


class Epsilon(_LinearRule):
    """LRP-ε (Bach et al. 2015): ``R_i = Σ_j x_i w_ij / (z_j + ε·sign z_j) · R_j`` with the bias as a sink.

    ``epsilon=0`` is LRP-0 (0/0 := 0). ``epsilon`` may be a callable ``z -> stabilised z``. On sum-like ops
    (add, sum, mean, average pooling) it is the stabilised sum rule (Zennit's ``Norm``); on a product of two
    activations (``matmul`` family) it is the bilinear ε rule giving each operand half.

    Parameters
    ----------
    epsilon : float or callable
    zero_params : sequence of str
        ``("bias",)`` drops the bias from the rule (Zennit's ``zero_params``).
    """

    families = frozenset({"linear", "conv", "matmul", "add", "reduce", "pool"})
    kind = "epsilon"

    def __init__(self, epsilon: Stabiliser = 1e-6, zero_params: Sequence[str] = ()):
        super().__init__(epsilon, zero_params)

    @property
    def epsilon(self) -> Stabiliser:
        return self.stabiliser

    def branches(self):
        return (Branch((Term("id", None, _identity),)),)


def Zero(zero_params: Sequence[str] = ()) -> Epsilon:
    """LRP-0: :class:`Epsilon` with ε = 0 (exact zeros give zero relevance, never NaN)."""
    return Epsilon(0.0, zero_params)


class Gamma(_LinearRule):
    """Generalised LRP-γ (Montavon et al. 2019; Andéol et al. 2021), sign-aware as in Zennit.

    Where ``z > 0``: terms ``x⁺(W + γW⁺) + (b + γb⁺)`` and ``x⁻(W + γW⁻)``; where ``z < 0``: ``x⁺(W + γW⁻) +
    (b + γb⁻)`` and ``x⁻(W + γW⁺)``; each set normalised by its own stabilised sum.
    """

    kind = "gamma"

    def __init__(self, gamma: float = 0.25, stabilizer: Stabiliser = 1e-6, zero_params: Sequence[str] = ()):
        if not isinstance(gamma, (int, float)) or gamma < 0:
            raise RuleError(f"gamma must be a number >= 0, got {gamma!r}")
        super().__init__(stabilizer, zero_params)
        self.gamma = float(gamma)

    def branches(self):
        g = self.gamma

        def wp(w):
            return w + g * w.clamp(min=0)

        def wn(w):
            return w + g * w.clamp(max=0)
        return (
            Branch((Term("pos", wp, wp), Term("neg", wn, None)), where="pos"),
            Branch((Term("pos", wn, wn), Term("neg", wp, None)), where="neg"),
        )


class ZPlus(_LinearRule):
    """LRP-z⁺ (Montavon et al. 2017) with negative inputs allowed: terms ``x⁺W⁺ + b⁺`` and ``x⁻W⁻``."""

    kind = "zplus"

    def __init__(self, stabilizer: Stabiliser = 1e-6, zero_params: Sequence[str] = ()):
        super().__init__(stabilizer, zero_params)

    def branches(self):
        return (Branch((Term("pos", _pos, _pos), Term("neg", _neg, None))),)


class AlphaBeta(_LinearRule):
    """LRP-αβ (Bach et al. 2015): ``α`` times the positive-contribution rule minus ``β`` times the negative one.

    Requires ``α − β = 1`` and ``α, β ≥ 0``.
    """

    kind = "alphabeta"

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: Stabiliser = 1e-6,
                 zero_params: Sequence[str] = ()):
        if alpha < 0 or beta < 0:
            raise RuleError(f"alpha and beta must both be >= 0, got alpha={alpha}, beta={beta}")
        if alpha - beta != 1:
            raise RuleError(f"alpha - beta must equal 1 (conservation), got alpha={alpha}, beta={beta}")
        super().__init__(stabilizer, zero_params)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def branches(self):
        return (
            Branch((Term("pos", _pos, _pos), Term("neg", _neg, None)), coef=self.alpha),
            Branch((Term("pos", _neg, _neg), Term("neg", _pos, None)), coef=-self.beta),
        )


class ZBox(_LinearRule):
    """LRP-z^B (Montavon et al. 2017) for inputs bounded by ``low`` and ``high`` (scalars or tensors that
    broadcast against the input without its batch dimension, e.g. per-channel ``(1, 3, 1, 1)``)."""

    kind = "zbox"

    def __init__(self, low: float | Tensor, high: float | Tensor, stabilizer: Stabiliser = 1e-6,
                 zero_params: Sequence[str] = ()):
        super().__init__(stabilizer, zero_params)
        for name, v in (("low", low), ("high", high)):
            if not isinstance(v, (int, float, torch.Tensor)) or isinstance(v, bool):
                raise RuleError(f"ZBox {name} must be a number or a tensor (scalar, per-channel (1, C, 1, 1) or "
                                f"per-pixel (1, C, H, W)), got {type(v).__name__}")
        try:
            ok = bool(torch.all(torch.as_tensor(low, dtype=torch.float64) <= torch.as_tensor(high,
                                                                                            dtype=torch.float64)))
        except RuntimeError as err:
            raise RuleError(f"ZBox bounds low {tuple(torch.as_tensor(low).shape)} and high "
                            f"{tuple(torch.as_tensor(high).shape)} do not broadcast against each other") from err
        if not ok:
            raise RuleError("ZBox needs low <= high everywhere (the input's lowest and highest possible values, "
                            "e.g. the normalised values of pixel 0 and 1); got low > high somewhere")
        self.low = low
        self.high = high

    def branches(self):
        low, high = self.low, self.high

        def lo(x):
            return _bound(low, x)

        def hi(x):
            return _bound(high, x)
        return (Branch((Term("id", None, _identity), Term(lo, _pos, _pos, -1.0), Term(hi, _neg, _neg, -1.0))),)

    def __eq__(self, other):
        return (type(other) is ZBox and _same(self.low, other.low) and _same(self.high, other.high)
                and self.stabiliser == other.stabiliser)

    __hash__ = Rule.__hash__


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(
            torch.equal(a.cpu(), b.cpu()))
    return a == b


def _bound(v: float | Tensor, x: Tensor) -> Tensor:
    if isinstance(v, torch.Tensor):
        v = v.to(device=x.device, dtype=x.dtype)
        while v.dim() < x.dim():
            v = v.unsqueeze(-1) if v.dim() >= 1 and v.shape[0] == 1 else v.unsqueeze(0)
        return v.expand_as(x)
    return torch.full_like(x, float(v))


class WSquare(_LinearRule):
    """LRP-w² (Montavon et al. 2017): ``R_i = Σ_j w_ij² / Σ_i w_ij² · R_j`` (bias squared too, as in Zennit)."""

    kind = "wsquare"

    def __init__(self, stabilizer: Stabiliser = 1e-6, zero_params: Sequence[str] = ()):
        super().__init__(stabilizer, zero_params)

    def branches(self):
        def sq(w):
            return w * w
        return (Branch((Term("ones", sq, sq),)),)


class Flat(_LinearRule):
    """LRP-flat (Lapuschkin et al. 2019): w² with every weight 1 and no bias: relevance spread uniformly over
    each output's receptive field."""

    kind = "flat"

    def __init__(self, stabilizer: Stabiliser = 1e-6, zero_params: Sequence[str] = ()):
        super().__init__(stabilizer, zero_params)

    def branches(self):
        return (Branch((Term("ones", torch.ones_like, None),)),)


# ===========================================================================================================
# Products of two activations (matmul family) and element-wise products
# ===========================================================================================================
class BilinearStep(Step):
    """``z = f(a, b)`` with both operands activations: each gets ``share`` of the relevance (uniform rule)."""

    __slots__ = ("kernel", "stabiliser", "pos", "fields", "meta", "give", "bias_pos", "conservative",
                 "sink_kind")
    handles_r = True

    def __init__(self, site: Site, share: float = 0.5, stabiliser: Stabiliser = 0.0,
                 give: tuple[float, float] | None = None):
        super().__init__(site)
        k: LinearKernel = site.spec.kernel
        self.kernel = k
        self.stabiliser = stabiliser
        self.pos = k.operands
        self.fields = k.saved_fields
        self.meta = _child_meta(site)
        self.give = give if give is not None else (share, share)
        self.bias_pos = k.bias_pos if (k.bias_pos is not None and k.bias_pos < len(site.edges)) else None
        eps0 = (not callable(stabiliser)) and float(stabiliser) == 0.0
        self.conservative = eps0 and sum(self.give) == 1.0
        self.sink_kind = "rule" if eps0 else "stabiliser"
        for p, f in zip(self.pos, self.fields):
            if G.saved(site.node, f) is None and site.edges[p] >= 0:
                site.planner.need_value(site.edges[p])

    def _operand(self, run, node, k):
        v = G.saved(node, self.fields[k])
        if v is None:
            v = run.value(self.in_edges[self.pos[k]], run.graph.describe(self.index))
        return v

    def __call__(self, run, outs):
        m = outs[0]
        if m is None:
            return [None] * self.n_in
        node = run.graph.nodes[self.index]
        a, b = self._operand(run, node, 0), self._operand(run, node, 1)
        alpha = self.kernel.alpha(node)
        eps0 = (not callable(self.stabiliser)) and float(self.stabiliser) == 0.0
        s = None
        if m.g is not None:
            if eps0:
                s = m.g
            else:
                z = self._z(run, node, a, b, alpha)
                s = m.g * z / _stab(self.stabiliser, z)
        if m.r is not None:
            z = self._z(run, node, a, b, alpha)
            sr = safe_div(m.r, z) if eps0 else m.r / _stab(self.stabiliser, z)
            s = sr if s is None else s + sr
        res: list[Msg | None] = [None] * self.n_in
        for k in (0, 1):
            if self.give[k] == 0 or self.in_edges[self.pos[k]] < 0:
                continue
            gk = (self.give[k] * alpha) * self.kernel.f_t(node, k, a, b, s)
            res[self.pos[k]] = Msg(g=_fit(gk, self.meta[self.pos[k]]))
        if self.bias_pos is not None and self.in_edges[self.bias_pos] >= 0:
            res[self.bias_pos] = Msg(g=_fit(self.kernel.beta(node) * s, self.meta[self.bias_pos]))
        return res

    def _z(self, run, node, a, b, alpha):
        z = alpha * self.kernel.f(node, a, b)
        if self.bias_pos is not None:
            e = self.in_edges[self.bias_pos]
            if e >= 0:
                z = z + self.kernel.beta(node) * run.value(e, run.graph.describe(self.index))
            else:
                z = run.value(self.out_slots[0], run.graph.describe(self.index))
        return z


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
        return v

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
        return [Msg(g=_fit(gs[0] * self.factor_fn(node), self.meta[0]))] + [None] * (self.n_in - 1)

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
        self.normalisers = normalisers
        self.gates = gates
        self.self_gating = self_gating

    def bind(self, site):
        return _bind_product(self, site, detect=True)


def _structure(site: Site):
    from .structure import Structure
    st = site.planner.structure_cache.get("structure")
    if st is None:
        st = Structure(site.planner)
        site.planner.structure_cache["structure"] = st
    return st


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


# ===========================================================================================================
# Sum rule (add, sub, sum, mean, average pooling, cumsum)
# ===========================================================================================================
class SumStep(Step):
    """The z-rule on a linear map with unit coefficients: ``R_i = c_i / z · R`` (signed), ε-stabilised.

    In gradient form with ε = 0 this is the map's transpose applied to ``G``, with no value needed.
    """

    __slots__ = ("kernel", "stabiliser", "meta", "conservative", "eps0", "sink_kind")
    handles_r = True

    def __init__(self, site: Site, stabiliser: Stabiliser):
        super().__init__(site)
        self.kernel: SumKernel = site.spec.kernel
        self.stabiliser = stabiliser
        self.meta = _child_meta(site)
        self.eps0 = (not callable(stabiliser)) and float(stabiliser) == 0.0
        self.conservative = self.eps0
        self.sink_kind = "stabiliser"
        if not self.eps0:
            site.planner.need_support(self.out_slots[0])

    def _transpose(self, run, s: Tensor) -> list[Tensor | None]:
        node = run.graph.nodes[self.index]
        coefs = self.kernel.coefficients(node) if self.kernel.coefficients is not None else None
        if coefs is not None:
            return [None if (m is None) else _fit(s if c == 1 else c * s, m) for c, m in zip(coefs, self.meta)]
        return [_fit(t, m) for t, m in zip(G.call_backward(node, [s]), self.meta)]

    def g(self, run, gs):
        s = gs[0]
        if not self.eps0:
            z = run.support(self.out_slots[0], run.graph.describe(self.index))  # read where G is non-zero
            s = s * z / _stab(self.stabiliser, z)
        return [gmsg(t) for t in self._transpose(run, s)]

    def r(self, run, rs):
        z = run.value(self.out_slots[0], run.graph.describe(self.index))
        s = safe_div(rs[0], z) if self.eps0 else rs[0] / _stab(self.stabiliser, z)
        return [gmsg(t) for t in self._transpose(run, s)]



class Sum(Rule):
    """The sum rule (z-rule without stabiliser) for additions and reductions: every operand gets relevance in
    proportion to its signed contribution, ``R_i = c_i / Σ_j c_j · R``. Exactly conservative."""

    families = frozenset({"add", "reduce", "pool"})

    def bind(self, site):
        return SumStep(site, 0.0)


def Norm(stabilizer: Stabiliser = 1e-6) -> Epsilon:
    """Zennit's ``Norm`` rule: the stabilised sum rule for sum-like ops (ε-rule without parameters)."""
    return Epsilon(stabilizer)


class MagnitudeStep(Step):
    """The DynamicLRP paper's magnitude split: ``R_i = |c_i| / (Σ_j |c_j| + ε) · R`` (explicit relevance)."""

    __slots__ = ("kernel", "eps", "meta")
    handles_r = True

    def __init__(self, site: Site, eps: float):
        super().__init__(site)
        self.kernel: SumKernel = site.spec.kernel
        self.eps = eps
        self.meta = _child_meta(site)
        for e in site.edges:
            if e >= 0:
                site.planner.need_value(e)
        site.planner.need_value(self.out_slots[0])

    def _split(self, run, R: Tensor) -> list[Msg | None]:
        node = run.graph.nodes[self.index]
        vals = [None if e < 0 else run.value(e, "magnitude split") for e in self.in_edges]
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
            return [None if mg is None else Msg(r=_fit(abs(c) * mg * s, m)) for c, mg, m in zip(coefs, mags, self.meta)]
        den = self.kernel.forward(node, mags, 0)
        s = R / (den + self.eps)
        back = G.call_backward(node, [s])
        # R_x = |x| * back-projected quotient, scaled back from the map's own coefficients (mean divides by N)
        ref = G.call_backward(node, [torch.ones_like(s)])
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
        _check_stabiliser(epsilon)
        self.epsilon = float(epsilon)

    def bind(self, site):
        k = site.spec.kernel
        if isinstance(k, SumKernel):
            if k.forward is None:
                return PassStep(site)  # x + scalar: all relevance to x
            return MagnitudeStep(site, self.epsilon)
        if isinstance(k, ProductKernel) and not k.scalar and len(site.edges) > 1 and all(
                e >= 0 for e in site.edges[:2]):
            return MagnitudeProductStep(site, self.epsilon)
        if isinstance(k, (ProductKernel, NegKernel)):
            return _bind_product(self, site, detect=False)
        raise _wrong_family(self, site, site.spec.family)


# ===========================================================================================================
# Element-wise non-linearities
# ===========================================================================================================
class IdentityStep(Step):
    """``R_x = R_y``; in gradient form ``G_x = G_y · y / x``."""

    __slots__ = ("kernel", "meta", "limit", "need_x_value", "f0", "conservative")
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
        self.need_x_value = (k._ratio is None and (k.x_field is None or G.saved(site.node, k.x_field) is None)
                             and k.inverse is not None and k.y_field is not None and site.edges[0] >= 0
                             and site.type in ("TanhBackward0", "SigmoidBackward0"))
        if self.need_x_value:
            site.planner.need_value(site.edges[0])

    def _xy(self, run, node) -> tuple[Tensor | None, Tensor | None]:
        k = self.kernel
        x = G.saved(node, k.x_field) if k.x_field else None
        y = G.saved(node, k.y_field) if k.y_field else None
        if x is None and y is None:
            x = run.value(self.in_edges[0], run.graph.describe(self.index))
        if y is None and x is not None:
            y = k.f(node, x)
        if x is None:
            if self.need_x_value:
                try:
                    x = run.value(self.in_edges[0], run.graph.describe(self.index))
                except Exception:  # noqa: BLE001 - fall back to the inverse map
                    x = k.inverse(node, y)
            elif k.inverse is not None:
                x = k.inverse(node, y)
        return x, y

    def ratio(self, run, node) -> Tensor:
        k = self.kernel
        x, y = self._xy(run, node) if k._ratio is None or k.x_field is not None else (None, G.saved(node, k.y_field))
        if k._ratio is not None:
            if x is None and k.x_field is not None:
                x = G.saved(node, k.x_field)
            return k._ratio(node, x, y)
        lim = self.limit(node) if callable(self.limit) else self.limit
        zero = x == 0
        r = y / torch.where(zero, 1, x)
        r = torch.where(zero, torch.as_tensor(lim, dtype=r.dtype, device=r.device), r)
        return torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)

    def g(self, run, gs):
        node = run.graph.nodes[self.index]
        if self.kernel.identity_is_gradient:
            (gx,) = G.call_backward(node, gs)[:1]
            return [Msg(g=_fit(gx, self.meta[0]))]
        return [Msg(g=_fit(gs[0] * self.ratio(run, node), self.meta[0]))]

    def r(self, run, rs):
        return [Msg(r=_fit(rs[0], self.meta[0]))]



class Identity(Rule):
    """Identity rule for element-wise non-linearities (AttnLRP; Zennit's ``Pass``): ``R_x = R_y``."""

    families = frozenset({"activation"})

    def bind(self, site):
        if not isinstance(site.spec.kernel, UnaryKernel):
            raise _wrong_family(self, site, site.spec.family)
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
        return [gmsg(_fit(t, m)) for t, m in zip(G.call_backward(node, gs), self.meta)]

    conservative = False


class Gradient(Rule):
    """Treat the node like plain gradient × input (``G_x = Jᵀ G``). Not conservative in general; for piecewise
    linear homogeneous ops (ReLU, LeakyReLU, max) it equals the identity rule."""

    families = frozenset({"activation", "any", "norm", "softmax", "product", "matmul", "routing"})

    def bind(self, site):
        return GradientStep(site)


# ===========================================================================================================
# Normalisation
# ===========================================================================================================
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


# ===========================================================================================================
# Softmax and attention
# ===========================================================================================================
class SoftmaxStep(Step):
    """AttnLRP softmax rule ``R_x = x ⊙ (R − s ⊙ Σ_j R_j)``: in gradient form exactly the softmax's backward."""

    __slots__ = ("meta", "dim")

    def __init__(self, site):
        super().__init__(site)
        self.meta = _child_meta(site)

    def g(self, run, gs):
        node = run.graph.nodes[self.index]
        return [gmsg(_fit(t, m)) for t, m in zip(G.call_backward(node, gs), self.meta)]

    conservative = False

    def input_totals(self, run, ins):
        """``Σ x·G_x`` with ``x = log s + c`` per row: the rule's ``G_x`` sums to zero per row, so ``c`` drops
        out and the total is measured exactly from the saved output alone."""
        m = ins[0] if ins else None
        if m is None or self.in_edges[0] < 0:
            return [None] * len(ins)
        s = G.saved(run.graph.nodes[self.index], "result")
        logs = torch.where(s > 0, torch.log(torch.where(s > 0, s, 1)), 0)
        t = None
        if m.g is not None:
            t = (logs.reshape(m.g.shape).to(m.g.dtype) * m.g).sum()
        if m.r is not None:
            t = m.r.sum() if t is None else t + m.r.sum()
        return [t] + [None] * (len(ins) - 1)


class Softmax(Rule):
    """The AttnLRP softmax rule (Achtibat et al. 2024), applied to the true (masked) logits: ``R_x = x ⊙ (R −
    s ⊙ Σ_j R_j)``. Not conservative (the per-row bias of the logits absorbs relevance)."""

    families = frozenset({"softmax"})

    def bind(self, site):
        if not isinstance(site.spec.kernel, SoftmaxKernel):
            raise _wrong_family(self, site, site.spec.family)
        if site.spec.kernel.log:
            return LogSoftmaxStep(site)
        return SoftmaxStep(site)


class LogSoftmaxStep(Step):
    """``log_softmax(x) = x − logsumexp(x)`` with the normaliser constant: all relevance to ``x``."""

    __slots__ = ("meta",)
    handles_r = False

    def __init__(self, site):
        super().__init__(site)
        self.meta = _child_meta(site)

    def g(self, run, gs):
        return [gmsg(_fit(gs[0], self.meta[0]))]

    conservative = False


class AttentionStep(Step):
    """Fused scaled-dot-product attention: the node's backward rescaled per operand.

    AttnLRP: uniform rule on ``A·V`` and ``Q·Kᵀ`` plus the softmax rule gives ``G_q = ∇_q / 4``,
    ``G_k = ∇_k / 4``, ``G_v = ∇_v / 2`` and ``G_mask = ∇_mask / 2`` (derived, not tuned). CP-LRP: the
    attention weights are constants, so ``G_v = ∇_v`` and nothing else. One backward of the fused kernel, no
    S×S matrix materialised beyond what the kernel itself uses.
    """

    __slots__ = ("factors", "meta", "conservative")

    def __init__(self, site, factors: tuple[float, ...]):
        super().__init__(site)
        self.factors = factors
        self.meta = _child_meta(site)
        # CP-LRP (values only) is exactly conservative; AttnLRP's softmax rule is not
        self.conservative = tuple(factors[:3]) == (0.0, 0.0, 1.0)

    def g(self, run, gs):
        node = run.graph.nodes[self.index]
        n_out = len(G.output_meta(node))
        grads_in = [gs[0]] + [None] * (n_out - 1)
        grads = G.call_backward(node, grads_in)
        res: list[Msg | None] = []
        for k, t in enumerate(grads[:self.n_in]):
            f = self.factors[k] if k < len(self.factors) else 0.0
            if t is None or f == 0 or self.in_edges[k] < 0:
                res.append(None)
            else:
                res.append(Msg(g=_fit(t * f, self.meta[k])))
        res += [None] * (self.n_in - len(res))
        return res

    def constant_share_zero(self, run, outs):
        return self.conservative  # CP-LRP sends nothing to a constant mask


class AttnLRP(Rule):
    """AttnLRP (Achtibat et al., ICML 2024) for fused attention nodes and softmax: uniform rule on the two
    matmuls and the softmax rule on the true logits."""

    families = frozenset({"attention", "softmax", "matmul", "product"})

    def bind(self, site):
        fam = site.spec.family_of(site) if site.spec.family_of else site.spec.family
        if fam == "attention":
            return AttentionStep(site, (0.25, 0.25, 0.5, 0.5))
        if fam == "softmax":
            return Softmax().bind(site)
        return _bind_product(self, site, detect=True)


class CPLRP(Rule):
    """CP-LRP (Ali et al., ICML 2022, "XAI for Transformers: Better Explanations through Conservative
    Propagation"): attention weights treated as constants, so attention relevance flows to the values only.
    Conservative by construction. Applies to fused attention, to products with a softmax output, and to softmax
    itself (which then receives nothing).

    Parameters
    ----------
    gate_constant : bool, optional
        Also treat the activated gate of a gated MLP (``act(gate(x)) * up(x)``: the operand produced by an
        element-wise non-linearity, when the other operand is not) as a constant, so that the product's relevance
        goes to ``up`` — what LXT's CP-LRP does (``cp_gated_mlp_forward`` detaches the gate projection; Ali et al.
        predate gated MLPs). Default ``True``. With ``False`` such products get the uniform rule (½ each), as in
        AttnLRP. Other products follow :class:`Product` (normalisers and sigmoid gates constant, self-gating
        products all to the signal).

    Examples
    --------
    >>> from dynamiclrp import presets
    >>> rules = presets.cplrp(gate_constant=False)   # CP-LRP on attention only
    """

    families = frozenset({"attention", "softmax", "matmul", "product"})

    def __init__(self, gate_constant: bool = True):
        if not isinstance(gate_constant, bool):
            raise RuleError(f"gate_constant must be True or False, got {gate_constant!r}")
        self.gate_constant = gate_constant

    def bind(self, site):
        fam = site.spec.family_of(site) if site.spec.family_of else site.spec.family
        if fam == "attention":
            return AttentionStep(site, (0.0, 0.0, 1.0, 0.0))
        if fam == "softmax":
            return Softmax().bind(site)
        return _bind_product(self, site, detect=True, softmax_constant=True)


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
