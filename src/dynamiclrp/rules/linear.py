"""The rule catalogue.

Every rule is an immutable object whose :meth:`~dynamiclrp.rules.base.Rule.bind` compiles it for one node into a
:class:`~dynamiclrp.rules.base.Step`. Rules are written against the kernel interfaces of
:mod:`dynamiclrp.ops`, so one rule serves every op of its family (``Epsilon`` serves ``addmm``,
``mm``, ``bmm``, ``conv1d/2d/3d`` and transposed convolutions alike).

Linear rules follow Zennit's algebra (Anders et al. 2021): a rule is a list of *branches*; each branch sums
*terms* ``f(x_k, w_k) + b_k`` built with input and parameter modifiers, divides the incoming relevance by the
stabilized branch output (optionally only where the unmodified output is positive or negative), and sends the
quotient back through each term's Jacobian transpose, multiplied by the modified input. ε, γ, z⁺, α-β, z^B,
w² and flat are all instances.

Notation: ``R`` relevance, ``G`` its gradient form (``R = value * G``), ``z`` an op's output.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..core.graph import saved
from ..core.ledger import settle
from ..core.messages import Msg, finite_sum as _finite_sum, safe_div, stabilize
from ..core.promises import Saved, available
from ..core.step import Site, Step
from ..errors import RuleError, ValueUnavailableError
from ..ops.linear import ConvKernel, LinearKernel
from .base import Rule, Stabilizer, _check_number, _check_stabilizer, _child_meta, _fit, _fit_mask, _stab, _wrong_family
from .batchnorm import _MergedBN
from .structure import structure_of
from .sums import SumStep

if TYPE_CHECKING:  # pragma: no cover
    from ..core.run import Run

Tensor = torch.Tensor


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

    __slots__ = ("kernel", "which", "x_pos", "w_pos", "bias_pos", "branches", "stabilizer", "zero_bias",
                 "x_field", "w_field", "x_meta", "b_meta", "kind", "needs_z", "conservative",
                 "sink_kind", "bn", "fast_eps", "z_source", "bias_wanted", "params", "bias_kind", "z_plan",
                 "lean_ledger", "x_ok", "x_nonneg", "pos_only")
    handles_r = True

    def __init__(self, site: Site, branches: Sequence[Branch], stabilizer: Stabilizer, zero_bias: bool,
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
        self.stabilizer = stabilizer
        self.zero_bias = zero_bias
        self.kind = kind
        self.conservative = False
        self.sink_kind = "stabilizer" if kind == "epsilon" else "rule"
        metas = _child_meta(site)
        self.x_meta = metas[self.x_pos]
        self.b_meta = metas[self.bias_pos] if self.bias_pos is not None else None
        single = len(self.branches) == 1 and len(self.branches[0].terms) == 1
        eps0 = (not callable(stabilizer)) and float(stabilizer) == 0.0
        # LRP-0 in gradient form needs no z at all
        self.needs_z = not (single and eps0 and kind == "epsilon")
        planner = site.planner
        node = site.node
        # an eval-mode batch norm right after this op is merged into it (Zennit's SequentialMergeBatchNorm)
        self.bn = _MergedBN.plan(site, self) if self.which == 0 else None
        self.bias_kind = self._bias_kind(site)
        # the fast ε path (gradient-form messages): s = G·|z|/(|z| + ε), z read where autograd kept it
        self.fast_eps = (kind == "epsilon" and single and not callable(stabilizer) and float(stabilizer) > 0
                         and not zero_bias)
        out = self.out_slots[0] if self.bn is None else self.bn.out_slot
        self.z_source = _cheap_output_source(site, out)
        # relevance reaches the output only where it is > 0: its one consumer is a ReLU
        cons = site.graph.consumers[out]
        self.pos_only = len(cons) == 1 and site.graph.types[cons[0][0]] == "ReluBackward0"
        # the bias's relevance is computed when someone reads it: the ledger, a requested bias, or a requested
        # tensor behind it (b = b_ih + b_hh, a bias cast or viewed on its way in)
        b_edge = site.edges[self.bias_pos] if self.bias_pos is not None else -1
        self.bias_wanted = b_edge >= 0 and (planner.everywhere or b_edge in planner.requested
                                            or planner.needed_below[site.graph.slot_node[b_edge]])
        if self.bias_kind == "edge":
            planner.mark_bias(site.edges[self.bias_pos])
        # plan the values the expected path reads: the lean path (gradient form) for LRP-0 and ε, the full
        # algebra (which needs the input) otherwise. With a ledger the lean path also books the stabilizer and
        # bias shares it can measure; what it cannot (a frozen bias of an op whose input is lost) travels on
        # inside the input's derived total (Step.book)
        lean = not self.needs_z or self.fast_eps
        self.lean_ledger = lean and planner.everywhere
        x_edge, w_edge = site.edges[self.x_pos], site.edges[self.w_pos]
        # a non-negative input (after ReLU, pooling...) takes the one-branch path of γ, z⁺, α-β: decided from the
        # graph, so the run never reads the input's values on the host
        self.x_nonneg = (kind in ("gamma", "zplus", "alphabeta") and x_edge >= 0
                         and structure_of(planner).is_nonnegative(x_edge))
        x_ok = saved(node, self.x_field) is not None or (x_edge >= 0 and planner.can_value(x_edge))
        self.x_ok = x_ok
        known_bias = self.bn.known if self.bn is not None else self.bias_kind != "lost"
        self.z_plan = None
        if lean and self.needs_z and self.z_source is None:
            resolver = planner.resolver
            if planner.can_value(out) and not resolver.avoid(resolver.recipe(out)):
                self.z_plan = "value"  # held downstream (a reshape away from a saved tensor, sum − residual...)
            elif planner.can_support(out) and not resolver.avoid(resolver.support(out)):
                self.z_plan = "support"  # e.g. the logits, from the explained entries a gather picked
            elif x_ok and known_bias:
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
        if saved(node, self.w_field) is None and w_edge >= 0:
            planner.need_value(w_edge)
        if ((not lean or self.z_plan == "compute" or (self.lean_ledger and x_ok))
                and saved(node, self.x_field) is None and x_edge >= 0):
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
        x = saved(node, self.x_field)
        if x is None and need_x:
            x = run.value(self.in_edges[self.x_pos], run.graph.describe(self.index))
        w = saved(node, self.w_field)
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
                where = run.graph.describe(self.index)
                z_full = run.value(out, where) if self.z_plan == "value" else run.support(out, where)
            elif z_full is None:
                z = alpha * self._f(node, x, w)
                bias = (self._bias(run, node, z, gradient_form_only=True) if self.bn is None
                        else self.bn.bias(run, self, node, x, z, w_orig, gradient_form_only=True))
                z_full = z if bias is None else (z + bias if run.functional else z.add_(bias))
        eps = float(self.stabilizer) if self.needs_z else 0.0
        chunks = _batch_chunks(self.kernel, g, x) if (run.ledger is None and not run.functional) else None
        if chunks is None:
            s = _eps_quotient(g, z_full, eps, run.functional)
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
        """Ledger of the lean path: the ε stabilizer's share ``Σ (G − s)·z`` and the share of a bias that is not
        an edge of the graph, ``Σ s·b`` (a frozen bias, or the merged bias of a batch norm), where it can be
        computed. What remains is exactly what the input received (``Step.book``, conservatively)."""
        if z is not None and self.needs_z:
            run.book_local("stabilizer", self.index, _finite_sum((g - s) * z), "the ε stabilizer")
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
            run.book_local(kind, self.index, _finite_sum(s * b), note, where=self._bias_label(run))

    def _bias_label(self, run: "Run") -> str | None:
        """The frozen bias's parameter name when it was read through the model (``"classifier.2.bias"``)."""
        if self.bias_kind != "const" or self.bn is not None:
            return None
        recipe = run.planner.resolver.const(self.index, self.bias_pos)
        return f"{recipe.source[1]} (frozen)" if recipe.source[0] == "param" else None

    def book(self, run, t_out, t_ins, outs):
        m = outs[0] if outs else None
        if self.lean_ledger and m is not None and m.r is None:
            return settle(self, run, t_out, t_ins, outs, conservative=True)
        return settle(self, run, t_out, t_ins, outs, self.conservative)

    def _fast_nonnegative(self, run, node, m, x, w, w_orig, alpha, res, has_bias_edge):
        """γ, z⁺ and α-β when the input is non-negative (after a ReLU): the x⁻ terms vanish and, by linearity,
        ``f(x, W⁻) = f(x, W) − f(x, W⁺)`` and ``Jᵀ_{W⁻} = Jᵀ_W − Jᵀ_{W⁺}``, so one extra forward op
        (``f(x, W⁺)``) and two transposed ops replace Zennit's four of each. Same numbers as the general path.
        """
        g = m.g
        m.g = None
        eps = float(self.stabilizer)
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
        chunks = (None if run.functional else _batch_chunks(self.kernel, g, x)) or [slice(None)]
        whole = len(chunks) == 1
        gx = None if whole else torch.empty(x.shape, dtype=g.dtype, device=g.device)
        bias_r = None
        for sl in chunks:
            def cut(t):
                if t is None or whole or t.dim() == 0 or t.shape[0] != x.shape[0]:
                    return t
                return t[sl]
            g_c, r_b = self._nonnegative_core(node, alpha, cut(x), w, wp, cut(b), cut(bz), cut(z_full), cut(g), eps,
                                              inplace=not run.functional)
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

    def _nonnegative_core(self, node, alpha, x, w, wp, b, bz, z_full, g, eps, inplace=False):
        """One (chunk of a) batch of :meth:`_fast_nonnegative`: the input's gradient-form relevance and the
        bias's share (z-shaped, or ``None``). ``inplace``: temporaries are updated in place (not when the pass
        is recorded for differentiable relevance)."""
        def scaled(t):
            return t if alpha == 1 else alpha * t

        def plus(t, extra, own=False):
            # own: t is a temporary nothing else reads, so it may be updated in place
            if extra is None:
                return t
            return t.add_(extra) if (own and inplace) else t + extra

        def positive_den(d):
            # a denominator >= 0 wherever relevance arrives: d + ε there (Zennit's sign(0) = +1), and kept >= ε
            # elsewhere (relevance 0 there, so only 0/0 must be avoided); a negative scale flips signs
            if alpha < 0:
                return stabilize(d, eps)
            return d.clamp_(min=0).add_(eps) if inplace else d.clamp(min=0) + eps

        R = g * z_full
        kind = self.kind
        gam = self.params.get("gamma", 0.0)
        if kind == "zplus" or (kind == "gamma" and self.pos_only):
            # z⁺: x·W⁺ + b⁺. γ where relevance arrives only at z > 0 (a ReLU after the op): x·(W + γW⁺) + b + γb⁺,
            # the z < 0 branch receives nothing. One forward and one transposed op with the modified weight.
            wm = wp if kind == "zplus" else w + gam * wp
            bm = None if bz is None else (bz.clamp(min=0) if kind == "zplus" else bz + gam * bz.clamp(min=0))
            den = positive_den(plus(scaled(self._f(node, x, wm)), bm, own=True))
            s_x = R.div_(den) if inplace else R / den
            del R, den
            gx = scaled(self._ft(node, x, wm, s_x))
            bias_r = None if bm is None else s_x * bm
        elif kind == "alphabeta":
            a, be = self.params["alpha"], self.params["beta"]
            zn = z_full if b is None else z_full - b        # f(x, W): the op without its bias
            P = scaled(self._f(node, x, wp))
            den_p = plus(P, None if bz is None else bz.clamp(min=0))
            den_n = plus(zn - P, None if bz is None else bz.clamp(max=0))
            sp = (a * R) / stabilize(den_p, eps)
            sn = (-be * R) / stabilize(den_n, eps)
            del R, den_p, den_n, P, zn
            gx = scaled(self._ft(node, x, wp, sp - sn) + self._ft(node, x, w, sn))
            bias_r = None if bz is None else sp * bz.clamp(min=0) + sn * bz.clamp(max=0)
        else:  # gamma: where z > 0 terms x(W + γW⁺) + b + γb⁺, where z < 0 terms x(W + γW⁻) + b + γb⁻
            zn = z_full if b is None else z_full - b
            P = scaled(self._f(node, x, wp))
            den_p = plus(zn + gam * P, None if bz is None else bz + gam * bz.clamp(min=0))
            den_n = plus((1.0 + gam) * zn - gam * P, None if bz is None else bz + gam * bz.clamp(max=0))
            del P, zn
            sp = R * (z_full > 0).to(R.dtype) / stabilize(den_p, eps)
            sn = R * (z_full < 0).to(R.dtype) / stabilize(den_n, eps)
            del R, den_p, den_n
            gx = scaled(self._ft(node, x, w, sp + (1.0 + gam) * sn) + gam * self._ft(node, x, wp, sp - sn))
            bias_r = (None if bz is None else
                      sp * (bz + gam * bz.clamp(min=0)) + sn * (bz + gam * bz.clamp(max=0)))
        # the input is >= 0: its relevance x·gx vanishes where x = 0, whatever gx holds there
        return gx, bias_r

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
        return saved(run.graph.nodes[node_i], fld)

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
        if m.r is None and run.ledger is None and self.x_nonneg and not callable(self.stabilizer):
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
        chunks = (None if run.functional else _batch_chunks(self.kernel, ref_msg, x)) or [slice(None)]
        whole = len(chunks) == 1
        z_src = None if derive else self._z_from_source(run)
        gx = rx = None
        rb_parts: list[Tensor] = []
        for sl in chunks:
            xs = x if whole else x[sl]
            bs = bias if (bias is None or whole or bias.dim() == 0 or bias.shape[0] != x.shape[0]) else bias[sl]
            gs = None if m.g is None else (m.g if whole else m.g[sl])
            rs = None if m.r is None else (m.r if whole else m.r[sl])
            zs = None if z_src is None else (z_src if whole else z_src[sl])
            g_c, r_c, rb_c = self._terms(node, alpha, xs, w, bs, gs, rs, zs)
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
            run.book_local("constant", self.index, rb.sum(), "a bias that does not require grad",
                           where=self._bias_label(run))
        return res

    def _terms(self, node, alpha, x, w, bias, g, r, z_full=None):
        """The branch/term algebra on one (chunk of a) batch: returns the gradient-form and explicit input
        relevance and the bias's share (z-shaped). ``z_full``: the op's output where autograd kept it (else it
        is computed). A branch's terms on a plain convolution are stacked along the input channels (one forward
        and one transposed call for all of them: the same sums, far fewer calls when the input has few channels)."""
        z = None
        if z_full is None:
            z = alpha * self._f(node, x, w)
            z_full = z if bias is None else z + bias
        # relevance arriving at z
        if g is not None:
            R = g * z_full
            if r is not None:
                R = R + r
        else:
            R = r
        eps0 = (not callable(self.stabilizer)) and float(self.stabilizer) == 0.0
        use_bias = bias is not None and not self.zero_bias
        dims = self.kernel.stack_dims(node, self.which)
        gx: Tensor | None = None
        rx: Tensor | None = None
        rb: Tensor | None = None
        for br in self.branches:
            xms = [_apply_x(t.x, x) for t in br.terms]
            wms = [w if t.w is None else t.w(w) for t in br.terms]
            # the unmodified term is the op's own output: reused when it was computed
            reuse = [z is not None and t.x == "id" and t.w is None for t in br.terms]
            todo = [k for k in range(len(br.terms)) if not reuse[k]]
            zb = None
            for k in range(len(br.terms)):
                if reuse[k]:
                    zt = z if br.terms[k].coef == 1.0 else br.terms[k].coef * z
                    zb = zt if zb is None else zb + zt
            if dims is not None and len(todo) > 1:
                zt = alpha * self._f(node, torch.cat([xms[k] for k in todo], dim=dims[0]),
                                     torch.cat([_times(br.terms[k].coef, wms[k]) for k in todo], dim=dims[1]))
                zb = zt if zb is None else zb + zt
            else:
                for k in todo:
                    zt = alpha * self._f(node, xms[k], wms[k])
                    if br.terms[k].coef != 1.0:
                        zt = br.terms[k].coef * zt
                    zb = zt if zb is None else zb + zt
            if use_bias:
                bsum = None
                for t in br.terms:
                    if t.b is not None:
                        bt = t.b(bias) if t.coef == 1.0 else t.coef * t.b(bias)
                        bsum = bt if bsum is None else bsum + bt
                if bsum is not None:
                    zb = zb + bsum
            s = safe_div(R, zb) if eps0 else R / _stab(self.stabilizer, zb)
            if br.where == "pos":
                s = s * (z_full > 0).to(s.dtype)
            elif br.where == "neg":
                s = s * (z_full < 0).to(s.dtype)
            if br.coef != 1.0:
                s = br.coef * s
            every = range(len(br.terms))
            if dims is not None and len(br.terms) > 1:
                c = x.shape[dims[0]]
                whole = self._ft(node, torch.cat(xms, dim=dims[0]),
                                 torch.cat([_times(t.coef, wm) for t, wm in zip(br.terms, wms)], dim=dims[1]), s)
                backs = [alpha * whole.narrow(dims[0], k * c, c) for k in every]
            else:
                backs = [(t.coef * alpha) * self._ft(node, xm, wm, s) for t, xm, wm in zip(br.terms, xms, wms)]
            for t, xm, back in zip(br.terms, xms, backs):
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


