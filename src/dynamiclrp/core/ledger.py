"""The ledger: where every unit of seed relevance ended, and the observer that keeps it during a run.

With ``explain(..., ledger=True)`` the run propagates through the whole graph, and after each step the
:class:`LedgerObserver` compares the relevance that arrived at the node (reported by its consumers, or measured
from the output's value) with what the step sent to each input (``Step.input_totals``, measured from the inputs'
values). Conservative rules book only the share of constant inputs; an input total that cannot be measured is
derived from exact conservation when it is the only unknown, and a constant share that cannot be measured where it
leaves travels inside that derived total and is booked, measured, at the next node whose inputs are all known.
Non-conservative rules book their residual under their sink kind. So ``unaccounted = seed − inputs − sinks`` ≈ 0
checks the rules' claims. The propagation loop itself knows nothing of this: it calls the observer's hooks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ValueUnavailableError
from .messages import UNKNOWN, Msg

if TYPE_CHECKING:  # pragma: no cover
    from .run import Run
    from .step import Step

Tensor = torch.Tensor


#: Sink categories, in the order ledgers are printed.
SINK_KINDS = {
    "bias": "bias terms of linear, convolution and normalisation ops (the ε rule's bias sink)",
    "leaf": "leaves that were not requested: parameters, buffers that require grad, unrequested inputs",
    "constant": "operands that do not require grad (masks, scalars, frozen tensors, masked_fill's fill value)",
    "padding": "relevance sent to the border of a constant padding (F.pad, ZeroPad2d): the fill value's share",
    "stabilizer": "the ε stabilizer of z-rules (relevance absorbed by z + ε·sign(z))",
    "rule": "rules that do not conserve by design (softmax rule, identity rule at a zero input, γ/α-β...)",
    "conversion": "explicit relevance on a zero activation, which gradient form cannot carry",
    "condition": "relevance outside a concept condition's units, or bypassing a conditioned tensor (CRP)",
}


@dataclass(frozen=True)
class Sink:
    """One place where relevance left the propagation without reaching a requested input.

    Attributes
    ----------
    kind : str
        One of :data:`SINK_KINDS`.
    where : str
        The node (``"AddmmBackward0#7"``) or parameter name where it happened.
    total : float
        Signed relevance that ended there.
    note : str
        What the sink is, in words.
    """

    kind: str
    where: str
    total: float
    note: str = ""


def _read(tensors: list[torch.Tensor]) -> list[float]:
    """The values of 0-dim tensors as floats, in order: one stack and one host transfer per device."""
    by_device: dict[torch.device, list[int]] = {}
    for k, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(k)
    values = [0.0] * len(tensors)
    for ks in by_device.values():
        for k, v in zip(ks, torch.stack([tensors[k].detach().double().reshape(()) for k in ks]).tolist()):
            values[k] = v
    return values


class Ledger:
    """Where every unit of seed relevance ended: requested inputs or named sinks.

    ``unaccounted = seed_total − Σ inputs − Σ sinks`` is ≈ 0 for a correct pass (float rounding only).
    Totals are accumulated as 0-dim tensors during the pass and read once at the end.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[str, str, torch.Tensor, str]] = []
        self._inputs: list[tuple[str, torch.Tensor]] = []
        self._seed: torch.Tensor | None = None
        self.unmeasured: list[str] = []
        #: groups of input totals known only together (:class:`Joint`)
        self.groups: dict[int, Group] = {}
        self.derived = 0  # input totals derived from exact conservation instead of measured from values
        self.seed_total: float = 0.0
        self.inputs: dict[str, float] = {}
        self.sinks: list[Sink] = []
        self.unaccounted: float = 0.0

    # -- booking (during the pass) -------------------------------------------------------------------------
    def book(self, kind: str, where: str, total: torch.Tensor | float, note: str = "") -> None:
        if kind not in SINK_KINDS:  # pragma: no cover - programming error
            raise ValueError(f"unknown sink kind {kind!r}")
        if not isinstance(total, torch.Tensor):
            total = torch.tensor(float(total))
        self._pending.append((kind, where, total.detach(), note))

    def unmeasurable(self, where: str, why: str) -> None:
        """Record relevance whose amount cannot be measured (its forward value is not in the graph)."""
        self.unmeasured.append(f"{where}: {why}")

    def requested(self, name: str, total: torch.Tensor) -> None:
        self._inputs.append((name, total.detach()))

    def seed(self, total: torch.Tensor) -> None:
        self._seed = total.detach() if isinstance(total, torch.Tensor) else torch.tensor(float(total))

    def pending(self) -> list[tuple[str, str, torch.Tensor, str]]:
        """The sinks booked so far and not yet read: ``(kind, where, total, note)`` with ``total`` a 0-dim tensor on
        the device it was measured on (an inner pass hands them to the outer ledger without reading them)."""
        return list(self._pending)

    def finish(self) -> None:
        """Read every total once (one host transfer per device) and compute :attr:`unaccounted`."""
        tensors = [t for _, _, t, _ in self._pending] + [t for _, t in self._inputs]
        values = _read(tensors)
        n = len(self._pending)
        merged: dict[tuple[str, str], list[Any]] = {}
        for (kind, where, _, note), v in zip(self._pending, values[:n]):
            key = (kind, where)
            if key in merged:
                merged[key][0] += v
            else:
                merged[key] = [v, note]
        self.sinks = [Sink(k, w, v, note) for (k, w), (v, note) in merged.items()]
        self.inputs = {}
        for (name, _), v in zip(self._inputs, values[n:]):
            self.inputs[name] = self.inputs.get(name, 0.0) + v
        self.seed_total = _read([self._seed])[0] if self._seed is not None else 0.0
        self.unaccounted = self.seed_total - sum(self.inputs.values()) - sum(s.total for s in self.sinks)
        self._pending.clear()
        self._inputs.clear()

    # -- reading ---------------------------------------------------------------------------------------------
    @property
    def sink_total(self) -> float:
        return sum(s.total for s in self.sinks)

    def by_kind(self) -> dict[str, float]:
        """Total relevance per sink kind."""
        out: dict[str, float] = {}
        for s in self.sinks:
            out[s.kind] = out.get(s.kind, 0.0) + s.total
        return out

    def rows(self) -> list[tuple[str, str, float]]:
        """``(category, name, total)`` rows: inputs first, then sinks grouped by kind, largest first."""
        rows = [("input", name, v) for name, v in self.inputs.items()]
        order = {k: i for i, k in enumerate(SINK_KINDS)}
        for s in sorted(self.sinks, key=lambda s: (order.get(s.kind, 99), -abs(s.total))):
            rows.append((s.kind, s.where, s.total))
        return rows

    def summary(self, top: int = 8, zeros: bool = False) -> str:
        """A short human-readable ledger: inputs, sinks per kind (with the largest places), unaccounted.

        Parameters
        ----------
        top : int
            Places listed per sink kind.
        zeros : bool
            Also list places whose total is exactly 0 (e.g. zero-valued biases); hidden by default.
        """
        seed = self.seed_total
        lines = [f"seed relevance          {seed: .6g}"]

        def pct(v: float) -> str:
            return f"{100 * v / seed:7.2f} %" if seed else ""

        for name, v in self.inputs.items():
            lines.append(f"  -> {name:<19} {v: .6g}  {pct(v)}")
        for kind, v in self.by_kind().items():
            lines.append(f"  -> sink: {kind:<13} {v: .6g}  {pct(v)}")
            biggest = sorted((s for s in self.sinks if s.kind == kind and (zeros or s.total != 0)),
                             key=lambda s: -abs(s.total))[:top]
            for s in biggest:
                lines.append(f"       {s.where:<26} {s.total: .4g}")
        lines.append(f"unaccounted             {self.unaccounted: .3g}")
        if self.unmeasured:
            lines.append("not measurable: " + "; ".join(self.unmeasured))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Ledger(seed={self.seed_total:.6g}, inputs={sum(self.inputs.values()):.6g}, "
                f"sinks={self.sink_total:.6g}, unaccounted={self.unaccounted:.3g})")


