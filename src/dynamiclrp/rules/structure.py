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

from typing import TYPE_CHECKING

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
        """``slot`` is computed from a reduction of activations through element-wise/scalar/view ops only."""
        g = self.g
        stack = [slot]
        seen = set()
        while stack and len(seen) < _LIMIT:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            i = self._producer(s)
            t = g.types[i]
            if t in REDUCTIONS:
                if any(self.p.active[e] for e in self._tensor_edges(i)):
                    return True
                continue
            if t in TRANSPARENT or t in ELEMENTWISE_UNARY or t in ELEMENTWISE_BINARY:
                stack.extend(self._tensor_edges(i))
        return False

    def is_gate(self, slot: int) -> bool:
        """``slot`` is ``sigmoid(...)`` or ``1 - sigmoid(...)`` (through views)."""
        g = self.g
        s = slot
        for _ in range(8):
            i = self._producer(s)
            t = g.types[i]
            if t in GATES:
                return True
            if t in TRANSPARENT or t in ("RsubBackward1", "NegBackward0"):
                edges = self._tensor_edges(i)
                if len(edges) != 1:
                    return False
                s = edges[0]
                continue
            return False
        return False

    def from_softmax(self, slot: int) -> bool:
        """``slot`` is a softmax output (attention weights), possibly viewed, cast or dropped out."""
        g = self.g
        s = slot
        for _ in range(12):
            i = self._producer(s)
            t = g.types[i]
            if t in SOFTMAX:
                return True
            if t in TRANSPARENT or t in ("MulBackward1", "DivBackward1"):
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
