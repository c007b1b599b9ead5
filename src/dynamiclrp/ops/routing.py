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


def replay_constant_pad(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    """``F.pad(x, pad)`` with the default fill, 0: the node keeps the padding sizes, not the fill value."""
    return F.pad(xs[0], saved(node, "pad"))


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


def replay_masked_scatter(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    """``self.masked_scatter(mask, source)``: the masked positions take ``source``'s elements in order (vision-
    language models insert image features into the text embeddings this way)."""
    return xs[0].masked_scatter(saved(node, "mask"), xs[1])


def replay_max_unpool(spatial: int) -> Callable[[Any, Sequence[Tensor | None], int], Tensor]:
    """``max_unpool{2,3}d`` (``spatial`` = 2 or 3): every input element written at its saved flat index within its
    plane, zeros elsewhere."""
    def replay(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
        shape = out_shape(node, nr)
        lead = shape[:len(shape) - spatial]
        x = xs[0].reshape(*lead, -1)
        idx = saved(node, "indices").reshape(x.shape)
        return x.new_zeros(*lead, math.prod(shape[len(shape) - spatial:])).scatter(-1, idx, x).reshape(shape)
    return replay


def replay_copy(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    """``dst.copy_(src)``: the output is ``src`` broadcast to ``dst``'s shape and cast to its dtype (``dst``'s own
    values are overwritten)."""
    m = output_meta(node)[nr]
    return xs[1].to(dtype=m.dtype, device=m.device).expand(m.shape).clone()


def copy_replay_inputs(node: Any, edges: tuple[int, ...]) -> tuple[int, ...]:
    return (1,)


def replay_pack_padded(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    """``pack_padded_sequence``'s data: the time steps of every sequence, time-major, longest sequences first
    (the lengths are read back from the saved batch sizes: sequence ``b`` lasts while ``batch_sizes[t] > b``)."""
    batch_sizes = saved(node, "result1")
    n = int(batch_sizes[0])
    lengths = (batch_sizes[None, :] > torch.arange(n)[:, None]).sum(1)
    return torch._pack_padded_sequence(xs[0], lengths, bool(saved(node, "batch_first")))[0]


_BAG_MODES = ("sum", "mean", "max")


def _bag(node: Any, weight: Tensor, psw: Tensor | None) -> Tensor:
    return F.embedding_bag(saved(node, "indices"), weight, saved(node, "offsets"), mode=_BAG_MODES[int(saved(node, "mode"))],
                           per_sample_weights=psw, padding_idx=_padding_idx(node))


def _padding_idx(node: Any) -> int | None:
    p = saved(node, "padding_idx")
    return None if p is None or int(p) < 0 else int(p)


class EmbeddingBagKernel(RoutingKernel):
    """``embedding_bag(indices, weight, offsets, mode, per_sample_weights)`` (fastText-style bag-of-words encoders,
    recommender features): each bag's output is the sum, mean or maximum of the weight rows its indices select,
    optionally weighted per index.

    Without per-index weights the output is a linear map of the selected rows with fixed coefficients (sum,
    mean) or a selection (max), so the node's backward routes relevance to the weight rows exactly (the z-rule
    in gradient form). With per-index weights ``p`` the output ``Σ_i p_i W[idx_i]`` is bilinear in ``p`` and
    ``W``; the weight is a parameter, so (as for any product with a parameter) the data operand ``p`` takes all
    the relevance — the z-rule of the linear map ``p ↦ Σ_i p_i W[idx_i]`` — and the rows get nothing. Either way
    the output is data (``data_lookup``), and exactly one operand receives relevance, so it is conservative.
    """

    def __init__(self) -> None:
        super().__init__(self.replay_bag)

    @staticmethod
    def replay_bag(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
        psw = xs[1] if len(xs) > 1 and xs[1] is not None else saved(node, "per_sample_weights")
        return _bag(node, xs[0], psw)

    @staticmethod
    def rebuild(node: Any, nr: int) -> Tensor | None:
        w = saved(node, "weight")
        return None if w is None or nr != 0 else _bag(node, w, saved(node, "per_sample_weights"))

    @staticmethod
    def can_rebuild(node: Any, nr: int) -> bool:
        return nr == 0 and saved(node, "weight") is not None

    @staticmethod
    def dropped(edges: tuple[int, ...], active: tuple[bool, ...]) -> tuple[int, ...]:
        """Input positions that receive nothing: the weight when per-index weights are a data operand."""
        return (0,) if len(edges) > 1 and edges[1] >= 0 and active[1] else (1,)



# -- complex-valued linear maps (FFT mixing) ----------------------------------------------------------------
class ComplexLinearKernel(RoutingKernel):
    """A linear map into or out of complex tensors (an FFT, ``view_as_real``/``view_as_complex``).

    Composed with a real-valued read-out (``fft(x).real``, FNet's token mixing; ``irfft(rfft(x) · W)``, global
    filter networks) the whole path is a real linear map of a real input with fixed coefficients, and PyTorch's
    backward through the complex intermediates is exactly its transpose. So relevance moves in gradient form with
    the node's own backward — the z-rule of the real composite, LRP-0 = gradient × input — and at a complex slot a
    message ``G`` stands for the relevance ``Re(conj(G)·v)``. Explicit relevance is first turned into gradient form
    at the real end (``gradient_only``), where dividing by the value is meaningful.
    """

    gradient_only = True


def replay_fft_r2c(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch._fft_r2c(xs[0], list(saved(node, "dim")), int(saved(node, "normalization")),
                          bool(saved(node, "onesided")))


def replay_fft_c2c(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch._fft_c2c(xs[0], list(saved(node, "dim")), int(saved(node, "normalization")),
                          bool(saved(node, "forward")))


def replay_fft_c2r(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    dims = list(saved(node, "dim"))
    last = out_shape(node, nr)[dims[-1]]
    return torch._fft_c2r(xs[0], dims, int(saved(node, "normalization")), last)


def rebuild_fft_r2c(node: Any, nr: int) -> Tensor | None:
    x = saved(node, "self")
    return None if x is None or nr != 0 else replay_fft_r2c(node, [x], 0)


def replay_view_as_real(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.view_as_real(xs[0])


def replay_view_as_complex(node: Any, xs: Sequence[Tensor | None], nr: int) -> Tensor:
    return torch.view_as_complex(xs[0].contiguous())
