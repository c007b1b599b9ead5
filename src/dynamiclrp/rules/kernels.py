"""Op kernels: what each kind of autograd node computes, read from its saved fields.

A kernel knows an op's forward function, which operands it saved, and its Jacobian-transpose products. Rules
(:mod:`dynamiclrp.rules.library`) are written once against these small interfaces, so adding an op means adding
a kernel (or reusing one) and a registry row, never touching the rules.

Kernel interfaces
-----------------
* :class:`LinearKernel` — ``z = f(x, w) + b`` with ``f`` bilinear (mm, bmm, addmm, conv...): ``f``, ``f_t``
  (``Jᵀ`` with respect to the activation operand), operand positions, bias.
* :class:`SumKernel` — ``z`` a linear combination of the inputs with non-negative weights up to sign (add, sub,
  sum, mean, average pooling, cumsum): ``grad`` (the map's transpose) and ``forward``.
* :class:`UnaryKernel` — element-wise ``y = f(x)``: which of x or y is saved and how to get the other.
* :class:`ProductKernel` — ``a * b`` or ``a / b``.
* :class:`RoutingKernel` — selection/permutation/copy ops whose transpose is their own backward formula.
* :class:`NormKernel`, :class:`SoftmaxKernel`, :class:`AttentionKernel`, :class:`LeafKernel`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .. import graph as G

Tensor = torch.Tensor


def _s(node: Any, name: str) -> Any:
    return G.saved(node, name)


def _meta_shape(node: Any, nr: int = 0) -> torch.Size:
    return G.output_meta(node)[nr].shape


# -----------------------------------------------------------------------------------------------------------
# Routing
# -----------------------------------------------------------------------------------------------------------
class RoutingKernel:
    """Ops that only select, permute, copy or broadcast elements (all coefficients 0 or 1).

    Their backward formula moves relevance exactly like gradient, in both message forms, so the rule is the
    node's own backward. ``replay`` re-applies the op forward (the forward closure of a promise branch).
    """

    def __init__(self, replay: Callable[[Any, Sequence[Tensor | None], int], Tensor] | None = None):
        self.replay = replay


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def replay_reshape(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0].reshape(_meta_shape(node, nr))


def replay_identity(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0]


def replay_to_copy(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    m = G.output_meta(node)[nr]
    return xs[0].to(dtype=m.dtype, device=m.device)


def replay_t(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0].t() if xs[0].dim() == 2 else xs[0]


def replay_transpose(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0].transpose(_s(node, "dim0"), _s(node, "dim1"))


def replay_permute(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0].permute(*_s(node, "dims"))


def replay_expand(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0].expand(_meta_shape(node, nr))


def replay_slice(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    x = xs[0]
    dim = _dim(_s(node, "dim"), x.dim())
    start, end, step = _s(node, "start"), _s(node, "end"), _s(node, "step")
    size = x.shape[dim]
    start = 0 if start is None else start
    end = size if end is None else end
    start = max(min(start + size if start < 0 else start, size), 0)
    end = max(min(end + size if end < 0 else end, size), 0)
    idx = [slice(None)] * x.dim()
    idx[dim] = slice(start, end, step)
    return x[tuple(idx)]


def replay_select(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0].select(_s(node, "dim"), _s(node, "index"))


def replay_index(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    idx = _s(node, "indices")
    # a None entry is a dimension that was not indexed (a full slice), not a new axis
    return xs[0][tuple(slice(None) if i is None else i for i in idx)] if idx is not None else xs[0]


def replay_gather(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.gather(xs[0], _s(node, "dim"), _s(node, "index"))


def replay_index_select(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.index_select(xs[0], _s(node, "dim"), _s(node, "index"))


def replay_cat(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.cat(list(xs), dim=_s(node, "dim"))


def replay_stack(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.stack(list(xs), dim=_s(node, "dim"))


def replay_split(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    dim = _s(node, "dim")
    sizes = _s(node, "split_sizes")
    if sizes is None:
        sizes = _s(node, "split_size")
    return torch.split(xs[0], sizes, dim=dim)[nr]


def replay_unbind(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0].select(_s(node, "dim"), nr)


def replay_repeat(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0].repeat(*_s(node, "repeats"))


def replay_flip(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.flip(xs[0], _s(node, "dims"))


def replay_roll(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.roll(xs[0], _s(node, "shifts"), _s(node, "dims"))


def replay_where(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.where(_s(node, "condition"), xs[0], xs[1])


def replay_constant_pad(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return F.pad(xs[0], _s(node, "pad"))


def replay_take_flat_indices(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    """Adaptive max pooling: the input gathered at the saved per-plane arg-max indices (``result1``)."""
    idx = _s(node, "result1")
    return xs[0].flatten(2).gather(2, idx.flatten(2)).view(idx.shape)


def binary_rebuild(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Any, int], Tensor | None]:
    """``fn(self, other)`` from the two saved operands (element-wise maximum, minimum...)."""
    def rebuild(node: Any, nr: int) -> Tensor | None:
        a, b = _s(node, "self"), _s(node, "other")
        return None if a is None or b is None else fn(a, b)
    return rebuild


def rebuild_take_flat_indices(node: Any, nr: int) -> Tensor | None:
    x = _s(node, "self")
    return None if x is None or nr != 0 else replay_take_flat_indices(node, [x], 0)


# -----------------------------------------------------------------------------------------------------------
# Linear ops: z = f(x, w) + b
# -----------------------------------------------------------------------------------------------------------
class LinearKernel:
    """``z = alpha * f(a, b) + beta * bias`` with ``f`` bilinear in its two operands.

    Attributes
    ----------
    operands : tuple of int
        Input positions of the two factors of ``f`` (``f``'s first and second argument).
    saved : tuple of str
        Saved fields holding those operands (``None`` when autograd skipped them).
    bias : int or None
        Input position of the additive term, if the op has one.
    """

    operands: tuple[int, int] = (0, 1)
    saved_fields: tuple[str, str] = ("self", "mat2")
    bias_pos: int | None = None

    def family(self, active: tuple[bool, ...]) -> str:
        a, b = (active[p] if p < len(active) else False for p in self.operands)
        return "matmul" if (a and b) else "linear"

    def alpha(self, node: Any) -> float:
        return 1.0

    def beta(self, node: Any) -> float:
        return 1.0

    def f(self, node: Any, a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def f_t(self, node: Any, which: int, a: Tensor, b: Tensor, s: Tensor) -> Tensor:
        """``Jᵀ s`` with respect to operand ``which`` (0 or 1), the other operand held fixed."""
        raise NotImplementedError

    def bias_view(self, node: Any, bias: Tensor, z_shape: torch.Size) -> Tensor:
        return bias

    def bias_reduce(self, node: Any, t: Tensor, bias_shape: torch.Size) -> Tensor:
        """Sum a z-shaped tensor back to the bias's shape (the transpose of :meth:`bias_view`)."""
        return t.sum_to_size(bias_shape) if t.shape != bias_shape else t

    def rebuild(self, node: Any, nr: int) -> Tensor | None:
        a = _s(node, self.saved_fields[0])
        b = _s(node, self.saved_fields[1])
        if a is None or b is None or self.bias_pos is not None:
            return None
        return self.alpha(node) * self.f(node, a, b)

    def absent(self, node: Any, pos: int) -> bool:
        """Whether the op had no tensor at input ``pos`` (a convolution without bias), as opposed to one that
        does not require grad."""
        return False

    def companion(self, node: Any, pos: int) -> tuple | None:
        """For the bias input: ``(weight tensor the node saved, output features, "weight", "bias")`` — the
        bias of a frozen layer is found next to its weight in the caller's model (:class:`~dynamiclrp.promises.
        ModelParams`). ``None`` for other inputs or when the weight was not saved."""
        return None

    def can_rebuild(self, node: Any, nr: int) -> bool:
        if self.bias_pos is not None:
            return False
        return _s(node, self.saved_fields[0]) is not None and _s(node, self.saved_fields[1]) is not None


class MmKernel(LinearKernel):
    operands = (0, 1)
    saved_fields = ("self", "mat2")

    def f(self, node, a, b):
        return a @ b

    def f_t(self, node, which, a, b, s):
        return s @ b.transpose(-1, -2) if which == 0 else a.transpose(-1, -2) @ s


class BmmKernel(MmKernel):
    pass


class AddmmKernel(MmKernel):
    operands = (1, 2)
    saved_fields = ("mat1", "mat2")
    bias_pos = 0

    def companion(self, node, pos):
        w = _s(node, "mat2") if pos == 0 else None
        return None if w is None else (w, _meta_shape(node)[-1], "weight", "bias")

    def alpha(self, node):
        return _s(node, "alpha")

    def beta(self, node):
        return _s(node, "beta")


class BaddbmmKernel(AddmmKernel):
    saved_fields = ("batch1", "batch2")

    def companion(self, node, pos):
        return None  # the added term of a batched product is an activation (e.g. ALiBi), not a layer's bias


class MvKernel(LinearKernel):
    operands = (0, 1)
    saved_fields = ("self", "vec")

    def f(self, node, a, b):
        return a @ b

    def f_t(self, node, which, a, b, s):
        return torch.outer(s, b) if which == 0 else a.transpose(-1, -2) @ s


class ConvKernel(LinearKernel):
    """``aten.convolution`` (1-3 d, transposed, grouped): operand 0 the input, 1 the weight, 2 the bias."""

    operands = (0, 1)
    saved_fields = ("input", "weight")
    bias_pos = 2

    @staticmethod
    def params(node: Any) -> tuple:
        return (_s(node, "stride"), _s(node, "padding"), _s(node, "dilation"), _s(node, "transposed"),
                _s(node, "output_padding"), _s(node, "groups"))

    def f(self, node, a, b):
        stride, padding, dilation, transposed, output_padding, groups = self.params(node)
        return torch.ops.aten.convolution(a, b, None, stride, padding, dilation, transposed, output_padding,
                                          groups)

    def f_t(self, node, which, a, b, s):
        stride, padding, dilation, transposed, output_padding, groups = self.params(node)
        mask = [which == 0, which == 1, False]
        out = torch.ops.aten.convolution_backward(s, a, b, None, stride, padding, dilation, transposed,
                                                  output_padding, groups, mask)
        return out[which]

    def bias_view(self, node, bias, z_shape):
        return bias.reshape((1, -1) + (1,) * (len(z_shape) - 2))

    def bias_reduce(self, node, t, bias_shape):
        return t.sum(dim=(0,) + tuple(range(2, t.dim()))).reshape(bias_shape)

    def absent(self, node, pos):
        if pos != 2:
            return False
        sizes = _s(node, "bias_sym_sizes_opt")
        return sizes is None or all(int(v) == 0 for v in sizes)

    def companion(self, node, pos):
        w = _s(node, "weight") if pos == 2 else None
        return None if w is None else (w, _meta_shape(node)[1], "weight", "bias")

    def family(self, active):
        return "matmul" if (active[0] and len(active) > 1 and active[1]) else "conv"


# -----------------------------------------------------------------------------------------------------------
# Sum-like ops: z = Σ_i c_i, each contribution a fixed linear map of one input with coefficient ±1 or 1/N
# -----------------------------------------------------------------------------------------------------------
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


def _alpha(node) -> float:
    a = _s(node, "alpha")
    return 1.0 if a is None else float(a)


def add_forward(node, xs, nr):
    a, b = xs[0], xs[1]
    return a + _alpha(node) * b


def sub_forward(node, xs, nr):
    return xs[0] - _alpha(node) * xs[1]


def rsub_forward(node, xs, nr):
    return xs[1] - _alpha(node) * xs[0]


def sum_forward(node, xs, nr):
    dims = _s(node, "dim")
    x = xs[0]
    if dims is None:
        return x.sum().reshape(_meta_shape(node))
    return x.sum(dim=tuple(dims), keepdim=bool(_s(node, "keepdim")))


def mean_forward(node, xs, nr):
    dims = _s(node, "dim")
    x = xs[0]
    if dims is None:
        return x.mean().reshape(_meta_shape(node))
    return x.mean(dim=tuple(dims), keepdim=bool(_s(node, "keepdim")))


def nll_forward(node, xs, nr):
    """``nll_loss`` (the last op of ``cross_entropy``): a linear map of the log-probabilities with the saved
    targets, class weights, reduction and ignored index."""
    reduction = ("none", "mean", "sum")[int(_s(node, "reduction"))]
    return F.nll_loss(xs[0], _s(node, "target"), _s(node, "weight"), reduction=reduction,
                      ignore_index=int(_s(node, "ignore_index")))


def cumsum_forward(node, xs, nr):
    return torch.cumsum(xs[0], _s(node, "dim"))


def avg_pool_rebuild(fn):
    def rebuild(node, nr):
        x = _s(node, "self")
        return None if x is None else fn(node, x)
    return rebuild


def _avg_pool2d(node, x):
    return F.avg_pool2d(x, _s(node, "kernel_size"), _s(node, "stride") or None, _s(node, "padding"),
                        _s(node, "ceil_mode"), _s(node, "count_include_pad"), _s(node, "divisor_override"))


def _avg_pool3d(node, x):
    return F.avg_pool3d(x, _s(node, "kernel_size"), _s(node, "stride") or None, _s(node, "padding"),
                        _s(node, "ceil_mode"), _s(node, "count_include_pad"), _s(node, "divisor_override"))


def _adaptive_avg_pool_nd(node, x):
    out = _meta_shape(node)
    nsp = len(out) - 2 if len(out) >= 3 else len(out) - 1
    spatial = tuple(out[-nsp:])
    fn = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[nsp]
    return fn(x, spatial)


# -----------------------------------------------------------------------------------------------------------
# Element-wise non-linearities
# -----------------------------------------------------------------------------------------------------------
class UnaryKernel:
    """Element-wise ``y = f(x)``.

    Parameters
    ----------
    f : callable ``(node, x) -> y``
        The forward function (with the node's saved parameters).
    x_field : str or None
        Saved field holding ``x``.
    y_field : str or None
        Saved field holding ``y``.
    inverse : callable ``(node, y) -> x`` or None
        Recovers ``x`` from ``y`` when only ``y`` is saved and the map is invertible (used when the Promise
        System cannot supply ``x`` exactly).
    ratio : callable ``(node, x, y) -> y / x`` or None
        A closed form of ``y / x`` that is exact where the division is not (ReLU: ``y > 0``).
    f0 : float
        ``f(0)``; when it is non-zero the identity rule cannot pass relevance through ``x == 0`` (a loss the
        ledger books), otherwise ``limit_ratio`` is used at ``x == 0``.
    """

    def __init__(self, f: Callable[[Any, Tensor], Tensor], x_field: str | None = "self",
                 y_field: str | None = None, inverse: Callable[[Any, Tensor], Tensor] | None = None,
                 ratio: Callable[[Any, Tensor | None, Tensor | None], Tensor] | None = None,
                 limit_ratio: Callable[[Any], float] | float = 0.0, f0: Callable[[Any], float] | float = 0.0,
                 identity_is_gradient: bool = False,
                 from_output: Callable[[Any, Tensor], tuple[Tensor, Tensor]] | None = None):
        self.identity_is_gradient = identity_is_gradient
        self.f = f
        self.x_field = x_field
        self.y_field = y_field
        self.inverse = inverse
        self._ratio = ratio
        self.limit_ratio = limit_ratio
        self.f0 = f0
        if from_output is None and inverse is not None and y_field is not None:
            from_output = _inverse_on_finite(inverse)
        #: ``(node, y) -> (x, mask)``: the input from the saved output where that is exact and relevance can pass
        self.from_output = from_output

    def rebuild(self, node, nr):
        if self.y_field is not None:
            y = _s(node, self.y_field)
            if y is not None:
                return y
        if self.x_field is not None:
            x = _s(node, self.x_field)
            if x is not None:
                return self.f(node, x)
        return None

    def can_rebuild(self, node, nr):
        return (self.y_field is not None and _s(node, self.y_field) is not None) or (
            self.x_field is not None and _s(node, self.x_field) is not None)

    def replay(self, node, xs, nr):
        return self.f(node, xs[0])


def _inverse_on_finite(inverse: Callable[[Any, Tensor], Tensor]) -> Callable[[Any, Tensor], tuple[Tensor, Tensor]]:
    def from_output(node: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        x = inverse(node, y)
        return x, torch.isfinite(x)  # saturated outputs (tanh = ±1) pass no gradient-form relevance
    return from_output


def _param(node, name, default):
    v = _s(node, name)
    return default if v is None else v


def _f_relu(node, x):
    return torch.relu(x)


def _f_leaky(node, x):
    return F.leaky_relu(x, float(_param(node, "negative_slope", 0.01)))


def _f_gelu(node, x):
    return F.gelu(x, approximate=_param(node, "approximate", "none"))


def _f_hardtanh(node, x):
    return F.hardtanh(x, float(_param(node, "min_val", -1.0)), float(_param(node, "max_val", 1.0)))


def _f_elu(node, x):
    alpha = float(_param(node, "alpha", 1.0))
    scale = float(_param(node, "scale", 1.0))
    input_scale = float(_param(node, "input_scale", 1.0))
    return torch.ops.aten.elu(x, alpha, scale, input_scale)


def _f_softplus(node, x):
    return F.softplus(x, float(_param(node, "beta", 1.0)), float(_param(node, "threshold", 20.0)))


def _f_pow(node, x):
    return torch.pow(x, _s(node, "exponent"))


def _f_clamp(node, x):
    return torch.clamp(x, _s(node, "min"), _s(node, "max"))


def _f_threshold(node, x):
    return F.threshold(x, float(_s(node, "threshold")), 0.0)


def _gelu_ratio(node, x):
    """``gelu(x) / x`` in closed form: ``Φ(x)`` (exact GELU) or ``(1 + tanh(√(2/π)(x + 0.044715x³))) / 2``."""
    if _param(node, "approximate", "none") == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
        return 0.5 * (1.0 + torch.tanh(inner))
    return 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def _leaky_ratio(node, x):
    slope = torch.full((), float(_param(node, "negative_slope", 0.01)), dtype=x.dtype, device=x.device)
    return torch.where(x > 0, torch.ones((), dtype=x.dtype, device=x.device), slope)


UNARY: dict[str, UnaryKernel] = {
    # piecewise-linear and homogeneous: y / x is the derivative, so the identity rule is the node's own backward
    "ReluBackward0": UnaryKernel(_f_relu, x_field=None, y_field="result",
                                 ratio=lambda n, x, y: (y > 0).to(y.dtype), identity_is_gradient=True,
                                 from_output=lambda n, y: (y, y > 0)),
    "LeakyReluBackward0": UnaryKernel(_f_leaky, ratio=lambda n, x, y: _leaky_ratio(n, x), limit_ratio=1.0,
                                      identity_is_gradient=True),
    "GeluBackward0": UnaryKernel(_f_gelu, ratio=lambda n, x, y: _gelu_ratio(n, x), limit_ratio=0.5),
    "SiluBackward0": UnaryKernel(lambda n, x: F.silu(x), ratio=lambda n, x, y: torch.sigmoid(x), limit_ratio=0.5),
    "MishBackward0": UnaryKernel(lambda n, x: F.mish(x), limit_ratio=math.tanh(math.log(2.0))),
    "TanhBackward0": UnaryKernel(lambda n, x: torch.tanh(x), x_field=None, y_field="result",
                                 inverse=lambda n, y: torch.atanh(y), limit_ratio=1.0),
    "SigmoidBackward0": UnaryKernel(lambda n, x: torch.sigmoid(x), x_field=None, y_field="result",
                                    inverse=lambda n, y: torch.logit(y), f0=0.5),
    "ExpBackward0": UnaryKernel(lambda n, x: torch.exp(x), x_field=None, y_field="result",
                                inverse=lambda n, y: torch.log(y), f0=1.0),
    "LogBackward0": UnaryKernel(lambda n, x: torch.log(x), f0=float("nan")),
    "SqrtBackward0": UnaryKernel(lambda n, x: torch.sqrt(x), x_field=None, y_field="result",
                                 inverse=lambda n, y: y * y),
    "RsqrtBackward0": UnaryKernel(lambda n, x: torch.rsqrt(x), x_field=None, y_field="result",
                                  inverse=lambda n, y: 1.0 / (y * y), f0=float("inf")),
    "ReciprocalBackward0": UnaryKernel(lambda n, x: torch.reciprocal(x), x_field=None, y_field="result",
                                       inverse=lambda n, y: torch.reciprocal(y), f0=float("inf")),
    "PowBackward0": UnaryKernel(_f_pow, limit_ratio=0.0),
    "HardtanhBackward0": UnaryKernel(_f_hardtanh, limit_ratio=1.0),
    "EluBackward0": UnaryKernel(_f_elu, limit_ratio=1.0),
    "SoftplusBackward0": UnaryKernel(_f_softplus, f0=math.log(2.0)),
    "HardswishBackward0": UnaryKernel(lambda n, x: F.hardswish(x), limit_ratio=0.5),
    "HardsigmoidBackward0": UnaryKernel(lambda n, x: F.hardsigmoid(x), f0=0.5),
    "AbsBackward0": UnaryKernel(lambda n, x: torch.abs(x), ratio=lambda n, x, y: torch.sign(x)),
    "ClampBackward1": UnaryKernel(_f_clamp, limit_ratio=1.0),
    "ClampMinBackward0": UnaryKernel(lambda n, x: torch.clamp_min(x, _s(n, "min")), limit_ratio=1.0),
    "ClampMaxBackward0": UnaryKernel(lambda n, x: torch.clamp_max(x, _s(n, "max")), limit_ratio=1.0),
    "ThresholdBackward0": UnaryKernel(_f_threshold, limit_ratio=0.0),
    "ErfBackward0": UnaryKernel(lambda n, x: torch.erf(x), limit_ratio=2.0 / math.sqrt(math.pi)),
    "SinBackward0": UnaryKernel(lambda n, x: torch.sin(x), limit_ratio=1.0),
    "CosBackward0": UnaryKernel(lambda n, x: torch.cos(x), f0=1.0),
}


# -----------------------------------------------------------------------------------------------------------
# Products
# -----------------------------------------------------------------------------------------------------------
class ProductKernel:
    """``a * b`` (``divide=False``) or ``a / b`` (``divide=True``) with both operands saved when both need grad.

    ``scalar`` marks the variant whose second operand is a Python scalar saved as ``other`` (``MulBackward1``,
    ``DivBackward1``): a pure scale.
    """

    #: a factor is the product divided by the other factor where that is non-zero (values on the support)
    support_role = "scale"

    def __init__(self, divide: bool = False, scalar: bool = False):
        self.divide = divide
        self.scalar = scalar

    def operand(self, node: Any, k: int) -> Tensor | None:
        v = _s(node, "self" if k == 0 else "other")
        if v is None:
            return None
        if not isinstance(v, torch.Tensor):
            # a Python float is a double: keep all of it (a 0-dim tensor does not up-cast float32 activations)
            v = torch.tensor(v, dtype=torch.float64) if isinstance(v, float) else torch.tensor(v)
        return v

    def rebuild(self, node, nr):
        a, b = self.operand(node, 0), self.operand(node, 1)
        if a is None or b is None:
            return None
        return a / b if self.divide else a * b

    def can_rebuild(self, node, nr):
        return _s(node, "self") is not None and _s(node, "other") is not None

    def replay(self, node, xs, nr):
        a = xs[0]
        b = xs[1] if len(xs) > 1 and xs[1] is not None else self.operand(node, 1)
        if b is None:
            raise ValueError("missing second operand")
        return a / b if self.divide else a * b


class NegKernel:
    """``-x``: a scale by -1."""

    support_role = "scale"
    divide = False
    scalar = True

    def operand(self, node: Any, k: int) -> Tensor:
        return torch.tensor(-1.0, dtype=torch.float64)

    def replay(self, node, xs, nr):
        return -xs[0]


# -----------------------------------------------------------------------------------------------------------
# Normalisation
# -----------------------------------------------------------------------------------------------------------
class NormKernel:
    """Normalisation ``y = (x - mean) * rstd * weight + bias`` with its statistics saved.

    ``kind`` is ``"layer"``, ``"batch"`` or ``"group"``. :meth:`grad_const` is the gradient with the
    normaliser (``rstd``, and for batch norm in eval mode also the mean) held constant; :meth:`shift` is the
    per-element additive term (``bias`` minus the scaled running mean) that the rule books as a bias sink.
    """

    def __init__(self, kind: str):
        self.kind = kind

    # -- statistics broadcast to x ------------------------------------------------------------------------
    def _layer_stats(self, node):
        x = _s(node, "input")
        nshape = _s(node, "normalized_shape")
        k = len(nshape)
        mean, rstd = _s(node, "result1"), _s(node, "result2")
        return x, k, mean, rstd

    def grad_const(self, node: Any, g: Tensor) -> Tensor:
        if self.kind == "layer":
            x, k, _, rstd = self._layer_stats(node)
            w = _s(node, "weight")
            gw = g * w if w is not None else g
            dims = tuple(range(-k, 0))
            return rstd * (gw - gw.mean(dim=dims, keepdim=True))
        if self.kind == "batch":
            x = _s(node, "input")
            w = _s(node, "weight")
            shape = (1, -1) + (1,) * (x.dim() - 2)
            if _s(node, "training"):
                invstd = _s(node, "result2").reshape(shape)
                gw = g * w.reshape(shape) if w is not None else g
                dims = (0,) + tuple(range(2, x.dim()))
                return invstd * (gw - gw.mean(dim=dims, keepdim=True))
            invstd = torch.rsqrt(_s(node, "running_var") + _s(node, "eps")).reshape(shape)
            scale = invstd * w.reshape(shape) if w is not None else invstd
            return g * scale
        if self.kind == "group":
            x = _s(node, "input")
            w = _s(node, "weight")
            n = x.shape[0]
            groups = _s(node, "group")
            shape = (1, -1) + (1,) * (x.dim() - 2)
            gw = g * w.reshape(shape) if w is not None else g
            gg = gw.reshape(n, groups, -1)
            rstd = _s(node, "result2").reshape(n, groups, 1)
            out = rstd * (gg - gg.mean(dim=-1, keepdim=True))
            return out.reshape(x.shape)
        raise ValueError(self.kind)  # pragma: no cover

    def forward(self, node: Any) -> Tensor:
        """The op's output from its saved tensors (an Arg Node)."""
        x = _s(node, "input")
        if self.kind == "layer":
            _, k, mean, rstd = self._layer_stats(node)
            y = (x - mean) * rstd
            w, b = _s(node, "weight"), _s(node, "bias")
        elif self.kind == "batch":
            shape = (1, -1) + (1,) * (x.dim() - 2)
            if _s(node, "training"):
                mean = _s(node, "result1").reshape(shape)
                invstd = _s(node, "result2").reshape(shape)
            else:
                mean = _s(node, "running_mean").reshape(shape)
                invstd = torch.rsqrt(_s(node, "running_var") + _s(node, "eps")).reshape(shape)
            y = (x - mean) * invstd
            w, b = _s(node, "weight"), None
            if w is not None:
                w = w.reshape(shape)
        else:
            n, groups = x.shape[0], _s(node, "group")
            mean = _s(node, "result1").reshape(n, groups, 1)
            rstd = _s(node, "result2").reshape(n, groups, 1)
            y = ((x.reshape(n, groups, -1) - mean) * rstd).reshape(x.shape)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            w, b = _s(node, "weight"), None
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
            return _s(node, "weight") is None
        if pos == 2:
            return _s(node, "bias" if self.kind == "layer" else "weight") is None
        return False

    def companion(self, node: Any, pos: int) -> tuple | None:
        """The shift of a frozen batch or group norm sits next to its running mean or weight in the model."""
        if pos != 2 or self.kind == "layer":
            return None
        if self.kind == "batch" and _s(node, "running_mean") is not None:
            rm = _s(node, "running_mean")
            return (rm, rm.shape[0], "running_mean", "bias")
        w = _s(node, "weight")
        return None if w is None else (w, w.shape[0], "weight", "bias")

    def rebuild(self, node, nr):
        if nr != 0 or _s(node, "input") is None:
            return None
        if self.kind != "layer":
            return None  # batch/group norm do not save their bias: rebuilt with the bias via replay
        return self.forward(node)

    def can_rebuild(self, node, nr):
        return nr == 0 and self.kind == "layer" and _s(node, "input") is not None

    def replay(self, node, xs, nr):
        """Output from the saved statistics plus the bias value (input 2) where the bias is not saved."""
        y = self.forward(node)
        if self.kind in ("batch", "group") and len(xs) > 2 and xs[2] is not None:
            y = y + xs[2].reshape((1, -1) + (1,) * (y.dim() - 2))
        return y


# -----------------------------------------------------------------------------------------------------------
# Softmax and attention
# -----------------------------------------------------------------------------------------------------------
class SoftmaxKernel:
    """``softmax`` / ``log_softmax`` along ``dim`` (the output is saved as ``result``)."""

    def __init__(self, log: bool = False):
        self.log = log


class AttentionKernel:
    """Fused ``scaled_dot_product_attention`` nodes (CPU flash, math-free CUDA flash/efficient/cuDNN).

    Inputs are ``(query, key, value[, attn_mask/bias])``; the node's own backward gives gradients that the
    AttnLRP and CP-LRP rules rescale.
    """

    output_field = "output"


class LeafKernel:
    """``AccumulateGrad``: a leaf tensor (input or parameter)."""


class EmbeddingKernel(RoutingKernel):
    """``embedding(weight, indices)``: rows of the weight, routed back by the node's backward."""

    @staticmethod
    def rebuild(node, nr):
        return None


# -----------------------------------------------------------------------------------------------------------
# Architecture coverage (issue 4): kernels of ops beyond the core set
# -----------------------------------------------------------------------------------------------------------
def replay_take_indices(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    """``topk``/``sort``/``kthvalue`` values: the input gathered at the saved indices along ``dim``."""
    idx = _s(node, "indices")
    dim = _s(node, "dim")
    if idx.dim() < xs[0].dim():  # kthvalue / median with keepdim=False
        idx = idx.unsqueeze(dim)
        return torch.gather(xs[0], dim, idx).squeeze(dim)
    return torch.gather(xs[0], dim, idx)


def replay_as_strided(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    """``as_strided`` replayed from its input's value.

    ``as_strided`` is defined on storage and autograd does not expose the input's memory layout, so the op is not
    re-applied blindly. Where the strides are the contiguous strides of ``size`` (size-1 dimensions ignored) with no
    storage offset and as many elements, it is a reshape. Otherwise the element map is read from the node's own
    backward (which knows the layout): probing it with the output positions ``1..n`` returns, at each input
    position, the output position that reads it. When every output element reads a distinct input element the
    replay is that gather; overlapping windows (an input element read twice) make the map ambiguous and the value
    is declared unavailable rather than guessed.
    """
    size = tuple(_s(node, "size"))
    stride = tuple(_s(node, "stride"))
    offset = _s(node, "storage_offset")
    x = xs[0]
    n_out = math.prod(size)
    if offset in (None, 0) and x.numel() == n_out and _contiguous_strides(size, stride):
        return x.reshape(size)
    meta = G.output_meta(node)[0]
    exact = {torch.float64: 2 ** 53, torch.float32: 2 ** 24}.get(meta.dtype, 0)
    problem = None
    if n_out >= exact:
        problem = "too many elements to probe its element map exactly"
    else:
        ids = torch.arange(1, n_out + 1, dtype=meta.dtype, device=meta.device).reshape(size)
        (pos,) = G.call_backward(node, [ids])[:1]
        (cnt,) = G.call_backward(node, [torch.ones_like(ids)])[:1]
        pos, cnt = pos.reshape(-1), cnt.reshape(-1)
        if bool((cnt > 1).any()) or int((cnt == 1).sum()) != n_out:
            problem = "overlapping windows make its element map ambiguous"
        else:
            src = torch.nonzero(cnt == 1).squeeze(1)
            out = x.new_empty(n_out)
            out[pos[src].round().long() - 1] = x.reshape(-1)[src]
            return out.reshape(size)
    from ..errors import ValueUnavailableError
    raise ValueUnavailableError(f"as_strided(size={size}, stride={stride}, storage_offset={offset}): {problem}, "
                                "so its value cannot be replayed")


def _contiguous_strides(size: Sequence[int], stride: Sequence[int]) -> bool:
    expected = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def upsample_forward(kind: str) -> Callable[[Any, Sequence[Tensor | None], int], Tensor]:
    """Forward of an interpolation node, with the exact scales autograd saved (``aten.upsample_*``).

    ``kind`` is one of ``linear1d``, ``bilinear2d``, ``bicubic2d``, ``trilinear3d``, ``bilinear2d_aa``,
    ``bicubic2d_aa``. These maps are linear with constant weights (non-negative except bicubic), so the sum
    rule applies (family ``pool``).
    """
    def forward(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
        x = xs[0]
        size = list(_s(node, "output_size"))
        ac = bool(_s(node, "align_corners"))
        if kind == "linear1d":
            return torch.ops.aten.upsample_linear1d(x, size, ac, _s(node, "scales"))
        if kind == "trilinear3d":
            return torch.ops.aten.upsample_trilinear3d(x, size, ac, _s(node, "scales_d"), _s(node, "scales_h"),
                                                       _s(node, "scales_w"))
        op = {"bilinear2d": torch.ops.aten.upsample_bilinear2d, "bicubic2d": torch.ops.aten.upsample_bicubic2d,
              "bilinear2d_aa": torch.ops.aten._upsample_bilinear2d_aa,
              "bicubic2d_aa": torch.ops.aten._upsample_bicubic2d_aa}[kind]
        return op(x, size, ac, _s(node, "scales_h"), _s(node, "scales_w"))
    return forward


def _grouped_spans(offs: Tensor, rows: int) -> list[tuple[int, int, int]]:
    """``(group, start, end)`` for each non-empty group of a grouped matmul with cumulative offsets."""
    spans, start = [], 0
    for g, end in enumerate(offs.tolist()):
        end = min(int(end), rows)
        if end > start:
            spans.append((g, start, end))
        start = max(start, end)
    return spans


class GroupedMmKernel(LinearKernel):
    """``torch._grouped_mm(x, w, offs)`` (Mixtral-style MoE experts): row block ``g`` of ``x`` (the tokens routed
    to expert ``g``, delimited by the cumulative ``offs``) times ``w[g]``. A linear op with weights, so the linear
    family's rule (ε...) applies per expert. ``x`` is ``(S, K)``, ``w`` ``(E, K, N)``; rows past ``offs[-1]``
    (expert-parallel sentinels) produce and receive zeros.
    """

    operands = (0, 1)
    saved_fields = ("self", "mat2")

    @staticmethod
    def offs(node: Any) -> Tensor:
        return _s(node, "offs")

    def f(self, node, a, b):
        offs = self.offs(node)
        if a.dim() == 2 and b.dim() == 3:
            out = a.new_zeros(a.shape[0], b.shape[-1])
            for g, s, e in _grouped_spans(offs, a.shape[0]):
                out[s:e] = a[s:e] @ b[g]
            return out
        return torch._grouped_mm(a, b, offs=offs)  # pragma: no cover - other layouts (3d x 2d...)

    def f_t(self, node, which, a, b, s):
        offs = self.offs(node)
        if not ((a is None or a.dim() == 2) and b.dim() == 3):  # pragma: no cover - other layouts
            raise NotImplementedError("grouped_mm: only the 2d x 3d (MoE experts) layout is supported")
        spans = _grouped_spans(offs, (a if a is not None else s).shape[0])
        if which == 0:
            out = s.new_zeros(s.shape[0], b.shape[-2])
            for g, st, e in spans:
                out[st:e] = s[st:e] @ b[g].transpose(-1, -2)
            return out
        out = b.new_zeros(b.shape)
        for g, st, e in spans:
            out[g] = a[st:e].transpose(-1, -2) @ s[st:e]
        return out


class GroupedMmFallbackKernel(GroupedMmKernel):
    """transformers' ``grouped_mm_fallback`` custom op (used where ``torch._grouped_mm`` is unavailable, e.g. on
    CPU with torch <= 2.8): the same product; ``input`` and ``weight`` in ``ctx.saved_tensors``, ``offs`` on the
    context."""

    saved_fields = ("saved_tensors.0", "saved_tensors.1")

    @staticmethod
    def offs(node: Any) -> Tensor:
        return node.offs


def _prelu_weight(node: Any, x: Tensor) -> Tensor:
    w = _s(node, "weight")
    if w.dim() == x.dim():
        return w
    shape = [1] * x.dim()
    if x.dim() >= 2 and w.numel() > 1:
        shape[1] = w.numel()
    return w.reshape(shape)


def _f_prelu(node: Any, x: Tensor) -> Tensor:
    return torch.where(x > 0, x, _prelu_weight(node, x) * x)


#: ``PreluKernelBackward0`` (inputs: x, weight): ``y = x`` for ``x > 0`` else ``a·x``; piecewise linear and
#: positively homogeneous, so the identity rule is gradient × input.
PRELU = UnaryKernel(_f_prelu, ratio=lambda n, x, y: torch.where(x > 0, torch.ones((), dtype=x.dtype),
                                                                 _prelu_weight(n, x)).to(x.dtype),
                    limit_ratio=1.0)


def _tanh_gelu(node: Any, x: Tensor) -> Tensor:
    # transformers.models.bloom.modeling_bloom.bloom_gelu_forward
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


#: BLOOM's ``GeLUFunction`` (a custom autograd Function): tanh-approximated GELU, input in ctx.saved_tensors[0].
BLOOM_GELU = UnaryKernel(_tanh_gelu, x_field="saved_tensors.0",
                         ratio=lambda n, x, y: 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))),
                         limit_ratio=0.5)


#: RecurrentGemma's ``SqrtBoundDerivative`` (a custom autograd Function): ``sqrt(x)`` whose backward clips the
#: derivative; input in ctx.saved_tensors[0]. An element-wise non-linearity with f(0) = 0.
RG_SQRT = UnaryKernel(lambda n, x: torch.sqrt(x), x_field="saved_tensors.0", limit_ratio=0.0)


def vector_norm_forward(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    """``torch.linalg.vector_norm`` with the node's saved ``ord``, ``dim`` and ``keepdim``."""
    dim = _s(node, "dim")
    return torch.linalg.vector_norm(xs[0], _s(node, "ord"), dim=None if dim is None else tuple(dim),
                                    keepdim=bool(_s(node, "keepdim")))


#: ``LinalgVectorNormBackward0``: a vector norm is positively homogeneous of degree 1, so by Euler's theorem
#: ``‖x‖ = Σ_i x_i ∂‖x‖/∂x_i``: the z-rule in gradient form (the node's backward) is exactly conservative
#: (``R_i = x_i² / ‖x‖² · R`` for the 2-norm). Family ``reduce``: the sum rule. (``ord=0``, which counts non-zeros,
#: is homogeneous of degree 0 and loses its relevance; no model uses it as a layer.)
VECTOR_NORM = SumKernel(vector_norm_forward, None, lambda node, nr: _s(node, "result") if nr == 0 else None)
