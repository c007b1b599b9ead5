"""Rules for special operations: fused recurrent layers, weight normalisation, in-place writes into views and
custom ``torch.autograd.Function``s.

Most node types are served by the family rules of a rule set (:mod:`dynamiclrp.rules.library`). The ops here
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
    linear family's rule (ε by default, one stabilised denominator over input, recurrent and bias terms, as in
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
      from dynamiclrp.rules.kernels import UnaryKernel
      kernel = UnaryKernel(lambda node, x: my_act(x), x_field="saved_tensors.0")
      spec = OpSpec("activation", kernel, inputs_saved=((0, "saved_tensors.0"),), rebuild=kernel.rebuild,
                    replay=kernel.replay)
      rules = dynamiclrp.presets.epsilon().with_ops({"MyActBackward": (spec, Identity())})

``"saved_tensors.K"`` is how a saved field names ``ctx.saved_tensors[K]`` of a custom Function node.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from .. import graph as G
from ..errors import UnsupportedOperationError
from .base import Msg, Rule, Site, Step
from .library import RoutingStep, _child_meta as _meta, _fit

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Run

Tensor = torch.Tensor

__all__ = ["Recurrent", "RecurrentStep", "WeightNorm", "WeightNormStep", "RecurrentKernel", "WeightNormKernel",
           "CheckedRouting", "CopySlicesKernel", "UnmatchedFunction", "lstm_layer_forward", "custom_function_family"]


# ===========================================================================================================
# Recurrent layers
# ===========================================================================================================
#: oneDNN's RNN modes (``aten/src/ATen/native/mkldnn/RNN.cpp``)
_MKLDNN_LSTM = 2


def lstm_layer_forward(x: Tensor, h0: Tensor, c0: Tensor, weight: Tensor, bias: Tensor | None,
                       reverse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer and direction with primitive ops (PyTorch's gate order ``i, f, g, o``).

    Parameters
    ----------
    x : Tensor
        Time-major input ``(T, B, I)``.
    h0, c0 : Tensor
        Initial states ``(B, H)``.
    weight : Tensor
        ``[W_ih, W_hh]`` concatenated along the input dimension, ``(4H, I + H)``: one linear map over
        ``[x_t, h_{t-1}]`` per step, so that the linear rule sees the whole gate pre-activation at once.
    bias : Tensor or None
        ``b_ih + b_hh``, ``(4H,)``.
    reverse : bool
        Process the sequence from the last step to the first (the backward direction of a bidirectional layer).

    Returns
    -------
    output, h_T, c_T : Tensor
        ``(T, B, H)`` (in time order), ``(B, H)``, ``(B, H)``.
    """
    steps = x.unbind(0)
    T = len(steps)
    outs: list[Tensor | None] = [None] * T
    h, c = h0, c0
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        z = F.linear(torch.cat([steps[t], h], dim=1), weight, bias)
        i, f, g, o = z.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs[t] = h
    return torch.stack(outs, 0), h, c


