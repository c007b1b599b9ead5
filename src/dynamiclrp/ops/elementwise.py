"""Element-wise ops: non-linearities ``y = f(x)`` (:class:`UnaryKernel`), products and quotients
(:class:`ProductKernel`), negation, and the element-wise maximum/minimum rebuilt from their saved operands."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..core.graph import saved

Tensor = torch.Tensor


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
        #: ``from_output`` is exact in every precision (ReLU); the inverses of saturating maps lose digits below
        #: float64, so the Promise System prefers recomputing to them there
        self.exact_inverse = False

    def rebuild(self, node, nr):
        if self.y_field is not None:
            y = saved(node, self.y_field)
            if y is not None:
                return y
        if self.x_field is not None:
            x = saved(node, self.x_field)
            if x is not None:
                return self.f(node, x)
        return None

    def can_rebuild(self, node, nr):
        return (self.y_field is not None and saved(node, self.y_field) is not None) or (
            self.x_field is not None and saved(node, self.x_field) is not None)

    def replay(self, node, xs, nr):
        return self.f(node, xs[0])


def _inverse_on_finite(inverse: Callable[[Any, Tensor], Tensor]) -> Callable[[Any, Tensor], tuple[Tensor, Tensor]]:
    def from_output(node: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        x = inverse(node, y)
        return x, well_conditioned(inverse, node, y, x)
    return from_output


def well_conditioned(inverse: Callable[[Any, Tensor], Tensor], node: Any, y: Tensor, x: Tensor) -> Tensor:
    """Where ``x = inverse(y)`` is exact to the dtype's precision: finite, and moved by less than ``eps^0.625``
    (relative, or absolute near 0; 1.6e-10 in float64, 4.6e-5 in float32) when ``y`` moves by one unit in the last
    place. Near saturation (``tanh`` at 0.9999999999) the saved output no longer determines its input: one ulp of
    ``y`` is a large step in ``x``."""
    ok = torch.isfinite(x)
    if not y.is_floating_point():
        return ok
    up = torch.nextafter(y, torch.full_like(y, float("inf")))
    x2 = inverse(node, up)
    tol = torch.finfo(y.dtype).eps ** 0.625
    return ok & torch.isfinite(x2) & ((x2 - x).abs() <= tol * x.abs().clamp(min=1.0))


def _param(node, name, default):
    v = saved(node, name)
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
    return torch.pow(x, saved(node, "exponent"))


def _f_clamp(node, x):
    return torch.clamp(x, saved(node, "min"), saved(node, "max"))


def _f_threshold(node, x):
    return F.threshold(x, float(saved(node, "threshold")), 0.0)


def _f_celu(node, x):
    return F.celu(x, float(_param(node, "alpha", 1.0)))


def _rrelu_slope(node: Any, x: Tensor) -> Tensor:
    """``y / x`` of ``rrelu``: in training the per-element slope autograd saved as ``noise`` (1 where ``x >= 0``);
    in evaluation the fixed slope ``(lower + upper) / 2`` on the negative side."""
    if bool(_param(node, "training", False)):
        return saved(node, "noise").to(x.dtype)
    slope = (float(_param(node, "lower", 1.0 / 8)) + float(_param(node, "upper", 1.0 / 3))) / 2
    return torch.where(x >= 0, torch.ones((), dtype=x.dtype, device=x.device),
                       torch.full((), slope, dtype=x.dtype, device=x.device))


def _f_rrelu(node, x):
    return x * _rrelu_slope(node, x)


def _sign_ratio(node, x, y):
    """``sign(x) / x = 1 / |x|`` (0 at ``x = 0``, where ``sign(0) = 0`` carries no relevance)."""
    ax = x.abs()
    return torch.where(ax > 0, 1.0 / torch.where(ax > 0, ax, 1), torch.zeros((), dtype=x.dtype, device=x.device))


def _gelu_ratio(node, x):
    """``gelu(x) / x`` = ``Φ(x)`` (exact GELU; its tanh approximation likewise), ``1/2`` at ``x = 0``: the fused
    ``gelu`` kernel and one division (``erf`` alone costs several times the whole GELU on a CPU)."""
    y = F.gelu(x, approximate=_param(node, "approximate", "none"))
    if torch.is_grad_enabled() and x.requires_grad:  # differentiable relevance: no in-place ops
        return torch.nan_to_num(y / x, nan=0.5)
    return y.div_(x).nan_to_num_(nan=0.5)


def _leaky_ratio(node, x):
    slope = torch.full((), float(_param(node, "negative_slope", 0.01)), dtype=x.dtype, device=x.device)
    return torch.where(x > 0, torch.ones((), dtype=x.dtype, device=x.device), slope)


def _exact(kernel: UnaryKernel) -> UnaryKernel:
    kernel.exact_inverse = True
    return kernel


UNARY: dict[str, UnaryKernel] = {
    # piecewise-linear and homogeneous: y / x is the derivative, so the identity rule is the node's own backward
    "ReluBackward0": _exact(UnaryKernel(_f_relu, x_field=None, y_field="result",
                                        ratio=lambda n, x, y: (y > 0).to(y.dtype), identity_is_gradient=True,
                                        from_output=lambda n, y: (y, y > 0))),
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
    "ClampMinBackward0": UnaryKernel(lambda n, x: torch.clamp_min(x, saved(n, "min")), limit_ratio=1.0),
    "ClampMaxBackward0": UnaryKernel(lambda n, x: torch.clamp_max(x, saved(n, "max")), limit_ratio=1.0),
    "ThresholdBackward0": UnaryKernel(_f_threshold, limit_ratio=0.0),
    "ErfBackward0": UnaryKernel(lambda n, x: torch.erf(x), limit_ratio=2.0 / math.sqrt(math.pi)),
    "SinBackward0": UnaryKernel(lambda n, x: torch.sin(x), limit_ratio=1.0),
    "CosBackward0": UnaryKernel(lambda n, x: torch.cos(x), f0=1.0),
    # CELU (Barron 2017): smooth, celu(0) = 0 and celu'(0) = 1; the identity rule (AttnLRP) passes R_x = R_y
    "CeluBackward0": UnaryKernel(_f_celu, limit_ratio=1.0),
    # log σ(x) = -softplus(-x): log σ(0) = -log 2 != 0, so relevance arriving where x == 0 cannot reach x (the
    # identity rule's sink, booked by the ledger)
    "LogSigmoidBackward0": UnaryKernel(lambda n, x: F.logsigmoid(x), f0=-math.log(2.0)),
    # randomized leaky ReLU: y = x·a with the slope a autograd saved (training) or the mean slope (evaluation);
    # piecewise linear and positively homogeneous, so the identity rule is the node's own backward (LRP-0 is
    # gradient × input)
    "RreluWithNoiseBackward0": UnaryKernel(_f_rrelu, ratio=lambda n, x, y: _rrelu_slope(n, x), limit_ratio=1.0,
                                           identity_is_gradient=True),
    # sign(x): piecewise constant, not homogeneous, so gradient × input (0) would delete relevance; the identity
    # rule for a function of one input (AttnLRP) gives R_x = R_y, i.e. G_x = G_y · sign(x) / x. Nothing saved:
    # the input comes from the Promise System
    "SignBackward0": UnaryKernel(lambda n, x: torch.sign(x), x_field=None, ratio=_sign_ratio),
}


def _prelu_weight(node: Any, x: Tensor) -> Tensor:
    w = saved(node, "weight")
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
        v = saved(node, "self" if k == 0 else "other")
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
        return saved(node, "self") is not None and saved(node, "other") is not None

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


def binary_rebuild(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Any, int], Tensor | None]:
    """``fn(self, other)`` from the two saved operands (element-wise maximum, minimum...)."""
    def rebuild(node: Any, nr: int) -> Tensor | None:
        a, b = saved(node, "self"), saved(node, "other")
        return None if a is None or b is None else fn(a, b)
    return rebuild