class Group:
    """A group of relevance totals known only together (see :class:`Joint`): what remains of their sum, how many
    shares are still travelling, and the nodes whose constants' shares the remainder holds."""

    __slots__ = ("total", "size", "constants")

    def __init__(self, total: Tensor, size: int):
        self.total = total
        self.size = size
        self.constants: list[str] = []


class Joint:
    """Relevance totals known only together: the inputs of a conservative node that could not be measured one by
    one (in-place writes into slices of the same tensor, as chunked attention and circular padding do, or a
    ``cat`` of ``where``/``masked_fill`` outputs whose fill values autograd did not keep). Each such input carries
    a share of a :class:`Group` whose sum is known. The shares travel through single-input conservative nodes;
    where all of a group's shares meet again in one slot (the paths from one tensor reconverge) that slot's total
    is known exactly; where a share reaches a node whose inputs are all measured, what it carried beyond them is
    that node's constants' share, and once every share has ended so, the constants' shares of the whole group are
    booked together.

    ``parts`` maps group ids to the number of shares this total holds; ``known`` is the measured rest (or None).
    """

    __slots__ = ("parts", "known")

    def __init__(self, parts: dict[int, int], known: Tensor | None = None):
        self.parts = parts
        self.known = known

    def plus(self, other: Any) -> "Joint":
        parts = dict(self.parts)
        known = self.known
        if isinstance(other, Joint):
            for g, n in other.parts.items():
                parts[g] = parts.get(g, 0) + n
            other = other.known
        if other is not None:
            known = other if known is None else known + other
        return Joint(parts, known)

    def resolve(self, groups: dict[int, Group]) -> Tensor | None:
        """The total, when this holds every remaining share of each of its groups; otherwise ``None``."""
        total = self.known
        for g, n in self.parts.items():
            grp = groups.get(g)
            if grp is None or grp.size != n or grp.constants:
                return None
            total = grp.total if total is None else total + grp.total
        return total

    def single(self) -> tuple[int, int] | None:
        """``(group, shares)`` when this is nothing but shares of one group."""
        if len(self.parts) != 1 or self.known is not None:
            return None
        return next(iter(self.parts.items()))


