"""Normalisation layers (layer, batch, group norm) with their statistics saved."""
from __future__ import annotations

from typing import Any

import torch

from ..core.graph import saved

Tensor = torch.Tensor


class NormKernel:
    """Normalisation ``y = (x - mean) * rstd * weight + bias`` with its statistics saved.

    ``kind`` is ``"layer"``, ``"batch"``, ``"group"`` or ``"rms"`` (``y = x * rstd * weight``, the fused
    ``_fused_rms_norm`` of ``F.rms_norm`` / ``nn.RMSNorm`` on a GPU: ``rstd`` saved as ``result1``).
    :meth:`grad_const` is the gradient with the normaliser (``rstd``, and for batch norm in eval mode also the mean)
    held constant. Batch norms save their epsilon as ``eps`` (``native_batch_norm``) or ``epsilon``
    (``cudnn_batch_norm``, ``miopen_batch_norm``): ``eps_field`` names it.
    """

    def __init__(self, kind: str, eps_field: str | None = "eps"):
        self.kind = kind
        self.eps_field = eps_field if kind == "batch" else None

    @property
    def fields(self) -> tuple[str, ...]:
        """The saved fields this kernel reads (checked against torch's generated node classes by the tests)."""
        per_kind = {
            "layer": ("input", "weight", "bias", "normalized_shape", "result1", "result2"),
            "batch": ("input", "weight", "running_mean", "running_var", "training", "result1", "result2"),
            "group": ("input", "weight", "group", "result1", "result2"),
            "rms": ("input", "weight", "result1", "normalized_shape"),
        }
        return per_kind[self.kind] + ((self.eps_field,) if self.eps_field else ())

    def eps(self, node: Any) -> float:
        """The batch norm's epsilon."""
        return float(saved(node, self.eps_field or "eps"))

    @staticmethod
    def _rstd(node: Any) -> Tensor:
        """``_fused_rms_norm``'s ``rstd`` shaped to broadcast against the input (the normalised dimensions as 1)."""
        x, rstd = saved(node, "input"), saved(node, "result1")
        k = len(saved(node, "normalized_shape"))
        return rstd.reshape(tuple(x.shape[:x.dim() - k]) + (1,) * k)

    def running_var_eps(self, node: Any) -> Tensor:
        """``running_var + eps`` of an eval-mode batch norm."""
        return saved(node, "running_var") + self.eps(node)

    # -- statistics broadcast to x ------------------------------------------------------------------------
    def _layer_stats(self, node):
        x = saved(node, "input")
        nshape = saved(node, "normalized_shape")
        k = len(nshape)
        mean, rstd = saved(node, "result1"), saved(node, "result2")
        mean, rstd = _attached(x, mean, rstd, tuple(range(-k, 0)))
        return x, k, mean, rstd

    def grad_const(self, node: Any, g: Tensor) -> Tensor:
        if self.kind == "layer":
            x, k, _, rstd = self._layer_stats(node)
            w = saved(node, "weight")
            gw = g * w if w is not None else g
            dims = tuple(range(-k, 0))
            return rstd * (gw - gw.mean(dim=dims, keepdim=True))
        if self.kind == "batch":
            x = saved(node, "input")
            w = saved(node, "weight")
            shape = (1, -1) + (1,) * (x.dim() - 2)
            if saved(node, "training"):
                dims = (0,) + tuple(range(2, x.dim()))
                _, invstd = _attached(x, saved(node, "result1").reshape(shape), saved(node, "result2").reshape(shape),
                                      dims)
                gw = g * w.reshape(shape) if w is not None else g
                return invstd * (gw - gw.mean(dim=dims, keepdim=True))
            invstd = torch.rsqrt(self.running_var_eps(node)).reshape(shape)
            scale = invstd * w.reshape(shape) if w is not None else invstd
            return g * scale
        if self.kind == "rms":
            w = saved(node, "weight")
            return self._rstd(node) * (g * w if w is not None else g)
        if self.kind == "group":
            x = saved(node, "input")
            w = saved(node, "weight")
            n = x.shape[0]
            groups = saved(node, "group")
            shape = (1, -1) + (1,) * (x.dim() - 2)
            gw = g * w.reshape(shape) if w is not None else g
            gg = gw.reshape(n, groups, -1)
            _, rstd = _attached(x.reshape(n, groups, -1), saved(node, "result1").reshape(n, groups, 1),
                                saved(node, "result2").reshape(n, groups, 1), (-1,))
            out = rstd * (gg - gg.mean(dim=-1, keepdim=True))
            return out.reshape(x.shape)
        raise ValueError(self.kind)  # pragma: no cover

    def forward(self, node: Any) -> Tensor:
        """The op's output from its saved tensors (an Arg Node)."""
        x = saved(node, "input")
        if self.kind == "layer":
            _, k, mean, rstd = self._layer_stats(node)
            y = (x - mean) * rstd
            w, b = saved(node, "weight"), saved(node, "bias")
        elif self.kind == "batch":
            shape = (1, -1) + (1,) * (x.dim() - 2)
            if saved(node, "training"):
                mean, invstd = _attached(x, saved(node, "result1").reshape(shape),
                                         saved(node, "result2").reshape(shape), (0,) + tuple(range(2, x.dim())))
            else:
                mean = saved(node, "running_mean").reshape(shape)
                invstd = torch.rsqrt(self.running_var_eps(node)).reshape(shape)
            y = (x - mean) * invstd
            w, b = saved(node, "weight"), None
            if w is not None:
                w = w.reshape(shape)
        elif self.kind == "rms":
            y = x * self._rstd(node)
            w, b = saved(node, "weight"), None
        else:
            n, groups = x.shape[0], saved(node, "group")
            mean, rstd = _attached(x.reshape(n, groups, -1), saved(node, "result1").reshape(n, groups, 1),
                                   saved(node, "result2").reshape(n, groups, 1), (-1,))
            y = ((x.reshape(n, groups, -1) - mean) * rstd).reshape(x.shape)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            w, b = saved(node, "weight"), None
            if w is not None:
                w = w.reshape(shape)
        if w is not None:
            y = y * w
        if b is not None:
            y = y + b
        return y

    def absent(self, node: Any, pos: int) -> bool:
        """An affine parameter the op did not have (batch/group norm without ``affine``, layer norm without
        bias)."""
        if pos == 1:
            return saved(node, "weight") is None
        if pos == 2:
            return self.kind == "rms" or saved(node, "bias" if self.kind == "layer" else "weight") is None
        return False

    def companion(self, node: Any, pos: int) -> tuple | None:
        """The shift of a frozen batch or group norm sits next to its running mean or weight in the model."""
        if pos != 2 or self.kind in ("layer", "rms"):
            return None
        if self.kind == "batch" and saved(node, "running_mean") is not None:
            rm = saved(node, "running_mean")
            return (rm, rm.shape[0], "running_mean", "bias")
        w = saved(node, "weight")
        return None if w is None else (w, w.shape[0], "weight", "bias")

    def rebuild(self, node, nr):
        if nr != 0 or saved(node, "input") is None:
            return None
        if self.kind not in ("layer", "rms"):
            return None  # batch/group norm do not save their bias: rebuilt with the bias via replay
        return self.forward(node)

    def can_rebuild(self, node, nr):
        return nr == 0 and self.kind in ("layer", "rms") and saved(node, "input") is not None

    def replay(self, node, xs, nr):
        """Output from the saved statistics plus the bias value (input 2) where the bias is not saved."""
        y = self.forward(node)
        if self.kind in ("batch", "group") and len(xs) > 2 and xs[2] is not None:
            y = y + xs[2].reshape((1, -1) + (1,) * (y.dim() - 2))
        return y


def _attached(x: Tensor, mean: Tensor, rstd: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The saved statistics, carrying their derivatives with respect to ``x`` when relevance is differentiable.

    Autograd saves a norm's mean and reciprocal standard deviation as outputs it does not differentiate, so they
    come back detached from ``x``. When grad mode is on and ``x`` requires grad (``create_graph=True``), they are
    recomputed from ``x`` (the ``eps`` the op used is what ``1/rstd²`` exceeds the variance by) and passed
    straight through: the saved values exactly, with the recomputed statistics' derivatives. Otherwise they are
    returned unchanged.
    """
    if not (torch.is_grad_enabled() and x.requires_grad) or mean.requires_grad or rstd.requires_grad:
        return mean, rstd
    m = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    eps = (rstd.reshape(var.shape).detach() ** -2 - var.detach()).clamp(min=0)
    r = torch.rsqrt(var + eps)
    return (mean + (m - m.detach()).reshape(mean.shape), rstd + (r - r.detach()).reshape(rstd.shape))