def _times(c: float, t: Tensor) -> Tensor:
    return t if c == 1.0 else (-t if c == -1.0 else c * t)


def _eps_quotient(g: Tensor, z: Tensor | None, eps: float, functional: bool = False) -> Tensor:
    """``g·|z|/(|z| + ε)`` in one new buffer (``g`` itself for LRP-0): ``g / (1 + ε/|z|)``, 0 where z = 0.
    ``functional``: out of place, as ``g·z/(z + ε·sign z)`` (differentiable everywhere, also at z = 0)."""
    if z is None or eps == 0:
        return g
    if functional:
        return g * (z / stabilize(z, eps))
    s = z.abs()
    s.reciprocal_().mul_(eps).add_(1.0)
    torch.div(g, s, out=s)
    return s


def _cheap_output_source(site: Site, slot: int) -> tuple[int, str] | None:
    """``(node, saved field)`` holding the value of ``slot`` at no cost: a consumer that saved it as an input,
    or its only consumer being a ReLU (whose saved output equals it wherever the ReLU sends relevance back)."""
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


class _LinearRule(Rule):
    families = frozenset({"linear", "conv"})
    kind = "generic"

    def __init__(self, stabilizer: Stabilizer = 1e-6, zero_params: Sequence[str] = ()):
        _check_stabilizer(stabilizer)
        if isinstance(zero_params, str):
            zero_params = (zero_params,)
        zp = tuple(zero_params)
        bad = [p for p in zp if p != "bias"]
        if bad:
            raise RuleError(f"zero_params may only contain 'bias' (op-level rules see no other parameter), got {bad}")
        self.stabilizer = stabilizer
        self.zero_params = zp

    def branches(self) -> tuple[Branch, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def bind(self, site):
        fam = site.spec.family_of(site) if site.spec.family_of else site.spec.family
        if fam in ("linear", "conv") or (fam == "matmul" and self.kind == "epsilon"):
            if fam == "matmul":
                return BilinearStep(site, share=0.5, stabilizer=self.stabilizer)
            return LinearStep(site, self.branches(), self.stabilizer, "bias" in self.zero_params, self.kind,
                              params={k: getattr(self, k) for k in ("gamma", "alpha", "beta", "low", "high")
                                      if hasattr(self, k)})
        if fam in ("add", "reduce", "pool") and self.kind == "epsilon":
            return SumStep(site, self.stabilizer)
        raise _wrong_family(self, site, fam)


class Epsilon(_LinearRule):
    """LRP-ε (Bach et al. 2015): ``R_i = Σ_j x_i w_ij / (z_j + ε·sign z_j) · R_j`` with the bias as a sink.

    ``epsilon=0`` is LRP-0 (0/0 := 0). ``epsilon`` may be a callable ``z -> stabilized z``. On sum-like ops
    (add, sum, mean, average pooling) it is the stabilized sum rule (Zennit's ``Norm``); on a product of two
    activations (``matmul`` family) it is the bilinear ε rule giving each operand half.

    Parameters
    ----------
    epsilon : float or callable
    zero_params : sequence of str
        ``("bias",)`` drops the bias from the rule (Zennit's ``zero_params``).
    """

    families = frozenset({"linear", "conv", "matmul", "add", "reduce", "pool"})
    kind = "epsilon"

    def __init__(self, epsilon: Stabilizer = 1e-6, zero_params: Sequence[str] = ()):
        super().__init__(epsilon, zero_params)

    @property
    def epsilon(self) -> Stabilizer:
        return self.stabilizer

    def branches(self):
        return (Branch((Term("id", None, _identity),)),)


class Zero(Epsilon):
    """LRP-0: :class:`Epsilon` with ε = 0 (exact zeros give zero relevance, never NaN)."""

    def __init__(self, zero_params: Sequence[str] = ()):
        super().__init__(0.0, zero_params)


class Norm(Epsilon):
    """Zennit's ``Norm`` rule: the stabilized sum rule for sum-like ops (the ε-rule without parameters)."""

    def __init__(self, stabilizer: Stabilizer = 1e-6):
        super().__init__(stabilizer)


class Gamma(_LinearRule):
    """Generalised LRP-γ (Montavon et al. 2019; Andéol et al. 2021), sign-aware as in Zennit.

    Where ``z > 0``: terms ``x⁺(W + γW⁺) + (b + γb⁺)`` and ``x⁻(W + γW⁻)``; where ``z < 0``: ``x⁺(W + γW⁻) +
    (b + γb⁻)`` and ``x⁻(W + γW⁺)``; each set normalised by its own stabilized sum.
    """

    kind = "gamma"

    def __init__(self, gamma: float = 0.25, stabilizer: Stabilizer = 1e-6, zero_params: Sequence[str] = ()):
        gamma = _check_number("gamma", gamma)
        super().__init__(stabilizer, zero_params)
        self.gamma = gamma

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

    def __init__(self, stabilizer: Stabilizer = 1e-6, zero_params: Sequence[str] = ()):
        super().__init__(stabilizer, zero_params)

    def branches(self):
        return (Branch((Term("pos", _pos, _pos), Term("neg", _neg, None))),)


class AlphaBeta(_LinearRule):
    """LRP-αβ (Bach et al. 2015): ``α`` times the positive-contribution rule minus ``β`` times the negative one.

    Requires ``α − β = 1`` (to a relative tolerance of 1e-9, so that ``AlphaBeta(2.2, 1.2)`` is accepted) and
    finite ``α, β ≥ 0``.
    """

    kind = "alphabeta"

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: Stabilizer = 1e-6,
                 zero_params: Sequence[str] = ()):
        alpha = _check_number("alpha", alpha, minimum=None)
        beta = _check_number("beta", beta, minimum=None)
        if alpha < 0 or beta < 0:
            raise RuleError(f"alpha and beta must both be >= 0, got alpha={alpha}, beta={beta}")
        if abs(alpha - beta - 1.0) > 1e-9 * max(1.0, alpha):
            raise RuleError(f"alpha - beta must equal 1 (conservation), got alpha={alpha}, beta={beta} "
                            f"(alpha - beta = {alpha - beta!r})")
        super().__init__(stabilizer, zero_params)
        self.alpha = alpha
        self.beta = beta

    def branches(self):
        return (
            Branch((Term("pos", _pos, _pos), Term("neg", _neg, None)), coef=self.alpha),
            Branch((Term("pos", _neg, _neg), Term("neg", _pos, None)), coef=-self.beta),
        )


