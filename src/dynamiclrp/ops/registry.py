"""The registry: one row per autograd node type, with its traits (in the spirit of PyTorch's ``derivatives.yaml``).

Each row (:class:`~dynamiclrp.core.spec.OpSpec`) says which *family* of rules handles the node (a rule set maps
families to rules), which kernel describes the op, which forward inputs/outputs autograd saved and under which
field, how to rebuild or replay the node's output for the Promise System, and the op's structural traits (a view,
a selection, a reduction, element-wise, a gate...) that rules and the Promise System ask about. Adding an op is one
row here (plus a kernel in this package when no existing one describes it). Node types not in this table are
unsupported: the planner raises :class:`~dynamiclrp.errors.UnsupportedOperationError` before any relevance is
computed.

Families
--------
``linear``, ``conv`` (activation × weight), ``matmul`` (activation × activation), ``product`` (element-wise
``*`` and ``/``), ``add``, ``reduce``, ``pool``, ``activation``, ``norm``, ``softmax``, ``attention``,
``routing``, ``embedding``, ``leaf``; and ``recurrent``, ``parametrization``, ``inplace``, ``composite``,
``custom`` for the special ops of :mod:`dynamiclrp.ops.special`.

Each row added for coverage names, in a comment, the LRP argument for its rule (Euler's theorem for homogeneous
statistics, AttnLRP's identity and uniform rules, the z-rule of a linear map with fixed coefficients, ...).
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from ..core.graph import saved
from ..core.spec import OpSpec
from ..core.step import Site
from . import routing
from .attention import AttentionKernel, LogsumexpKernel, SoftmaxKernel
from .elementwise import BLOOM_GELU, PRELU, RG_SQRT, UNARY, NegKernel, ProductKernel, binary_rebuild
from .linear import (AddmmKernel, BaddbmmKernel, BmmKernel, ConvKernel, GroupedMmFallbackKernel, GroupedMmKernel,
                     LinearKernel, MmKernel, MvKernel, VdotKernel)
from .norm import NormKernel
from .reduce import (AFFINE_GRID, CUMPROD, GRID_SAMPLE, PROD, ROI_ALIGN, SCATTER_REDUCE, STD, VAR, VECTOR_NORM,
                     AddKernel, SumKernel, _adaptive_avg_pool_nd, _alpha, _avg_pool2d, _avg_pool3d, add_forward,
                     avg_pool_rebuild, cumsum_forward, mean_forward, nll_forward, rsub_forward, sub_forward,
                     sum_forward, upsample_forward, vector_norm_forward)
from .special import (CHECKPOINT, GLU, TRILINEAR, CopySlicesKernel, CudnnRnnKernel, FusedCellKernel, LeafKernel,
                      RecurrentKernel, WeightNormKernel,
                      function_family)

#: element-wise non-linearities used as activation functions (the activated operand of a gated MLP)
_ACTIVATIONS = frozenset({
    "ReluBackward0", "GeluBackward0", "SiluBackward0", "MishBackward0", "TanhBackward0", "SigmoidBackward0",
    "SoftplusBackward0", "EluBackward0", "LeakyReluBackward0", "HardswishBackward0", "HardsigmoidBackward0",
    "HardtanhBackward0", "ThresholdBackward0", "CeluBackward0", "RreluWithNoiseBackward0",
})
#: gates: a signal multiplied by one of these takes all the relevance (LSTM/GRU, squeeze-excitation)
_GATES = frozenset({"SigmoidBackward0", "HardsigmoidBackward0"})
#: element-wise non-linearities whose output is never negative
_NONNEGATIVE = frozenset({"ReluBackward0", "SigmoidBackward0", "HardsigmoidBackward0", "SoftplusBackward0"})
#: routing ops whose every output element is a copy, maximum or minimum of input elements (no constant fill)
_KEEPS_SIGN = frozenset({
    "SliceBackward0", "SelectBackward0", "SelectBackward1", "IndexBackward0", "IndexSelectBackward0",
    "GatherBackward0", "CatBackward0", "StackBackward0", "SplitBackward0", "SplitBackward1",
    "SplitWithSizesBackward0", "SplitWithSizesBackward1", "UnsafeSplitBackward0", "UnsafeSplitWithSizesBackward0",
    "UnbindBackward0", "FlipBackward0", "RollBackward0", "PixelShuffleBackward0", "PixelUnshuffleBackward0",
    "UpsampleNearest1DBackward0", "UpsampleNearest2DBackward0", "UpsampleNearest3DBackward0",
    "UpsampleNearestExact1DBackward0", "UpsampleNearestExact2DBackward0", "UpsampleNearestExact3DBackward0",
    "ReflectionPad1DBackward0", "ReflectionPad2DBackward0", "ReplicationPad1DBackward0", "ReplicationPad2DBackward0",
    "MaxBackward0", "MinBackward0", "MaxBackward1", "MinBackward1", "AmaxBackward0", "AminBackward0",
    "MaximumBackward0", "MinimumBackward0", "MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0",
    "AdaptiveMaxPool2DBackward0", "AdaptiveMaxPool3DBackward0",
})
#: average pools: non-negative averages of input elements
_AVERAGE_POOLS = frozenset({"AvgPool2DBackward0", "AvgPool3DBackward0", "AdaptiveAvgPool2DBackward0",
                            "AdaptiveAvgPool3DBackward0"})


# -----------------------------------------------------------------------------------------------------------
# Row builders
# -----------------------------------------------------------------------------------------------------------
def _family_of_linear(site: Site) -> str:
    return site.spec.kernel.family(site.active)


def _linear(kernel: LinearKernel, inputs_saved: tuple[tuple[int, str], ...], **traits: Any) -> OpSpec:
    return OpSpec("linear", kernel, inputs_saved=inputs_saved, rebuild=kernel.rebuild, replay=_linear_replay(kernel),
                  family_of=_family_of_linear, costly=True, **traits)


def _linear_replay(kernel: LinearKernel) -> Callable:
    """``alpha·f(a, b) + beta·bias`` from the inputs' values (constant operands are read by the Promise System
    from saved fields or, for a frozen bias, from the model; an absent bias is ``None``)."""
    def replay(node: Any, xs: Any, nr: int) -> torch.Tensor:
        a, b = xs[kernel.operands[0]], xs[kernel.operands[1]]
        z = kernel.alpha(node) * kernel.f(node, a, b)
        if kernel.bias_pos is not None and len(xs) > kernel.bias_pos and xs[kernel.bias_pos] is not None:
            z = z + kernel.beta(node) * kernel.bias_view(node, xs[kernel.bias_pos], z.shape)
        return z
    return replay


def _routing(replay: Callable | None = None, replay_inputs: Any = None, inputs_saved: tuple = (),
             selection: bool = True, **traits: Any) -> OpSpec:
    """A routing row; ``selection=False`` for routing ops that add copies (scatter-add, index-add, fold) or scale
    them (dropout), whose input is not a copy of their output."""
    return OpSpec("routing", routing.RoutingKernel(replay), replay=replay, replay_inputs=replay_inputs,
                  inputs_saved=inputs_saved, selection=selection, **traits)


def _view(replay: Callable, reshape: bool = False, bijection: bool = True) -> OpSpec:
    """A view, copy or cast: the output *is* the input rearranged (``reshape``: in the same element order;
    ``bijection``: one to one, so the input can be read back from the output)."""
    return _routing(replay, view=True, reshape=reshape, bijection=bijection)


def _unary(name: str) -> OpSpec:
    k = UNARY[name]
    results = ((0, k.y_field),) if k.y_field else ()
    inputs_saved = ((0, k.x_field),) if k.x_field else ()
    return OpSpec("activation", k, results=results, inputs_saved=inputs_saved, rebuild=k.rebuild,
                  replay=k.replay, elementwise="unary", activation=name in _ACTIVATIONS, gate=name in _GATES,
                  nonnegative=name in _NONNEGATIVE)


def _sum(forward: Callable | None, coefficients: Callable | None = None, rebuild: Callable | None = None,
         inputs_saved: tuple = (), replay_inputs: Any = None, family: str = "add", kernel: type = SumKernel,
         **traits: Any) -> OpSpec:
    return OpSpec(family, kernel(forward, coefficients, rebuild), rebuild=rebuild, replay=forward,
                  replay_inputs=replay_inputs, inputs_saved=inputs_saved, **traits)


def _add_coefs(node: Any) -> tuple[float, ...]:
    return (1.0, _alpha(node))


def _sub_coefs(node: Any) -> tuple[float, ...]:
    return (1.0, -_alpha(node))


def _rsub_coefs(node: Any) -> tuple[float, ...]:
    return (-_alpha(node), 1.0)


def _product(divide: bool, scalar: bool = False) -> OpSpec:
    k = ProductKernel(divide=divide, scalar=scalar)
    inputs_saved: tuple = () if scalar else ((0, "self"), (1, "other"))
    return OpSpec("product", k, inputs_saved=inputs_saved, rebuild=k.rebuild, replay=k.replay,
                  replay_inputs=(0,) if scalar else None, elementwise="unary" if scalar else "binary")


def _max_pool_rebuild(fn: Callable) -> Callable:
    def rebuild(node: Any, nr: int) -> torch.Tensor | None:
        x = saved(node, "self")
        if x is None or nr != 0:
            return None
        return fn(node, x)
    return rebuild


def _mp2d(node: Any, x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, saved(node, "kernel_size"), saved(node, "stride") or None, saved(node, "padding"),
                        saved(node, "dilation"), saved(node, "ceil_mode"))


def _mp3d(node: Any, x: torch.Tensor) -> torch.Tensor:
    return F.max_pool3d(x, saved(node, "kernel_size"), saved(node, "stride") or None, saved(node, "padding"),
                        saved(node, "dilation"), saved(node, "ceil_mode"))


def _embedding_replay(node: Any, xs: Any, nr: int) -> torch.Tensor:
    return F.embedding(saved(node, "indices"), xs[0], saved(node, "padding_idx"))


def _norm(kind: str, eps_field: str = "eps") -> OpSpec:
    k = NormKernel(kind, eps_field if kind == "batch" else None)
    inputs_saved: tuple = ((0, "input"),) + (((1, "weight"),) if kind in ("layer", "batch", "group", "rms") else ())
    if kind == "layer":
        inputs_saved = inputs_saved + ((2, "bias"),)
    return OpSpec("norm", k, inputs_saved=inputs_saved, rebuild=k.rebuild, replay=k.replay,
                  replay_inputs=(2,) if kind in ("batch", "group") else (),
                  static_fields=("training",) if kind == "batch" else ())


def _composite(kernel: Any, inputs_saved: tuple = (), **traits: Any) -> OpSpec:
    """An op re-expressed with primitive ops (family ``composite``, rule ``Decompose``); its output is rebuilt from
    the inputs it kept, or replayed from its inputs' values."""
    def rebuild(node: Any, nr: int) -> torch.Tensor | None:
        xs = kernel.inputs(node)
        if xs is None or any(x is None for x in xs):
            return None
        return _nth(kernel.forward(node, *xs), nr)

    def replay(node: Any, xs: Any, nr: int) -> torch.Tensor:
        return _nth(kernel.forward(node, *xs), nr)
    return OpSpec("composite", kernel, inputs_saved=inputs_saved, rebuild=rebuild, replay=replay, **traits)


