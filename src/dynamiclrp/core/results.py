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
    """

    relevance: tuple[torch.Tensor, ...]
    ledger: "Ledger | None" = None
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
