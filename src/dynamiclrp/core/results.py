"""What an explanation returns: the relevance tensors, the ledger and the recovered values."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .ledger import Ledger
    from .promises import PromiseRecord


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
    values : tuple of (torch.Tensor or None), or None
        With ``values=True``: the forward value of each requested input (for an intermediate tensor requested
        as a ``GradientEdge``, the activation the Promise System recovered; ``None`` where it cannot be).
    """

    relevance: tuple[torch.Tensor, ...]
    ledger: "Ledger | None" = None
    promises: list["PromiseRecord"] = field(default_factory=list)
    values: tuple[torch.Tensor | None, ...] | None = None
    #: relevance passes made for a call over several concepts: 1 when vectorised, one per concept otherwise
    passes: int = 1

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
