"""Plan-time sites and compiled steps: what a rule binds to, and what the run loop calls.

At plan time the engine calls ``rule.bind(site)`` for every node that must run; the rule returns a :class:`Step`,
a callable holding everything that could be decided from the graph's structure, so that executing a plan is a
flat loop of step calls. A step maps the messages (:class:`~dynamiclrp.core.messages.Msg`) arriving at a node's
outputs to messages for its inputs, and reports to the ledger (:mod:`dynamiclrp.core.ledger`) what it sent where.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ValueUnavailableError
from . import ledger
from .graph import GraphView, saved
from .messages import UNKNOWN, Msg

if TYPE_CHECKING:  # pragma: no cover
    from .plan import Planner
    from .run import Run
    from .spec import OpSpec

Tensor = torch.Tensor


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
    def graph(self) -> GraphView:
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
        return saved(self.node, field_name)

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
    #: the op has a constant operand that is not an input of the node (a Python scalar autograd did not keep, as
    #: in ``1 - x``): its share is booked like that of an input that does not require grad
    implicit_constant = False

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
            except ValueUnavailableError:  # unmeasurable: book() derives it or reports it
                out.append(UNKNOWN)
        return out

    def constant_share_zero(self, run: "Run", outs: list[Msg | None]) -> bool:
        """Whether the relevance this node sends to inputs that do not require grad is provably zero."""
        return False

    #: ledger kind of the share of constant operands (``"padding"`` for a padding's fill value)
    constant_kind = "constant"


    def book(self, run: "Run", t_out: Any, t_ins: list[Any], outs: list[Msg | None]) -> list[Any]:
        """Book this node's sinks given the relevance that arrived (``t_out``) and what it sent on
        (:func:`dynamiclrp.core.ledger.settle`: conservative steps book only the share of constant inputs,
        non-conservative ones their residual under :attr:`sink_kind`). Returns the input totals."""
        return ledger.settle(self, run, t_out, t_ins, outs, self.conservative)

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