class ZBox(_LinearRule):
    """LRP-z^B (Montavon et al. 2017) for inputs bounded by ``low`` and ``high`` (scalars or tensors that
    broadcast against the input without its batch dimension, e.g. per-channel ``(1, 3, 1, 1)``)."""

    kind = "zbox"

    def __init__(self, low: float | Tensor, high: float | Tensor, stabilizer: Stabilizer = 1e-6,
                 zero_params: Sequence[str] = ()):
        super().__init__(stabilizer, zero_params)
        for name, v in (("low", low), ("high", high)):
            if not isinstance(v, (numbers.Real, torch.Tensor)) or isinstance(v, bool):
                raise RuleError(f"ZBox {name} must be a number or a tensor (scalar, per-channel (1, C, 1, 1) or "
                                f"per-pixel (1, C, H, W)), got {type(v).__name__}")
            if isinstance(v, torch.Tensor) and (v.is_complex() or v.dtype == torch.bool):
                raise RuleError(f"ZBox {name} must be a real tensor, got dtype {v.dtype}")
            if not bool(torch.isfinite(torch.as_tensor(v, dtype=torch.float64)).all()):
                raise RuleError(f"ZBox {name} must be finite everywhere (the input's lowest/highest possible "
                                "value), got a NaN or an infinity")
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
                and self.stabilizer == other.stabilizer)

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

    def __init__(self, stabilizer: Stabilizer = 1e-6, zero_params: Sequence[str] = ()):
        super().__init__(stabilizer, zero_params)

    def branches(self):
        def sq(w):
            return w * w
        return (Branch((Term("ones", sq, sq),)),)