def _nth(out: Any, nr: int) -> torch.Tensor:
    t = out if isinstance(out, torch.Tensor) else out[nr]
    return t.detach()


def _function(kernel: Any, module: str, qualname: str, family: str) -> OpSpec:
    """A known custom ``autograd.Function`` (element-wise, its input in ``ctx.saved_tensors[0]``), matched by node
    class name and checked against the Function's class."""
    return OpSpec(family, kernel, inputs_saved=((0, "saved_tensors.0"),), rebuild=kernel.rebuild, replay=kernel.replay,
                  family_of=function_family(family), function=(module, qualname))


# -----------------------------------------------------------------------------------------------------------
# The rows
# -----------------------------------------------------------------------------------------------------------
def _routing_rows() -> dict[str, OpSpec]:
    rows: dict[str, OpSpec] = {}
    for name in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0",
                 "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3", "SqueezeBackward4",
                 "SqueezeBackward5",  # in-place squeeze_(dims), met under vmap
                 "UnsqueezeBackward0", "UnsqueezeBackward1", "FlattenBackward0", "UnflattenBackward0"):
        rows[name] = _view(routing.replay_reshape, reshape=True)
    for name in ("CloneBackward0", "AliasBackward0", "ContiguousBackward0", "LiftFreshBackward0", "DetachBackward0"):
        rows[name] = _view(routing.replay_identity, reshape=True)
    # complex-valued linear maps (FNet's Fourier mixing, global filters): gradient-form routing of the real
    # composite (see ComplexLinearKernel)
    cplx = routing.ComplexLinearKernel
    rows["ViewAsRealBackward0"] = OpSpec("routing", cplx(routing.replay_view_as_real),
                                         replay=routing.replay_view_as_real, view=True)
    rows["ViewAsComplexBackward0"] = OpSpec("routing", cplx(routing.replay_view_as_complex),
                                            replay=routing.replay_view_as_complex, view=True)
    rows["FftR2CBackward0"] = OpSpec("routing", cplx(routing.replay_fft_r2c), inputs_saved=((0, "self"),),
                                     rebuild=routing.rebuild_fft_r2c, replay=routing.replay_fft_r2c)
    rows["FftC2CBackward0"] = OpSpec("routing", cplx(routing.replay_fft_c2c), replay=routing.replay_fft_c2c)
    rows["FftC2RBackward0"] = OpSpec("routing", cplx(routing.replay_fft_c2r), replay=routing.replay_fft_c2r)
    rows["ToCopyBackward0"] = _view(routing.replay_to_copy, reshape=True, bijection=False)  # a cast may round
    rows["TBackward0"] = _view(routing.replay_t)
    rows["TBackward1"] = _view(routing.replay_t)  # in-place t_()
    rows["TransposeBackward0"] = _view(routing.replay_transpose)
    rows["TransposeBackward1"] = _view(routing.replay_transpose)
    rows["PermuteBackward0"] = _view(routing.replay_permute)
    rows["ExpandBackward0"] = _view(routing.replay_expand, bijection=False)
    rows["RepeatBackward0"] = _view(routing.replay_repeat, bijection=False)
    rows["SliceBackward0"] = _routing(routing.replay_slice)
    rows["SelectBackward0"] = _routing(routing.replay_select)
    rows["SelectBackward1"] = _routing(routing.replay_select)
    rows["IndexBackward0"] = _routing(routing.replay_index)
    rows["IndexSelectBackward0"] = _routing(routing.replay_index_select)
    rows["GatherBackward0"] = _routing(routing.replay_gather)
    rows["CatBackward0"] = _routing(routing.replay_cat)
    rows["StackBackward0"] = _routing(routing.replay_stack)
    for name in ("SplitBackward0", "SplitBackward1", "SplitWithSizesBackward0", "SplitWithSizesBackward1",
                 "UnsafeSplitBackward0", "UnsafeSplitWithSizesBackward0"):
        rows[name] = _routing(routing.replay_split)
    rows["UnbindBackward0"] = _routing(routing.replay_unbind)
    rows["FlipBackward0"] = _routing(routing.replay_flip)
    rows["RollBackward0"] = _routing(routing.replay_roll)
    rows["WhereBackward0"] = _routing(routing.replay_where, replay_inputs=(0, 1))
    # F.pad(mode="constant") keeps only the padding sizes, not the fill value: where no consumer saved the padded
    # tensor (a convolution does) it is replayed with F.pad's default fill, 0 (README, "Known limits")
    rows["ConstantPadNdBackward0"] = _routing(routing.replay_constant_pad)
    rows["MaskedFillBackward0"] = _routing()
    rows["MaskedFillBackward1"] = _routing()
    rows["IndexPutBackward0"] = _routing(selection=False)  # index_put_(accumulate=True) adds
    rows["ScatterBackward0"] = _routing()
    rows["ScatterBackward1"] = _routing()
    rows["ScatterAddBackward0"] = _routing(selection=False)
    rows["IndexAddBackward0"] = _routing(selection=False)
    rows["NativeDropoutBackward0"] = _routing(selection=False, view=True)
    rows["UnfoldBackward0"] = _routing()
    rows["Im2ColBackward0"] = _routing(routing.replay_im2col)
    rows["Col2ImBackward0"] = _routing(selection=False)
    rows["PixelShuffleBackward0"] = _routing(routing.replay_pixel_shuffle)
    rows["PixelUnshuffleBackward0"] = _routing(routing.replay_pixel_unshuffle)
    for name, op in (("UpsampleNearest1DBackward0", "upsample_nearest1d"),
                     ("UpsampleNearest2DBackward0", "upsample_nearest2d"),
                     ("UpsampleNearest3DBackward0", "upsample_nearest3d"),
                     ("UpsampleNearestExact1DBackward0", "_upsample_nearest_exact1d"),
                     ("UpsampleNearestExact2DBackward0", "_upsample_nearest_exact2d"),
                     ("UpsampleNearestExact3DBackward0", "_upsample_nearest_exact3d")):
        rows[name] = _routing(routing.replay_upsample_nearest(op))
    # reflection and replication padding save their input: rebuilt from it (every output element is a copy)
    for name, mode in (("ReflectionPad1DBackward0", "reflect"), ("ReflectionPad2DBackward0", "reflect"),
                       ("ReplicationPad1DBackward0", "replicate"), ("ReplicationPad2DBackward0", "replicate")):
        rows[name] = OpSpec("routing", routing.RoutingKernel(routing.replay_pad(mode)), inputs_saved=((0, "self"),),
                            rebuild=routing.rebuild_pad(mode), replay=routing.replay_pad(mode), selection=True)
    for name in ("TopkBackward0", "SortBackward0", "KthvalueBackward0"):
        rows[name] = _routing(routing.replay_take_indices)
    for name in ("AsStridedBackward0", "AsStridedBackward1"):
        rows[name] = _routing(routing.replay_as_strided)
    # winner-take-all maxima: the gradient routes everything to the arg-max
    rows["MaxBackward0"] = _routing(routing.replay_take_indices)  # max(dim): the input at the saved indices
    rows["MinBackward0"] = _routing(routing.replay_take_indices)
    for name in ("MaxBackward1", "MinBackward1", "AmaxBackward0", "AminBackward0"):  # they keep their result
        rows[name] = OpSpec("routing", routing.RoutingKernel(), results=((0, "result"),), inputs_saved=((0, "self"),),
                            selection=True, reduction=name in ("MaxBackward1", "AmaxBackward0"))
    for name, fn in (("MaximumBackward0", torch.maximum), ("MinimumBackward0", torch.minimum),
                     ("FmaxBackward0", torch.fmax), ("FminBackward0", torch.fmin)):
        rows[name] = OpSpec("routing", routing.RoutingKernel(), inputs_saved=((0, "self"), (1, "other")),
                            rebuild=binary_rebuild(fn), selection=True)
    rows["MaxPool2DWithIndicesBackward0"] = OpSpec(
        "routing", routing.RoutingKernel(), inputs_saved=((0, "self"),), rebuild=_max_pool_rebuild(_mp2d), selection=True)
    rows["MaxPool3DWithIndicesBackward0"] = OpSpec(
        "routing", routing.RoutingKernel(), inputs_saved=((0, "self"),), rebuild=_max_pool_rebuild(_mp3d), selection=True)
    for name in ("AdaptiveMaxPool2DBackward0", "AdaptiveMaxPool3DBackward0"):
        rows[name] = OpSpec("routing", routing.RoutingKernel(routing.replay_take_flat_indices), inputs_saved=((0, "self"),),
                            rebuild=routing.rebuild_take_flat_indices, replay=routing.replay_take_flat_indices, selection=True)
    rows["EmbeddingBackward0"] = OpSpec("embedding", routing.EmbeddingKernel(), replay=_embedding_replay,
                                        replay_inputs=(0,), selection=True, data_lookup=True)
    # full backward hooks (register_full_backward_hook): each output is its input. The rule routes through the
    # node's own backward, called directly, so the hooks (which only the autograd engine runs) never fire
    rows["BackwardHookFunctionBackward"] = OpSpec(
        "routing", routing.RoutingKernel(routing.replay_nth), replay=routing.replay_nth, selection=True, view=True,
        reshape=True, family_of=function_family("routing"),
        function=("torch.nn.modules._functions", "BackwardHookFunction"))
    # sum/mean/max of weight rows per bag, or the per-index weights when they are data (see EmbeddingBagKernel)
    bag = routing.EmbeddingBagKernel()
    rows["EmbeddingBagBackward0"] = OpSpec("embedding", bag, inputs_saved=((0, "weight"), (1, "per_sample_weights")),
                                           rebuild=bag.rebuild, replay=bag.replay_bag, replay_inputs=(0,),
                                           data_lookup=True)
    # selections added for coverage (issue 11): every output element is a copy of an input element or a constant,
    # so the node's backward is the z-rule in gradient form (LRP-0 = gradient × input), exactly conservative
    rows["MaskedScatterBackward0"] = _routing(routing.replay_masked_scatter)  # image features into text embeddings
    rows["MaxUnpool2DBackward0"] = _routing(routing.replay_max_unpool(2))
    rows["MaxUnpool3DBackward0"] = _routing(routing.replay_max_unpool(3))
    rows["CopyBackwards"] = _routing(routing.replay_copy, replay_inputs=routing.copy_replay_inputs)  # dst.copy_(src)
    rows["PackPaddedSequenceBackward0"] = _routing(routing.replay_pack_padded)  # packed LSTM/GRU input
    # scatter_reduce: sum/mean (fixed coefficients) and amax/amin (selections) route like the gradient; prod is a
    # homogeneous product (family reduce); see ScatterReduceKernel
    rows["ScatterReduceBackward0"] = OpSpec("routing", SCATTER_REDUCE, results=((0, "result"),),
                                            inputs_saved=((0, "self"), (1, "src")), rebuild=SCATTER_REDUCE.rebuild,
                                            replay=SCATTER_REDUCE.forward, family_of=SCATTER_REDUCE.family_of)
    # in-place writes into views: routing, after a plan-time check of the wrapped op (family "inplace")
    rows["CopySlices"] = OpSpec("inplace", CopySlicesKernel(), replay=CopySlicesKernel.replay)
    return rows


