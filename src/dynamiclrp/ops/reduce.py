"""Sum-like ops: a linear map of the inputs with fixed coefficients (add, sub, sum, mean, cumsum, average pooling,
interpolation, ``nll_loss``), which the sum rule distributes over; and vector norms (homogeneous of degree 1)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..core.graph import next_edges, node_type, output_meta, saved
from .routing import out_shape

Tensor = torch.Tensor


class SumKernel:
    """A linear map of the inputs that the sum rule distributes over (add, sub, sum, mean, average pools).

    ``grad(node, g)`` is the map's transpose (the node's backward), ``forward`` rebuilds the output from the
    inputs. ``signs`` gives each input's coefficient sign for multi-input adds (``a - b`` → ``(1, -1)``).
    """

    def __init__(self, forward: Callable[[Any, Sequence[Tensor | None], int], Tensor] | None,
                 coefficients: Callable[[Any], tuple[float, ...]] | None = None, rebuild: Callable | None = None):
        self.forward = forward
        self.coefficients = coefficients
        self._rebuild = rebuild
        # an addend of a two-tensor sum is the total minus the other addend (values on the support)
        self.support_role = "sum" if coefficients is not None and forward is not None else None

    def rebuild(self, node, nr):
        return None if self._rebuild is None else self._rebuild(node, nr)


class AddKernel(SumKernel):
    """``a + alpha·b``; knows one more thing than the sum rule: a frozen layer's bias added after a matrix product.

    ``F.linear`` on a non-contiguous input of three or more dimensions runs as ``matmul`` then ``add(bias)``, so a
    frozen bias is a constant of an ``AddBackward0`` whose other operand is a reshaped ``mm`` (or ``bmm``) with the
    layer's weight: :meth:`companion` points the Promise System at that weight, whose module's ``bias`` it is (read
    only with ``model=``, and only when that bias has the output's width)."""

    _VIEWS = ("UnsafeViewBackward0", "ViewBackward0", "ReshapeAliasBackward0", "ExpandBackward0")

    def companion(self, node: Any, pos: int) -> tuple | None:
        edges = next_edges(node)
        if pos not in (0, 1) or len(edges) != 2 or edges[pos][0] is not None or edges[1 - pos][0] is None:
            return None
        other = edges[1 - pos][0]
        for _ in range(4):
            if node_type(other) not in self._VIEWS:
                break
            nxt = next_edges(other)
            if len(nxt) != 1 or nxt[0][0] is None:
                return None
            other = nxt[0][0]
        if node_type(other) not in ("MmBackward0", "BmmBackward0"):
            return None
        w = saved(other, "mat2")
        return None if w is None else (w, output_meta(node)[0].shape[-1], "weight", "bias")


def _alpha(node) -> float:
    a = saved(node, "alpha")
    return 1.0 if a is None else float(a)


def add_forward(node, xs, nr):
    a, b = xs[0], xs[1]
    return a + _alpha(node) * b


def sub_forward(node, xs, nr):
    return xs[0] - _alpha(node) * xs[1]


def rsub_forward(node, xs, nr):
    return xs[1] - _alpha(node) * xs[0]


def sum_forward(node, xs, nr):
    dims = saved(node, "dim")
    x = xs[0]
    if dims is None:
        return x.sum().reshape(out_shape(node))
    return x.sum(dim=tuple(dims), keepdim=bool(saved(node, "keepdim")))


def mean_forward(node, xs, nr):
    dims = saved(node, "dim")
    x = xs[0]
    if dims is None:
        return x.mean().reshape(out_shape(node))
    return x.mean(dim=tuple(dims), keepdim=bool(saved(node, "keepdim")))


def nll_forward(node, xs, nr):
    """``nll_loss`` (the last op of ``cross_entropy``): a linear map of the log-probabilities with the saved
    targets, class weights, reduction and ignored index."""
    reduction = ("none", "mean", "sum")[int(saved(node, "reduction"))]
    return F.nll_loss(xs[0], saved(node, "target"), saved(node, "weight"), reduction=reduction,
                      ignore_index=int(saved(node, "ignore_index")))


def cumsum_forward(node, xs, nr):
    return torch.cumsum(xs[0], saved(node, "dim"))


def avg_pool_rebuild(fn):
    def rebuild(node, nr):
        x = saved(node, "self")
        return None if x is None else fn(node, x)
    return rebuild


def _avg_pool2d(node, x):
    return F.avg_pool2d(x, saved(node, "kernel_size"), saved(node, "stride") or None, saved(node, "padding"),
                        saved(node, "ceil_mode"), saved(node, "count_include_pad"), saved(node, "divisor_override"))


def _avg_pool3d(node, x):
    return F.avg_pool3d(x, saved(node, "kernel_size"), saved(node, "stride") or None, saved(node, "padding"),
                        saved(node, "ceil_mode"), saved(node, "count_include_pad"), saved(node, "divisor_override"))


def _adaptive_avg_pool_nd(node, x):
    out = out_shape(node)
    nsp = len(out) - 2 if len(out) >= 3 else len(out) - 1
    spatial = tuple(out[-nsp:])
    fn = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[nsp]
    return fn(x, spatial)


def upsample_forward(kind: str) -> Callable[[Any, Sequence[Tensor | None], int], Tensor]:
    """Forward of an interpolation node, with the exact scales autograd saved (``aten.upsample_*``).

    ``kind`` is one of ``linear1d``, ``bilinear2d``, ``bicubic2d``, ``trilinear3d``, ``bilinear2d_aa``,
    ``bicubic2d_aa``. These maps are linear with constant weights (non-negative except bicubic), so the sum
    rule applies (family ``pool``).
    """
    def forward(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
        x = xs[0]
        size = list(saved(node, "output_size"))
        ac = bool(saved(node, "align_corners"))
        if kind == "linear1d":
            return torch.ops.aten.upsample_linear1d(x, size, ac, saved(node, "scales"))
        if kind == "trilinear3d":
            return torch.ops.aten.upsample_trilinear3d(x, size, ac, saved(node, "scales_d"), saved(node, "scales_h"),
                                                       saved(node, "scales_w"))
        op = {"bilinear2d": torch.ops.aten.upsample_bilinear2d, "bicubic2d": torch.ops.aten.upsample_bicubic2d,
              "bilinear2d_aa": torch.ops.aten._upsample_bilinear2d_aa,
              "bicubic2d_aa": torch.ops.aten._upsample_bicubic2d_aa}[kind]
        return op(x, size, ac, saved(node, "scales_h"), saved(node, "scales_w"))
    return forward


def vector_norm_forward(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    """``torch.linalg.vector_norm`` with the node's saved ``ord``, ``dim`` and ``keepdim``."""
    dim = saved(node, "dim")
    return torch.linalg.vector_norm(xs[0], saved(node, "ord"), dim=None if dim is None else tuple(dim),
                                    keepdim=bool(saved(node, "keepdim")))


#: ``LinalgVectorNormBackward0``: a vector norm is positively homogeneous of degree 1, so by Euler's theorem
#: ``‖x‖ = Σ_i x_i ∂‖x‖/∂x_i``: the z-rule in gradient form (the node's backward) is exactly conservative
#: (``R_i = x_i² / ‖x‖² · R`` for the 2-norm). Family ``reduce``: the sum rule. (``ord=0``, which counts non-zeros,
#: is homogeneous of degree 0 and loses its relevance; no model uses it as a layer.)
VECTOR_NORM = SumKernel(vector_norm_forward, None, lambda node, nr: saved(node, "result") if nr == 0 else None)
