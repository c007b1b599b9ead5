"""Building blocks shared by every rule: relevance messages, plan-time sites and compiled steps.

Relevance messages
------------------
Relevance travels along slots in one of two forms, and a message may carry both parts at once:

``g`` (gradient form)
    A tensor ``G`` with the shape of the slot's forward value ``v``; the relevance it stands for is ``v * G``.
    Every rule that is a *z-rule* (ε, γ, z⁺, α-β, the sum rule, routing, the identity rule, the uniform product
    rule, the AttnLRP softmax rule...) maps ``G`` to ``G`` without ever dividing by an activation. This is the
    fast path: on piecewise-linear graphs LRP-0 in this form *is* gradient × input.
``r`` (explicit form)
    The relevance tensor ``R`` itself. Seeds start in this form, and rules whose result is not proportional to
    the input (flat, w², z^B, the paper's magnitude splits) produce it.

Converting ``g`` to ``r`` multiplies by the slot's forward value, converting ``r`` to ``g`` divides by it; both
need the value, which the Promise System (:mod:`dynamiclrp.promises`) supplies when autograd did not save it.

A rule is a small object (``Epsilon(1e-6)``, ``Uniform()``...). At plan time the engine calls
``rule.bind(site)`` for every node, which returns a compiled :class:`Step`: a callable holding everything that
could be decided from the graph's structure, so that executing a plan is a flat loop of step calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .. import graph as G

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Run, Planner

Tensor = torch.Tensor


class _Unknown:
    """Marker for a relevance total that cannot be measured."""

    def __repr__(self) -> str:  # pragma: no cover
        return "UNKNOWN"


UNKNOWN = _Unknown()


class Msg:
    """Relevance arriving at one slot: a gradient-form part ``g`` and/or an explicit part ``r``."""

    __slots__ = ("g", "r")

    def __init__(self, g: Tensor | None = None, r: Tensor | None = None):
        self.g = g
        self.r = r

    def add(self, other: "Msg") -> None:
        """Accumulate ``other`` into this message (out of place, so no tensor shared elsewhere is mutated)."""
        if other.g is not None:
            self.g = other.g if self.g is None else self.g + other.g
        if other.r is not None:
            self.r = other.r if self.r is None else self.r + other.r

    def explicit(self, value: Tensor | None) -> Tensor | None:
        """The relevance this message stands for at a slot whose forward value is ``value``: ``g·value + r``."""
        out = None
        if self.g is not None:
            out = self.g * value
        if self.r is not None:
            out = self.r if out is None else out + self.r
        return out

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        def d(t):
            return None if t is None else tuple(t.shape)
        return f"Msg(g={d(self.g)}, r={d(self.r)})"


def gmsg(t: Tensor | None) -> Msg | None:
    return None if t is None else Msg(g=t)


def rmsg(t: Tensor | None) -> Msg | None:
    return None if t is None else Msg(r=t)


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 wherever ``den == 0`` (never NaN or inf from a zero denominator)."""
    zero = den == 0
    return torch.where(zero, torch.zeros((), dtype=num.dtype, device=num.device), num / torch.where(zero, 1, den))


