"""Sum-like ops: a linear map of the inputs with fixed coefficients (add, sub, sum, mean, cumsum, average pooling,
interpolation, ``nll_loss``, grid sampling, ``roi_align``, ``affine_grid``), which the sum rule distributes over;
and positively homogeneous statistics (vector norms, std, var, products, cumulative products, ``scatter_reduce``'s
product), which Euler's theorem lets the same rule distribute exactly."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..core.graph import call_backward, function_attr, next_edges, node_type, output_meta, saved
from .routing import out_shape

Tensor = torch.Tensor


class SumKernel:
    """A linear map of the inputs that the sum rule distributes over (add, sub, sum, mean, average pools).

    ``grad(node, g)`` is the map's transpose (the node's backward), ``forward`` rebuilds the output from the
    inputs. ``signs`` gives each input's coefficient sign for multi-input adds (``a - b`` → ``(1, -1)``).
    """

    #: ``transpose(node, s) -> one tensor (or None) per input``: the map's transpose applied to ``s`` when it is not
    #: the node's own backward (an operand the map does not act on linearly, e.g. a sampling grid, gets ``None``)
    transpose: Callable[[Any, Tensor], Sequence[Tensor | None]] | None = None
    #: the map is linear in its inputs (``False`` for the homogeneous statistics of :class:`HomogeneousKernel`)
    linear = True

    def __init__(self, forward: Callable[[Any, Sequence[Tensor | None], int], Tensor] | None,
                 coefficients: Callable[[Any], tuple[float, ...]] | None = None, rebuild: Callable | None = None,
                 transpose: Callable[[Any, Tensor], Sequence[Tensor | None]] | None = None):
        self.forward = forward
        self.coefficients = coefficients
        self._rebuild = rebuild
        if transpose is not None:
            self.transpose = transpose
        # an addend of a two-tensor sum is the total minus the other addend (values on the support)
        self.support_role = "sum" if coefficients is not None and forward is not None else None

    def rebuild(self, node, nr):
        return None if self._rebuild is None else self._rebuild(node, nr)

    def back(self, node: Any, s: Tensor) -> Sequence[Tensor | None]:
        """The map's transpose applied to ``s`` (the node's backward unless :attr:`transpose` says otherwise)."""
        if self.transpose is not None:
            return self.transpose(node, s)
        return call_backward(node, [s])


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


class HomogeneousKernel(SumKernel):
    """A positively homogeneous map of degree ``k`` (``f(t·x) = t^k f(x)`` for ``t > 0``): standard deviation
    (``k = 1``), variance (``k = 2``), the product of ``n`` elements (``k = n``), a cumulative product (``k = i + 1``
    at position ``i``).

    By Euler's theorem ``Σ_i x_i ∂f/∂x_i = k·f(x)``, so ``R_i = x_i ∂f/∂x_i / k · R / f`` distributes ``R``
    exactly; it is also what Integrated Gradients from the zero baseline gives for such ``f``, and for a product
    of ``n`` factors it is AttnLRP's uniform rule (Achtibat et al. 2024: each factor ``R / n``). In gradient form
    ``G_x = Jᵀ (G / k)``: the node's backward applied to the message divided by the degree, so the sum rule
    (family ``reduce``, ε-stabilized where a preset asks) applies unchanged. ``degree(node, s)`` returns ``k``
    shaped to broadcast against the output.
    """

    linear = False

    def __init__(self, forward: Callable[[Any, Sequence[Tensor | None], int], Tensor],
                 degree: Callable[[Any, Tensor], Any], rebuild: Callable | None = None):
        super().__init__(forward, None, rebuild)
        self.degree = degree

    def back(self, node: Any, s: Tensor) -> Sequence[Tensor | None]:
        return call_backward(node, [s / self.degree(node, s)])


def _dims(node: Any, ndim: int) -> tuple[int, ...]:
    dim = saved(node, "dim")
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(d + ndim if d < 0 else d for d in dims) if dims else tuple(range(ndim))


def _correction(node: Any) -> float:
    c = saved(node, "correction")
    return 1.0 if c is None else float(c)


def std_forward(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    x = xs[0]
    return torch.std(x, dim=_dims(node, x.dim()), correction=_correction(node),
                     keepdim=bool(saved(node, "keepdim"))).reshape(out_shape(node))


def var_forward(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    x = xs[0]
    return torch.var(x, dim=_dims(node, x.dim()), correction=_correction(node),
                     keepdim=bool(saved(node, "keepdim"))).reshape(out_shape(node))


def prod_forward(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    x = xs[0]
    dim = saved(node, "dim")
    if dim is None:
        return x.prod().reshape(out_shape(node))
    return x.prod(dim, keepdim=bool(saved(node, "keepdim")))


def _prod_degree(node: Any, s: Tensor) -> float:
    x = saved(node, "self")
    dim = saved(node, "dim")
    return float(x.numel() if dim is None else x.shape[dim])


def cumprod_forward(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.cumprod(xs[0], saved(node, "dim"))


def _cumprod_degree(node: Any, s: Tensor) -> Tensor:
    d = saved(node, "dim")
    d = d + s.dim() if d < 0 else d
    shape = [1] * s.dim()
    shape[d] = s.shape[d]
    return torch.arange(1, s.shape[d] + 1, dtype=s.dtype, device=s.device).reshape(shape)


def _saved_result(node: Any, nr: int) -> Tensor | None:
    return saved(node, "result") if nr == 0 else None


def _recompute(fn: Callable[[Any, Sequence[Tensor | None], int], Tensor]) -> Callable[[Any, int], Tensor | None]:
    def rebuild(node: Any, nr: int) -> Tensor | None:
        x = saved(node, "self")
        return None if x is None or nr != 0 else fn(node, [x], nr)
    return rebuild


#: ``StdBackward0``: homogeneous of degree 1 (like a vector norm): gradient × input is exactly conservative
STD = HomogeneousKernel(std_forward, lambda node, s: 1.0, _saved_result)
#: ``VarBackward0``: homogeneous of degree 2 (``var(t·x) = t²·var(x)``)
VAR = HomogeneousKernel(var_forward, lambda node, s: 2.0, _recompute(var_forward))
#: ``ProdBackward0/1``: the product of ``n`` elements, homogeneous of degree ``n``: each factor ``R / n``
PROD = HomogeneousKernel(prod_forward, _prod_degree, _saved_result)
#: ``CumprodBackward0``: output ``i`` (along ``dim``) is a product of ``i + 1`` elements
CUMPROD = HomogeneousKernel(cumprod_forward, _cumprod_degree, _saved_result)


# -- linear maps of an input with coefficients fixed by another operand (sampling grids, boxes) --------------
def _grid_sampler(node: Any, x: Tensor, grid: Tensor) -> Tensor:
    mode = ("bilinear", "nearest", "bicubic")[int(saved(node, "interpolation_mode"))]
    padding = ("zeros", "border", "reflection")[int(saved(node, "padding_mode"))]
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=padding,
                         align_corners=bool(saved(node, "align_corners")))


def grid_sample_forward(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    """``grid_sample(x, grid)`` with the sampling grid the node saved."""
    return _grid_sampler(node, xs[0], saved(node, "grid"))


def _grid_sample_rebuild(node: Any, nr: int) -> Tensor | None:
    x, grid = saved(node, "input"), saved(node, "grid")
    return None if x is None or grid is None or nr != 0 else _grid_sampler(node, x, grid)


def _grid_sample_transpose(node: Any, s: Tensor) -> Sequence[Tensor | None]:
    """The interpolation's transpose for the sampled input only: the grid chooses the coefficients (it is not a
    term of the sum), so it gets nothing."""
    out = call_backward(node, [s])
    return (out[0], None)


#: ``GridSampler2DBackward0`` / ``GridSampler3DBackward0`` (spatial transformers, optical flow warping): for a
#: given grid the output is a linear map of the input with fixed interpolation weights (bilinear, nearest or
#: bicubic), so the sum rule applies to the input (as for interpolation, family ``pool``); the grid only decides
#: the weights — it routes, like an attention pattern held constant (CP-LRP) or a gate (Arras et al. 2017) — and
#: receives no relevance. Exactly conservative with zero padding and no bias.
GRID_SAMPLE = SumKernel(grid_sample_forward, None, _grid_sample_rebuild, _grid_sample_transpose)


def affine_grid_forward(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    """``affine_grid(theta, size)``: the base grid times ``thetaᵀ`` (linear in ``theta``)."""
    return F.affine_grid(xs[0], list(saved(node, "size")), align_corners=bool(saved(node, "align_corners")))


#: ``AffineGridGeneratorBackward0``: ``grid = base · θᵀ``, a linear map of θ with the fixed base grid as
#: coefficients: the sum rule (family ``pool``), exactly conservative.
AFFINE_GRID = SumKernel(affine_grid_forward)


def roi_align_forward(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    """torchvision's ``roi_align(x, rois)`` with the boxes and settings the node kept (``ctx.saved_tensors[0]`` and
    the context's attributes); ``torch.ops.torchvision`` exists whenever such a node does."""
    rois = saved(node, "saved_tensors.0")
    return torch.ops.torchvision.roi_align(xs[0], rois.to(xs[0].dtype), float(function_attr(node, "spatial_scale")),
                                           int(function_attr(node, "pooled_height")),
                                           int(function_attr(node, "pooled_width")),
                                           int(function_attr(node, "sampling_ratio")),
                                           bool(function_attr(node, "aligned")))