def _share_ends(book: "Ledger", joint: Joint, value: Tensor, constants: str | None = None) -> bool:
    """A share of a group ended with the measured total ``value`` (beyond which it held the shares of the constants
    named ``constants``): the group's rest shrinks, and when no share is left the constants' shares are booked.
    Returns whether the share could be accounted for this way."""
    got = joint.single()
    if got is None:
        return False
    grp = book.groups[got[0]]
    grp.total = grp.total - value
    grp.size -= got[1]
    if constants is not None:
        grp.constants.append(constants)
    if grp.size == 0 and grp.constants:
        book.book("constant", " + ".join(dict.fromkeys(grp.constants)), grp.total,
                  "constants whose shares were measured together")
    return True


def settle(step: "Step", run: "Run", t_out: Any, t_ins: list[Any], outs: list[Msg | None],
           conservative: bool) -> list[Any]:
    """Book one step's sinks given the relevance that arrived (``t_out``) and what it sent on (``t_ins``).

    Conservative steps book only the share of constant inputs; an input total that could not be measured is
    derived from exact conservation when it is the only unknown. Non-conservative steps book their residual under
    their ``sink_kind``. Returns the (possibly completed) input totals.
    """
    book = run.ledger
    assert book is not None
    where = run.planner.label(step.index)
    unknown = [k for k, t in enumerate(t_ins) if t is UNKNOWN]
    known = None
    for t in t_ins:
        if isinstance(t, torch.Tensor):
            known = t if known is None else known + t
    has_const = ((step.implicit_constant or any(e < 0 for e in step.in_edges))
                 and not step.constant_share_zero(run, outs))
    carried = run.carried  # upstream constants whose shares are included in t_out (see below)
    label = where if not carried else f"{where} (incl. constants of {', '.join(dict.fromkeys(carried))})"
    if isinstance(t_out, Joint):
        if conservative and len(unknown) == 1 and known is None:
            t_ins = list(t_ins)
            t_ins[unknown[0]] = t_out  # a share of a group passes through (a view, a slice...)
            if has_const or carried:
                run.carry_out[unknown[0]] = list(carried) + ([where] if has_const else [])
            return t_ins
        if conservative and not unknown and _share_ends(book, t_out, torch.zeros(()) if known is None else known,
                                                          label if has_const or carried else None):
            return t_ins
        t_out = UNKNOWN
    if t_out is UNKNOWN:
        if unknown or has_const or carried or not conservative:
            book.unmeasurable(where, "the forward value of this node's output is not in the graph")
        return t_ins
    if conservative:
        if not unknown:
            if has_const or carried:
                book.book(step.constant_kind if not carried else "constant", label,
                          t_out if known is None else t_out - known)
        elif len(unknown) == 1:
            # the one input we cannot measure gets what exact conservation leaves; if this node also sent
            # relevance to constants, that share travels inside the derived total and is booked, measured,
            # at the next node whose inputs are all known (the constants are named there)
            t_ins = list(t_ins)
            t_ins[unknown[0]] = t_out if known is None else t_out - known
            book.derived += 1
            if has_const or carried:
                run.carry_out[unknown[0]] = list(carried) + ([where] if has_const else [])
        else:
            # several inputs we cannot measure: their sum is what conservation leaves, and each carries a share
            # of it until the paths meet again (Joint); constants' shares ride along as with one unknown input
            gid = len(book.groups)
            book.groups[gid] = Group(t_out if known is None else t_out - known, len(unknown))
            t_ins = list(t_ins)
            for k in unknown:
                t_ins[k] = Joint({gid: 1})
                if has_const or carried:
                    run.carry_out[k] = list(carried) + ([where] if has_const else [])
            book.derived += 1
        return t_ins
    if unknown:
        book.unmeasurable(where, "an input whose forward value is not in the graph")
        return t_ins
    book.book(step.sink_kind, label, t_out if known is None else t_out - known)
    return t_ins


