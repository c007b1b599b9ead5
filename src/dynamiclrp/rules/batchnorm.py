"""Eval-mode batch norms merged into the linear/conv op before them (Zennit's ``SequentialMergeBatchNorm``, decided
from the graph): which ones merge, the merged weight and bias, and the batch norm's own pass-through step."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..core.graph import output_meta, saved
from ..core.messages import gmsg, rmsg
from ..core.promises import available
from ..core.step import Site, Step
from ..ops.linear import ConvKernel
from .base import Rule

if TYPE_CHECKING:  # pragma: no cover
    from ..core.plan import Planner
    from ..core.run import Run
    from .linear import LinearStep

Tensor = torch.Tensor


class _MergedBN:
    """An eval-mode batch norm merged into the linear/conv op before it, for that op's rule.

    ``W' = W·s`` and ``b' = (b − μ)·s + β`` per output channel with ``s = γ / sqrt(running_var + eps)``, exactly the
    parameters Zennit's ``SequentialMergeBatchNorm`` canonizer writes into the model (Anders et al. 2021), so that
    ``W'x + b'`` is the batch norm's output. Which batch norms merge is decided by
    :func:`batchnorm_merges`; the batch norm's own step
    (:class:`MergedBatchNormStep`) hands its output message to this op unchanged.
    """

    __slots__ = ("bn", "l_bias", "beta_kind", "known", "reason", "out_slot", "op_out", "op", "bias_pos",
                 "conv", "transposed")

    @staticmethod
    def plan(site: Site, step: "LinearStep") -> "_MergedBN | None":
        merges = site.planner.analyses.get(("batchnorm_merges", id(site.planner.rules)))
        bn = None if merges is None else merges.bn_of.get(site.index)
        return None if bn is None else _MergedBN(site, step, bn)

    def __init__(self, site: Site, step: "LinearStep", bn: int):
        g = site.graph
        resolver = site.planner.resolver
        self.bn = bn
        self.op = site.index
        self.out_slot = g.slot_base[bn]
        self.op_out = step.out_slots[0]
        self.bias_pos = step.bias_pos
        self.conv = isinstance(step.kernel, ConvKernel)
        self.transposed = self.conv and bool(saved(site.node, "transposed"))
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
        s = 1.0 / torch.sqrt(run.planner.specs[self.bn].kernel.running_var_eps(node))
        gamma = saved(node, "weight")
        return s if gamma is None else gamma * s

    def weight(self, run: "Run", node: Any, w: Tensor) -> Tensor:
        """``W'``: the op's weight (in the layout the kernel's ``f`` takes) scaled per output channel."""
        s = self._scale(run).to(w.dtype)
        if not self.conv:
            return w * s  # dense: (in, out), the output channel is the last dimension
        if not self.transposed:
            return w * s.reshape((-1,) + (1,) * (w.dim() - 1))
        groups = int(saved(node, "groups"))
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
        mu = saved(bn_node, "running_mean").to(z.dtype)
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
    :class:`BatchNormMerges`). Not meant to be chosen by hand."""

    families = frozenset({"norm"})

    def bind(self, site):
        return MergedBatchNormStep(site)


class BatchNormMerges:
    """Which eval-mode batch norms are merged into the linear/conv op that produces their input.

    A batch norm node ``bn`` (a row of the ``norm`` family with a batch-norm kernel: ``NativeBatchNormBackward0``,
    and on a GPU ``CudnnBatchNormBackward0`` / ``MiopenBatchNormBackward0``) is merged into the node ``op`` that
    produced its input when

    * the batch norm is in eval mode (``training`` saved as ``False``: running statistics, no batch statistics);
    * ``op`` is a convolution (1-3 d, transposed, grouped) or a dense layer (``addmm``/``mm`` with a 2-d output and the
      activation as the first operand), so that the batch norm's channel dimension (dim 1) is ``op``'s output
      channel;
    * the output of ``op`` has ``bn`` as its only consumer and was not requested as an input;
    * ``op``'s rule is a linear rule (ε, γ, z⁺, α-β, z^B, w², flat), i.e. the rule that merging changes;
    * the batch norm gets its family's rule (one given a rule per node, per layer or per op type stays separate).

    The merged op computes ``z' = W'x + b'`` with ``W' = W·γ/σ`` (per output channel), ``b' = (b − μ)·γ/σ + β``
    and ``σ = sqrt(running_var + eps)`` — exactly the batch norm's output — so the linear rule sees the
    composite affine map, as after Zennit's ``SequentialMergeBatchNorm`` canonizer (Anders et al. 2021), without
    modifying the model. The batch norm itself then passes relevance through unchanged.

    Attributes
    ----------
    bn_of : dict
        ``op index -> bn index``.
    op_of : dict
        ``bn index -> op index``.
    """

    def __init__(self, bn_of: dict[int, int]):
        self.bn_of = bn_of
        self.op_of = {b: o for o, b in bn_of.items()}


def _is_eval_batchnorm(node) -> bool:
    training = saved(node, "training")
    return training is False and saved(node, "running_mean") is not None \
        and saved(node, "running_var") is not None


def batchnorm_merges(planner: "Planner", op_gets_linear_rule, bn_family_ruled=None) -> BatchNormMerges:
    """Find the batch norms to merge in ``planner``'s graph (see :class:`BatchNormMerges`).

    Parameters
    ----------
    planner : Planner
    op_gets_linear_rule : callable
        ``op_gets_linear_rule(index) -> Rule | None``: the linear rule node ``index`` will get, or ``None``.
    bn_family_ruled : callable, optional
        ``bn_family_ruled(index) -> bool``: whether the batch norm gets its family rule (one given its own rule
        per node, per layer or per op type is not merged).

    Notes
    -----
    The decision depends on the graph's structure and the rules only, so a frozen model merges exactly the batch
    norms its trainable twin merges; the values a merge needs are the linear rule's business (a frozen β that the
    graph does not hold is read through ``model=``).
    """
    g = planner.graph
    bn_of: dict[int, int] = {}
    for bn, bn_spec in enumerate(planner.specs):
        if bn_spec is None or bn_spec.family != "norm" or getattr(bn_spec.kernel, "kind", None) != "batch":
            continue
        node = g.nodes[bn]
        if not _is_eval_batchnorm(node):
            continue
        if bn_family_ruled is not None and not bn_family_ruled(bn):
            continue
        s = g.edges[bn][0] if g.edges[bn] else -1
        if s < 0 or s in planner.requested:
            continue
        op = g.slot_node[s]
        op_spec = planner.specs[op]
        if op_spec is None or not op_spec.merges_batchnorm or (g.n_out[op] or 1) != 1 or len(g.consumers[s]) != 1:
            continue
        k = op_spec.kernel
        edges = g.edges[op]
        act = [p < len(edges) and edges[p] >= 0 and planner.active[edges[p]] for p in k.operands]
        if act[0] == act[1] or not act[0]:
            continue  # a product of two activations, or the weight as the first operand
        out_meta = output_meta(g.nodes[op])[0]
        if not isinstance(op_spec.kernel, ConvKernel) and len(out_meta.shape) != 2:
            continue
        rule = op_gets_linear_rule(op)
        if rule is None:
            continue
        bn_of[op] = bn
    return BatchNormMerges(bn_of)
