"""Explicit-matrix reference implementations of the LRP rules for one linear-type layer.

This module is a *yardstick*: it must not import ``dynamiclrp`` (nor Zennit). Every rule is written from the
math on the dense contribution matrix of a single layer, in float64, one sample at a time:

* The layer (``nn.Linear``, ``conv{1,2,3}d``, ``conv_transpose{1,2,3}d``, average pooling, ``sum``) is turned
  into its dense matrix ``M`` of shape ``(n_out, n_in)`` by applying the *bias-free* op to the ``n_in``
  basis vectors of the per-sample input space (:func:`dense_matrix`). For linear, convolution and transposed
  convolution every entry ``M[j, i]`` is either 0 or exactly one weight element (the kernel offset linking
  input ``i`` and output ``j`` is unique), so clamping ``M`` equals the matrix of the clamped weights, and
  squaring ``M`` equals the matrix of the squared weights.
* Contributions: ``Z[j, i] = M[j, i] * x[i]`` and ``z[j] = sum_i Z[j, i] + b[j]`` (``b`` broadcast to the output).
  ``Z^+ = max(Z, 0)`` and ``Z^- = min(Z, 0)``; note ``Z^+ = x^+ w^+ + x^- w^-`` and ``Z^- = x^+ w^- + x^- w^+``,
  which is how Zennit builds them from clamped inputs and clamped weights.
* Stabilizer (Zennit 0.5.1, ``zennit.core.stabilize``): ``stab(d) = d + eps * sgn0(d)`` with ``sgn0(d) = +1``
  for ``d >= 0`` and ``-1`` otherwise (so ``sign(0) = +1``). With ``eps = 0`` this reference defines
  ``0/0 := 0`` (any ``n/0 := 0``); Zennit itself returns ``inf``/``nan`` there.

All rule functions share the signature ``rule(weight, bias, op, x, R, ..., zero_params=None) -> R_in`` with
``x`` of shape ``(B, *in_shape)``, ``R`` of shape ``(B, *out_shape)`` (the layer's output shape) and the
returned input relevance of shape ``x.shape`` in float64. ``zero_params`` follows Zennit: a parameter name or
list of names (``"bias"``, ``"weight"``) whose values are replaced by zeros before the rule is evaluated
(``zero_params="bias"`` is the "bias treated as absent" variant; passing ``bias=None`` is equivalent).
:func:`non_conserved` gives the per-sample ledger entry ``sum(R) - sum(R_in)``.

Sources: Zennit 0.5.1 ``zennit/rules.py`` and ``zennit/core.py`` (definitions checked against its code; see
``tests/test_reference_vs_zennit.py`` for the parity tests); Bach et al. 2015 (ε, α-β), Montavon et al. 2017
(z⁺, z^B, w²), Montavon et al. 2019 (γ), Andéol et al. 2021 (generalised γ), Lapuschkin et al. 2019 (flat).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Op",
    "from_module",
    "dense_matrix",
    "bias_vector",
    "stabilize",
    "safe_divide",
    "epsilon",
    "lrp0",
    "gamma",
    "zplus",
    "alpha_beta",
    "zbox",
    "wsquare",
    "flat",
    "pass_rule",
    "norm",
    "non_conserved",
    "RULES",
]

IntOrTuple = Union[int, Sequence[int]]
ZeroParams = Optional[Union[str, Sequence[str]]]

_CONV = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
_CONVT = {"conv_transpose1d": 1, "conv_transpose2d": 2, "conv_transpose3d": 3}
_POOL = {"avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3}
_APOOL = {"adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3}
_DTYPE = torch.float64


@dataclass(frozen=True)
class Op:
    """Description of a linear-type operation (everything except its weight and bias).

    Parameters
    ----------
    kind : str
        One of ``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"conv3d"``, ``"conv_transpose1d"``,
        ``"conv_transpose2d"``, ``"conv_transpose3d"``, ``"avg_pool{1,2,3}d"``, ``"adaptive_avg_pool{1,2,3}d"``
        or ``"sum"`` (the last three families have no weight; they exist for the ``Norm`` rule).
    stride, padding, dilation, output_padding : int or tuple of int
        As in ``torch.nn.functional``. ``stride=None`` means 1 for convolutions and ``kernel_size`` for pooling.
    groups : int
        Convolution groups.
    kernel_size : int or tuple of int, optional
        Pooling window (pooling only).
    output_size : int or tuple of int, optional
        Adaptive pooling output size.
    ceil_mode, count_include_pad : bool
        Average-pooling options.
    dim : int
        Summed dimension for ``kind="sum"`` (as ``zennit.layer.Sum``: an index into the *batched* tensor).
    """

    kind: str
    stride: Optional[IntOrTuple] = None
    padding: IntOrTuple = 0
    dilation: IntOrTuple = 1
    groups: int = 1
    output_padding: IntOrTuple = 0
    kernel_size: Optional[IntOrTuple] = None
    output_size: Optional[IntOrTuple] = None
    ceil_mode: bool = False
    count_include_pad: bool = True
    dim: int = -1

    @property
    def has_weight(self) -> bool:
        """Whether the op takes a weight (linear, convolutions)."""
        return self.kind == "linear" or self.kind in _CONV or self.kind in _CONVT

    def apply(self, x: Tensor, weight: Optional[Tensor]) -> Tensor:
        """Apply the op *without bias* to a batched input ``x``.

        Parameters
        ----------
        x : Tensor
            Batched input ``(N, *in_shape)``.
        weight : Tensor or None
            Weight (ignored for weightless ops).

        Returns
        -------
        Tensor
            ``(N, *out_shape)``.
        """
        k = self.kind
        stride = 1 if self.stride is None else self.stride
        if k == "linear":
            return F.linear(x, weight)
        if k in _CONV:
            fn = (F.conv1d, F.conv2d, F.conv3d)[_CONV[k] - 1]
            return fn(x, weight, None, stride=stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        if k in _CONVT:
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[_CONVT[k] - 1]
            return fn(x, weight, None, stride=stride, padding=self.padding, output_padding=self.output_padding,
                      groups=self.groups, dilation=self.dilation)
        if k in _POOL:
            fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[_POOL[k] - 1]
            return fn(x, self.kernel_size, stride=self.stride, padding=self.padding, ceil_mode=self.ceil_mode,
                      count_include_pad=self.count_include_pad)
        if k in _APOOL:
            fn = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[_APOOL[k] - 1]
            return fn(x, self.output_size)
        if k == "sum":
            return x.sum(dim=self.dim)
        raise ValueError(f"unknown op kind {k!r}")


def from_module(module: torch.nn.Module) -> tuple[Optional[Tensor], Optional[Tensor], Op]:
    """Extract ``(weight, bias, op)`` from a ``torch.nn`` module.

    Supports ``Linear``, ``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d``, ``AvgPool{1,2,3}d``,
    ``AdaptiveAvgPool{1,2,3}d`` and any module named ``Sum`` with a ``dim`` attribute (``zennit.layer.Sum``;
    matched by name so that this module does not import Zennit).

    Parameters
    ----------
    module : torch.nn.Module
        The layer.

    Returns
    -------
    tuple
        ``(weight, bias, op)``; weight/bias are detached float64 copies or ``None``.
    """
    nn = torch.nn

    def _p(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.detach().to(_DTYPE).clone()

    if isinstance(module, nn.Linear):
        return _p(module.weight), _p(module.bias), Op("linear")
    for cls, kind in ((nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d")):
        if type(module) is cls:
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise NotImplementedError("only numeric zero padding is supported")
            return _p(module.weight), _p(module.bias), Op(kind, stride=module.stride, padding=module.padding,
                                                          dilation=module.dilation, groups=module.groups)
    for cls, kind in ((nn.ConvTranspose1d, "conv_transpose1d"), (nn.ConvTranspose2d, "conv_transpose2d"),
                      (nn.ConvTranspose3d, "conv_transpose3d")):
        if type(module) is cls:
            return _p(module.weight), _p(module.bias), Op(kind, stride=module.stride, padding=module.padding,
                                                          dilation=module.dilation, groups=module.groups,
                                                          output_padding=module.output_padding)
    for cls, kind in ((nn.AvgPool1d, "avg_pool1d"), (nn.AvgPool2d, "avg_pool2d"), (nn.AvgPool3d, "avg_pool3d")):
        if type(module) is cls:
            if getattr(module, "divisor_override", None) is not None:
                raise NotImplementedError("divisor_override is not supported")
            return None, None, Op(kind, kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                                  ceil_mode=module.ceil_mode, count_include_pad=module.count_include_pad)
    for cls, kind in ((nn.AdaptiveAvgPool1d, "adaptive_avg_pool1d"), (nn.AdaptiveAvgPool2d, "adaptive_avg_pool2d"),
                      (nn.AdaptiveAvgPool3d, "adaptive_avg_pool3d")):
        if type(module) is cls:
            return None, None, Op(kind, output_size=module.output_size)
    if type(module).__name__ == "Sum" and hasattr(module, "dim"):
        return None, None, Op("sum", dim=module.dim)
    raise NotImplementedError(f"no reference op for {type(module).__name__}")


def dense_matrix(op: Op, weight: Optional[Tensor], in_shape: Sequence[int]) -> tuple[Tensor, tuple[int, ...]]:
    """Dense matrix of the bias-free op on one sample, built from the op applied to basis vectors.

    Parameters
    ----------
    op : Op
        The operation.
    weight : Tensor or None
        Weight of the op (``None`` for weightless ops).
    in_shape : sequence of int
        Per-sample input shape (without batch dimension).

    Returns
    -------
    M : Tensor
        ``(n_out, n_in)`` float64 matrix with ``op(x)[j] = sum_i M[j, i] x[i]`` (flattened sample).
    out_shape : tuple of int
        Per-sample output shape.
    """
    in_shape = tuple(int(s) for s in in_shape)
    n_in = 1
    for s in in_shape:
        n_in *= s
    basis = torch.eye(n_in, dtype=_DTYPE).reshape((n_in,) + in_shape)
    w = None if weight is None else weight.to(_DTYPE)
    with torch.no_grad():
        out = op.apply(basis, w)
    out_shape = tuple(out.shape[1:])
    return out.reshape(n_in, -1).T.contiguous(), out_shape


def bias_vector(op: Op, bias: Optional[Tensor], out_shape: Sequence[int]) -> Tensor:
    """Bias broadcast to the flattened per-sample output (zeros when ``bias is None``).

    For linear layers the bias runs along the last output dimension; for (transposed) convolutions along the
    channel dimension (the first per-sample dimension).

    Parameters
    ----------
    op : Op
        The operation.
    bias : Tensor or None
        Bias vector.
    out_shape : sequence of int
        Per-sample output shape.

    Returns
    -------
    Tensor
        ``(n_out,)`` float64.
    """
    out_shape = tuple(out_shape)
    if bias is None:
        return torch.zeros(out_shape, dtype=_DTYPE).reshape(-1)
    b = bias.to(_DTYPE)
    if op.kind == "linear":
        return torch.broadcast_to(b, out_shape).reshape(-1).clone()
    b = b.reshape((-1,) + (1,) * (len(out_shape) - 1))
    return torch.broadcast_to(b, out_shape).reshape(-1).clone()


def stabilize(d: Tensor, eps: float) -> Tensor:
    """Zennit's default stabilizer ``d + eps * sgn0(d)`` with ``sgn0(0) = +1``.

    Source: ``zennit.core.stabilize`` (``clip=False, norm_scale=False``).

    Parameters
    ----------
    d : Tensor
        Denominator.
    eps : float
        Stabilizer.

    Returns
    -------
    Tensor
        Stabilized denominator.
    """
    return d + eps * torch.where(d >= 0, torch.ones_like(d), -torch.ones_like(d))


def safe_divide(n: Tensor, d: Tensor) -> Tensor:
    """``n / d`` with ``n / 0 := 0`` (so ``0/0 := 0``); used for the ``eps = 0`` limits."""
    zero = d == 0
    return torch.where(zero, torch.zeros_like(n), n / torch.where(zero, torch.ones_like(d), d))


def _zero_set(zero_params: ZeroParams) -> set[str]:
    if zero_params is None:
        return set()
    if isinstance(zero_params, str):
        return {zero_params}
    return set(zero_params)


def _prep(weight: Optional[Tensor], bias: Optional[Tensor], op: Op, x: Tensor, R: Tensor,
          zero_params: ZeroParams) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[int, ...], Tensor, Tensor]:
    """Common setup: flatten, build ``M`` (with zeroed params), the effective bias and the original bias."""
    zp = _zero_set(zero_params)
    unknown = zp - {"weight", "bias"}
    if unknown:
        raise ValueError(f"unsupported zero_params {sorted(unknown)}")
    x = x.detach().to(_DTYPE)
    in_shape = tuple(x.shape[1:])
    w_orig = None if weight is None else weight.detach().to(_DTYPE)
    M_orig, out_shape = dense_matrix(op, w_orig, in_shape)
    M = torch.zeros_like(M_orig) if "weight" in zp else M_orig
    b_orig = bias_vector(op, None if bias is None else bias.detach(), out_shape)
    b = torch.zeros_like(b_orig) if "bias" in zp else b_orig
    R = R.detach().to(_DTYPE)
    if tuple(R.shape[1:]) != out_shape or R.shape[0] != x.shape[0]:
        raise ValueError(f"R has shape {tuple(R.shape)}, expected {(x.shape[0],) + out_shape}")
    return x.reshape(x.shape[0], -1), R.reshape(R.shape[0], -1), M, b, in_shape, M_orig, b_orig


def _redistribute(num: Tensor, den: Tensor, R: Tensor, eps: float) -> Tensor:
    """``R_in[i] = sum_j num[j, i] * R[j] / stab(den[j])`` (``n/0 := 0`` when ``eps == 0``)."""
    return (num * safe_divide(R, stabilize(den, eps))[:, None]).sum(0)


def _per_sample(x2: Tensor, R2: Tensor, in_shape: tuple[int, ...],
                fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    out = torch.stack([fn(x2[s], R2[s]) for s in range(x2.shape[0])])
    return out.reshape((x2.shape[0],) + in_shape)


def epsilon(weight: Optional[Tensor], bias: Optional[Tensor], op: Op, x: Tensor, R: Tensor, epsilon: float = 1e-6,
            zero_params: ZeroParams = None) -> Tensor:
    r"""LRP-ε (Bach et al. 2015; ``zennit.rules.Epsilon``).

    .. math:: R_i = \sum_j \frac{x_i w_{ij}}{\operatorname{stab}_\varepsilon(z_j)} R_j,\qquad
              z_j = \sum_i x_i w_{ij} + b_j

    The bias is part of the denominator (a relevance sink) unless zeroed via ``zero_params``. ``epsilon=0``
    gives LRP-0 with ``0/0 := 0``.

    Parameters
    ----------
    weight, bias : Tensor or None
        Layer parameters.
    op : Op
        The linear-type op.
    x : Tensor
        Layer input ``(B, *in_shape)``.
    R : Tensor
        Output relevance ``(B, *out_shape)``.
    epsilon : float
        Stabilizer ε (signed, ``sign(0)=+1``).
    zero_params : str or list of str, optional
        Parameters set to zero (Zennit semantics).

    Returns
    -------
    Tensor
        Input relevance, shape of ``x``.
    """
    x2, R2, M, b, in_shape, _, _ = _prep(weight, bias, op, x, R, zero_params)

    def one(xs: Tensor, Rs: Tensor) -> Tensor:
        Z = M * xs[None, :]
        return _redistribute(Z, Z.sum(1) + b, Rs, epsilon)

    return _per_sample(x2, R2, in_shape, one)


def lrp0(weight: Optional[Tensor], bias: Optional[Tensor], op: Op, x: Tensor, R: Tensor,
         zero_params: ZeroParams = None) -> Tensor:
    """LRP-0: :func:`epsilon` with ``epsilon=0`` and the convention ``0/0 := 0`` (Zennit gives nan there)."""
    return epsilon(weight, bias, op, x, R, epsilon=0.0, zero_params=zero_params)


def gamma(weight: Optional[Tensor], bias: Optional[Tensor], op: Op, x: Tensor, R: Tensor, gamma: float = 0.25,
          stabilizer: float = 1e-6, zero_params: ZeroParams = None) -> Tensor:
    r"""Generalised, sign-aware LRP-γ exactly as ``zennit.rules.Gamma`` (0.5.1) computes it.

    The branch is selected by the sign of the *unmodified* output :math:`z_j = \sum_i Z_{ij} + b_j`
    (original weight **and original bias**, even when ``zero_params`` zeroes them; Zennit's fifth,
    unmodified forward pass):

    .. math::
        R_i = \sum_{j: z_j > 0} \frac{Z_{ij} + \gamma Z^+_{ij}}
                                     {\operatorname{stab}(\sum_k (Z_{kj} + \gamma Z^+_{kj}) + b'_j + \gamma b'^+_j)} R_j
            + \sum_{j: z_j < 0} \frac{Z_{ij} + \gamma Z^-_{ij}}
                                     {\operatorname{stab}(\sum_k (Z_{kj} + \gamma Z^-_{kj}) + b'_j + \gamma b'^-_j)} R_j

    with :math:`Z_{ij} = x_i w_{ij}`, :math:`Z^\pm` its positive/negative part, :math:`b'` the (possibly zeroed)
    bias, and outputs with :math:`z_j = 0` receiving nothing. Derivation: Zennit's positive branch sums
    ``x⁺(w + γw⁺) + x⁻(w + γw⁻)`` (bias ``b + γb⁺`` only on the first term), which equals
    :math:`Z + \gamma Z^+`; symmetrically for the negative branch. For positive inputs and positive outputs this
    is the original γ-rule of Montavon et al. 2019 with a bias term.

    Parameters
    ----------
    weight, bias, op, x, R, zero_params
        See :func:`epsilon`.
    gamma : float
        γ ≥ 0.
    stabilizer : float
        Signed stabilizer of both denominators.

    Returns
    -------
    Tensor
        Input relevance.
    """
    x2, R2, M, b, in_shape, M_orig, b_orig = _prep(weight, bias, op, x, R, zero_params)

    def one(xs: Tensor, Rs: Tensor) -> Tensor:
        Z = M * xs[None, :]
        z_orig = (M_orig * xs[None, :]).sum(1) + b_orig
        num_p = Z + gamma * Z.clamp(min=0)
        num_n = Z + gamma * Z.clamp(max=0)
        den_p = num_p.sum(1) + b + gamma * b.clamp(min=0)
        den_n = num_n.sum(1) + b + gamma * b.clamp(max=0)
        Rp = torch.where(z_orig > 0, Rs, torch.zeros_like(Rs))
        Rn = torch.where(z_orig < 0, Rs, torch.zeros_like(Rs))
        return _redistribute(num_p, den_p, Rp, stabilizer) + _redistribute(num_n, den_n, Rn, stabilizer)

    return _per_sample(x2, R2, in_shape, one)


def zplus(weight: Optional[Tensor], bias: Optional[Tensor], op: Op, x: Tensor, R: Tensor, stabilizer: float = 1e-6,
          zero_params: ZeroParams = None) -> Tensor:
    r"""LRP-z⁺ (``zennit.rules.ZPlus``; = α1β0 with negative inputs allowed).

    .. math:: R_i = \sum_j \frac{Z^+_{ij}}{\operatorname{stab}(\sum_k Z^+_{kj} + b'^+_j)} R_j

    with :math:`Z^+_{ij} = x_i^+ w_{ij}^+ + x_i^- w_{ij}^-` and only the positive part of the bias in the
    denominator (Zennit clamps the bias with the weight in the ``x⁺`` pass and zeroes it in the ``x⁻`` pass).

    Parameters
    ----------
    weight, bias, op, x, R, zero_params
        See :func:`epsilon`.
    stabilizer : float
        Signed stabilizer.

    Returns
    -------
    Tensor
        Input relevance.
    """
    x2, R2, M, b, in_shape, _, _ = _prep(weight, bias, op, x, R, zero_params)

    def one(xs: Tensor, Rs: Tensor) -> Tensor:
        Zp = (M * xs[None, :]).clamp(min=0)
        return _redistribute(Zp, Zp.sum(1) + b.clamp(min=0), Rs, stabilizer)

    return _per_sample(x2, R2, in_shape, one)


def alpha_beta(weight: Optional[Tensor], bias: Optional[Tensor], op: Op, x: Tensor, R: Tensor, alpha: float = 2.0,
               beta: float = 1.0, stabilizer: float = 1e-6, zero_params: ZeroParams = None) -> Tensor:
    r"""LRP-αβ (Bach et al. 2015; ``zennit.rules.AlphaBeta``).

    .. math::
        R_i = \sum_j \Big(\alpha \frac{Z^+_{ij}}{\operatorname{stab}(\sum_k Z^+_{kj} + b'^+_j)}
                        - \beta \frac{Z^-_{ij}}{\operatorname{stab}(\sum_k Z^-_{kj} + b'^-_j)}\Big) R_j

    Both branches are normalised separately; the positive bias part joins the positive denominator and the
    negative part the negative one. A negative denominator is stabilized to ``d - eps``; a zero negative
    denominator (no negative contributions) to ``+eps`` with a zero numerator, i.e. it contributes nothing.
    Zennit additionally requires ``alpha - beta == 1`` and ``alpha, beta >= 0``; this reference does not.

    Parameters
    ----------
    weight, bias, op, x, R, zero_params
        See :func:`epsilon`.
    alpha, beta : float
        Weights of the positive and negative branch.
    stabilizer : float
        Signed stabilizer.

    Returns
    -------
    Tensor
        Input relevance.
    """
    x2, R2, M, b, in_shape, _, _ = _prep(weight, bias, op, x, R, zero_params)

    def one(xs: Tensor, Rs: Tensor) -> Tensor:
        Z = M * xs[None, :]
        Zp, Zn = Z.clamp(min=0), Z.clamp(max=0)
        return (alpha * _redistribute(Zp, Zp.sum(1) + b.clamp(min=0), Rs, stabilizer)
                - beta * _redistribute(Zn, Zn.sum(1) + b.clamp(max=0), Rs, stabilizer))

    return _per_sample(x2, R2, in_shape, one)


def _expand_bound(bound: Union[float, Tensor], x: Tensor) -> Tensor:
    """Expand a ZBox bound to ``x.shape`` the way ``zennit.core.expand`` does.

    Scalars broadcast; a tensor with fewer dimensions than ``x`` gets singleton dimensions *appended* (so
    ``(1, 3)`` is read as ``(1, 3, 1, 1)`` for images); a leading dimension larger than the batch is cut.
    """
    t = torch.as_tensor(bound, dtype=_DTYPE)
    if t.ndim == 0:
        return t.expand(x.shape)
    if t.ndim < x.ndim:
        t = t.reshape(tuple(t.shape) + (1,) * (x.ndim - t.ndim))
    if t.shape[0] > x.shape[0]:
        t = t[: x.shape[0]]
    return t.expand(x.shape)


def zbox(weight: Optional[Tensor], bias: Optional[Tensor], op: Op, x: Tensor, R: Tensor, low: Union[float, Tensor],
         high: Union[float, Tensor], stabilizer: float = 1e-6, zero_params: ZeroParams = None) -> Tensor:
    r"""LRP-z^B / ZBox (Montavon et al. 2017; ``zennit.rules.ZBox``) for bounded inputs ``low <= x <= high``.

    .. math::
        R_i = \sum_j \frac{x_i w_{ij} - l_i w^+_{ij} - h_i w^-_{ij}}
                          {\operatorname{stab}(\sum_k x_k w_{kj} - l_k w^+_{kj} - h_k w^-_{kj})} R_j

    ``low``/``high`` are scalars or tensors (per-channel ``(1, C, 1, 1)`` or per-pixel ``(1, C, H, W)``),
    expanded as in :func:`_expand_bound`. The bias cancels *exactly* in Zennit's denominator
    (``(Wx + b) - (W⁺l + b⁺) - (W⁻h + b⁻)`` and ``b - b⁺ - b⁻ = 0``), so biases never matter for ZBox.

    Parameters
    ----------
    weight, bias, op, x, R, zero_params
        See :func:`epsilon`.
    low, high : float or Tensor
        Input bounds.
    stabilizer : float
        Signed stabilizer.

    Returns
    -------
    Tensor
        Input relevance.
    """
    x2, R2, M, b, in_shape, _, _ = _prep(weight, bias, op, x, R, zero_params)
    xd = x.detach().to(_DTYPE)
    L = _expand_bound(low, xd).reshape(x2.shape)
    H = _expand_bound(high, xd).reshape(x2.shape)
    Mp, Mn = M.clamp(min=0), M.clamp(max=0)
    out = []
    for s in range(x2.shape[0]):
        num = M * x2[s][None, :] - Mp * L[s][None, :] - Mn * H[s][None, :]
        out.append(_redistribute(num, num.sum(1), R2[s], stabilizer))
    return torch.stack(out).reshape((x2.shape[0],) + in_shape)


def wsquare(weight: Optional[Tensor], bias: Optional[Tensor], op: Op, x: Tensor, R: Tensor, stabilizer: float = 1e-6,
            zero_params: ZeroParams = None) -> Tensor:
    r"""LRP-w² (Montavon et al. 2017; ``zennit.rules.WSquare``): independent of ``x``.

    .. math:: R_i = \sum_j \frac{w_{ij}^2}{\operatorname{stab}(\sum_k w_{kj}^2 + b_j'^2)} R_j

    Zennit squares *all* parameters, so the squared bias ``b²`` joins the denominator (a sink) unless zeroed.

    Parameters
    ----------
    weight, bias, op, x, R, zero_params
        See :func:`epsilon`.
    stabilizer : float
        Signed stabilizer.

    Returns
    -------
    Tensor
        Input relevance.
    """
    x2, R2, M, b, in_shape, _, _ = _prep(weight, bias, op, x, R, zero_params)
    M2 = M ** 2
    den = M2.sum(1) + b ** 2
    return _per_sample(x2, R2, in_shape, lambda xs, Rs: _redistribute(M2, den, Rs, stabilizer))


def flat(weight: Optional[Tensor], bias: Optional[Tensor], op: Op, x: Tensor, R: Tensor, stabilizer: float = 1e-6,
         zero_params: ZeroParams = None) -> Tensor:
    r"""LRP-flat (Lapuschkin et al. 2019; ``zennit.rules.Flat``): uniform over the receptive field.

    .. math:: R_i = \sum_j \frac{c_{ij}}{\operatorname{stab}(\sum_k c_{kj})} R_j

    where :math:`c_{ij} = 1` if input ``i`` is structurally connected to output ``j`` (the op evaluated with an
    all-ones weight, so zero padding and groups are respected but weights that happen to be 0 still count).
    The bias is *always* zeroed (Zennit adds ``"bias"`` to ``zero_params``). For weightless ops ``c`` is the op's
    own matrix (Zennit leaves their missing parameters alone).

    Parameters
    ----------
    weight, bias, op, x, R, zero_params
        See :func:`epsilon` (``zero_params`` is irrelevant: all weights become ones, the bias zero).
    stabilizer : float
        Signed stabilizer.

    Returns
    -------
    Tensor
        Input relevance.
    """
    x2, R2, _, _, in_shape, _, _ = _prep(weight, bias, op, x, R, None)
    ones = None if weight is None else torch.ones_like(weight, dtype=_DTYPE)
    C, _ = dense_matrix(op, ones, in_shape)
    den = C.sum(1)
    return _per_sample(x2, R2, in_shape, lambda xs, Rs: _redistribute(C, den, Rs, stabilizer))


def pass_rule(weight: Optional[Tensor], bias: Optional[Tensor], op: Optional[Op], x: Tensor, R: Tensor) -> Tensor:
    """Pass rule (``zennit.rules.Pass``): the output relevance is handed through unchanged, ``R_in = R``.

    Only meaningful for shape-preserving layers (activations, BatchNorm); ``weight``, ``bias`` and ``op`` are
    ignored and ``R.shape`` must equal ``x.shape``.

    Returns
    -------
    Tensor
        ``R`` as float64.
    """
    if tuple(R.shape) != tuple(x.shape):
        raise ValueError(f"Pass needs R.shape == x.shape, got {tuple(R.shape)} vs {tuple(x.shape)}")
    return R.detach().to(_DTYPE).clone()


def norm(weight: Optional[Tensor], bias: Optional[Tensor], op: Op, x: Tensor, R: Tensor,
         stabilizer: float = 1e-6) -> Tensor:
    r"""Norm rule (``zennit.rules.Norm``): the ε-rule with ``stabilizer`` as ε and *unmodified* parameters.

    .. math:: R_i = \sum_j \frac{x_i a_{ij}}{\operatorname{stab}(\sum_k x_k a_{kj} + b_j)} R_j

    Meant for weightless linear maps (average pooling ``a_ij = 1/|window|``, ``zennit.layer.Sum``
    ``a_ij = 1``). On a layer with parameters it equals :func:`epsilon` with the bias kept (no ``zero_params``).

    Parameters
    ----------
    weight, bias, op, x, R
        See :func:`epsilon`.
    stabilizer : float
        Signed stabilizer.

    Returns
    -------
    Tensor
        Input relevance.
    """
    return epsilon(weight, bias, op, x, R, epsilon=stabilizer, zero_params=None)


def non_conserved(R_out: Tensor, R_in: Tensor) -> Tensor:
    """Per-sample ledger entry ``sum(R_out) - sum(R_in)`` (relevance absorbed by biases/stabilizers).

    Parameters
    ----------
    R_out : Tensor
        Output relevance ``(B, ...)``.
    R_in : Tensor
        Input relevance ``(B, ...)``.

    Returns
    -------
    Tensor
        ``(B,)`` float64.
    """
    return R_out.detach().to(_DTYPE).reshape(R_out.shape[0], -1).sum(1) - \
        R_in.detach().to(_DTYPE).reshape(R_in.shape[0], -1).sum(1)


#: Name -> reference rule, for parametrised tests.
RULES: dict[str, Callable[..., Tensor]] = {
    "epsilon": epsilon,
    "lrp0": lrp0,
    "gamma": gamma,
    "zplus": zplus,
    "alpha_beta": alpha_beta,
    "zbox": zbox,
    "wsquare": wsquare,
    "flat": flat,
    "pass": pass_rule,
    "norm": norm,
}