def _build() -> Mapping[str, OpSpec]:
    t: dict[str, OpSpec] = {}
    t["AccumulateGrad"] = OpSpec("leaf", LeafKernel())
    # linear algebra
    t["MmBackward0"] = _linear(MmKernel(), ((0, "self"), (1, "mat2")), merges_batchnorm=True)
    t["BmmBackward0"] = _linear(BmmKernel(), ((0, "self"), (1, "mat2")))
    t["AddmmBackward0"] = _linear(AddmmKernel(), ((1, "mat1"), (2, "mat2")), merges_batchnorm=True)
    t["BaddbmmBackward0"] = _linear(BaddbmmKernel(), ((1, "batch1"), (2, "batch2")))
    t["MvBackward0"] = _linear(MvKernel(), ((0, "self"), (1, "vec")))
    t["VdotBackward0"] = _linear(VdotKernel(), ((0, "self"), (1, "other")))  # spectral norm's σ = uᵀ(W v)
    t["ConvolutionBackward0"] = OpSpec("conv", ConvKernel(), inputs_saved=((0, "input"), (1, "weight")),
                                       replay=_linear_replay(ConvKernel()), family_of=_family_of_linear,
                                       static_fields=("bias_sym_sizes_opt",), merges_batchnorm=True, costly=True)
    # MoE experts (torch._grouped_mm): a linear op with weights
    t["GroupedMmBackward0"] = _linear(GroupedMmKernel(), ((0, "self"), (1, "mat2")))
    t["GeneratedBackwardFor_transformers_grouped_mm_fallback_defaultBackward"] = _linear(
        GroupedMmFallbackKernel(), ((0, "saved_tensors.0"), (1, "saved_tensors.1")))
    # sums
    t["AddBackward0"] = _sum(add_forward, _add_coefs, replay_inputs=(0, 1), elementwise="binary", kernel=AddKernel)
    t["AddBackward1"] = _sum(None, lambda n: (1.0,), elementwise="unary")
    t["SubBackward0"] = _sum(sub_forward, _sub_coefs, replay_inputs=(0, 1), elementwise="binary")
    t["SubBackward1"] = _sum(None, lambda n: (1.0,), elementwise="unary")
    t["RsubBackward0"] = _sum(rsub_forward, _rsub_coefs, replay_inputs=(0, 1), elementwise="binary")
    t["RsubBackward1"] = _sum(None, lambda n: (-_alpha(n),), elementwise="unary")
    for name in ("SumBackward0", "SumBackward1"):
        t[name] = _sum(sum_forward, family="reduce", reduction=True)
    for name in ("MeanBackward0", "MeanBackward1"):
        t[name] = _sum(mean_forward, family="reduce", reduction=True)
    t["CumsumBackward0"] = _sum(cumsum_forward, family="reduce")
    # positively homogeneous statistics (Euler's theorem, see HomogeneousKernel): std (degree 1), var (2), the
    # product of n elements (n: AttnLRP's uniform rule), cumulative products (i + 1 at position i). Std and var are
    # statistics, so a product with them treats them as normalisers
    t["StdBackward0"] = OpSpec("reduce", STD, results=((0, "result"),), inputs_saved=((0, "self"),),
                               rebuild=STD.rebuild, replay=STD.forward, reduction=True)
    t["VarBackward0"] = OpSpec("reduce", VAR, inputs_saved=((0, "self"),), rebuild=VAR.rebuild, replay=VAR.forward,
                               reduction=True)
    for name in ("ProdBackward0", "ProdBackward1"):
        t[name] = OpSpec("reduce", PROD, results=((0, "result"),), inputs_saved=((0, "self"),), rebuild=PROD.rebuild,
                         replay=PROD.forward)
    t["CumprodBackward0"] = OpSpec("reduce", CUMPROD, results=((0, "result"),), inputs_saved=((0, "self"),),
                                   rebuild=CUMPROD.rebuild, replay=CUMPROD.forward)
    # spatial transformers and R-CNN heads: linear maps of the input with coefficients fixed by a grid or boxes
    # (the sum rule, like interpolation; the grid/boxes receive nothing), and the affine grid, linear in θ
    for name in ("GridSampler2DBackward0", "GridSampler3DBackward0"):
        t[name] = OpSpec("pool", GRID_SAMPLE, rebuild=GRID_SAMPLE.rebuild, replay=GRID_SAMPLE.forward,
                         replay_inputs=(0,), inputs_saved=((0, "input"), (1, "grid")))
    t["AffineGridGeneratorBackward0"] = OpSpec("pool", AFFINE_GRID, replay=AFFINE_GRID.forward)
    t["GeneratedBackwardFor_torchvision_roi_align_defaultBackward"] = OpSpec(
        "pool", ROI_ALIGN, replay=ROI_ALIGN.forward, replay_inputs=(0,), family_of=function_family("pool"),
        function=("torch._library.autograd", "GeneratedBackwardFor_torchvision_roi_align_default"))
    # a loss as the explained output: nll_loss (cross_entropy = log_softmax + nll_loss) is linear in its input
    for name in ("NllLossBackward0", "NllLoss2DBackward0"):
        t[name] = _sum(nll_forward, inputs_saved=((0, "self"),), family="reduce")
    t["AvgPool2DBackward0"] = _sum(lambda n, xs, nr: _avg_pool2d(n, xs[0]), rebuild=avg_pool_rebuild(_avg_pool2d),
                                   inputs_saved=((0, "self"),), family="pool")
    t["AvgPool3DBackward0"] = _sum(lambda n, xs, nr: _avg_pool3d(n, xs[0]), rebuild=avg_pool_rebuild(_avg_pool3d),
                                   inputs_saved=((0, "self"),), family="pool")
    for name in ("AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0"):
        t[name] = _sum(lambda n, xs, nr: _adaptive_avg_pool_nd(n, xs[0]),
                       rebuild=avg_pool_rebuild(_adaptive_avg_pool_nd), inputs_saved=((0, "self"),), family="pool")
    # interpolation: linear maps with constant weights -> the sum rule (family "pool", like average pooling)
    for name, kind in (("UpsampleLinear1DBackward0", "linear1d"), ("UpsampleBilinear2DBackward0", "bilinear2d"),
                       ("UpsampleBicubic2DBackward0", "bicubic2d"), ("UpsampleTrilinear3DBackward0", "trilinear3d"),
                       ("UpsampleBilinear2DAaBackward0", "bilinear2d_aa"),
                       ("UpsampleBicubic2DAaBackward0", "bicubic2d_aa")):
        t[name] = _sum(upsample_forward(kind), family="pool")
    # vector norms (F.normalize, cosine attention, GRN): homogeneous of degree 1 -> the sum rule is conservative
    t["LinalgVectorNormBackward0"] = OpSpec("reduce", VECTOR_NORM, results=((0, "result"),),
                                            inputs_saved=((0, "self"),), rebuild=VECTOR_NORM.rebuild,
                                            replay=vector_norm_forward, reduction=True)
    # products
    t["MulBackward0"] = _product(divide=False)
    t["MulBackward1"] = _product(divide=False, scalar=True)
    t["DivBackward0"] = _product(divide=True)
    t["DivBackward1"] = _product(divide=True, scalar=True)
    t["NegBackward0"] = OpSpec("product", NegKernel(), replay=NegKernel().replay, elementwise="unary")
    # element-wise non-linearities
    for name in UNARY:
        t[name] = _unary(name)
    # PReLU: piecewise-linear activation with a learned slope (identity rule on x, nothing to the slope)
    t["PreluKernelBackward0"] = OpSpec("activation", PRELU, inputs_saved=((0, "self"),), rebuild=PRELU.rebuild,
                                       replay=PRELU.replay, replay_inputs=(0,))
    # normalisation
    t["NativeLayerNormBackward0"] = _norm("layer")
    t["NativeBatchNormBackward0"] = _norm("batch")
    # cudnn_batch_norm (a CUDA GPU in float32/float16 with an affine batch norm; bfloat16 takes the native kernel)
    # and miopen_batch_norm (ROCm): derivatives.yaml saves input, weight, running_mean, running_var, training,
    # epsilon (not eps), result1 = save_mean, result2 = save_var (cuDNN's and MIOpen's "SaveInvVariance": the
    # inverse standard deviation, like native_batch_norm's result2) and, for cuDNN, result3 = the reserve space.
    # Differentiable inputs: input, weight, bias (as native_batch_norm); merged into the conv/linear before it alike.
    t["CudnnBatchNormBackward0"] = _norm("batch", eps_field="epsilon")
    t["MiopenBatchNormBackward0"] = _norm("batch", eps_field="epsilon")
    t["NativeGroupNormBackward0"] = _norm("group")
    # _fused_rms_norm(input, normalized_shape, weight, eps) -> (output, rstd): F.rms_norm / nn.RMSNorm on a GPU
    # (on a CPU it decomposes into primitive ops). derivatives.yaml saves input, normalized_shape, weight and
    # result1 (rstd, shaped like input with the normalised dimensions kept as 1); differentiable: input, weight
    t["FusedRmsNormBackward0"] = _norm("rms")
    # softmax and attention
    t["SoftmaxBackward0"] = OpSpec("softmax", SoftmaxKernel(), results=((0, "result"),), nonnegative=True)
    t["SafeSoftmaxBackward0"] = OpSpec("softmax", SoftmaxKernel(), results=((0, "result"),), nonnegative=True)
    t["LogSoftmaxBackward0"] = OpSpec("softmax", SoftmaxKernel(log=True), results=((0, "result"),))
    # logsumexp, a smooth maximum: relevance by the softmax weights (Softmax rule -> LogsumexpStep); a statistic
    t["LogsumexpBackward0"] = OpSpec("softmax", LogsumexpKernel(), results=((0, "result"),),
                                     inputs_saved=((0, "self"),), reduction=True)
    # fused scaled_dot_product_attention, per backend (derivatives.yaml and the generated node classes):
    # * _scaled_dot_product_flash_attention_for_cpu: differentiable query, key, value; saves query, key, value,
    #   attn_mask, output, logsumexp, dropout_p, is_causal, scale;
    # * _scaled_dot_product_efficient_attention (CUDA "memory-efficient"): differentiable query, key, value,
    #   attn_bias; saves query, key, value, attn_bias, output, log_sumexp (spelled so), philox_seed,
    #   philox_offset, dropout_p, is_causal, scale;
    # * _scaled_dot_product_flash_attention (CUDA flash, half precision only): differentiable query, key, value;
    #   saves query, key, value, output, logsumexp, cum_seq_q/k, max_q/k, rng_state, unused, dropout_p,
    #   is_causal, scale (no mask: masks select another backend);
    # * _scaled_dot_product_cudnn_attention: differentiable query, key, value (attn_bias saved, no edge in the
    #   versions checked); saves query, key, value, attn_bias, output, logsumexp, cum_seq_q/k, max_q/k,
    #   philox_seed, philox_offset, dropout_p, is_causal, scale;
    # * _flash_attention_forward / _efficient_attention_forward (the kernels called directly, e.g. for nested or
    #   variable-length batches; layout (B, S, H, D)): query, key, value (+ bias); they save the output and the
    #   inputs under the same names, the log-sum-exp as softmax_logsumexp / logsumexp.
    # The rule calls the node's own backward (exact for every mask, causal flag, GQA layout, scale and dropout mask
    # the kernel saw: dropout is a constant scaling of the attention weights, which the AttnLRP and CP-LRP factors
    # pass through); only the output and the inputs are read, under the names common to every backend.
    for name, mask, lse in (("ScaledDotProductFlashAttentionForCpuBackward0", "attn_mask", "logsumexp"),
                            ("ScaledDotProductEfficientAttentionBackward0", "attn_bias", "log_sumexp"),
                            ("ScaledDotProductFlashAttentionBackward0", None, "logsumexp"),
                            ("ScaledDotProductCudnnAttentionBackward0", "attn_bias", "logsumexp"),
                            ("FlashAttentionBackward0", None, "softmax_logsumexp"),
                            ("EfficientAttentionBackward0", "bias", "logsumexp")):
        t[name] = OpSpec("attention", AttentionKernel(mask_field=mask, lse_field=lse), results=((0, "output"),),
                         inputs_saved=((0, "query"), (1, "key"), (2, "value")))
    t.update(_routing_rows())
    # fused oneDNN LSTM layer (nn.LSTM on CPU): re-expressed with primitive ops, explained with the rule set
    rnn = RecurrentKernel()
    t["MkldnnRnnLayerBackward0"] = OpSpec(
        "recurrent", rnn, results=((0, "result0"), (1, "result1"), (2, "result2")),
        inputs_saved=((0, "input"), (1, "weight0"), (2, "weight1"), (5, "hx_"), (6, "cx_")), rebuild=rnn.rebuild,
        static_fields=("mode", "has_biases", "batch_sizes"))
    # fused cuDNN / MIOpen RNN (nn.LSTM, nn.GRU, nn.RNN on a GPU), every layer and direction in one node: see
    # CudnnRnnKernel for the saved fields (derivatives.yaml's _cudnn_rnn: input, weight[], weight_stride0, hx, cx,
    # mode, hidden_size, proj_size, num_layers, batch_first, dropout, train, bidirectional, batch_sizes,
    # result0 = output; hy and cy are not saved). The weight list's positions depend on the network, so only the
    # input's saved field is declared here; the rule reads the rest.
    cudnn_rnn = CudnnRnnKernel()
    rnn_static = ("mode", "num_layers", "bidirectional", "batch_first", "weight_stride0", "batch_sizes", "train",
                  "dropout")
    t["CudnnRnnBackward0"] = OpSpec("recurrent", cudnn_rnn, results=((0, "result0"),), inputs_saved=((0, "input"),),
                                    rebuild=cudnn_rnn.rebuild, static_fields=rnn_static + ("proj_size",))
    # fused LSTM/GRU cells (nn.LSTMCell / nn.GRUCell on a GPU; nn.LSTM / nn.GRU where cuDNN does not take the input):
    # see FusedCellKernel for derivatives.yaml's saved fields (the LSTM cell keeps cy as result1; hy is not saved)
    lstm_cell = FusedCellKernel("lstm")
    t["ThnnFusedLstmCellBackward0"] = OpSpec("recurrent", lstm_cell, results=((1, "result1"),),
                                             inputs_saved=((0, "input_gates"), (1, "hidden_gates"), (2, "cx"),
                                                           (3, "input_bias"), (4, "hidden_bias")),
                                             rebuild=lstm_cell.rebuild)
    gru_cell = FusedCellKernel("gru")
    t["ThnnFusedGruCellBackward0"] = OpSpec("recurrent", gru_cell,
                                            inputs_saved=((0, "input_gates"), (1, "hidden_gates"), (2, "hx"),
                                                          (3, "input_bias"), (4, "hidden_bias")))
    t["MiopenRnnBackward0"] = OpSpec("recurrent", cudnn_rnn, results=((0, "result0"),), inputs_saved=((0, "input"),),
                                     rebuild=cudnn_rnn.rebuild, static_fields=rnn_static)
    # weight normalisation (wav2vec2's positional convolution)
    wn = WeightNormKernel()
    t["WeightNormInterfaceBackward0"] = OpSpec("parametrization", wn, inputs_saved=((0, "v"), (1, "g")),
                                               rebuild=wn.rebuild)
    # ops re-expressed with primitive ops and explained with the caller's rule set (rule Decompose)
    t["GluBackward0"] = _composite(GLU, inputs_saved=((0, "self"),))
    t["TrilinearBackward0"] = _composite(TRILINEAR, inputs_saved=((0, "i1"), (1, "i2"), (2, "i3")))
    t["CheckpointFunctionBackward"] = _composite(CHECKPOINT, family_of=function_family("composite"),
                                                 function=("torch.utils.checkpoint", "CheckpointFunction"))
    # known custom autograd Functions
    t["GeLUFunctionBackward"] = _function(BLOOM_GELU, "transformers.models.bloom.modeling_bloom", "GeLUFunction",
                                          "activation")
    t["SqrtBoundDerivativeBackward"] = _function(
        RG_SQRT, "transformers.models.recurrent_gemma.modeling_recurrent_gemma", "SqrtBoundDerivative", "activation")
    for name in _KEEPS_SIGN | _AVERAGE_POOLS:
        t[name] = dataclasses.replace(t[name], keeps_sign=True)
    return MappingProxyType(t)


#: node type -> OpSpec. Read-only; extend per rule set with ``RuleSet.with_ops``.
REGISTRY: Mapping[str, OpSpec] = _build()


def families() -> frozenset[str]:
    """Every family some registry row uses."""
    return frozenset(spec.family for spec in REGISTRY.values()) | {"matmul"}


def describe(name: str) -> dict[str, Any]:
    """A readable summary of one row (used by the coverage report)."""
    spec = REGISTRY.get(name)
    if spec is None:
        return {"node": name, "covered": False}
    return {"node": name, "covered": True, "family": spec.family, "kernel": type(spec.kernel).__name__}
