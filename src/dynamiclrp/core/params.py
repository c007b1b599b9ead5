"""The caller's model, read-only: its parameters and buffers found by tensor identity.

Autograd never keeps a frozen bias. With ``model=`` the Promise System reads such a constant from the module that
owns a tensor the node *did* save (its weight, a batch norm's running mean), by PyTorch's naming convention. The
planner also names ledger rows by module. Nothing is hooked, patched, re-run or modified.
"""
from __future__ import annotations

import torch

from .graph import storage_key, view_base


class ModelParams:
    """Looks up the parameters and buffers of a model by tensor identity, read-only.

    Used to resolve constants that autograd never keeps — the bias of a frozen linear or convolution layer, the
    shift of a frozen batch norm — through the module that owns a tensor the node *did* save (its weight, its
    running mean). Nothing is hooked, patched, re-run or modified.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._owner: dict[int, tuple[str, str]] | None = None  # built on first use (plans are cached)
        self._storage: dict[int, list[tuple[torch.Tensor, str, str]]] = {}

    def _index(self) -> dict[int, tuple[str, str]]:
        if self._owner is None:
            self._owner = {}
            for mname, mod in self.model.named_modules():
                for attr, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
                    if t is None or id(t) in self._owner:
                        continue
                    self._owner[id(t)] = (mname, attr)
                    if t.device.type != "meta":
                        self._storage.setdefault(storage_key(t), []).append((t, mname, attr))
        return self._owner

    def owner(self, t: torch.Tensor) -> tuple[str, str, torch.Tensor] | None:
        """``(module name, attribute, tensor)`` of the parameter or buffer ``t`` is, or is a view of."""
        index = self._index()
        seen: torch.Tensor | None = t
        while seen is not None:
            got = index.get(id(seen))
            if got is not None:
                return got[0], got[1], seen
            seen = view_base(seen)
        if t.device.type == "meta":
            return None
        for p, mname, attr in self._storage.get(storage_key(t), ()):
            if p.dtype == t.dtype:
                return mname, attr, p
        return None

    def tensor(self, name: str) -> torch.Tensor:
        """The parameter or buffer called ``name`` (``"features.0.bias"``)."""
        mname, _, attr = name.rpartition(".")
        mod = self.model.get_submodule(mname) if mname else self.model
        return getattr(mod, attr)

    def companion(self, weight: torch.Tensor, out_features: int, old: str, new: str) -> tuple | None:
        """The ``("param", name, start, length)`` source of the tensor that goes with ``weight`` by PyTorch's
        naming convention (``weight`` → ``bias``, ``in_proj_weight`` → ``in_proj_bias``, ``running_mean`` →
        ``bias``...), sliced like ``weight`` when the op used some of its rows. ``None`` when ``weight`` is not
        one of the model's tensors or no such companion with matching size exists."""
        got = self.owner(weight)
        if got is None:
            return None
        mname, attr, full = got
        name = attr.replace(old, new) if old in attr else None
        if name is None or name == attr:
            return None
        mod = self.model.get_submodule(mname) if mname else self.model
        comp = getattr(mod, name, None)
        if not isinstance(comp, torch.Tensor):
            return None
        qual = f"{mname}.{name}" if mname else name
        if comp.dim() != 1:
            return None
        n = comp.shape[0]
        if n == out_features and (full is weight or weight.storage_offset() == full.storage_offset()):
            return ("param", qual, 0, n)
        # a slice of the full weight (q/k/v rows of a packed projection): find the rows it starts at
        for d in range(full.dim()):
            if full.shape[d] != n:
                continue
            offset = weight.storage_offset() - full.storage_offset()
            start = (offset // full.stride(d)) % full.shape[d] if full.stride(d) else 0
            if start + out_features <= n:
                return ("param", qual, int(start), int(out_features))
        return None
