"""Structural questions about the graph that product rules ask at plan time.

* Is this operand a **normaliser** (a statistic of the activations, e.g. ``rsqrt(mean(x²) + eps)``)? Norms are
  found from the graph's structure, never from numeric tolerances.
* Is this operand a **gate** (the output of a sigmoid, possibly ``1 - sigmoid``)? LSTM/GRU cells and
  squeeze-excitation blocks multiply a signal by a gate; the signal takes the relevance (Arras et al. 2017).
* Is this product **self-gating** (``x * g(x)`` with ``g`` element-wise: SiLU/Swish written out, GPT-2's
  tanh-GELU, Mish)? Then the product is an element-wise non-linearity of ``x`` and the identity rule applies.
* Is this operand produced by a **softmax** (attention weights)? CP-LRP treats those as constants.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Planner

# ops that keep "what it is" of a tensor: views, copies, casts, broadcasts
TRANSPARENT = frozenset({
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "ExpandBackward0", "CloneBackward0",
    "ToCopyBackward0", "AliasBackward0", "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "SqueezeBackward3", "SqueezeBackward4", "TransposeBackward0", "PermuteBackward0",
    "TBackward0", "RepeatBackward0", "ContiguousBackward0", "NativeDropoutBackward0",
})
# element-wise ops with one tensor operand and saved/scalar constants
ELEMENTWISE_UNARY = frozenset({
    "RsqrtBackward0", "SqrtBackward0", "ReciprocalBackward0", "PowBackward0", "PowBackward1", "ExpBackward0",
    "LogBackward0", "TanhBackward0", "SigmoidBackward0", "ReluBackward0", "GeluBackward0", "SiluBackward0",
    "NegBackward0", "AbsBackward0", "ClampBackward1", "ClampMinBackward0", "ClampMaxBackward0", "ErfBackward0",
    "SoftplusBackward0", "MishBackward0", "HardtanhBackward0", "EluBackward0", "LeakyReluBackward0",
    "HardswishBackward0", "HardsigmoidBackward0", "SinBackward0", "CosBackward0", "AddBackward1", "SubBackward1",
    "RsubBackward1", "MulBackward1", "DivBackward1", "ThresholdBackward0", "Expm1Backward0", "Log1pBackward0",
})
ELEMENTWISE_BINARY = frozenset({
    "AddBackward0", "SubBackward0", "RsubBackward0", "MulBackward0", "DivBackward0",
})
REDUCTIONS = frozenset({
    "MeanBackward0", "MeanBackward1", "SumBackward0", "SumBackward1", "VarBackward0", "VarBackward1",
    "StdBackward0", "StdBackward1", "LinalgVectorNormBackward0", "NormBackward0", "NormBackward1",
    "NormBackward2", "NormBackward3", "AmaxBackward0", "MaxBackward1", "LogsumexpBackward0", "VarMeanBackward0",
    "StdMeanBackward0",
})
GATES = frozenset({"SigmoidBackward0", "HardsigmoidBackward0"})
#: element-wise non-linearities used as activation functions (the activated operand of a gated MLP)
ACTIVATIONS = frozenset({
    "ReluBackward0", "GeluBackward0", "SiluBackward0", "MishBackward0", "TanhBackward0", "SigmoidBackward0",
    "SoftplusBackward0", "EluBackward0", "LeakyReluBackward0", "HardswishBackward0", "HardsigmoidBackward0",
    "HardtanhBackward0", "ThresholdBackward0",
})
SOFTMAX = frozenset({"SoftmaxBackward0", "SafeSoftmaxBackward0"})

_LIMIT = 48  # nodes explored per question; patterns are local


class Structure:
    """Plan-time structure queries, memoised per planner."""

    def __init__(self, planner: "Planner"):
        self.p = planner
        self.g = planner.graph

    def _producer(self, slot: int) -> int:
        return self.g.slot_node[slot]

    def _tensor_edges(self, i: int) -> list[int]:
        return [e for e in self.g.edges[i] if e >= 0]

    def is_normaliser(self, slot: int) -> bool:
        """``slot`` is computed from a reduction of activations through element-wise/scalar/view ops only: every
        path from it to an activation passes through a reduction (so ``x * rsqrt(mean(x²))``, a *normalised*
        tensor, is not a normaliser, while ``rsqrt(mean(x²) + ε)`` is)."""
        g = self.g
        stack = [slot]
        seen = set()
        found = False
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            if len(seen) > _LIMIT:
                return False
            if not self.p.active[s]:
                continue  # parameters and constants
            i = self._producer(s)
            t = g.types[i]
            if t in REDUCTIONS:
                found = True
                continue
            if t in TRANSPARENT or t in ELEMENTWISE_UNARY or t in ELEMENTWISE_BINARY:
                stack.extend(self._tensor_edges(i))
                continue
            return False  # an activation reached without a reduction
        return found

    def _produced_by(self, slot: int, targets: frozenset[str], through: frozenset[str] | tuple[str, ...],
                     steps: int) -> bool:
        """Whether ``slot`` comes from a node of a type in ``targets`` through a chain of single-input nodes
        whose types are transparent or in ``through``."""
        g = self.g
        s = slot
        for _ in range(steps):
            i = self._producer(s)
            t = g.types[i]
            if t in targets:
                return True
            if t not in TRANSPARENT and t not in through:
                return False
            edges = self._tensor_edges(i)
            if len(edges) != 1:
                return False
            s = edges[0]
        return False

    def is_gate(self, slot: int) -> bool:
        """``slot`` is ``sigmoid(...)`` or ``1 - sigmoid(...)`` (through views)."""
        return self._produced_by(slot, GATES, ("RsubBackward1", "NegBackward0"), 8)

    def from_softmax(self, slot: int) -> bool:
        """``slot`` is a softmax output (attention weights), possibly viewed, cast or dropped out."""
        return self._produced_by(slot, SOFTMAX, ("MulBackward1", "DivBackward1"), 12)

    def is_activation_output(self, slot: int) -> bool:
        """``slot`` is the output of an element-wise non-linearity (SiLU, GELU, ReLU, tanh, sigmoid..., or one
        written out as a self-gating product ``x * g(x)``), possibly viewed or cast: the gate of a gated MLP."""
        g = self.g
        s = slot
        for _ in range(8):
            i = self._producer(s)
            t = g.types[i]
            if t in ACTIVATIONS:
                return True
            if t == "MulBackward0":
                edges = self._tensor_edges(i)
                return len(edges) == 2 and self.self_gating_signal(edges[0], edges[1]) is not None
            if t in TRANSPARENT:
                edges = self._tensor_edges(i)
                if len(edges) != 1:
                    return False
                s = edges[0]
                continue
            return False
        return False

    def _linear_chain(self, slot: int) -> list[int]:
        """``slot`` and the slots it is a view / scalar multiple / cast of."""
        g = self.g
        chain = [slot]
        s = slot
        for _ in range(8):
            i = self._producer(s)
            t = g.types[i]
            if t in ("MulBackward1", "DivBackward1", "NegBackward0", "ToCopyBackward0", "CloneBackward0",
                     "AliasBackward0") or (t in ("MulBackward0", "DivBackward0")
                                           and len(self._tensor_edges(i)) == 1):
                edges = self._tensor_edges(i)
                if len(edges) != 1:
                    break
                s = edges[0]
                chain.append(s)
                continue
            break
        return chain

    def self_gating_signal(self, slot_a: int, slot_b: int) -> int | None:
        """For ``a * b``: return 0 if ``b`` is an element-wise function of ``a``'s source, 1 if ``a`` is one of
        ``b``'s, ``None`` otherwise."""
        for k, (sig, gate) in enumerate(((slot_a, slot_b), (slot_b, slot_a))):
            sources = set(self._linear_chain(sig))
            if self._elementwise_of(gate, sources):
                return k
        return None

    def _elementwise_of(self, slot: int, sources: set[int]) -> bool:
        g = self.g
        if slot in sources:
            return False
        stack = [slot]
        seen: set[int] = set()
        reached = False
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            if len(seen) > _LIMIT:
                return False
            if s in sources:
                reached = True
                continue
            i = self._producer(s)
            t = g.types[i]
            if t in ELEMENTWISE_UNARY or t in ELEMENTWISE_BINARY or t in ("ToCopyBackward0", "CloneBackward0"):
                stack.extend(self._tensor_edges(i))
                continue
            return False
        return reached