class LedgerObserver:
    """Keeps the ledger during a run: the relevance total delivered into every slot so far, and the constants
    whose shares ride inside a derived total. The run loop calls :meth:`seeded`, :meth:`skipped`,
    :meth:`before` and :meth:`after`."""

    def __init__(self, run: "Run"):
        self.run = run
        self.arrived: dict[int, Any] = {}  # slot -> relevance total delivered into it so far
        self.carry: dict[int, list[str]] = {}  # slot -> constants whose shares its arrived total includes

    def seeded(self, slot: int, seed: Tensor) -> None:
        prev = self.arrived.get(slot)
        self.arrived[slot] = seed.sum() if prev is None else prev + seed.sum()

    def conditioned(self, slot: int, before: Msg | None, after: Msg | None) -> None:
        """A concept condition masked the relevance at ``slot``: book what it removed."""
        run = self.run
        book = run.ledger
        if before is None or book is None:
            return
        node = run.graph.slot_node[slot]
        t = self.arrived.pop(slot, None)
        try:
            if t is None or t is UNKNOWN:
                t = run.total(slot, before)
            kept = run.total(slot, after)
        except ValueUnavailableError:
            book.unmeasurable(run.planner.label(node), "relevance removed by a concept condition (the "
                                    "conditioned tensor's value is not in the graph)")
            self.arrived[slot] = UNKNOWN
            return
        book.book("condition", run.planner.label(node), t - kept,
                        "relevance outside the condition's units (CRP mask)")
        self.arrived[slot] = kept

    def dropped(self, slot: int, msg: Msg) -> None:
        """Relevance at ``slot`` that bypasses a conditioned tensor, dropped (``exclude_parallel``)."""
        run = self.run
        book = run.ledger
        if book is None:
            return
        node = run.graph.slot_node[slot]
        t = self.arrived.pop(slot, None)
        self.carry.pop(slot, None)
        try:
            if t is None or t is UNKNOWN:
                t = run.total(slot, msg)
        except ValueUnavailableError:
            book.unmeasurable(run.planner.label(node), "relevance bypassing a conditioned tensor")
            return
        book.book("condition", f"{run.planner.label(node)} (parallel)", t,
                        "relevance that bypasses a conditioned tensor (exclude_parallel)")

    def skipped(self, base: int, k: int) -> None:
        for j in range(k):
            self.arrived.pop(base + j, None)

    def before(self, base: int, k: int, outs: list[Msg | None]) -> Any:
        """The relevance that arrived at a node (its consumers' totals, measured from the output's value where a
        consumer could not report one); resets the step's local bookings."""
        run = self.run
        total = None
        book = run.ledger
        assert book is not None
        groups = book.groups
        for j in range(k):
            m = outs[j]
            t = self.arrived.pop(base + j, None)
            if m is None:
                continue
            joint = t if isinstance(t, Joint) else None
            if joint is not None:
                t = joint.resolve(groups)
            if t is None or t is UNKNOWN:
                try:
                    t = run.total(base + j, m)
                except ValueUnavailableError:
                    t = run.shifted_total(base + j, m)
                if t is not None and joint is not None:
                    _share_ends(book, joint, t)
                elif t is None:
                    if joint is None or k != 1:
                        total = UNKNOWN
                        break
                    t = joint  # not measurable on its own: a share of a group, passed on (settle)
            total = t if total is None else _add(total, t)
        run.carried = []
        for j in range(k):
            run.carried += self.carry.pop(base + j, [])
        run.local = None
        return total

    def after(self, i: int, step: "Step", outs: list[Msg | None], ins: list[Msg | None], t_out: Any) -> None:
        run = self.run
        if isinstance(t_out, Joint) and run.local is not None:
            t_out = UNKNOWN
        elif t_out is not UNKNOWN and t_out is not None and run.local is not None:
            t_out = t_out - run.local
        run.carry_out = {}
        t_ins = step.book(run, t_out, step.input_totals(run, ins), outs)
        edges = run.graph.edges[i]
        for pos, names in run.carry_out.items():
            if edges[pos] >= 0:
                self.carry.setdefault(edges[pos], []).extend(names)
        for s_in, t in zip(edges, t_ins):
            if s_in >= 0 and t is not None:
                prev = self.arrived.get(s_in)
                if prev is None:
                    self.arrived[s_in] = t
                elif prev is UNKNOWN or t is UNKNOWN:
                    self.arrived[s_in] = UNKNOWN
                else:
                    self.arrived[s_in] = _add(prev, t)


def _add(a: Any, b: Any) -> Any:
    """Sum of two relevance totals, either of which may be a :class:`Joint`."""
    if isinstance(a, Joint):
        return a.plus(b)
    if isinstance(b, Joint):
        return b.plus(a)
    return a + b
