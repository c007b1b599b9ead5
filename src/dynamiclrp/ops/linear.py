"""Linear ops ``z = alpha·f(a, b) + beta·bias`` with ``f`` bilinear: mm, bmm, addmm, baddbmm, mv, convolution,
grouped mm. Rules are written once against :class:`LinearKernel` (``f``, its Jacobian transpose ``f_t``, operand
positions, the bias), so one rule serves every op of the family.
"""
from __future__ import annotations

from typing import Any

import torch

from ..core.graph import function_attr, saved
from .routing import out_shape

Tensor = torch.Tensor


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
        a = saved(node, self.saved_fields[0])
        b = saved(node, self.saved_fields[1])
        if a is None or b is None or self.bias_pos is not None:
            return None
        return self.alpha(node) * self.f(node, a, b)

    def absent(self, node: Any, pos: int) -> bool:
        """Whether the op had no tensor at input ``pos`` (a convolution without bias), as opposed to one that
        does not require grad."""
        return False

    def companion(self, node: Any, pos: int) -> tuple | None:
        """For the bias input: ``(weight tensor the node saved, output features, "weight", "bias")`` — the
        bias of a frozen layer is found next to its weight in the caller's model (:class:`~dynamiclrp.core.promises.
        ModelParams`). ``None`` for other inputs or when the weight was not saved."""
        return None

    def can_rebuild(self, node: Any, nr: int) -> bool:
        if self.bias_pos is not None:
            return False
        return saved(node, self.saved_fields[0]) is not None and saved(node, self.saved_fields[1]) is not None


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
        w = saved(node, "mat2") if pos == 0 else None
        return None if w is None else (w, out_shape(node)[-1], "weight", "bias")

    def alpha(self, node):
        return saved(node, "alpha")

    def beta(self, node):
        return saved(node, "beta")


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


class VdotKernel(LinearKernel):
    """``vdot(a, b) = Σ_i conj(a_i) b_i`` of two vectors (spectral normalisation's ``σ = uᵀ W v``): a bilinear map
    with the linear rules' algebra (real tensors; a complex ``vdot`` is not an LRP layer)."""

    operands = (0, 1)
    saved_fields = ("self", "other")

    def f(self, node, a, b):
        return torch.vdot(a, b)

    def f_t(self, node, which, a, b, s):
        return s * b.conj() if which == 0 else s * a


class ConvKernel(LinearKernel):
    """``aten.convolution`` (1-3 d, transposed, grouped): operand 0 the input, 1 the weight, 2 the bias."""

    operands = (0, 1)
    saved_fields = ("input", "weight")
    bias_pos = 2

    @staticmethod
    def params(node: Any) -> tuple:
        return (saved(node, "stride"), saved(node, "padding"), saved(node, "dilation"), saved(node, "transposed"),
                saved(node, "output_padding"), saved(node, "groups"))

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
        sizes = saved(node, "bias_sym_sizes_opt")
        return sizes is None or all(int(v) == 0 for v in sizes)

    def companion(self, node, pos):
        w = saved(node, "weight") if pos == 2 else None
        return None if w is None else (w, out_shape(node)[1], "weight", "bias")

    def family(self, active):
        return "matmul" if (active[0] and len(active) > 1 and active[1]) else "conv"


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
        return saved(node, "offs")

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
        return function_attr(node, "offs")
