"""Routing ops: selections, permutations, copies and broadcasts (all coefficients 0 or 1).

Their backward formula moves relevance exactly like gradient, in both message forms, so their rule is the node's own
backward. ``replay`` re-applies the op forward (a promise branch's forward step); selections are also how the
Promise System recovers a value on the support of its relevance (the registry row's ``selection`` trait).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..core.graph import call_backward, output_meta, saved
from ..errors import ValueUnavailableError

Tensor = torch.Tensor


def out_shape(node: Any, nr: int = 0) -> torch.Size:
    """Shape of forward output ``nr`` of ``node``."""
    return output_meta(node)[nr].shape


class RoutingKernel:
    """Ops that only select, permute, copy or broadcast elements (all coefficients 0 or 1).

    Their backward formula moves relevance exactly like gradient, in both message forms, so the rule is the
    node's own backward. ``replay`` re-applies the op forward (the forward closure of a promise branch).
    """

    def __init__(self, replay: Callable[[Any, Sequence[Tensor | None], int], Tensor] | None = None):
        self.replay = replay


class EmbeddingKernel(RoutingKernel):
    """``embedding(weight, indices)``: rows of the weight, routed back by the node's backward."""

    @staticmethod
    def rebuild(node, nr):
        return None


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def replay_reshape(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0].reshape(out_shape(node, nr))


def replay_identity(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0]


def replay_nth(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    """Output ``nr`` is input ``nr`` (a node that passes several tensors through, e.g. a backward hook's)."""
    return xs[nr]


def replay_to_copy(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    m = output_meta(node)[nr]
    return xs[0].to(dtype=m.dtype, device=m.device)


def replay_t(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0].t() if xs[0].dim() == 2 else xs[0]


def replay_transpose(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0].transpose(saved(node, "dim0"), saved(node, "dim1"))


def replay_permute(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0].permute(*saved(node, "dims"))


def replay_expand(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0].expand(out_shape(node, nr))


def replay_slice(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    x = xs[0]
    dim = _dim(saved(node, "dim"), x.dim())
    start, end, step = saved(node, "start"), saved(node, "end"), saved(node, "step")
    size = x.shape[dim]
    start = 0 if start is None else start
    end = size if end is None else end
    start = max(min(start + size if start < 0 else start, size), 0)
    end = max(min(end + size if end < 0 else end, size), 0)
    idx = [slice(None)] * x.dim()
    idx[dim] = slice(start, end, step)
    return x[tuple(idx)]


def replay_select(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0].select(saved(node, "dim"), saved(node, "index"))


def replay_index(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    idx = saved(node, "indices")
    # a None entry is a dimension that was not indexed (a full slice), not a new axis
    return xs[0][tuple(slice(None) if i is None else i for i in idx)] if idx is not None else xs[0]


def replay_gather(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.gather(xs[0], saved(node, "dim"), saved(node, "index"))


def replay_index_select(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.index_select(xs[0], saved(node, "dim"), saved(node, "index"))


def replay_cat(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.cat(list(xs), dim=saved(node, "dim"))


def replay_stack(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.stack(list(xs), dim=saved(node, "dim"))


def replay_split(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    dim = saved(node, "dim")
    sizes = saved(node, "split_sizes")
    if sizes is None:
        sizes = saved(node, "split_size")
    return torch.split(xs[0], sizes, dim=dim)[nr]


def replay_unbind(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0].select(saved(node, "dim"), nr)


def replay_repeat(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return xs[0].repeat(*saved(node, "repeats"))


def replay_flip(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.flip(xs[0], saved(node, "dims"))


def replay_roll(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.roll(xs[0], saved(node, "shifts"), saved(node, "dims"))


def replay_where(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.where(saved(node, "condition"), xs[0], xs[1])


def replay_pad(mode: str) -> Callable[[Any, Sequence[Tensor | None], int], Tensor]:
    """Reflection and replication padding, which save their input and their padding sizes."""
    def replay(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
        return F.pad(xs[0], tuple(saved(node, "padding")), mode=mode)
    return replay


def rebuild_pad(mode: str) -> Callable[[Any, int], Tensor | None]:
    replay = replay_pad(mode)

    def rebuild(node: Any, nr: int) -> Tensor | None:
        x = saved(node, "self")
        return None if x is None or nr != 0 else replay(node, [x], 0)
    return rebuild


def replay_upsample_nearest(op: str) -> Callable[[Any, Sequence[Tensor | None], int], Tensor]:
    """Nearest-neighbour upsampling with the saved output size and scales (the aten op itself, so the index map is
    the forward's exactly)."""
    fn = getattr(torch.ops.aten, op)

    def replay(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
        size = list(saved(node, "output_size"))
        if op.endswith("1d"):
            return fn(xs[0], size, saved(node, "scales"))
        if op.endswith("2d"):
            return fn(xs[0], size, saved(node, "scales_h"), saved(node, "scales_w"))
        return fn(xs[0], size, saved(node, "scales_d"), saved(node, "scales_h"), saved(node, "scales_w"))
    return replay


def replay_pixel_shuffle(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return F.pixel_shuffle(xs[0], saved(node, "upscale_factor"))


def replay_pixel_unshuffle(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return F.pixel_unshuffle(xs[0], saved(node, "downscale_factor"))


def replay_im2col(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return F.unfold(xs[0], saved(node, "kernel_size"), saved(node, "dilation"), saved(node, "padding"),
                    saved(node, "stride"))


def replay_take_flat_indices(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    """Adaptive max pooling: the input gathered at the saved per-plane arg-max indices (``result1``)."""
    idx = saved(node, "result1")
    return xs[0].flatten(2).gather(2, idx.flatten(2)).view(idx.shape)


def rebuild_take_flat_indices(node: Any, nr: int) -> Tensor | None:
    x = saved(node, "self")
    return None if x is None or nr != 0 else replay_take_flat_indices(node, [x], 0)


def replay_take_indices(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    """``topk``/``sort``/``kthvalue`` values: the input gathered at the saved indices along ``dim``."""
    idx = saved(node, "indices")
    dim = saved(node, "dim")
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
    size = tuple(saved(node, "size"))
    stride = tuple(saved(node, "stride"))
    offset = saved(node, "storage_offset")
    x = xs[0]
    n_out = math.prod(size)
    if offset in (None, 0) and x.numel() == n_out and _contiguous_strides(size, stride):
        return x.reshape(size)
    meta = output_meta(node)[0]
    exact = {torch.float64: 2 ** 53, torch.float32: 2 ** 24}.get(meta.dtype, 0)
    problem = None
    if n_out >= exact:
        problem = "too many elements to probe its element map exactly"
    else:
        ids = torch.arange(1, n_out + 1, dtype=meta.dtype, device=meta.device).reshape(size)
        (pos,) = call_backward(node, [ids])[:1]
        (cnt,) = call_backward(node, [torch.ones_like(ids)])[:1]
        pos, cnt = pos.reshape(-1), cnt.reshape(-1)
        if bool((cnt > 1).any()) or int((cnt == 1).sum()) != n_out:
            problem = "overlapping windows make its element map ambiguous"
        else:
            src = torch.nonzero(cnt == 1).squeeze(1)
            out = x.new_empty(n_out)
            out[pos[src].round().long() - 1] = x.reshape(-1)[src]
            return out.reshape(size)
    raise ValueUnavailableError(f"as_strided(size={size}, stride={stride}, storage_offset={offset}): {problem}, "
                                "so its value cannot be replayed")


def _contiguous_strides(size: Sequence[int], stride: Sequence[int]) -> bool:
    expected = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True
