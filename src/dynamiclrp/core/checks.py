"""Run-time checks that do not stop the device: their verdicts are read once, after the propagation loop.

A check on values (is a recovered value exact everywhere relevance reaches it? does explicit relevance land where
a value is unknown?) needs a number on the host to decide whether to raise. Reading it inside the loop
(``bool(t.any())``) makes the host wait for the device at every such node, which on a GPU serialises the whole
pass. Instead a step records the check as a 0-dim boolean tensor (``True``: the check failed) with a factory for
the error it would raise; :meth:`DeferredChecks.raise_first` reads every flag at once, one transfer per device,
after the loop (or when the loop stops on another exception), and raises the error of the first failed check.
The relevance computed in the meantime is discarded with the exception, so deferring changes when the error is
raised, never what is returned.
"""
from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor


class DeferredChecks:
    """Failed-check flags collected during one relevance pass (see the module docstring)."""

    __slots__ = ("_flags",)

    def __init__(self) -> None:
        self._flags: list[tuple[Tensor, Callable[[], Exception]]] = []

    def add(self, failed: Tensor, error: Callable[[], Exception]) -> None:
        """Record a check: ``failed`` is a boolean tensor with one element (``True``: raise ``error()``)."""
        self._flags.append((failed.detach().reshape(()), error))

    def __len__(self) -> int:
        return len(self._flags)

    def raise_first(self) -> None:
        """Read every flag (one host transfer per device) and raise the error of the first failed check."""
        if not self._flags:
            return
        flags, self._flags = self._flags, []
        by_device: dict[torch.device, list[int]] = {}
        for k, (f, _) in enumerate(flags):
            by_device.setdefault(f.device, []).append(k)
        failed: list[int] = []
        for ks in by_device.values():
            values = torch.stack([flags[k][0] for k in ks]).tolist()
            failed += [k for k, v in zip(ks, values) if v]
        if failed:
            raise flags[min(failed)][1]()
