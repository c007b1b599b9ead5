"""Ops that fuse a sub-network into one node, or need a structural check: fused recurrent layers (oneDNN LSTM),
weight normalisation, in-place writes into views (``CopySlices``), known custom ``autograd.Function``s, leaves."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from ..core.graph import forward_cls, saved
from ..errors import UnsupportedOperationError

if TYPE_CHECKING:  # pragma: no cover
    from ..core.step import Site

Tensor = torch.Tensor


#: oneDNN's RNN modes (``aten/src/ATen/native/mkldnn/RNN.cpp``)
_MKLDNN_LSTM = 2


def lstm_layer_forward(x: Tensor, h0: Tensor, c0: Tensor, weight: Tensor, bias: Tensor | None,
                       reverse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer and direction with primitive ops (PyTorch's gate order ``i, f, g, o``).

    Parameters
    ----------
    x : Tensor
        Time-major input ``(T, B, I)``.
    h0, c0 : Tensor
        Initial states ``(B, H)``.
    weight : Tensor
        ``[W_ih, W_hh]`` concatenated along the input dimension, ``(4H, I + H)``: one linear map over
        ``[x_t, h_{t-1}]`` per step, so that the linear rule sees the whole gate pre-activation at once.
    bias : Tensor or None
        ``b_ih + b_hh``, ``(4H,)``.
    reverse : bool
        Process the sequence from the last step to the first (the backward direction of a bidirectional layer).

    Returns
    -------
    output, h_T, c_T : Tensor
        ``(T, B, H)`` (in time order), ``(B, H)``, ``(B, H)``.
    """
    steps = x.unbind(0)
    T = len(steps)
    outs: list[Tensor | None] = [None] * T
    h, c = h0, c0
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        z = F.linear(torch.cat([steps[t], h], dim=1), weight, bias)
        i, f, g, o = z.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs[t] = h
    return torch.stack(outs, 0), h, c


class RecurrentKernel:
    """``MkldnnRnnLayerBackward0``: one layer and direction of ``nn.LSTM`` fused by oneDNN (CPU).

    Forward inputs: ``input (T, B, I)``, ``weight0 = W_ih``, ``weight1 = W_hh``, ``weight2 = b_ih``,
    ``weight3 = b_hh``, ``hx``, ``cx``; outputs ``output (T, B, H)``, ``hy``, ``cy`` (saved as ``result0..2``).
    """

    inputs = ("input", "weight0", "weight1", "weight2", "weight3", "hx_", "cx_")

    @staticmethod
    def check(site: "Site") -> None:
        node = site.node
        mode = saved(node, "mode")
        if mode != _MKLDNN_LSTM:
            raise UnsupportedOperationError(
                f"{site.describe()}: oneDNN RNN mode {mode} is not supported (only LSTM, mode {_MKLDNN_LSTM}); "
                "register a rule with RuleSet.with_ops({'MkldnnRnnLayerBackward0': ...})")
        if saved(node, "batch_sizes"):
            raise UnsupportedOperationError(
                f"{site.describe()}: packed sequences through the fused oneDNN LSTM are not supported")

    def rebuild(self, node: Any, nr: int) -> Tensor | None:
        return saved(node, f"result{nr}") if nr < 3 else None


class WeightNormKernel:
    """``_weight_norm_interface(v, g, dim) -> (w, norms)`` with ``w = g · v / ‖v‖`` (norm over every dimension but
    ``dim``). Saved: ``v``, ``g``, ``dim``, ``result1`` (the norms, shaped like ``g``)."""

    @staticmethod
    def scale(node: Any) -> Tensor:
        return saved(node, "g") / saved(node, "result1")

    def rebuild(self, node: Any, nr: int) -> Tensor | None:
        v = saved(node, "v")
        if nr != 0 or v is None:
            return None
        return v * self.scale(node)


class CopySlicesKernel:
    """``CopySlices``: an in-place op applied to a view of a base tensor (family ``inplace``)."""


def function_family(family: str) -> Callable[["Site"], str]:
    """``family_of`` for the row of a known custom Function: ``family`` when the node comes from the expected
    Function class, ``"custom"`` otherwise (whose rule refuses it with a clear error)."""
    def family_of(site: "Site") -> str:
        cls = forward_cls(site.node)
        if cls is None or (cls.__module__, cls.__qualname__) != site.spec.function:
            return "custom"
        return family
    return family_of


class LeafKernel:
    """``AccumulateGrad``: a leaf tensor (input or parameter)."""
