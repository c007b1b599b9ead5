"""Rules for special operations: fused recurrent layers, weight normalisation, in-place writes into views and
custom ``torch.autograd.Function``s.

Most node types are served by the family rules of a rule set (:mod:`dynamiclrp.rules`). The ops here
either fuse a whole sub-network into one autograd node, so no single family rule can describe them, or need a
structural check before a family rule may be trusted:

``MkldnnRnnLayerBackward0`` (``nn.LSTM`` on CPU, family ``recurrent``, rule :class:`Recurrent`)
    One node per layer and direction; its gates are not saved (only an opaque oneDNN workspace). A faithful
    rule over the fused node is impossible from the node alone, but the node saves everything the layer's
    forward needs (input, weights, initial states), so :class:`RecurrentStep` **re-expresses the layer with
    primitive ops** (one linear map over ``[x_t, h_{t-1}]`` per step, sigmoid/tanh gates, ``c = f·c + i·g``,
    ``h = o·tanh(c)``) and runs the caller's own rule set on that small graph. With the default product rule
    the gates are recognised structurally and the signal operand takes all the relevance (Arras et al. 2017,
    "Explaining recurrent neural network predictions in sentiment analysis"); the gate pre-activations get the
    linear family's rule (ε by default, one stabilized denominator over input, recurrent and bias terms, as in
    Arras et al.); ``c = f·c + i·g`` gets the sum rule. Every sink of the inner pass is booked in the outer ledger
    under ``<node>/<inner place>``, and the relevance of the bias is sent to the two bias parameters.
``WeightNormInterfaceBackward0`` (``weight_norm``, family ``parametrization``, rule :class:`WeightNorm`)
    ``w = g · v / ‖v‖``: with the normaliser ``g / ‖v‖`` held constant (as LayerNorm's in AttnLRP) ``w`` is a
    per-row scaling of ``v``, so all relevance goes to the direction ``v`` (``R_v = R_w``) and none to the
    magnitude ``g``.
``CopySlices`` (in-place writes into a view, family ``inplace``, rule :class:`CheckedRouting`)
    The node wraps the in-place op's own backward. Routing is exact when the wrapped op is linear with constant
    coefficients (``x[i] = y``, ``x[i] += y``, ``x[i] *= 2``) or piecewise linear and homogeneous
    (``x[i].relu_()``): then gradient form *is* the z-rule. The rule probes the wrapped op once at plan time and
    refuses (``UnsupportedOperationError``) in-place non-linear ops on views, whose rule cannot be recovered from
    the fused node.
``GeLUFunctionBackward`` (BLOOM's custom Function, family ``activation``)
    A registry row for a known custom Function: the tanh-approximated GELU, read from ``ctx.saved_tensors[0]``
    (field ``"saved_tensors.0"``); the row checks the Function's class so that an unrelated user Function of the
    same name is not mistaken for it.

Custom autograd Functions
-------------------------
A node of a custom ``torch.autograd.Function`` is named ``<ClassName>Backward``; unknown ones raise
:class:`~dynamiclrp.errors.UnsupportedOperationError` naming the node type, the Function's class and how to
register a rule. Register one on the rule set, by node type:

* a rule alone, when the rule needs no forward values (``Routing()`` for index/shape-like Functions,
  ``Gradient()`` when gradient × input is the right relevance)::

      rules = dynamiclrp.presets.epsilon().with_ops({"MyIndexFunctionBackward": dynamiclrp.rules.Routing()})

* an ``(OpSpec, Rule)`` pair to describe the op to the family rules and the Promise System, e.g. an element-wise
  non-linearity whose input the Function saved with ``ctx.save_for_backward(x)``::

      from dynamiclrp.rules import Identity, OpSpec
      from dynamiclrp.ops import UnaryKernel
      kernel = UnaryKernel(lambda node, x: my_act(x), x_field="saved_tensors.0")
      spec = OpSpec("activation", kernel, inputs_saved=((0, "saved_tensors.0"),), rebuild=kernel.rebuild,
                    replay=kernel.replay)
      rules = dynamiclrp.presets.epsilon().with_ops({"MyActBackward": (spec, Identity())})

``"saved_tensors.K"`` is how a saved field names ``ctx.saved_tensors[K]`` of a custom Function node.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from ..core.graph import call_backward, forward_cls, output_meta, saved
from ..core.messages import Msg, safe_div
from ..core.run import compute
from ..core.step import Site, Step
from ..errors import RuleError, UnsupportedOperationError
from ..ops.special import RecurrentKernel, WeightNormKernel, lstm_layer_forward
from .base import Rule, _child_meta as _meta, _fit
from .routing import RoutingStep

if TYPE_CHECKING:  # pragma: no cover
    from ..core.run import Run

Tensor = torch.Tensor

__all__ = ["Recurrent", "RecurrentStep", "WeightNorm", "WeightNormStep", "CheckedRouting", "UnmatchedFunction",
           "SPECIAL_RULES"]


class RecurrentStep(Step):
    """A fused LSTM layer re-expressed with primitive ops and explained with the caller's rule set.

    See the module docstring; :func:`lstm_layer_forward` is the re-expression. Relevance arriving at the layer's
    outputs (sequence, ``h_T``, ``c_T``) seeds an inner pass whose requested inputs are the layer input, the
    initial states, the concatenated weight and the summed bias; their relevance is sent to the node's inputs
    (the bias relevance split between ``b_ih`` and ``b_hh`` by the sum rule, the weight relevance by columns).
    """

    __slots__ = ("rules", "meta", "has_bias")
    handles_r = True

    def __init__(self, site: Site, rules: Any = None):
        super().__init__(site)
        RecurrentKernel.check(site)
        base = rules if rules is not None else site.planner.rules
        # layer/first-layer/per-node selections refer to the outer graph; they have no meaning inside the layer
        self.rules = dataclasses.replace(base, first_layer=None, layers={}, override=None)
        self.meta = _meta(site)
        self.has_bias = bool(saved(site.node, "has_biases"))
        for k in (3, 4):
            if self.has_bias and site.edges[k] >= 0:
                site.planner.mark_bias(site.edges[k])

    def _inner(self, node: Any) -> tuple[list[Tensor], list[Tensor]]:
        x = saved(node, "input").detach()
        w_ih, w_hh = saved(node, "weight0").detach(), saved(node, "weight1").detach()
        H = w_hh.shape[1]
        hx, cx = saved(node, "hx_"), saved(node, "cx_")
        B = x.shape[1]
        h0 = (hx.detach() if hx is not None else x.new_zeros(B, H)).clone().requires_grad_(True)
        c0 = (cx.detach() if cx is not None else x.new_zeros(B, H)).clone().requires_grad_(True)
        xin = x.clone().requires_grad_(True)
        weight = torch.nn.Parameter(torch.cat([w_ih, w_hh], dim=1))
        if self.has_bias:
            bias = torch.nn.Parameter(saved(node, "weight2").detach() + saved(node, "weight3").detach())
        else:
            bias = torch.nn.Parameter(x.new_zeros(w_ih.shape[0]))
        with torch.enable_grad():
            outs = list(lstm_layer_forward(xin, h0, c0, weight, bias, bool(saved(node, "reverse"))))
        return outs, [xin, h0, c0, weight, bias]

    def __call__(self, run: "Run", outs: list[Msg | None]) -> list[Msg | None]:
        res: list[Msg | None] = [None] * self.n_in
        if all(m is None for m in outs):
            return res
        node = run.graph.nodes[self.index]
        inner_out, inner_in = self._inner(node)
        chosen, seeds = [], []
        for k, m in enumerate(outs[:3]):
            R = None if m is None else m.explicit(saved(node, f"result{k}"))
            if R is not None:
                chosen.append(inner_out[k])
                seeds.append(R.to(inner_out[k].dtype))
        ledger = run.ledger is not None
        ex = compute(chosen, inner_in, seeds, rules=self.rules, ledger=ledger, allow_unused=True)
        r_x, r_h, r_c, r_w, r_b = ex.relevance
        ni = inner_in[0].shape[-1]
        parts: list[Tensor | None] = [r_x, r_w[:, :ni], r_w[:, ni:], None, None, r_h, r_c]
        if self.has_bias:
            b_ih, b_hh = saved(node, "weight2"), saved(node, "weight3")
            share = safe_div(b_ih, b_ih + b_hh)
            parts[3], parts[4] = r_b * share, r_b * (1 - share)
        for k, t in enumerate(parts):
            if t is not None and self.in_edges[k] >= 0:
                res[k] = Msg(r=_fit(t, self.meta[k]))
        if ledger:
            # the inner pass's sinks, booked like Run.book_local so that the engine excludes them from this node's
            # residual; relevance sent to inputs that do not require grad (initial states...) is that residual
            where = run.planner.label(self.index)
            for s in ex.ledger.sinks:
                total = torch.as_tensor(s.total, dtype=torch.float64)
                run.ledger.book(s.kind, f"{where}/{s.where}", total, s.note)
                run.local = total if run.local is None else run.local + total
            for msg in ex.ledger.unmeasured:
                run.ledger.unmeasurable(where, msg)
        return res


class Recurrent(Rule):
    """Rule for fused recurrent layers (``MkldnnRnnLayerBackward0``): the layer is re-expressed with primitive ops
    and explained with the rule set in use (Arras et al. 2017 with the default rules: gates are multiplicative
    and the signal takes the relevance, ε on the gate pre-activations, the sum rule on the cell update).

    Parameters
    ----------
    rules : RuleSet or None
        Rule set for the inner ops (e.g. ``dynamiclrp.presets.zero()``); ``None`` uses the rule set of the
        explanation.
    """

    families = frozenset({"recurrent"})

    def __init__(self, rules: Any = None):
        if rules is not None and not hasattr(rules, "rule_for"):
            raise RuleError(f"Recurrent(rules=...) takes a RuleSet or None, got {type(rules).__name__}; for a preset "
                            "pass it built, e.g. Recurrent(dynamiclrp.presets.zero())")
        self.rules = rules

    def bind(self, site):
        return RecurrentStep(site, self.rules)


class WeightNormStep(Step):
    """``R_v = R_w`` (gradient form ``G_v = G_w · g/‖v‖``), nothing to ``g``; conservative."""

    __slots__ = ("meta",)
    handles_r = True

    def __init__(self, site: Site):
        super().__init__(site)
        self.meta = _meta(site)

    def g(self, run, gs):
        node = run.graph.nodes[self.index]
        return [Msg(g=_fit(gs[0] * WeightNormKernel.scale(node), self.meta[0])), None]

    def r(self, run, rs):
        return [Msg(r=_fit(rs[0], self.meta[0])), None]


class WeightNorm(Rule):
    """Weight normalisation ``w = g · v / ‖v‖`` with the normaliser held constant: all relevance to ``v``."""

    families = frozenset({"parametrization"})

    def bind(self, site):
        return WeightNormStep(site)


def _copy_slices_problem(node: Any) -> str | None:
    meta = output_meta(node)[0]
    probe = torch.ones(meta.shape, dtype=meta.dtype, device=meta.device)
    with torch.no_grad():
        grads = call_backward(node, [probe])
    for t in grads:
        if t is None:
            continue
        vals = torch.unique(t.detach().flatten())
        vals = vals[(vals != 0) & (vals != 1) & (vals != -1)]
        if vals.numel() > 1:
            return ("the in-place op written into a view has data-dependent coefficients (an element-wise "
                    "non-linearity or a product with a tensor, e.g. x[...].sigmoid_() or x[...] *= t)")
    return None


class CheckedRouting(Rule):
    """Routing for ``CopySlices`` (in-place writes into a view), after checking that routing is exact.

    ``CopySlices`` calls the in-place op's backward on the written view. Routing (gradient form) is the z-rule when
    that op is linear with constant coefficients (``x[i] = y``, ``x[i] += y``, ``x[i] *= 2``) or piecewise linear
    and homogeneous (``x[i].relu_()``). Probing the node once with a gradient of ones returns its
    Jacobian-transpose coefficients: those ops give at most one value other than 0 and ±1 per input, while
    element-wise non-linear ops (``sigmoid_``) or products with a tensor give data-dependent coefficients and are
    refused with :class:`~dynamiclrp.errors.UnsupportedOperationError` (their rule cannot be recovered from the
    fused node).
    """

    families = frozenset({"inplace"})

    def bind(self, site):
        _check_copy_slices(site.node, site.describe())
        return CheckedRoutingStep(site)


def _check_copy_slices(node: Any, where: str) -> None:
    problem = _copy_slices_problem(node)
    if problem is not None:
        raise UnsupportedOperationError(
            f"{where} (an in-place write into a view): {problem}; its relevance rule cannot be recovered from the "
            "fused CopySlices node. Write the op out of place (y = x.clone(); y[...] = f(y[...]) keeps f's own "
            "node), or register a rule with RuleSet.with_ops({'CopySlices': ...}).")


class CheckedRoutingStep(RoutingStep):
    """Routing that repeats the check when it runs: a cached plan may be reused for another graph of the same
    signature, whose CopySlices could wrap a different in-place op."""

    __slots__ = ()

    def __call__(self, run, outs):
        _check_copy_slices(run.graph.nodes[self.index], run.graph.describe(self.index))
        return super().__call__(run, outs)


class UnmatchedFunction(Rule):
    """Refuses a custom Function node whose class name matches a registry row of a *different* Function (family
    ``custom``, see :func:`dynamiclrp.ops.special.function_family`)."""

    families = frozenset({"custom"})

    def bind(self, site):
        cls = forward_cls(site.node)
        expected = ".".join(site.spec.function or ("?", "?"))
        found = "not a custom Function" if cls is None else f"{cls.__module__}.{cls.__qualname__}"
        raise UnsupportedOperationError(
            f"{site.describe()} is named like {expected} but comes from {found} (a different custom "
            f"torch.autograd.Function); register its rule with "
            f"RuleSet.with_ops({{'{site.type}': dynamiclrp.rules.Routing()}}) or an (OpSpec, Rule) pair")


#: the rules of the families of :mod:`dynamiclrp.ops.special`, which no preset maps (a rule set may override them
#: with ``with_families``-like ``ops`` entries per node type)
SPECIAL_RULES: dict[str, Rule] = {
    "recurrent": Recurrent(), "parametrization": WeightNorm(), "inplace": CheckedRouting(),
    "custom": UnmatchedFunction(),
}