# -----------------------------------------------------------------------------------------------------------
# BatchNorm merging (Zennit's SequentialMergeBatchNorm, decided from the graph)
# -----------------------------------------------------------------------------------------------------------
#: autograd nodes of batch norm (eval mode keeps the running statistics as saved fields)
BATCHNORM = frozenset({"NativeBatchNormBackward0"})
#: linear ops whose output channel is the batch norm's channel dimension when its output is (N, C, ...)
_MERGEABLE_LINEAR = frozenset({"ConvolutionBackward0", "AddmmBackward0", "MmBackward0"})


class BatchNormMerges:
    """Which eval-mode batch norms are merged into the linear/conv op that produces their input.

    A ``NativeBatchNormBackward0`` node ``bn`` is merged into the node ``op`` that produced its input when

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
    from .. import graph as G
    training = G.saved(node, "training")
    return training is False and G.saved(node, "running_mean") is not None \
        and G.saved(node, "running_var") is not None


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
    for bn, t in enumerate(g.types):
        if t not in BATCHNORM:
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
        if g.types[op] not in _MERGEABLE_LINEAR or (g.n_out[op] or 1) != 1 or len(g.consumers[s]) != 1:
            continue
        spec = planner.specs[op]
        if spec is None:
            continue
        k = spec.kernel
        edges = g.edges[op]
        act = [p < len(edges) and edges[p] >= 0 and planner.active[edges[p]] for p in k.operands]
        if act[0] == act[1] or not act[0]:
            continue  # a product of two activations, or the weight as the first operand
        from .. import graph as G
        out_meta = G.output_meta(g.nodes[op])[0]
        if g.types[op] != "ConvolutionBackward0" and len(out_meta.shape) != 2:
            continue
        rule = op_gets_linear_rule(op)
        if rule is None:
            continue
        bn_of[op] = bn
    return BatchNormMerges(bn_of)
