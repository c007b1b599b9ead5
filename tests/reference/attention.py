r"""Explicit (R-form) AttnLRP and CP-LRP references for small transformer blocks, in float64.

This module must not import ``dynamiclrp``. Relevance is propagated as explicit relevance tensors, op by op,
exactly as the rules are written in the papers (no gradient tricks):

* **Linear layers** — ε-rule with the bias as a sink (Bach et al. 2015; AttnLRP Eq. 8):
  :math:`R_i = x_i \sum_j w_{ji} R_j / \operatorname{stab}(z_j)`, :math:`z = Wx + b`,
  :math:`\operatorname{stab}(z) = z + \varepsilon\,\mathrm{sgn}_0(z)` with :math:`\mathrm{sgn}_0(0) = +1`
  (Zennit's stabilizer). With ε = 0, :math:`n/0 := 0`.
* **Element-wise non-linearities** (SiLU, GELU, …) — identity rule, :math:`R_{in} = R_{out}` (AttnLRP Eq. 9).
* **Normalisation** — the normaliser (mean and standard deviation for LayerNorm, rms for RMSNorm) is a
  constant (AttnLRP Prop. 3.4; Ali et al. 2022 §3). LayerNorm becomes the affine map
  :math:`y = \operatorname{diag}(w/\sigma)(I - \tfrac1N 11^\top)x + b` (the centring is part of the linear map)
  and gets the ε-rule; RMSNorm becomes :math:`y = \operatorname{diag}(w/\mathrm{rms})\,x` and its ε-rule reduces to
  :math:`R_{in} = y R / \operatorname{stab}(y)` (= identity for ε = 0).
* **Products of two activations** — uniform rule (AttnLRP Eq. 7, Props. 3.2/3.3): the product is split with the
  ε-rule treating the other operand as the weight, and each operand keeps half. For :math:`O = AV`:
  :math:`R^A_{jk} = \sum_p A_{jk}V_{kp}R_{jp} / (2\operatorname{stab}(O_{jp}))`,
  :math:`R^V_{kp} = \sum_j A_{jk}V_{kp}R_{jp} / (2\operatorname{stab}(O_{jp}))`; the same for :math:`QK^\top`;
  element-wise :math:`h = a\odot u`: :math:`R^a = R^u = \tfrac12\,h R/\operatorname{stab}(h)` (= R/2 for ε = 0).
  **ε choice:** ``Eps.product`` defaults to 0 (exact division with :math:`n/0 := 0`), which equals LXT's
  efficient Gradient×Input implementation (it never divides); LXT's explicit implementation adds an unsigned
  1e-6 (A·V) or 1e-8 (Q·Kᵀ) to ``2·O``.
* **Softmax** — AttnLRP Prop. 3.1 (Taylor decomposition at x with bias):
  :math:`R^{in} = x \odot (R - s \odot \sum_j R_j)`, x the softmax input (logits incl. additive mask), s the
  output. Masked positions (mask entries ≤ -1e30, including ``-inf`` and ``finfo.min``, and the causal mask)
  get 0 relevance (x is replaced by 0 there, as LXT does).
* **Additions of two activations** (residuals) — z-rule with signed contributions:
  :math:`R^a = a R/\operatorname{stab}(a + b)`, :math:`R^b = b R/\operatorname{stab}(a + b)` (``Eps.add``,
  default 0). The additive attention mask is a *constant* second operand of such an add: ``S + M`` sends
  :math:`S R/\operatorname{stab}(S + M)` to the scores and the rest to the mask (a sink). A causal mask is applied
  as a fill (no add), so it costs no relevance at unmasked positions. A constant scalar factor (the
  :math:`1/\sqrt{d}` score scale) passes relevance unchanged.
* **CP-LRP** (Ali et al. 2022, "XAI for Transformers: Better Explanations through Conservative Propagation") —
  the same, but the attention weights A are constants: :math:`O = AV` is linear in V and
  :math:`R^V_{kp} = \sum_j A_{jk} V_{kp} R_{jp}/\operatorname{stab}(O_{jp})` (no halving), so Q, K and the softmax
  get nothing. Following LXT's ``cp_LRP`` patches, the gate of a gated MLP is also a constant by default
  (``gate_constant=None`` → True in CP mode): all of :math:`R^h` goes to the up projection.

GQA: K/V heads are repeated (``repeat_interleave``, query head ``h`` uses kv head ``h // n_rep``); relevance of
the copies is summed back onto each kv head.

Every ``*_relevance`` function returns a :class:`Relevances` with the relevance of the block input (``"x"``),
every intermediate, and their totals (``totals[name] = float(R.sum())``) for ledger checks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .rules import safe_divide, stabilize

__all__ = [
    "Eps",
    "Relevances",
    "ratio",
    "linear_relevance",
    "matmul_uniform_relevance",
    "matmul_const_a_relevance",
    "mul_uniform_relevance",
    "add_relevance",
    "softmax_relevance",
    "rmsnorm_relevance",
    "layernorm_relevance",
    "AttentionWeights",
    "MLPWeights",
    "NormWeights",
    "TransformerLayerWeights",
    "make_attention",
    "make_mlp",
    "make_norm",
    "make_transformer_layer",
    "attention_forward",
    "attention_relevance",
    "mlp_forward",
    "mlp_relevance",
    "norm_forward",
    "norm_relevance",
    "transformer_layer_forward",
    "transformer_layer_relevance",
    "MASK_THRESHOLD",
]

_DTYPE = torch.float64
#: additive-mask entries at or below this count as masked
MASK_THRESHOLD = -1e30
Mode = Literal["attnlrp", "cplrp"]


@dataclass(frozen=True)
class Eps:
    """Stabilizers (signed, ``z + eps*sgn0(z)``) per op family.

    Attributes
    ----------
    linear : float
        ε of the ε-rule on linear layers (projections, MLP).
    norm : float
        ε of the ε-rule on the affine map of LayerNorm/RMSNorm (normaliser constant).
    product : float
        ε of the uniform rule for products (A·V, Q·Kᵀ, gate·up) and of the CP-LRP A·V rule.
    add : float
        ε of the z-rule on residual adds and on the additive attention mask.
    """

    linear: float = 1e-6
    norm: float = 1e-6
    product: float = 0.0
    add: float = 0.0

    @classmethod
    def zero(cls) -> "Eps":
        """All stabilizers 0 (exact rules with ``n/0 := 0``)."""
        return cls(0.0, 0.0, 0.0, 0.0)


@dataclass
class Relevances:
    """Relevance of a block's input and intermediates.

    Attributes
    ----------
    relevance : dict of str to Tensor
        ``"x"`` is the block input; ``"out"`` the seed; other keys are documented per block.
    forward : dict of str to Tensor
        The forward intermediates the relevance was computed from.
    totals : dict of str to float
        ``float(R.sum())`` for every entry of ``relevance``.
    """

    relevance: dict[str, Tensor]
    forward: dict[str, Tensor] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.totals = {k: float(v.sum()) for k, v in self.relevance.items()}

    def __getitem__(self, key: str) -> Tensor:
        return self.relevance[key]


# --------------------------------------------------------------------------------------------------------------
# Per-op rules
# --------------------------------------------------------------------------------------------------------------
def ratio(R: Tensor, z: Tensor, eps: float) -> Tensor:
    """``R / stab(z)`` with the signed stabilizer; ``n/0 := 0`` (only reachable for ``eps == 0``)."""
    return safe_divide(R, stabilize(z, eps))


def linear_relevance(x: Tensor, weight: Tensor, bias: Optional[Tensor], R: Tensor, eps: float) -> Tensor:
    r"""ε-rule for ``y = x Wᵀ + b`` over the last dimension: :math:`R^x = x \odot (R / \operatorname{stab}(y))W`.

    Parameters
    ----------
    x : Tensor
        ``(..., in)``.
    weight : Tensor
        ``(out, in)``.
    bias : Tensor or None
        ``(out,)``; a relevance sink.
    R : Tensor
        ``(..., out)``.
    eps : float
        Stabilizer.

    Returns
    -------
    Tensor
        ``(..., in)``.
    """
    z = F.linear(x, weight, bias)
    return x * (ratio(R, z, eps) @ weight)


def matmul_uniform_relevance(a: Tensor, b: Tensor, R: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    r"""Uniform rule for ``O = a @ b`` (AttnLRP Prop. 3.3): each operand gets half of the ε-split.

    .. math:: R^a_{jk} = \tfrac12 \sum_p a_{jk} b_{kp} R_{jp}/\operatorname{stab}(O_{jp}),\quad
              R^b_{kp} = \tfrac12 \sum_j a_{jk} b_{kp} R_{jp}/\operatorname{stab}(O_{jp})

    Returns
    -------
    tuple of Tensor
        ``(R_a, R_b)`` with the shapes of ``a`` and ``b``.
    """
    G = ratio(R, a @ b, eps) / 2
    return a * (G @ b.transpose(-1, -2)), b * (a.transpose(-1, -2) @ G)


def matmul_const_a_relevance(a: Tensor, b: Tensor, R: Tensor, eps: float) -> Tensor:
    r"""ε-rule for ``O = a @ b`` with ``a`` a constant (CP-LRP's A·V): all relevance goes to ``b``.

    .. math:: R^b_{kp} = \sum_j a_{jk} b_{kp} R_{jp}/\operatorname{stab}(O_{jp})
    """
    return b * (a.transpose(-1, -2) @ ratio(R, a @ b, eps))


def mul_uniform_relevance(a: Tensor, b: Tensor, R: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    r"""Uniform rule for the element-wise ``h = a * b`` (same shapes).

    :math:`R^a = R^b = \tfrac12 h R/\operatorname{stab}(h)` (exactly ``R/2`` for ``eps = 0`` and ``h != 0``).
    """
    h = a * b
    r = h * ratio(R, h, eps) / 2
    return r, r.clone()


def add_relevance(a: Tensor, b: Tensor, R: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    r"""z-rule for ``a + b`` (same shapes), signed contributions.

    :math:`R^a = a R/\operatorname{stab}(a+b)`, :math:`R^b = b R/\operatorname{stab}(a+b)`.
    """
    g = ratio(R, a + b, eps)
    return a * g, b * g


def softmax_relevance(x: Tensor, R: Tensor, dim: int = -1, masked: Optional[Tensor] = None) -> Tensor:
    r"""AttnLRP softmax rule (Prop. 3.1): :math:`R^{in} = x \odot (R - s \odot \sum_j R_j)`, ``s = softmax(x)``.

    Parameters
    ----------
    x : Tensor
        Softmax input (logits including any additive mask); ``-inf`` entries count as masked.
    R : Tensor
        Relevance of the softmax output.
    dim : int
        Softmax dimension.
    masked : Tensor of bool, optional
        Extra masked positions; masked positions get relevance 0 (``x`` replaced by 0 there).

    Returns
    -------
    Tensor
        Relevance of ``x``.
    """
    s = torch.softmax(x, dim=dim)
    m = torch.isneginf(x)
    if masked is not None:
        m = m | masked
    xm = torch.where(m, torch.zeros_like(x), x)
    return xm * (R - s * R.sum(dim=dim, keepdim=True))


def rmsnorm_relevance(x: Tensor, weight: Optional[Tensor], R: Tensor, eps: float, norm_eps: float) -> Tensor:
    r"""RMSNorm ``y = w ⊙ x / rms(x)``, ``rms = sqrt(mean(x²) + norm_eps)`` constant: ε-rule on the diagonal map.

    :math:`R^x = x \odot (w/\mathrm{rms}) \odot R/\operatorname{stab}(y) = y \odot R / \operatorname{stab}(y)`.
    """
    rms = torch.sqrt((x * x).mean(-1, keepdim=True) + norm_eps)
    scale = (1.0 / rms) if weight is None else weight / rms
    y = x * scale
    return x * scale * ratio(R, y, eps)


def layernorm_relevance(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], R: Tensor, eps: float,
                        norm_eps: float) -> Tensor:
    r"""LayerNorm with constant σ: ε-rule on :math:`y = \operatorname{diag}(w/\sigma)(I - \tfrac1N 11^\top)x + b`.

    With :math:`u = (w/\sigma) \odot R/\operatorname{stab}(y)`: :math:`R^x = x \odot (u - \operatorname{mean}(u))`
    (the transposed centring). The bias is a sink.
    """
    mu = x.mean(-1, keepdim=True)
    sigma = torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + norm_eps)
    scale = (1.0 / sigma) if weight is None else weight / sigma
    y = (x - mu) * scale
    if bias is not None:
        y = y + bias
    u = scale * ratio(R, y, eps)
    return x * (u - u.mean(-1, keepdim=True))


# --------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------
@dataclass
class AttentionWeights:
    """Multi-head (optionally grouped-query) attention parameters, float64.

    ``wq: (H*dh, D)``, ``wk, wv: (Hkv*dh, D)``, ``wo: (D, H*dh)``; biases may be ``None``.
    """

    wq: Tensor
    bq: Optional[Tensor]
    wk: Tensor
    bk: Optional[Tensor]
    wv: Tensor
    bv: Optional[Tensor]
    wo: Tensor
    bo: Optional[Tensor]
    n_heads: int
    n_kv_heads: int

    @property
    def head_dim(self) -> int:
        """Per-head dimension."""
        return self.wq.shape[0] // self.n_heads

    @property
    def scale(self) -> float:
        """Score scale ``1/sqrt(head_dim)``."""
        return 1.0 / math.sqrt(self.head_dim)


@dataclass
class MLPWeights:
    """MLP parameters. Gated (SwiGLU: ``down(act(gate(x)) * up(x))``) when ``w_gate`` is given, else
    ``down(act(up(x)))``. ``act`` is ``"silu"`` or ``"gelu"`` (exact erf GELU)."""

    w_up: Tensor
    b_up: Optional[Tensor]
    w_down: Tensor
    b_down: Optional[Tensor]
    w_gate: Optional[Tensor] = None
    b_gate: Optional[Tensor] = None
    act: str = "silu"

    @property
    def gated(self) -> bool:
        """Whether this is a gated MLP."""
        return self.w_gate is not None


@dataclass
class NormWeights:
    """``kind="rms"`` (RMSNorm, no bias) or ``kind="layer"`` (LayerNorm) with affine ``weight``/``bias``."""

    kind: str
    weight: Optional[Tensor]
    bias: Optional[Tensor] = None
    eps: float = 1e-6


@dataclass
class TransformerLayerWeights:
    """Pre-norm layer ``h = x + attn(norm1(x))``, ``y = h + mlp(norm2(h))``."""

    norm1: NormWeights
    attn: AttentionWeights
    norm2: NormWeights
    mlp: MLPWeights


def _rand(gen: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(*shape, generator=gen, dtype=_DTYPE)


def make_attention(d_model: int = 16, n_heads: int = 4, n_kv_heads: Optional[int] = None,
                   head_dim: Optional[int] = None, bias: bool = True, seed: int = 0) -> AttentionWeights:
    """Random attention weights (``N(0, 1/D)`` weights, ``N(0, 0.1²)`` biases)."""
    gen = torch.Generator().manual_seed(seed)
    n_kv = n_heads if n_kv_heads is None else n_kv_heads
    if n_heads % n_kv:
        raise ValueError("n_heads must be a multiple of n_kv_heads")
    dh = d_model // n_heads if head_dim is None else head_dim
    s = d_model ** -0.5

    def b(n: int) -> Optional[Tensor]:
        return _rand(gen, n, scale=0.1) if bias else None

    return AttentionWeights(
        wq=_rand(gen, n_heads * dh, d_model, scale=s), bq=b(n_heads * dh),
        wk=_rand(gen, n_kv * dh, d_model, scale=s), bk=b(n_kv * dh),
        wv=_rand(gen, n_kv * dh, d_model, scale=s), bv=b(n_kv * dh),
        wo=_rand(gen, d_model, n_heads * dh, scale=(n_heads * dh) ** -0.5), bo=b(d_model),
        n_heads=n_heads, n_kv_heads=n_kv,
    )


def make_mlp(d_model: int = 16, hidden: int = 32, gated: bool = True, act: str = "silu", bias: bool = True,
             seed: int = 0) -> MLPWeights:
    """Random (gated) MLP weights."""
    gen = torch.Generator().manual_seed(seed)

    def b(n: int) -> Optional[Tensor]:
        return _rand(gen, n, scale=0.1) if bias else None

    w_up, b_up = _rand(gen, hidden, d_model, scale=d_model ** -0.5), b(hidden)
    w_gate = _rand(gen, hidden, d_model, scale=d_model ** -0.5) if gated else None
    b_gate = b(hidden) if gated else None
    return MLPWeights(w_up=w_up, b_up=b_up, w_down=_rand(gen, d_model, hidden, scale=hidden ** -0.5),
                      b_down=b(d_model), w_gate=w_gate, b_gate=b_gate, act=act)


def make_norm(kind: str = "rms", d_model: int = 16, bias: bool = True, seed: int = 0, eps: float = 1e-6) -> NormWeights:
    """Random affine norm weights (``weight ~ 1 + N(0, 0.1²)``; bias only for LayerNorm)."""
    gen = torch.Generator().manual_seed(seed)
    w = 1.0 + _rand(gen, d_model, scale=0.1)
    bb = _rand(gen, d_model, scale=0.1) if (bias and kind == "layer") else None
    return NormWeights(kind=kind, weight=w, bias=bb, eps=eps)


def make_transformer_layer(d_model: int = 16, n_heads: int = 4, n_kv_heads: Optional[int] = None, hidden: int = 32,
                           norm: str = "rms", bias: bool = True, seed: int = 0) -> TransformerLayerWeights:
    """Random pre-norm transformer layer (gated SiLU MLP)."""
    return TransformerLayerWeights(
        norm1=make_norm(norm, d_model, bias, seed + 1),
        attn=make_attention(d_model, n_heads, n_kv_heads, bias=bias, seed=seed + 2),
        norm2=make_norm(norm, d_model, bias, seed + 3),
        mlp=make_mlp(d_model, hidden, gated=True, bias=bias, seed=seed + 4),
    )


# --------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------
def _act(name: str, x: Tensor) -> Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    raise ValueError(f"unknown activation {name!r}")


def attention_forward(x: Tensor, w: AttentionWeights, attn_mask: Optional[Tensor] = None,
                      causal: bool = False) -> dict[str, Tensor]:
    """Forward pass with every intermediate.

    Parameters
    ----------
    x : Tensor
        ``(B, T, D)``.
    w : AttentionWeights
        Parameters.
    attn_mask : Tensor, optional
        Additive float mask broadcastable to ``(B, H, T, T)``; entries ≤ :data:`MASK_THRESHOLD` are masked.
    causal : bool
        Causal masking (applied as a fill with ``-inf``).

    Returns
    -------
    dict
        ``q, k, v`` (projections, ``(B, T, ·)``), ``Q (B,H,T,dh)``, ``K, V (B,Hkv,T,dh)``, ``K_rep, V_rep``
        (``(B,H,T,dh)``), ``P = Q K_repᵀ``, ``S = scale·P``, ``X`` (softmax input), ``masked`` (bool),
        ``A`` (softmax), ``O = A V_rep``, ``o`` (``(B,T,H·dh)``), ``y`` (output).
    """
    x = x.to(_DTYPE)
    B, T, _ = x.shape
    H, Hkv, dh = w.n_heads, w.n_kv_heads, w.head_dim
    q, k, v = F.linear(x, w.wq, w.bq), F.linear(x, w.wk, w.bk), F.linear(x, w.wv, w.bv)
    Q = q.view(B, T, H, dh).transpose(1, 2)
    K = k.view(B, T, Hkv, dh).transpose(1, 2)
    V = v.view(B, T, Hkv, dh).transpose(1, 2)
    K_rep = K.repeat_interleave(H // Hkv, dim=1)
    V_rep = V.repeat_interleave(H // Hkv, dim=1)
    P = Q @ K_rep.transpose(-1, -2)
    S = P * w.scale
    masked = torch.zeros(B, H, T, T, dtype=torch.bool)
    X = S
    if attn_mask is not None:
        M = torch.broadcast_to(attn_mask.to(_DTYPE), (B, H, T, T))
        masked = masked | (M <= MASK_THRESHOLD)
        X = S + M
    if causal:
        masked = masked | torch.ones(T, T, dtype=torch.bool).triu(1)
    X = X.masked_fill(masked, float("-inf"))
    A = torch.softmax(X, dim=-1)
    O = A @ V_rep
    o = O.transpose(1, 2).reshape(B, T, H * dh)
    y = F.linear(o, w.wo, w.bo)
    return dict(x=x, q=q, k=k, v=v, Q=Q, K=K, V=V, K_rep=K_rep, V_rep=V_rep, P=P, S=S, X=X, masked=masked, A=A,
                O=O, o=o, y=y)


def attention_relevance(x: Tensor, w: AttentionWeights, R_out: Tensor, mode: Mode = "attnlrp", eps: Eps = Eps(),
                        attn_mask: Optional[Tensor] = None, causal: bool = False) -> Relevances:
    """AttnLRP / CP-LRP relevance through the attention block.

    Parameters
    ----------
    x : Tensor
        Block input ``(B, T, D)``.
    w : AttentionWeights
        Parameters.
    R_out : Tensor
        Relevance of the block output ``(B, T, D)``.
    mode : {"attnlrp", "cplrp"}
        Rule set.
    eps : Eps
        Stabilizers.
    attn_mask, causal
        As in :func:`attention_forward`.

    Returns
    -------
    Relevances
        Keys: ``out``, ``o``, ``O``, ``A``, ``V_rep``, ``V``, ``X`` (softmax input), ``S`` (scaled scores),
        ``P`` (= ``S``'s relevance: the scale passes it through), ``Q``, ``K_rep``, ``K``, ``q``, ``k``, ``v``,
        ``x_from_q``, ``x_from_k``, ``x_from_v``, ``x``. In CP mode ``A``, ``X``, ``S``, ``P``, ``Q``, ``K`` … are 0.
    """
    f = attention_forward(x, w, attn_mask, causal)
    B, T, _ = f["x"].shape
    H, Hkv, dh = w.n_heads, w.n_kv_heads, w.head_dim
    n_rep = H // Hkv
    R_out = R_out.to(_DTYPE)
    r: dict[str, Tensor] = {"out": R_out}
    r["o"] = linear_relevance(f["o"], w.wo, w.bo, R_out, eps.linear)
    r["O"] = r["o"].view(B, T, H, dh).transpose(1, 2)
    if mode == "attnlrp":
        r["A"], r["V_rep"] = matmul_uniform_relevance(f["A"], f["V_rep"], r["O"], eps.product)
        r["X"] = softmax_relevance(f["X"], r["A"], masked=f["masked"])
        if attn_mask is not None:  # X = S + M: z-rule, the constant mask is a sink
            g = ratio(r["X"], torch.where(f["masked"], torch.ones_like(f["S"]), f["X"]), eps.add)
            r["S"] = torch.where(f["masked"], torch.zeros_like(g), f["S"] * g)
        else:
            r["S"] = r["X"]
        r["P"] = r["S"]
        r["Q"], R_KT = matmul_uniform_relevance(f["Q"], f["K_rep"].transpose(-1, -2), r["P"], eps.product)
        r["K_rep"] = R_KT.transpose(-1, -2)
    elif mode == "cplrp":
        r["V_rep"] = matmul_const_a_relevance(f["A"], f["V_rep"], r["O"], eps.product)
        for key in ("A", "X", "S", "P"):
            r[key] = torch.zeros_like(f[key])
        r["Q"] = torch.zeros_like(f["Q"])
        r["K_rep"] = torch.zeros_like(f["K_rep"])
    else:
        raise ValueError(f"unknown mode {mode!r}")
    r["K"] = r["K_rep"].view(B, Hkv, n_rep, T, dh).sum(2)
    r["V"] = r["V_rep"].view(B, Hkv, n_rep, T, dh).sum(2)
    r["q"] = r["Q"].transpose(1, 2).reshape(B, T, H * dh)
    r["k"] = r["K"].transpose(1, 2).reshape(B, T, Hkv * dh)
    r["v"] = r["V"].transpose(1, 2).reshape(B, T, Hkv * dh)
    r["x_from_q"] = linear_relevance(f["x"], w.wq, w.bq, r["q"], eps.linear)
    r["x_from_k"] = linear_relevance(f["x"], w.wk, w.bk, r["k"], eps.linear)
    r["x_from_v"] = linear_relevance(f["x"], w.wv, w.bv, r["v"], eps.linear)
    r["x"] = r["x_from_q"] + r["x_from_k"] + r["x_from_v"]
    return Relevances(r, f)


def mlp_forward(x: Tensor, w: MLPWeights) -> dict[str, Tensor]:
    """Forward pass with intermediates.

    Gated: ``up``, ``gate``, ``act = act(gate)``, ``h = act * up``, ``y``; plain: ``up``, ``act = act(up)``,
    ``h = act``, ``y``.
    """
    x = x.to(_DTYPE)
    up = F.linear(x, w.w_up, w.b_up)
    if w.gated:
        gate = F.linear(x, w.w_gate, w.b_gate)
        a = _act(w.act, gate)
        h = a * up
        f = dict(x=x, up=up, gate=gate, act=a, h=h)
    else:
        a = _act(w.act, up)
        f = dict(x=x, up=up, act=a, h=a)
    f["y"] = F.linear(f["h"], w.w_down, w.b_down)
    return f


def mlp_relevance(x: Tensor, w: MLPWeights, R_out: Tensor, mode: Mode = "attnlrp", eps: Eps = Eps(),
                  gate_constant: Optional[bool] = None) -> Relevances:
    """Relevance through the (gated) MLP.

    ε-rule on ``down``; gated: uniform rule on ``act(gate) * up`` (or, with ``gate_constant``, everything to
    ``up``: ``R_up = h R_h / stab(h)``), identity rule on ``act``, ε-rule on ``gate`` and ``up``; plain: identity on
    ``act`` and ε on ``up``. ``gate_constant=None`` means ``mode == "cplrp"`` (LXT's ``cp_gated_mlp_forward``).

    Returns
    -------
    Relevances
        Keys ``out``, ``h``, ``act``, ``gate`` (gated), ``up``, ``x_from_gate`` (gated), ``x_from_up``, ``x``.
    """
    if mode not in ("attnlrp", "cplrp"):
        raise ValueError(f"unknown mode {mode!r}")
    if gate_constant is None:
        gate_constant = mode == "cplrp"
    f = mlp_forward(x, w)
    R_out = R_out.to(_DTYPE)
    r: dict[str, Tensor] = {"out": R_out}
    r["h"] = linear_relevance(f["h"], w.w_down, w.b_down, R_out, eps.linear)
    if w.gated:
        if gate_constant:
            r["up"] = f["h"] * ratio(r["h"], f["h"], eps.product)
            r["act"] = torch.zeros_like(f["act"])
        else:
            r["act"], r["up"] = mul_uniform_relevance(f["act"], f["up"], r["h"], eps.product)
        r["gate"] = r["act"]  # identity rule
        r["x_from_gate"] = linear_relevance(f["x"], w.w_gate, w.b_gate, r["gate"], eps.linear)
    else:
        r["act"] = r["h"]
        r["up"] = r["act"]  # identity rule
    r["x_from_up"] = linear_relevance(f["x"], w.w_up, w.b_up, r["up"], eps.linear)
    r["x"] = r["x_from_up"] + (r["x_from_gate"] if w.gated else 0.0)
    return Relevances(r, f)


def norm_forward(x: Tensor, w: NormWeights) -> Tensor:
    """RMSNorm ``w ⊙ x / sqrt(mean(x²) + eps)`` or LayerNorm ``w ⊙ (x - μ)/sqrt(var + eps) + b`` (biased var)."""
    x = x.to(_DTYPE)
    if w.kind == "rms":
        y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + w.eps)
        return y if w.weight is None else y * w.weight
    if w.kind == "layer":
        mu = x.mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + w.eps)
        if w.weight is not None:
            y = y * w.weight
        return y if w.bias is None else y + w.bias
    raise ValueError(f"unknown norm {w.kind!r}")


def norm_relevance(x: Tensor, w: NormWeights, R_out: Tensor, eps: Eps = Eps()) -> Relevances:
    """Relevance through RMSNorm/LayerNorm with the normaliser constant (``eps.norm`` on the affine map).

    Returns
    -------
    Relevances
        Keys ``out`` and ``x``.
    """
    x = x.to(_DTYPE)
    R_out = R_out.to(_DTYPE)
    if w.kind == "rms":
        if w.bias is not None:
            raise ValueError("RMSNorm has no bias")
        Rx = rmsnorm_relevance(x, w.weight, R_out, eps.norm, w.eps)
    elif w.kind == "layer":
        Rx = layernorm_relevance(x, w.weight, w.bias, R_out, eps.norm, w.eps)
    else:
        raise ValueError(f"unknown norm {w.kind!r}")
    return Relevances({"out": R_out, "x": Rx}, {"x": x, "y": norm_forward(x, w)})


def transformer_layer_forward(x: Tensor, w: TransformerLayerWeights, attn_mask: Optional[Tensor] = None,
                              causal: bool = False) -> dict[str, Tensor]:
    """Pre-norm layer forward: ``n1 = norm1(x)``, ``a = attn(n1)``, ``h = x + a``, ``n2 = norm2(h)``,
    ``m = mlp(n2)``, ``y = h + m``."""
    x = x.to(_DTYPE)
    n1 = norm_forward(x, w.norm1)
    a = attention_forward(n1, w.attn, attn_mask, causal)["y"]
    h = x + a
    n2 = norm_forward(h, w.norm2)
    m = mlp_forward(n2, w.mlp)["y"]
    return dict(x=x, n1=n1, a=a, h=h, n2=n2, m=m, y=h + m)


def transformer_layer_relevance(x: Tensor, w: TransformerLayerWeights, R_out: Tensor, mode: Mode = "attnlrp",
                                eps: Eps = Eps(), attn_mask: Optional[Tensor] = None, causal: bool = False,
                                gate_constant: Optional[bool] = None) -> Relevances:
    """Relevance through a pre-norm transformer layer (residual adds with the z-rule, ``eps.add``).

    Returns
    -------
    Relevances
        Keys ``out``, ``m`` (MLP output), ``h_residual``, ``n2``, ``h_from_norm``, ``h``, ``a`` (attention output),
        ``x_residual``, ``n1``, ``x_from_norm``, ``x``, plus the nested blocks' relevances prefixed ``mlp.``,
        ``attn.``, ``norm1.``, ``norm2.``.
    """
    f = transformer_layer_forward(x, w, attn_mask, causal)
    R_out = R_out.to(_DTYPE)
    r: dict[str, Tensor] = {"out": R_out}
    r["h_residual"], r["m"] = add_relevance(f["h"], f["m"], R_out, eps.add)
    mlp_r = mlp_relevance(f["n2"], w.mlp, r["m"], mode, eps, gate_constant)
    r["n2"] = mlp_r["x"]
    norm2_r = norm_relevance(f["h"], w.norm2, r["n2"], eps)
    r["h_from_norm"] = norm2_r["x"]
    r["h"] = r["h_residual"] + r["h_from_norm"]
    r["x_residual"], r["a"] = add_relevance(f["x"], f["a"], r["h"], eps.add)
    attn_r = attention_relevance(f["n1"], w.attn, r["a"], mode, eps, attn_mask, causal)
    r["n1"] = attn_r["x"]
    norm1_r = norm_relevance(f["x"], w.norm1, r["n1"], eps)
    r["x_from_norm"] = norm1_r["x"]
    r["x"] = r["x_residual"] + r["x_from_norm"]
    for prefix, sub in (("mlp.", mlp_r), ("attn.", attn_r), ("norm1.", norm1_r), ("norm2.", norm2_r)):
        for key, value in sub.relevance.items():
            r[prefix + key] = value
    return Relevances(r, f)