#: torchvision's ``roi_align`` (``GeneratedBackwardFor_torchvision_roi_align_defaultBackward``, the R-CNN family's
#: box, mask and keypoint heads): every output bin is an average of bilinear samples of the feature map inside a
#: box, a linear map of the features with fixed non-negative weights once the boxes are given (the region
#: proposals are detached by the RPN), so the sum rule applies (family ``pool``, like average pooling and
#: interpolation); the boxes receive nothing.
ROI_ALIGN = SumKernel(roi_align_forward)


# -- scatter_reduce ------------------------------------------------------------------------------------------
def scatter_reduce_forward(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.scatter_reduce(xs[0], saved(node, "dim"), saved(node, "index"), xs[1], saved(node, "reduce"),
                                include_self=bool(saved(node, "include_self")))


def _scatter_prod_degree(node: Any, s: Tensor) -> Tensor:
    """Factors per output position of a ``prod`` scatter: the sources written there, plus ``self`` when it is
    included (or when no source reaches the position, whose output is then ``self``)."""
    index = saved(node, "index")
    cnt = torch.zeros(s.shape, dtype=s.dtype, device=s.device).scatter_add(
        saved(node, "dim"), index, torch.ones(index.shape, dtype=s.dtype, device=s.device))
    return cnt + 1 if bool(saved(node, "include_self")) else torch.where(cnt == 0, 1, cnt)


class ScatterReduceKernel(HomogeneousKernel):
    """``scatter_reduce(self, dim, index, src, reduce)`` (graph networks: GAT's per-node softmax takes an ``amax``
    and a ``sum`` over each node's incoming edges; message passing aggregates with ``sum``/``mean``/``amax``).

    ``sum`` and ``mean`` are linear with fixed coefficients and ``amax``/``amin`` select (ties share): the node's
    own backward is then the z-rule in gradient form (family ``routing``, as ``scatter_add``/``index_add``),
    exactly conservative. ``prod`` multiplies the factors written to each position: homogeneous of degree = their
    number, each factor ``R / n`` (AttnLRP's uniform rule, family ``reduce``).
    """

    def __init__(self) -> None:
        super().__init__(scatter_reduce_forward, _scatter_prod_degree,
                         lambda node, nr: saved(node, "result") if nr == 0 else None)

    @staticmethod
    def family_of(site: Any) -> str:
        return "reduce" if saved(site.node, "reduce") == "prod" else "routing"


SCATTER_REDUCE = ScatterReduceKernel()
