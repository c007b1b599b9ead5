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
