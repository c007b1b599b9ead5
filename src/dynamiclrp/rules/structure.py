"""Structural questions about the graph that product rules ask at plan time.

* Is this operand a **normaliser** (a statistic of the activations, e.g. ``rsqrt(mean(x²) + eps)``)? Norms are
  found from the graph's structure, never from numeric tolerances.
* Is this operand a **gate** (the output of a sigmoid, possibly ``1 - sigmoid``)? LSTM/GRU cells and
  squeeze-excitation blocks multiply a signal by a gate; the signal takes the relevance (Arras et al. 2017).
* Is this product **self-gating** (``x * g(x)`` with ``g`` element-wise: SiLU/Swish written out, GPT-2's
  tanh-GELU, Mish)? Then the product is an element-wise non-linearity of ``x`` and the identity rule applies.
* Is this operand produced by a **softmax** (attention weights)? CP-LRP treats those as constants.
* Is this subtraction a **stabilising shift** (``exp(x − max)``, the exp-normalisation trick of softmax, WKV
  kernels, GAT's edge softmax)? The maximum is there for numerical range only; the sum rule holds it constant.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..core.graph import saved
from ..ops.elementwise import NegKernel

if TYPE_CHECKING:  # pragma: no cover
    from ..core.plan import Planner
    from ..core.spec import OpSpec


_LIMIT = 48  # nodes explored per question; patterns are local

#: maxima: element-wise maximum, max/amax reductions, a logsumexp (a smooth maximum)
_MAXIMA = frozenset({"MaximumBackward0", "FmaxBackward0", "MaxBackward0", "MaxBackward1", "AmaxBackward0",
                     "LogsumexpBackward0"})


def _scalar_product(spec: "OpSpec") -> bool:
    """``x * c``, ``x / c`` with a scalar ``c``, or ``-x``."""
    return spec.family == "product" and spec.elementwise == "unary"


def _scalar_shift(spec: "OpSpec") -> bool:
    """``x + c``, ``x - c``, ``c - x`` with a scalar ``c``, or ``-x`` (what turns ``σ`` into ``1 − σ``)."""
    return (spec.family == "add" and spec.elementwise == "unary") or isinstance(spec.kernel, NegKernel)


class Structure:
    """Plan-time structure queries over the registry rows' traits, memoised per planner."""

    def __init__(self, planner: "Planner"):
        self.p = planner
        self.g = planner.graph

    def _spec(self, slot: int) -> "OpSpec | None":
        return self.p.specs[self.g.slot_node[slot]]

    def _tensor_edges(self, i: int) -> list[int]:
        return [e for e in self.g.edges[i] if e >= 0]

    def is_normaliser(self, slot: int) -> bool:
        """``slot`` is computed from a reduction of activations through element-wise/scalar/view ops only: every
        path from it to an activation passes through a reduction (so ``x * rsqrt(mean(x²))``, a *normalised*
        tensor, is not a normaliser, while ``rsqrt(mean(x²) + ε)`` is)."""
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
            spec = self._spec(s)
            if spec is not None and spec.reduction:
                found = True
                continue
            if spec is not None and (spec.view or spec.elementwise):
                stack.extend(self._tensor_edges(self.g.slot_node[s]))
                continue
            return False  # an activation reached without a reduction
        return found

    def _produced_by(self, slot: int, target: Callable[["OpSpec"], bool], through: Callable[["OpSpec"], bool],
                     steps: int) -> bool:
        """Whether ``slot`` comes from a node whose row satisfies ``target`` through a chain of single-input
        views or nodes satisfying ``through``."""
        s = slot
        for _ in range(steps):
            spec = self._spec(s)
            if spec is None:
                return False
            if target(spec):
                return True
            if not spec.view and not through(spec):
                return False
            edges = self._tensor_edges(self.g.slot_node[s])
            if len(edges) != 1:
                return False
            s = edges[0]
        return False

    def is_nonnegative(self, slot: int) -> bool:
        """``slot`` is ``>= 0`` by construction: produced by a non-negative op (ReLU, sigmoid, softmax) through
        views, pooling and selections (every input of those non-negative too). Decided from the rows' traits, so
        a rule can take a non-negative input's fast path without looking at the values."""
        stack = [slot]
        seen: set[int] = set()
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            if len(seen) > _LIMIT:
                return False
            spec = self._spec(s)
            if spec is None:
                return False
            if spec.nonnegative:
                continue
            if not (spec.view or spec.keeps_sign):
                return False
            edges = self._tensor_edges(self.g.slot_node[s])
            if not edges:
                return False
            stack.extend(edges)
        return True

    def is_gate(self, slot: int) -> bool:
        """``slot`` is ``sigmoid(...)`` or ``1 - sigmoid(...)`` (through views)."""
        return self._produced_by(slot, lambda spec: spec.gate, _scalar_shift, 8)

    def from_softmax(self, slot: int) -> bool:
        """``slot`` is a softmax output (attention weights), possibly viewed, cast, scaled or dropped out."""
        return self._produced_by(slot, lambda spec: spec.family == "softmax" and not getattr(spec.kernel, "log", True),
                                 _scalar_product, 12)

    def is_activation_output(self, slot: int) -> bool:
        """``slot`` is the output of an element-wise non-linearity (SiLU, GELU, ReLU, tanh, sigmoid..., or one
        written out as a self-gating product ``x * g(x)``), possibly viewed or cast: the gate of a gated MLP."""
        s = slot
        for _ in range(8):
            spec = self._spec(s)
            if spec is None:
                return False
            i = self.g.slot_node[s]
            if spec.activation:
                return True
            if spec.family == "product" and spec.elementwise == "binary" and not spec.kernel.divide:
                edges = self._tensor_edges(i)
                return len(edges) == 2 and self.self_gating_signal(edges[0], edges[1]) is not None
            if spec.view:
                edges = self._tensor_edges(i)
                if len(edges) != 1:
                    return False
                s = edges[0]
                continue
            return False
        return False

    def _linear_chain(self, slot: int) -> list[int]:
        """``slot`` and the slots it is a copy / scalar multiple / cast of."""
        chain = [slot]
        s = slot
        for _ in range(8):
            spec = self._spec(s)
            i = self.g.slot_node[s]
            edges = self._tensor_edges(i)
            if spec is not None and len(edges) == 1 and (
                    spec.reshape or (spec.family == "product" and spec.elementwise is not None)):
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
            spec = self._spec(s)
            if spec is not None and (spec.elementwise or spec.reshape):
                stack.extend(self._tensor_edges(self.g.slot_node[s]))
                continue
            return False
        return reached

    # -- the exp-normalisation trick ---------------------------------------------------------------------------
    def maximum_of(self, slot: int) -> int | None:
        """The node computing a maximum of activations (element-wise ``maximum``, ``max``/``amax``, a scatter
        ``amax``, a ``logsumexp``) that ``slot`` is, possibly viewed, expanded or indexed (``m[index]`` of a
        per-node maximum); ``None`` if it is not one."""
        s = slot
        for _ in range(12):
            i = self.g.slot_node[s]
            t = self.g.types[i]
            if t in _MAXIMA:
                return i
            spec = self.p.specs[i]
            if spec is None:
                return None
            if t == "ScatterReduceBackward0":
                return i if saved(self.g.nodes[i], "reduce") == "amax" else None
            edges = self._tensor_edges(i)
            if (spec.view or spec.selection) and len(edges) == 1:
                s = edges[0]
                continue
            return None
        return None

    def stabilising_shift(self, i: int) -> bool:
        """Node ``i`` computes ``x − m`` with ``m`` a maximum (and ``x`` not one), and its output feeds only
        exponentials (through views): the exp-normalisation trick, where ``m`` keeps ``exp`` in range and cancels
        in the normalised result (softmax is shift-invariant)."""
        if self.g.types[i] != "SubBackward0":
            return False
        edges = self.g.edges[i]
        if len(edges) != 2 or min(edges) < 0 or not self.p.active[edges[0]]:
            return False
        m = self.maximum_of(edges[1])
        if m is None:
            return False
        # x − max(x, ...) (a running maximum minus the maximum it enters), or x − max(...) with x no maximum itself
        if self.maximum_of(edges[0]) is not None and edges[0] not in self.g.edges[m]:
            return False
        return self._feeds_only_exp(self.g.slot_base[i])

    def _feeds_only_exp(self, slot: int) -> bool:
        stack, seen, found = [slot], set(), False
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            if len(seen) > _LIMIT:
                return False
            for c, _pos in self.g.consumers[s]:
                t = self.g.types[c]
                spec = self.p.specs[c]
                if t == "ExpBackward0":
                    found = True
                elif spec is not None and spec.view and len(self._tensor_edges(c)) == 1:
                    stack.extend(self.g.slots_of(c))
                else:
                    return False
        return found

def structure_of(planner: "Planner") -> Structure:
    """The planner's :class:`Structure` (one per plan, memoised in ``planner.analyses``)."""
    st = planner.analyses.get("structure")
    if st is None:
        st = Structure(planner)
        planner.analyses["structure"] = st
    return st