class RecurrentKernel:
    """``MkldnnRnnLayerBackward0``: one layer and direction of ``nn.LSTM`` fused by oneDNN (CPU).

    Forward inputs: ``input (T, B, I)``, ``weight0 = W_ih``, ``weight1 = W_hh``, ``weight2 = b_ih``,
    ``weight3 = b_hh``, ``hx``, ``cx``; outputs ``output (T, B, H)``, ``hy``, ``cy`` (saved as ``result0..2``).
    """

    inputs = ("input", "weight0", "weight1", "weight2", "weight3", "hx_", "cx_")

    @property
    def rule(self) -> Rule:
        return Recurrent()

    @staticmethod
    def check(site: Site) -> None:
        node = site.node
        mode = G.saved(node, "mode")
        if mode != _MKLDNN_LSTM:
            raise UnsupportedOperationError(
                f"{site.describe()}: oneDNN RNN mode {mode} is not supported (only LSTM, mode {_MKLDNN_LSTM}); "
                "register a rule with RuleSet.with_ops({'MkldnnRnnLayerBackward0': ...})")
        if G.saved(node, "batch_sizes"):
            raise UnsupportedOperationError(
                f"{site.describe()}: packed sequences through the fused oneDNN LSTM are not supported")

    def rebuild(self, node: Any, nr: int) -> Tensor | None:
        return G.saved(node, f"result{nr}") if nr < 3 else None


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
        self.has_bias = bool(G.saved(site.node, "has_biases"))
        for k in (3, 4):
            if self.has_bias and site.edges[k] >= 0:
                site.planner.mark_bias(site.edges[k])

    def _inner(self, node: Any) -> tuple[list[Tensor], list[Tensor]]:
        x = G.saved(node, "input").detach()
        w_ih, w_hh = G.saved(node, "weight0").detach(), G.saved(node, "weight1").detach()
        H = w_hh.shape[1]
        hx, cx = G.saved(node, "hx_"), G.saved(node, "cx_")
        B = x.shape[1]
        h0 = (hx.detach() if hx is not None else x.new_zeros(B, H)).clone().requires_grad_(True)
        c0 = (cx.detach() if cx is not None else x.new_zeros(B, H)).clone().requires_grad_(True)
        xin = x.clone().requires_grad_(True)
        weight = torch.nn.Parameter(torch.cat([w_ih, w_hh], dim=1))
        if self.has_bias:
            bias = torch.nn.Parameter(G.saved(node, "weight2").detach() + G.saved(node, "weight3").detach())
        else:
            bias = torch.nn.Parameter(x.new_zeros(w_ih.shape[0]))
        with torch.enable_grad():
            outs = list(lstm_layer_forward(xin, h0, c0, weight, bias, bool(G.saved(node, "reverse"))))
        return outs, [xin, h0, c0, weight, bias]

    def __call__(self, run: "Run", outs: list[Msg | None]) -> list[Msg | None]:
        from ..engine import compute

        res: list[Msg | None] = [None] * self.n_in
        if all(m is None for m in outs):
            return res
        node = run.graph.nodes[self.index]
        inner_out, inner_in = self._inner(node)
        chosen, seeds = [], []
        for k, m in enumerate(outs[:3]):
            R = None if m is None else m.explicit(G.saved(node, f"result{k}"))
            if R is not None:
                chosen.append(inner_out[k])
                seeds.append(R.to(inner_out[k].dtype))
        ledger = run.ledger is not None
        ex = compute(chosen, inner_in, seeds, rules=self.rules, ledger=ledger)
        r_x, r_h, r_c, r_w, r_b = ex.relevance
        ni = inner_in[0].shape[-1]
        parts: list[Tensor | None] = [r_x, r_w[:, :ni], r_w[:, ni:], None, None, r_h, r_c]
        if self.has_bias:
            b_ih, b_hh = G.saved(node, "weight2"), G.saved(node, "weight3")
            from .base import safe_div
            share = safe_div(b_ih, b_ih + b_hh)
            parts[3], parts[4] = r_b * share, r_b * (1 - share)
        for k, t in enumerate(parts):
            if t is not None and self.in_edges[k] >= 0:
                res[k] = Msg(r=_fit(t, self.meta[k]))
        if ledger:
            # the inner pass's sinks, booked like Run.book_local so that the engine excludes them from this node's
            # residual; relevance sent to inputs that do not require grad (initial states...) is that residual
            where = run.graph.describe(self.index)
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
    rules : RuleSet, str or None
        Rule set for the inner ops; ``None`` uses the rule set of the explanation.
    """

    families = frozenset({"recurrent"})

    def __init__(self, rules: Any = None):
        self.rules = rules

    def bind(self, site):
        from .ruleset import resolve_rules
        return RecurrentStep(site, None if self.rules is None else resolve_rules(self.rules))


# ===========================================================================================================
# Weight normalisation
# ===========================================================================================================
class WeightNormKernel:
    """``_weight_norm_interface(v, g, dim) -> (w, norms)`` with ``w = g · v / ‖v‖`` (norm over every dimension but
    ``dim``). Saved: ``v``, ``g``, ``dim``, ``result1`` (the norms, shaped like ``g``)."""

    @property
    def rule(self) -> Rule:
        return WeightNorm()

    @staticmethod
    def scale(node: Any) -> Tensor:
        return G.saved(node, "g") / G.saved(node, "result1")

    def rebuild(self, node: Any, nr: int) -> Tensor | None:
        v = G.saved(node, "v")
        if nr != 0 or v is None:
            return None
        return v * self.scale(node)


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


# ===========================================================================================================
# In-place writes into views (CopySlices) and known custom Functions: plan-time checks
# ===========================================================================================================
def _copy_slices_problem(node: Any) -> str | None:
    meta = G.output_meta(node)[0]
    probe = torch.ones(meta.shape, dtype=meta.dtype, device=meta.device)
    with torch.no_grad():
        grads = G.call_backward(node, [probe])
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
        return _checked_routing_step(site)


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


def _checked_routing_step(site: Site) -> Step:
    return CheckedRoutingStep(site)


class CopySlicesKernel:
    """``CopySlices``: an in-place op applied to a view of a base tensor (family ``inplace``)."""

    rule = CheckedRouting()


class UnmatchedFunction(Rule):
    """Refuses a custom Function node whose class name matches a registry row of a *different* Function."""

    families = frozenset({"custom"})

    def __init__(self, expected: str):
        self.expected = expected

    def bind(self, site):
        cls = getattr(site.node, "_forward_cls", None)
        found = "not a custom Function" if cls is None else f"{cls.__module__}.{cls.__qualname__}"
        raise UnsupportedOperationError(
            f"{site.describe()} is named like {self.expected} but comes from {found} (a different custom "
            f"torch.autograd.Function); register its rule with "
            f"RuleSet.with_ops({{'{site.type}': dynamiclrp.rules.Routing()}}) or an (OpSpec, Rule) pair")


def custom_function_family(kernel: Any, module: str, qualname: str, family: str) -> Callable[[Site], str]:
    """``family_of`` for a registry row of a known custom ``autograd.Function``.

    Rows are keyed by node class name (``<ClassName>Backward``), so the node's Function class is checked: a
    different Function of the same name gets family ``custom``, whose rule (:class:`UnmatchedFunction`, set on
    ``kernel``) refuses it with a clear error.
    """
    kernel.rule = UnmatchedFunction(f"{module}.{qualname}")

    def family_of(site: Site) -> str:
        cls = getattr(site.node, "_forward_cls", None)
        if cls is None or cls.__module__ != module or cls.__qualname__ != qualname:
            return "custom"
        return family
    return family_of