class Flat(_LinearRule):
    """LRP-flat (Lapuschkin et al. 2019): w² with every weight 1 and no bias: relevance spread uniformly over
    each output's receptive field."""

    kind = "flat"

    def __init__(self, stabilizer: Stabilizer = 1e-6, zero_params: Sequence[str] = ()):
        super().__init__(stabilizer, zero_params)

    def branches(self):
        return (Branch((Term("ones", torch.ones_like, None),)),)


class BilinearStep(Step):
    """``z = f(a, b)`` with both operands activations: each gets ``share`` of the relevance (uniform rule)."""

    __slots__ = ("kernel", "stabilizer", "pos", "fields", "meta", "give", "bias_pos", "conservative",
                 "sink_kind")
    handles_r = True

    def __init__(self, site: Site, share: float = 0.5, stabilizer: Stabilizer = 0.0,
                 give: tuple[float, float] | None = None):
        super().__init__(site)
        k: LinearKernel = site.spec.kernel
        self.kernel = k
        self.stabilizer = stabilizer
        self.pos = k.operands
        self.fields = k.saved_fields
        self.meta = _child_meta(site)
        self.give = give if give is not None else (share, share)
        self.bias_pos = k.bias_pos if (k.bias_pos is not None and k.bias_pos < len(site.edges)) else None
        eps0 = (not callable(stabilizer)) and float(stabilizer) == 0.0
        self.conservative = eps0 and sum(self.give) == 1.0
        self.sink_kind = "rule" if eps0 else "stabilizer"
        for p, f in zip(self.pos, self.fields):
            if saved(site.node, f) is None and site.edges[p] >= 0:
                site.planner.need_value(site.edges[p])

    def _operand(self, run, node, k):
        v = saved(node, self.fields[k])
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
        eps0 = (not callable(self.stabilizer)) and float(self.stabilizer) == 0.0
        s = None
        if m.g is not None:
            if eps0:
                s = m.g
            else:
                z = self._z(run, node, a, b, alpha)
                s = m.g * z / _stab(self.stabilizer, z)
        if m.r is not None:
            z = self._z(run, node, a, b, alpha)
            sr = safe_div(m.r, z) if eps0 else m.r / _stab(self.stabilizer, z)
            s = sr if s is None else s + sr
        res: list[Msg | None] = [None] * self.n_in
        for k in (0, 1):
            if self.give[k] == 0 or self.in_edges[self.pos[k]] < 0:
                continue
            gk = (self.give[k] * alpha) * self.kernel.f_t(node, k, a, b, s)
            res[self.pos[k]] = Msg(g=_fit(gk, self.meta[self.pos[k]]))
        if self.bias_pos is not None and self.in_edges[self.bias_pos] >= 0:
            shape = torch.Size(self.meta[self.bias_pos][0])
            gb = self.kernel.bias_reduce(node, self.kernel.beta(node) * s, shape)  # a conv's bias: per channel
            res[self.bias_pos] = Msg(g=_fit(gb, self.meta[self.bias_pos]))
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
