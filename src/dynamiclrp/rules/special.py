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
``CudnnRnnBackward0`` / ``MiopenRnnBackward0`` (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` on a GPU, rule :class:`Recurrent`)
    One node for the whole network, every layer and direction. :class:`CudnnRecurrentStep` re-expresses it from
    the saved input, initial states and weight list, each layer written the way the CPU explains it (LSTM as the
    oneDNN layer above; GRU and Elman RNN as ATen's CPU cells, :func:`~dynamiclrp.ops.special.gru_layer_forward`),
    so that a model gets the same relevance on either device.
``ThnnFusedLstmCellBackward0`` / ``ThnnFusedGruCellBackward0`` (``nn.LSTMCell``, ``nn.GRUCell`` on a GPU)
    The element-wise part of one step, after the two matrix products that have nodes of their own:
    :class:`FusedCellStep` re-expresses it from the saved pre-activations, state and biases.
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
from ..ops.special import (RNN_GRU, RNN_LSTM, RNN_RELU, CompositeKernel, CudnnRnnKernel, FusedCellKernel,
                           RecurrentKernel, WeightNormKernel, gru_layer_forward, lstm_layer_forward, rnn_layer_forward)
from .base import Rule, _child_meta as _meta, _fit, _message
from .routing import RoutingStep

if TYPE_CHECKING:  # pragma: no cover
    from ..core.run import Run

Tensor = torch.Tensor

__all__ = ["Recurrent", "RecurrentStep", "CudnnRecurrentStep", "FusedCellStep", "WeightNorm", "WeightNormStep",
           "CheckedRouting", "UnmatchedFunction", "Decompose", "DecomposedStep", "SPECIAL_RULES"]


class _ReExpressedStep(Step):
    """A fused node re-expressed with primitive ops and explained with the caller's rule set (an inner pass).

    Subclasses build the small graph in :meth:`_inner`: its outputs (one per node output), the values of the node's
    outputs (to read gradient-form messages), the inner leaves whose relevance is wanted, and how that relevance maps
    onto the node's inputs. Relevance arriving at the node's outputs seeds the inner pass; the inner pass runs in
    float32 when the node computed in half precision (the re-expression is then closer to the fused kernel, which
    accumulates in float32), and its relevance is cast back.
    """

    __slots__ = ("rules", "meta", "active")
    handles_r = True

    def __init__(self, site: Site, rules: Any = None):
        super().__init__(site)
        base = rules if rules is not None else site.planner.rules
        # layer/first-layer/per-node selections refer to the outer graph; they have no meaning inside the layer
        self.rules = dataclasses.replace(base, first_layer=None, layers={}, override=None)
        self.meta = _meta(site)
        self.active = tuple(site.active)

    def _state(self, t: Tensor, dtype: torch.dtype, pos: int, always_data: bool = False) -> Tensor:
        """An input of the node as a leaf of the inner pass: data (an activation source) when the node's input
        ``pos`` depends on the explained input, a constant operand otherwise (a bias; an initial state of zeros or
        a learned one), as the product rules of the same network written with primitive ops see it.
        ``always_data``: the state is the signal whatever it depends on (the LSTM convention of the oneDNN rule:
        ``c_{t-1}`` takes the relevance of ``f · c_{t-1}``; a constant state's share is then booked as a
        constant)."""
        active = always_data or (pos < len(self.active) and self.active[pos])
        return _leaf(t, dtype, param=not active)

    def _inner(self, node: Any) -> tuple[list[Tensor | None], list[Tensor | None], list[Tensor], Any]:
        raise NotImplementedError

    def __call__(self, run: "Run", outs: list[Msg | None]) -> list[Msg | None]:
        res: list[Msg | None] = [None] * self.n_in
        if all(m is None for m in outs):
            return res
        node = run.graph.nodes[self.index]
        inner_out, values, inner_in, scatter = self._inner(node)
        chosen, seeds, forms = [], [], []
        for k, m in enumerate(outs):
            if m is None or k >= len(inner_out) or inner_out[k] is None:
                continue
            y = inner_out[k]
            v = values[k] if k < len(values) and values[k] is not None else y.detach()
            # the message goes on into the inner pass in the form it arrived (no look at its values on the host);
            # its explicit relevance is the seed the inner ledger starts from
            g = None if m.g is None else m.g.to(y.dtype)
            r = None if m.r is None else m.r.to(y.dtype)
            chosen.append(y)
            forms.append(Msg(g, r))
            seeds.append(Msg(g, r).explicit(v.to(y.dtype)))
        if not chosen:
            return res
        ledger = run.ledger is not None
        ex = compute(chosen, inner_in, seeds, rules=self.rules, ledger=ledger, seed_messages=forms,
                     finish_ledger=False, allow_unused=True)
        for k, t in enumerate(scatter(list(ex.relevance))):
            if t is not None and k < self.n_in and self.in_edges[k] >= 0:
                res[k] = Msg(r=_fit(t, self.meta[k]))
        if ledger:
            # the inner pass's sinks, booked like Run.book_local so that the engine excludes them from this node's
            # residual; relevance sent to inputs that do not require grad (initial states...) is that residual
            where = run.planner.label(self.index)
            for kind, place, total, note in ex.ledger.pending():  # tensors on the device: nothing read here
                total = total.double()
                run.ledger.book(kind, f"{where}/{place}", total, note)
                run.local = total if run.local is None else run.local + total
            for msg in ex.ledger.unmeasured:
                run.ledger.unmeasurable(where, msg)
        return res


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _leaf(t: Tensor, dtype: torch.dtype, param: bool = False) -> Tensor:
    t = t.detach().to(dtype)
    return torch.nn.Parameter(t.clone()) if param else t.clone().requires_grad_(True)


class RecurrentStep(_ReExpressedStep):
    """A fused oneDNN LSTM layer (``MkldnnRnnLayerBackward0``) re-expressed with primitive ops and explained with
    the caller's rule set.

    See the module docstring; :func:`lstm_layer_forward` is the re-expression. Relevance arriving at the layer's
    outputs (sequence, ``h_T``, ``c_T``) seeds an inner pass whose requested inputs are the layer input, the
    initial states, the concatenated weight and the summed bias; their relevance is sent to the node's inputs
    (the bias relevance split between ``b_ih`` and ``b_hh`` by the sum rule, the weight relevance by columns).
    """

    __slots__ = ("has_bias",)

    def __init__(self, site: Site, rules: Any = None):
        RecurrentKernel.check(site)
        super().__init__(site, rules)
        self.has_bias = bool(saved(site.node, "has_biases"))
        for k in (3, 4):
            if self.has_bias and site.edges[k] >= 0:
                site.planner.mark_bias(site.edges[k])

    def _inner(self, node: Any):
        x = saved(node, "input")
        dt = _compute_dtype(x)
        w_ih, w_hh = saved(node, "weight0"), saved(node, "weight1")
        H = w_hh.shape[1]
        hx, cx = saved(node, "hx_"), saved(node, "cx_")
        B = x.shape[1]
        h0 = self._state(hx if hx is not None else x.new_zeros(B, H), dt, 5, always_data=True)
        c0 = self._state(cx if cx is not None else x.new_zeros(B, H), dt, 6, always_data=True)
        xin = _leaf(x, dt)
        weight = torch.nn.Parameter(torch.cat([w_ih.detach(), w_hh.detach()], dim=1).to(dt))
        b_ih = b_hh = None
        if self.has_bias:
            b_ih, b_hh = saved(node, "weight2"), saved(node, "weight3")
            bias = torch.nn.Parameter((b_ih.detach() + b_hh.detach()).to(dt))
        else:
            bias = torch.nn.Parameter(x.new_zeros(w_ih.shape[0], dtype=dt))
        with torch.enable_grad():
            outs = list(lstm_layer_forward(xin, h0, c0, weight, bias, bool(saved(node, "reverse"))))
        values = [saved(node, f"result{k}") for k in range(3)]
        ni = x.shape[-1]

        def scatter(rel: list[Tensor]) -> list[Tensor | None]:
            r_x, r_h, r_c, r_w, r_b = rel
            parts: list[Tensor | None] = [r_x, r_w[:, :ni], r_w[:, ni:], None, None, r_h, r_c]
            if b_ih is not None:
                parts[3], parts[4] = _split_bias(r_b, b_ih, b_hh)
            return parts
        return outs, values, [xin, h0, c0, weight, bias], scatter


def _split_bias(r_b: Tensor, b_ih: Tensor, b_hh: Tensor) -> tuple[Tensor, Tensor]:
    """The relevance of ``b = b_ih + b_hh`` shared by the sum rule (in proportion to each addend)."""
    b_ih, b_hh = b_ih.detach().to(r_b.dtype), b_hh.detach().to(r_b.dtype)
    share = safe_div(b_ih, b_ih + b_hh)
    return r_b * share, r_b * (1 - share)


class CudnnRecurrentStep(_ReExpressedStep):
    """``CudnnRnnBackward0`` / ``MiopenRnnBackward0``: a whole ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (every layer and
    direction) fused by cuDNN or MIOpen, re-expressed with primitive ops from the saved input, initial states and
    weight list (:class:`~dynamiclrp.ops.special.CudnnRnnKernel`) and explained with the caller's rule set.

    Each layer is written the way the CPU explains it, so a model gets the same relevance on a GPU as on a CPU:
    an LSTM layer as oneDNN's fused layer is re-expressed (:func:`lstm_layer_forward`: one linear map over
    ``[x_t, h_{t-1}]``, the bias ``b_ih + b_hh`` split between the two parameters by the sum rule; with
    ``proj_size`` the projection ``W_hr`` follows), a GRU or Elman layer as ATen's CPU cell
    (:func:`gru_layer_forward`, :func:`rnn_layer_forward`: input and recurrent maps each with its own bias).
    Layers feed each other the concatenation of their directions; there is no dropout between layers (eval mode,
    checked). Only ``output`` is saved; ``hy`` and ``cy`` are read from the re-expression.
    """

    __slots__ = ("bias_edges",)

    def __init__(self, site: Site, rules: Any = None):
        CudnnRnnKernel.check(site)
        super().__init__(site, rules)
        for g in CudnnRnnKernel.groups(site.node):
            for name in ("b_ih", "b_hh"):
                e = site.edges[1 + g["pos_" + name]] if g[name] is not None else -1
                if e >= 0:
                    site.planner.mark_bias(e)

    def _inner(self, node: Any):
        mode = CudnnRnnKernel.mode(node)
        x = saved(node, "input")
        dt = _compute_dtype(x)
        batch_first = bool(saved(node, "batch_first"))
        layers = int(saved(node, "num_layers"))
        dirs = 2 if saved(node, "bidirectional") else 1
        groups = CudnnRnnKernel.groups(node)
        H = int(saved(node, "hidden_size"))
        P = groups[0]["w_hr"].shape[0] if groups[0]["w_hr"] is not None else H
        B = x.shape[0] if batch_first else x.shape[1]
        hx, cx = saved(node, "hx"), saved(node, "cx")
        xin = _leaf(x, dt)
        n_in = self.n_in
        lstm = mode == RNN_LSTM
        # LSTM: the states are the signal, as in the oneDNN rule; GRU / Elman: as ATen's CPU graph has them (a
        # constant state makes W_hn h + b_hn a constant operand of r ⊙ (...))
        h0 = self._state(hx if hx is not None and hx.numel() else x.new_zeros(layers * dirs, B, P), dt, n_in - 2,
                         always_data=lstm)
        c0 = (self._state(cx if cx is not None and cx.numel() else x.new_zeros(layers * dirs, B, H), dt, n_in - 1,
                          always_data=True) if lstm else None)
        leaves: list[Tensor] = [xin, h0] + ([c0] if c0 is not None else [])
        params: list[dict[str, Tensor | None]] = []
        for g in groups:
            if lstm:
                p: dict[str, Tensor | None] = {
                    "w": torch.nn.Parameter(torch.cat([g["w_ih"].detach(), g["w_hh"].detach()], 1).to(dt)),
                    "b": None if g["b_ih"] is None else torch.nn.Parameter(
                        (g["b_ih"].detach() + g["b_hh"].detach()).to(dt)),
                    "w_hr": None if g["w_hr"] is None else torch.nn.Parameter(g["w_hr"].detach().to(dt))}
            else:
                p = {n: None if g[n] is None else torch.nn.Parameter(g[n].detach().to(dt))
                     for n in ("w_ih", "w_hh", "b_ih", "b_hh")}
            params.append(p)
            leaves += [t for t in p.values() if t is not None]
        with torch.enable_grad():
            inp = xin.transpose(0, 1) if batch_first else xin
            h_last: list[Tensor] = []
            c_last: list[Tensor] = []
            for layer in range(layers):
                outs_d = []
                for d in range(dirs):
                    k = layer * dirs + d
                    p = params[k]
                    rev = d == 1
                    if lstm:
                        o, hT, cT = lstm_layer_forward(inp, h0[k], c0[k], p["w"], p["b"], rev, p["w_hr"])
                        c_last.append(cT)
                    elif mode == RNN_GRU:
                        o, hT = gru_layer_forward(inp, h0[k], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], rev)
                    else:
                        o, hT = rnn_layer_forward(inp, h0[k], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], rev,
                                                  relu=mode == RNN_RELU)
                    outs_d.append(o)
                    h_last.append(hT)
                inp = outs_d[0] if dirs == 1 else torch.cat(outs_d, dim=-1)
            output = inp.transpose(0, 1) if batch_first else inp
            hy = torch.stack(h_last, 0)
            cy = torch.stack(c_last, 0) if lstm else None
        outs = [output, hy, cy]
        values: list[Tensor | None] = [saved(node, "result0"), None, None]

        def scatter(rel: list[Tensor]) -> list[Tensor | None]:
            res: list[Tensor | None] = [None] * n_in
            it = iter(rel)
            res[0] = next(it)
            res[n_in - 2] = next(it)
            if lstm:
                res[n_in - 1] = next(it)
            for g, p in zip(groups, params):
                if lstm:
                    r_w = next(it)
                    ni = g["w_ih"].shape[1]
                    res[1 + g["pos_w_ih"]], res[1 + g["pos_w_hh"]] = r_w[:, :ni], r_w[:, ni:]
                    if p["b"] is not None:
                        res[1 + g["pos_b_ih"]], res[1 + g["pos_b_hh"]] = _split_bias(next(it), g["b_ih"], g["b_hh"])
                    if p["w_hr"] is not None:
                        res[1 + g["pos_w_hr"]] = next(it)
                else:
                    for n in ("w_ih", "w_hh", "b_ih", "b_hh"):
                        if p[n] is not None:
                            res[1 + g["pos_" + n]] = next(it)
            return res
        return outs, values, leaves, scatter


class FusedCellStep(_ReExpressedStep):
    """``ThnnFusedLstmCellBackward0`` / ``ThnnFusedGruCellBackward0``: one fused LSTM or GRU step, re-expressed with
    primitive ops from its saved pre-activations, state and biases (:class:`~dynamiclrp.ops.special.FusedCellKernel`)
    and explained with the caller's rule set. Each input is data in the inner pass when it depends on the explained
    input, a constant operand otherwise (a bias; the recurrent pre-activation of a zero initial state)."""

    __slots__ = ("kernel",)

    def __init__(self, site: Site, rules: Any = None):
        super().__init__(site, rules)
        self.kernel: FusedCellKernel = site.spec.kernel
        for k in (3, 4):
            if k < len(site.edges) and site.edges[k] >= 0:
                site.planner.mark_bias(site.edges[k])

    def _inner(self, node: Any):
        k = self.kernel
        ig = saved(node, "input_gates")
        dt = _compute_dtype(ig)
        raw = [ig, saved(node, "hidden_gates"), saved(node, k.state_field), saved(node, "input_bias"),
               saved(node, "hidden_bias")]
        leaves = [None if t is None or t.numel() == 0 else self._state(t, dt, pos) for pos, t in enumerate(raw)]
        with torch.enable_grad():
            outs = list(k.forward(*leaves))
        values: list[Tensor | None] = [None, saved(node, "result1") if k.kind == "lstm" else None]
        present = [pos for pos, t in enumerate(leaves) if t is not None]

        def scatter(rel: list[Tensor]) -> list[Tensor | None]:
            res: list[Tensor | None] = [None] * 5
            for pos, r in zip(present, rel):
                res[pos] = r
            return res
        return outs, values, [t for t in leaves if t is not None], scatter


class Recurrent(Rule):
    """Rule for fused recurrent layers (``MkldnnRnnLayerBackward0`` on a CPU, ``CudnnRnnBackward0`` /
    ``MiopenRnnBackward0`` on a GPU): the layer is re-expressed with primitive ops and explained with the rule set
    in use (Arras et al. 2017 with the default rules: gates are multiplicative and the signal takes the relevance,
    ε on the gate pre-activations, the sum rule on the cell update).

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
        if isinstance(site.spec.kernel, CudnnRnnKernel):
            return CudnnRecurrentStep(site, self.rules)
        if isinstance(site.spec.kernel, FusedCellKernel):
            return FusedCellStep(site, self.rules)
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


_COPY_SLICES_PROBLEM = ("the in-place op written into a view has data-dependent coefficients (an element-wise "
                        "non-linearity or a product with a tensor, e.g. x[...].sigmoid_() or x[...] *= t)")


def _copy_slices_failed(node: Any) -> Tensor | None:
    """Probe the wrapped op once with a gradient of ones: a 0-dim boolean tensor, ``True`` when some input's
    coefficients take more than one value other than 0 and ±1 (computed on the device, no host sync)."""
    meta = output_meta(node)[0]
    probe = torch.ones(meta.shape, dtype=meta.dtype, device=meta.device)
    with torch.no_grad():
        grads = call_backward(node, [probe])
    failed = None
    for t in grads:
        if t is None or t.numel() == 0:
            continue
        t = t.detach().flatten()
        other = (t != 0) & (t != 1) & (t != -1)
        inf = torch.full((), float("inf"), dtype=t.dtype, device=t.device)
        several = torch.where(other, t, -inf).amax() != torch.where(other, t, inf).amin()
        f = other.any() & several
        failed = f if failed is None else failed | f.to(failed.device)
    return failed


def _copy_slices_problem(node: Any) -> str | None:
    failed = _copy_slices_failed(node)
    return _COPY_SLICES_PROBLEM if failed is not None and bool(failed) else None


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


def _copy_slices_error(where: str, problem: str) -> UnsupportedOperationError:
    return UnsupportedOperationError(
        f"{where} (an in-place write into a view): {problem}; its relevance rule cannot be recovered from the "
        "fused CopySlices node. Write the op out of place (y = x.clone(); y[...] = f(y[...]) keeps f's own "
        "node), or register a rule with RuleSet.with_ops({'CopySlices': ...}).")


def _check_copy_slices(node: Any, where: str) -> None:
    problem = _copy_slices_problem(node)
    if problem is not None:
        raise _copy_slices_error(where, problem)


class CheckedRoutingStep(RoutingStep):
    """Routing that repeats the check when it runs: a cached plan may be reused for another graph of the same
    signature, whose CopySlices could wrap a different in-place op."""

    __slots__ = ()

    def __call__(self, run, outs):
        failed = _copy_slices_failed(run.graph.nodes[self.index])
        if failed is not None:  # read after the loop: no host sync here
            where = run.graph.describe(self.index)
            run.values.checks.add(failed, lambda: _copy_slices_error(where, _COPY_SLICES_PROBLEM))
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


def _book_inner(run: "Run", index: int, ledger: Any) -> None:
    """Book an inner pass's sinks in the outer ledger under ``<node>/<inner place>`` (like ``Run.book_local``, so
    that the engine excludes them from this node's residual) and carry its unmeasured entries; the totals stay on
    the device, unread (``compute(..., finish_ledger=False)``)."""
    where = run.planner.label(index)
    for kind, place, total, note in ledger.pending():
        total = total.double()
        run.ledger.book(kind, f"{where}/{place}", total, note)
        run.local = total if run.local is None else run.local + total
    for msg in ledger.unmeasured:
        run.ledger.unmeasurable(where, msg)


class DecomposedStep(Step):
    """An op re-expressed with primitive ops (:class:`~dynamiclrp.ops.special.CompositeKernel`) and explained with
    the caller's rule set, like :class:`RecurrentStep` for fused LSTM layers.

    At run time the inputs' values are made leaves of a small graph (parameters stay parameters, so the rules
    treat them as weights), the re-expression runs forward, the relevance arriving at the node's outputs seeds an
    inner pass over that graph, and the relevance of each leaf is sent to the node's input. The inner pass's sinks
    are booked in the outer ledger under ``<node>/<inner place>``.
    """

    __slots__ = ("rules", "meta", "forward", "saved_inputs", "active", "promised")
    handles_r = True

    def __init__(self, site: Site, forward: Any, inputs: Any, rules: Any = None):
        super().__init__(site)
        base = rules if rules is not None else site.planner.rules
        # layer/first-layer/per-node selections refer to the outer graph; they have no meaning inside the op
        self.rules = dataclasses.replace(base, first_layer=None, layers={}, override=None)
        self.meta = _meta(site)
        self.forward = forward
        self.saved_inputs = inputs
        self.active = site.active
        kept = inputs(site.node) if inputs is not None else None
        # inputs the node did not keep: promised (their forward values, as every other rule's)
        self.promised = tuple(k for k, e in enumerate(site.edges)
                              if e >= 0 and (kept is None or k >= len(kept) or kept[k] is None))
        for k in self.promised:
            site.planner.need_value(site.edges[k])

    def _values(self, run: "Run", node: Any) -> list[Any]:
        kept = list(self.saved_inputs(node)) if self.saved_inputs is not None else []
        vals: list[Any] = [kept[k] if k < len(kept) else None for k in range(max(self.n_in, len(kept)))]
        for k in self.promised:
            vals[k] = run.value(self.in_edges[k], run.graph.describe(self.index))
        return vals

    def __call__(self, run: "Run", outs: list[Msg | None]) -> list[Msg | None]:
        res: list[Msg | None] = [None] * self.n_in
        if all(m is None for m in outs):
            return res
        node = run.graph.nodes[self.index]
        args: list[Any] = []
        leaves: list[tuple[int, Tensor]] = []
        for k, v in enumerate(self._values(run, node)):
            if isinstance(v, Tensor) and k < self.n_in and self.in_edges[k] >= 0 and (
                    v.is_floating_point() or v.is_complex()):
                v = v.detach()
                # a parameter (or anything computed from parameters only) stays one: the rules treat it as a weight
                leaf = v.clone().requires_grad_(True) if self.active[k] else torch.nn.Parameter(v.clone())
                leaves.append((k, leaf))
                args.append(leaf)
            else:
                args.append(v.detach() if isinstance(v, Tensor) else v)
        with torch.enable_grad():
            got = self.forward(node, *args)
        inner = [got] if isinstance(got, Tensor) else list(got)
        chosen, seeds, forms = [], [], []
        for k, m in enumerate(outs):
            if m is None or k >= len(inner) or not isinstance(inner[k], Tensor) or inner[k].grad_fn is None:
                continue
            y = inner[k]
            # the message goes on into the inner pass in the form it arrived; its explicit relevance seeds the ledger
            g = None if m.g is None else m.g.to(y.dtype)
            r = None if m.r is None else m.r.to(y.dtype)
            chosen.append(y)
            forms.append(Msg(g, r))
            seeds.append(Msg(g, r).explicit(y.detach()))
        if not chosen or not leaves:
            return res
        ledger = run.ledger is not None
        ex = compute(chosen, [leaf for _, leaf in leaves], seeds, rules=self.rules, ledger=ledger,
                     model=run.planner.model, seed_messages=forms, finish_ledger=False)
        for (k, leaf), R in zip(leaves, ex.relevance):
            res[k] = _message(R, leaf.detach(), self.meta[k])
        if ledger:
            _book_inner(run, self.index, ex.ledger)
        return res


class Decompose(Rule):
    """Explain a node through a re-expression of its op with primitive ops, using the caller's rule set.

    The built-in composite ops (GLU, ``nn.Bilinear``'s trilinear product, reentrant checkpointing: family
    ``composite``) get it by default. For a custom ``torch.autograd.Function`` it is the few-line recipe: give the
    Function's math written with ordinary ops, and every op inside gets its usual rule::

        rules = dynamiclrp.presets.epsilon().with_ops({
            "XSoftmaxBackward": dynamiclrp.rules.Decompose(
                lambda ctx, x: torch.softmax(x, ctx.dim)),  # ctx: the node, with what the Function stored on it
        })

    Parameters
    ----------
    forward : callable or None
        ``forward(node, *inputs) -> output or tuple of outputs``: the op recomputed from the values of its forward
        inputs (one argument per input of the node, i.e. per tensor argument of the Function that requires grad
        or not, in order). ``node`` is the autograd node — for a custom Function, its ``ctx``, holding whatever
        ``forward`` stored (``ctx.dim``, ``ctx.saved_tensors``). ``None`` uses the registry row's
        :class:`~dynamiclrp.ops.special.CompositeKernel`.
    inputs : callable or None
        ``inputs(node) -> values``: the inputs' values read from the node (e.g. ``ctx.saved_tensors``); ``None``
        obtains them from the graph (the Promise System), as every rule's values.
    rules : RuleSet or None
        Rule set for the ops inside; ``None`` uses the explanation's.
    """

    families = frozenset({"composite", "custom", "any"})

    def __init__(self, forward: Any = None, inputs: Any = None, rules: Any = None):
        if forward is not None and not callable(forward):
            raise RuleError(f"Decompose(forward=...) takes a callable forward(node, *inputs), got {forward!r}")
        if inputs is not None and not callable(inputs):
            raise RuleError(f"Decompose(inputs=...) takes a callable inputs(node) -> values, got {inputs!r}")
        if rules is not None and not hasattr(rules, "rule_for"):
            raise RuleError(f"Decompose(rules=...) takes a RuleSet or None, got {type(rules).__name__}")
        self.forward = forward
        self.inputs = inputs
        self.rules = rules

    def bind(self, site):
        forward, inputs = self.forward, self.inputs
        if forward is None:
            kernel = site.spec.kernel
            if not isinstance(kernel, CompositeKernel):
                raise RuleError(f"Decompose() needs forward=... for {site.describe()}, whose registry row has no "
                                "re-expression: Decompose(lambda node, *inputs: <the op with ordinary torch ops>)")
            forward = kernel.forward
            inputs = kernel.inputs if inputs is None else inputs
        return DecomposedStep(site, forward, inputs, self.rules)


#: the rules of the families of :mod:`dynamiclrp.ops.special`, which no preset maps (a rule set may override them
#: with ``with_families``-like ``ops`` entries per node type)
SPECIAL_RULES: dict[str, Rule] = {
    "recurrent": Recurrent(), "parametrization": WeightNorm(), "inplace": CheckedRouting(),
    "custom": UnmatchedFunction(), "composite": Decompose(),
}