def finite_sum(t: Tensor) -> Tensor:
    """``t.sum()`` ignoring non-finite products (``0 · inf`` of a masked ``-inf`` logit with zero relevance)."""
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0).sum() if not torch.isfinite(t).all() else t.sum()


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1`` (Zennit's convention); ``eps == 0`` returns ``z``."""
    if eps == 0:
        return z
    return torch.where(z >= 0, z + eps, z - eps)


@dataclass
class Site:
    """Everything a rule may look at while it compiles itself for one node (plan time only).

    Attributes
    ----------
    planner : Planner
        The plan under construction; gives access to the graph, structure queries and value recipes.
    index : int
        Node index in ``planner.graph``.
    spec : OpSpec
        The registry row of this node type.
    active : tuple of bool
        Per forward input: whether that input depends on an activation source (a requested non-parameter
        tensor or a data leaf). Inputs that do not (parameters, constants, parameter-only subgraphs) are treated
        as constants by product rules. ``None`` edges are never active.
    """

    planner: "Planner"
    index: int
    spec: "OpSpec"
    active: tuple[bool, ...]

    @property
    def graph(self) -> G.GraphView:
        return self.planner.graph

    @property
    def node(self) -> Any:
        return self.planner.graph.nodes[self.index]

    @property
    def type(self) -> str:
        return self.planner.graph.types[self.index]

    @property
    def edges(self) -> tuple[int, ...]:
        return self.planner.graph.edges[self.index]

    def saved(self, field_name: str) -> Any:
        return G.saved(self.node, field_name)

    def describe(self) -> str:
        return self.planner.graph.describe(self.index)


class Step:
    """A rule compiled for one node. Steps are immutable after construction and hold no autograd node or
    tensor (only indices and structural facts), so a plan is reusable for every graph with the same signature;
    they read saved tensors through ``run.graph.nodes[self.index]`` when called. Subclasses implement :meth:`g`
    and, where meaningful, :meth:`r`.

    ``__call__`` receives one :class:`Msg` (or ``None``) per forward output of the node and returns one
    :class:`Msg` (or ``None``) per forward input. The default implementation converts parts the subclass does
    not handle: an ``r`` part is turned into ``g`` by dividing by the output value (relevance where the value is
    exactly 0 cannot be represented and is booked in the ledger as a conversion loss).
    """

    __slots__ = ("index", "n_in", "out_slots", "in_edges")
    handles_r = False  # subclasses that implement r() natively set this

    def __init__(self, site: Site):
        self.index = site.index
        self.n_in = len(site.edges)
        self.out_slots = tuple(site.graph.slots_of(site.index))
        self.in_edges = site.edges

    # -- to override ---------------------------------------------------------------------------------------
    #: the rule conserves relevance exactly (up to constants' shares); otherwise its residual is a sink
    conservative = True
    #: ledger kind of the residual of a non-conservative rule
    sink_kind = "rule"

    def g(self, run: "Run", gs: list[Tensor | None]) -> list[Msg | None]:
        raise NotImplementedError

    def r(self, run: "Run", rs: list[Tensor | None]) -> list[Msg | None]:
        raise NotImplementedError

    # -- ledger (only used by explain(..., ledger=True)) -----------------------------------------------------
    def input_totals(self, run: "Run", ins: list[Msg | None]) -> list[Any]:
        """Relevance total sent to each input: a 0-dim tensor, ``None`` (nothing sent) or :data:`UNKNOWN`
        (the input's forward value cannot be recovered to measure it)."""
        out: list[Any] = []
        for e, m in zip(self.in_edges, ins):
            if e < 0 or m is None:
                out.append(None)
                continue
            try:
                out.append(run.total(e, m))
            except Exception:  # noqa: BLE001 - unmeasurable, handled by book()
                out.append(UNKNOWN)
        return out

    def constant_share_zero(self, run: "Run", outs: list[Msg | None]) -> bool:
        """Whether the relevance this node sends to inputs that do not require grad is provably zero."""
        return False

    def book(self, run: "Run", t_out: Any, t_ins: list[Any], outs: list[Msg | None]) -> list[Any]:
        """Book this node's sinks given the relevance that arrived (``t_out``) and what it sent on.

        Conservative rules book only the share of constant inputs; an input total that could not be measured
        is derived from exact conservation when it is the only unknown. Non-conservative rules book their
        residual under :attr:`sink_kind`. Returns the (possibly completed) input totals.
        """
        return self._book(run, t_out, t_ins, outs, self.conservative)

    def _book(self, run: "Run", t_out: Any, t_ins: list[Any], outs: list[Msg | None],
              conservative: bool) -> list[Any]:
        where = run.graph.describe(self.index)
        unknown = [k for k, t in enumerate(t_ins) if t is UNKNOWN]
        known = None
        for t in t_ins:
            if isinstance(t, torch.Tensor):
                known = t if known is None else known + t
        has_const = any(e < 0 for e in self.in_edges) and not self.constant_share_zero(run, outs)
        carried = run.carried  # upstream constants whose shares are included in t_out (see below)
        label = where if not carried else f"{where} (incl. constants of {', '.join(carried)})"
        if t_out is UNKNOWN:
            if unknown or has_const or carried or not conservative:
                run.ledger.unmeasurable(where, "the forward value of this node's output is not in the graph")
            return t_ins
        if conservative:
            if not unknown:
                if has_const or carried:
                    run.ledger.book("constant", label, t_out if known is None else t_out - known)
            elif len(unknown) == 1:
                # the one input we cannot measure gets what exact conservation leaves; if this node also sent
                # relevance to constants, that share travels inside the derived total and is booked, measured,
                # at the next node whose inputs are all known (the constants are named there)
                t_ins = list(t_ins)
                t_ins[unknown[0]] = t_out if known is None else t_out - known
                run.ledger.derived += 1
                if has_const or carried:
                    run.carry_out[unknown[0]] = list(carried) + ([where] if has_const else [])
            else:
                run.ledger.unmeasurable(where, "several inputs whose forward values are not in the graph")
            return t_ins
        if unknown:
            run.ledger.unmeasurable(where, "an input whose forward value is not in the graph")
            return t_ins
        run.ledger.book(self.sink_kind, label, t_out if known is None else t_out - known)
        return t_ins

    # -- driver ---------------------------------------------------------------------------------------------
    def __call__(self, run: "Run", outs: list[Msg | None]) -> list[Msg | None]:
        gs: list[Tensor | None] = [None if m is None else m.g for m in outs]
        rs: list[Tensor | None] = [None if m is None else m.r for m in outs]
        has_r = any(t is not None for t in rs)
        if has_r and not self.handles_r:
            for k, t in enumerate(rs):
                if t is None:
                    continue
                conv = run.r_to_g(self.out_slots[k], t)
                gs[k] = conv if gs[k] is None else gs[k] + conv
            has_r = False
        has_g = any(t is not None for t in gs)
        res_g = self.g(run, gs) if has_g else None
        res_r = self.r(run, rs) if has_r else None
        if res_r is None:
            return res_g if res_g is not None else [None] * self.n_in
        if res_g is None:
            return res_r
        merged: list[Msg | None] = []
        for a, b in zip(res_g, res_r):
            if a is None:
                merged.append(b)
            elif b is None:
                merged.append(a)
            else:
                m = Msg(a.g, a.r)
                m.add(b)
                merged.append(m)
        return merged


class Rule:
    """Base class of relevance rules. A rule is immutable configuration; :meth:`bind` compiles it for a node.

    Subclasses state which op families they apply to in ``families`` (used to validate rule sets).
    """

    families: frozenset[str] = frozenset()

    def bind(self, site: Site) -> Step:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted((k, repr(v)) for k, v in vars(self).items()))))


