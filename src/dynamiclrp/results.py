"""What an explanation returns: the relevance tensors and the ledger of where every unit of relevance ended."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .graph import GraphView
    from .promises import PromiseRecord

#: Sink categories, in the order ledgers are printed.
SINK_KINDS = {
    "bias": "bias terms of linear, convolution and normalisation ops (the ε rule's bias sink)",
    "leaf": "leaves that were not requested: parameters, buffers that require grad, unrequested inputs",
    "constant": "operands that do not require grad (masks, scalars, frozen tensors)",
    "stabiliser": "the ε stabiliser of z-rules (relevance absorbed by z + ε·sign(z))",
    "rule": "rules that do not conserve by design (softmax rule, identity rule at a zero input, γ/α-β...)",
    "conversion": "explicit relevance on a zero activation, which gradient form cannot carry",
}


def G_fit(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reduce or broadcast ``t`` to the shape of ``like``."""
    if t.shape == like.shape:
        return t
    if t.numel() >= like.numel():
        return t.sum_to_size(like.shape)
    return t.expand_as(like)


def _saved_result(run: Any, step: Any) -> torch.Tensor:
    from . import graph as _G
    return _G.saved(run.graph.nodes[step.index], "result")


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


class Ledger:
    """Where every unit of seed relevance ended: requested inputs or named sinks.

    ``unaccounted = seed_total − Σ inputs − Σ sinks`` is ≈ 0 for a correct pass (float rounding only).
    Totals are accumulated as 0-dim tensors during the pass and read once at the end.
    """

    def __init__(self, graph: "GraphView | None" = None):
        self._pending: list[tuple[str, str, torch.Tensor, str]] = []
        self._inputs: list[tuple[str, torch.Tensor]] = []
        self._seed: torch.Tensor | None = None
        self.unmeasured: list[str] = []
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

    # -- measuring helpers used by rule steps (``run`` is the engine's Run) -----------------------------------
    def _totals(self, run: Any, step: Any, outs: list, ins: list) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                                               str | None]:
        """Σ relevance arriving at the node and Σ relevance it sends to non-constant inputs."""
        t_out = None
        problem = None
        for slot, m in zip(step.out_slots, outs):
            try:
                t = run.total(slot, m)
            except Exception as err:  # noqa: BLE001 - reported as unmeasurable, never fatal
                t, problem = None, str(err).split(".")[0]
                if m is not None:
                    t = run.shifted_total(slot, m)
                    if t is not None:
                        problem = None
            if t is not None:
                t_out = t if t_out is None else t_out + t
        t_in = None
        for e, m in zip(step.in_edges, ins):
            if e < 0 or m is None:
                continue
            try:
                t = run.total(e, m)
            except Exception as err:  # noqa: BLE001
                t, problem = None, str(err).split(".")[0]
            if t is not None:
                t_in = t if t_in is None else t_in + t
        return t_out, t_in, problem

    def measured(self, run: Any, step: Any, outs: list, ins: list, kind: str = "rule", note: str = "") -> None:
        """Book ``Σ R_out − Σ R_in`` of a node whose rule is not conservative (or has constant inputs)."""
        t_out, t_in, problem = self._totals(run, step, outs, ins)
        where = run.graph.describe(step.index)
        if problem is not None:
            self.unmeasurable(where, problem)
            return
        if t_out is None:
            return
        loss = t_out if t_in is None else t_out - t_in
        self.book(kind, where, loss, note or SINK_KINDS[kind])

    def constants(self, run: Any, step: Any, outs: list, ins: list) -> None:
        """Book the share of a conservative node's relevance that went to inputs that do not require grad."""
        if any(m is not None and (m.g is not None and bool((m.g != 0).any()) or m.r is not None)
               for m in outs):
            self.measured(run, step, outs, ins, kind="constant")

    def linear(self, run: Any, step: Any, R: torch.Tensor, x: torch.Tensor, gx: torch.Tensor | None,
               rx: torch.Tensor | None, rb: torch.Tensor | None, constant_bias: bool) -> None:
        """Book a linear rule's bias share and its stabiliser / rule loss."""
        where = run.graph.describe(step.index)
        t_out = R.sum()
        t_x = None
        if gx is not None:
            t_x = (gx * x).sum() if gx.shape == x.shape else (G_fit(gx, x) * x).sum()
        if rx is not None:
            t_x = rx.sum() if t_x is None else t_x + rx.sum()
        t_b = rb.sum() if rb is not None else None
        loss = t_out
        if t_x is not None:
            loss = loss - t_x
        if t_b is not None:
            loss = loss - t_b
            if constant_bias:
                self.book("constant", where, t_b, "bias that does not require grad")
        kind = "stabiliser" if step.kind == "epsilon" else "rule"
        self.book(kind, where, loss)

    def softmax(self, run: Any, step: Any, outs: list, ins: list) -> None:
        """Book the softmax rule's non-conservation: ``Σ s·G_s − Σ x·G_x`` with ``x = log s + const`` per row
        (the constant drops out because the rule's ``G_x`` sums to zero over each row)."""
        m_out = outs[0]
        m_in = ins[0] if ins else None
        where = run.graph.describe(step.index)
        if m_out is None:
            return
        s = _saved_result(run, step)
        t_out = (s * m_out.g).sum() if m_out.g is not None else torch.zeros((), dtype=s.dtype)
        if m_out.r is not None:
            t_out = t_out + m_out.r.sum()
        t_in = torch.zeros((), dtype=s.dtype)
        if m_in is not None and m_in.g is not None:
            g = m_in.g
            logs = torch.where(s > 0, torch.log(torch.where(s > 0, s, 1)), 0).to(g.dtype)
            t_in = (logs.reshape(g.shape) * g).sum() if logs.numel() == g.numel() else (logs * g).sum()
        self.book("rule", where, t_out - t_in, "softmax rule (relevance absorbed by the per-row logit offset)")

    def leaf_name(self, run: Any, index: int) -> str:
        from . import graph as _G
        t = _G.leaf_tensor(run.graph.nodes[index])
        model = getattr(run.planner.rules, "model", None)
        if model is not None:
            for name, p in model.named_parameters():
                if p is t:
                    return name
        kind = "parameter" if isinstance(t, torch.nn.Parameter) else "tensor"
        return f"{kind} {tuple(t.shape)} (AccumulateGrad#{index})"

    def requested(self, name: str, total: torch.Tensor) -> None:
        self._inputs.append((name, total.detach()))

    def seed(self, total: torch.Tensor) -> None:
        self._seed = total.detach() if isinstance(total, torch.Tensor) else torch.tensor(float(total))

    def finish(self) -> None:
        """Read every total once (one host sync) and compute :attr:`unaccounted`."""
        tensors = [t.double().cpu().reshape(()) for _, _, t, _ in self._pending]
        tensors += [t.double().cpu().reshape(()) for _, t in self._inputs]
        values = torch.stack(tensors).tolist() if tensors else []
        n = len(self._pending)
        merged: dict[tuple[str, str], list] = {}
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
        self.seed_total = float(self._seed.double().item()) if self._seed is not None else 0.0
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

    def summary(self, top: int = 8) -> str:
        """A short human-readable ledger: inputs, sinks per kind (with the largest places), unaccounted."""
        seed = self.seed_total
        lines = [f"seed relevance          {seed: .6g}"]

        def pct(v: float) -> str:
            return f"{100 * v / seed:7.2f} %" if seed else ""

        for name, v in self.inputs.items():
            lines.append(f"  -> {name:<19} {v: .6g}  {pct(v)}")
        for kind, v in self.by_kind().items():
            lines.append(f"  -> sink: {kind:<13} {v: .6g}  {pct(v)}")
            biggest = sorted((s for s in self.sinks if s.kind == kind), key=lambda s: -abs(s.total))[:top]
            for s in biggest:
                lines.append(f"       {s.where:<26} {s.total: .4g}")
        lines.append(f"unaccounted             {self.unaccounted: .3g}")
        if self.unmeasured:
            lines.append("not measurable: " + "; ".join(self.unmeasured))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Ledger(seed={self.seed_total:.6g}, inputs={sum(self.inputs.values()):.6g}, "
                f"sinks={self.sink_total:.6g}, unaccounted={self.unaccounted:.3g})")


@dataclass
class Explanation:
    """Result of :func:`dynamiclrp.explain`.

    Attributes
    ----------
    relevance : tuple of torch.Tensor
        One tensor per requested input, same shape, dtype and device (as :func:`dynamiclrp.relevance`).
    ledger : Ledger or None
        Where the seed relevance ended (``None`` when ``ledger=False``).
    promises : list of PromiseRecord
        Values recovered by the Promise System (only with ``trace_promises=True``).
    """

    relevance: tuple[torch.Tensor, ...]
    ledger: Ledger | None = None
    promises: list["PromiseRecord"] = field(default_factory=list)

    @property
    def unaccounted(self) -> float:
        """Σ seeds − Σ requested-input relevance − Σ sinks (≈ 0 for every graph)."""
        if self.ledger is None:
            raise ValueError("this explanation was computed with ledger=False; call explain(..., ledger=True)")
        return self.ledger.unaccounted

    def __iter__(self) -> Any:
        return iter(self.relevance)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.relevance[k]

    def __len__(self) -> int:
        return len(self.relevance)
