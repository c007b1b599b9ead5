"""Relevance messages and the arithmetic shared by every rule.

Relevance travels along slots in one of two forms, and a message may carry both parts at once:

``g`` (gradient form)
    A tensor ``G`` with the shape of the slot's forward value ``v``; the relevance it stands for is ``v * G``.
    Every rule that is a *z-rule* (ε, γ, z⁺, α-β, the sum rule, routing, the identity rule, the uniform product
    rule, the AttnLRP softmax rule...) maps ``G`` to ``G`` without ever dividing by an activation. This is the
    fast path: on piecewise-linear graphs LRP-0 in this form *is* gradient × input.
``r`` (explicit form)
    The relevance tensor ``R`` itself. Rules whose result is not proportional to the input (flat, w², z^B, the
    paper's magnitude splits) produce it.

Converting ``g`` to ``r`` multiplies by the slot's forward value, converting ``r`` to ``g`` divides by it; both
need the value, which the Promise System (:mod:`dynamiclrp.core.promises`) supplies when autograd did not save it.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


class _Unknown:
    """Marker for a relevance total that cannot be measured."""

    def __repr__(self) -> str:  # pragma: no cover
        return "UNKNOWN"


UNKNOWN = _Unknown()


class Msg:
    """Relevance arriving at one slot: a gradient-form part ``g`` and/or an explicit part ``r``."""

    __slots__ = ("g", "r")

    def __init__(self, g: Tensor | None = None, r: Tensor | None = None):
        self.g = g
        self.r = r

    def add(self, other: "Msg") -> None:
        """Accumulate ``other`` into this message (out of place, so no tensor shared elsewhere is mutated)."""
        if other.g is not None:
            self.g = other.g if self.g is None else self.g + other.g
        if other.r is not None:
            self.r = other.r if self.r is None else self.r + other.r

    def explicit(self, value: Tensor | None) -> Tensor | None:
        """The relevance this message stands for at a slot whose forward value is ``value``: ``g·value + r``.

        Where ``g`` is 0 no relevance arrived, whatever the value: a NaN or infinite input that the model masks out
        (``torch.where(torch.isnan(x), 0, x)``) gets relevance 0 there, not ``NaN · 0``."""
        out = None
        if self.g is not None:
            out = torch.where(self.g == 0, torch.zeros((), dtype=self.g.dtype, device=self.g.device),
                              self.g * value)
        if self.r is not None:
            out = self.r if out is None else out + self.r
        return out

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        def d(t):
            return None if t is None else tuple(t.shape)
        return f"Msg(g={d(self.g)}, r={d(self.r)})"


def gmsg(t: Tensor | None) -> Msg | None:
    return None if t is None else Msg(g=t)


def rmsg(t: Tensor | None) -> Msg | None:
    return None if t is None else Msg(r=t)


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 wherever ``den == 0`` (never NaN or inf from a zero denominator)."""
    zero = den == 0
    return torch.where(zero, torch.zeros((), dtype=num.dtype, device=num.device), num / torch.where(zero, 1, den))


def finite_sum(t: Tensor) -> Tensor:
    """``t.sum()`` ignoring non-finite products (``0 · inf`` of a masked ``-inf`` logit with zero relevance); no
    host sync (``nan_to_num`` is the identity on finite values)."""
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0).sum()


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1`` (Zennit's convention); ``eps == 0`` returns ``z``."""
    if eps == 0:
        return z
    return torch.where(z >= 0, z + eps, z - eps)