# -----------------------------------------------------------------------------------------------------------
# Op specification (one registry row)
# -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpSpec:
    """One row of the registry: how dynamiclrp understands one autograd node type.

    Attributes
    ----------
    family : str
        Which entry of a rule set handles the node (``"linear"``, ``"add"``, ``"routing"``...). Kernels whose
        family depends on the graph (a matmul of two activations is a ``"matmul"``, of an activation and a
        weight a ``"linear"``) provide ``family_of``.
    kernel : Any
        Op semantics the rules need: forward functions, saved-field adapters, Jacobian-transpose products.
    results : tuple
        ``(output number, saved field)`` pairs: forward outputs autograd saved (Arg Nodes by construction).
    inputs_saved : tuple
        ``(input position, saved field)`` pairs: forward inputs autograd saved for this node.
    rebuild : callable or None
        ``rebuild(node, nr) -> tensor``: output ``nr`` recomputed from the node's own saved tensors (an Arg
        Node). It may return ``None`` when a needed field was not saved for this particular node.
    replay : callable or None
        ``replay(node, input_values, nr) -> tensor``: output ``nr`` recomputed from the values of the node's
        inputs (the forward closure of a promise branch step, or the op of a promise-generating node).
        ``replay_inputs`` lists the input positions it needs (default: all of them, so an input that does not
        require grad — a constant autograd did not keep — makes the replay impossible), or is a callable
        ``(node, edges) -> positions`` for ops that read some operands from saved fields.
    static_fields : tuple of str
        Saved non-tensor fields that rules or recipes read *while planning* (e.g. whether a batch norm is in
        training mode). They are part of the graph signature, so a cached plan is never reused for a graph
        that differs in them.
    selection : bool
        Every output element is a copy of one input element or a constant (views, indexing, gather, cat, max
        with indices, max pooling...): where the node's backward routes something to an input, the input's
        value equals the output's. The Promise System recovers values on the support through such nodes.
    """

    family: str
    kernel: Any = None
    results: tuple[tuple[int, str], ...] = ()
    inputs_saved: tuple[tuple[int, str], ...] = ()
    rebuild: Callable[[Any, int], Tensor | None] | None = None
    replay: Callable[[Any, Sequence[Tensor | None], int], Tensor] | None = None
    replay_inputs: tuple[int, ...] | Callable[[Any, tuple[int, ...]], tuple[int, ...]] | None = None
    family_of: Callable[[Site], str] | None = field(default=None, compare=False)
    static_fields: tuple[str, ...] = ()
    selection: bool = False
