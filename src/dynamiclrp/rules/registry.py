"""The registry: one row per autograd node type (in the spirit of PyTorch's ``derivatives.yaml``).

Each row says which *family* of rules handles the node (the rule set maps families to rules), which kernel
describes the op, which forward inputs/outputs autograd saved and under which field, and how to rebuild or
replay the node's output for the Promise System. Node types not in this table are unsupported: the planner
raises :class:`~dynamiclrp.errors.UnsupportedOperationError` before any relevance is computed.

Families
--------
``linear``, ``conv`` (activation × weight), ``matmul`` (activation × activation), ``product`` (element-wise
``*`` and ``/``), ``add``, ``reduce``, ``pool``, ``activation``, ``norm``, ``softmax``, ``attention``,
``routing``, ``embedding``, ``leaf``.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from .. import graph as G
from . import kernels as K
from .base import OpSpec, Site


def _family_of_linear(site: Site) -> str:
    return site.spec.kernel.family(site.active)


def _linear(kernel: K.LinearKernel, inputs_saved: tuple[tuple[int, str], ...]) -> OpSpec:
    return OpSpec("linear", kernel, inputs_saved=inputs_saved, rebuild=kernel.rebuild,
                  replay=_linear_replay(kernel), family_of=_family_of_linear)


def _linear_replay(kernel: K.LinearKernel):
    """``alpha·f(a, b) + beta·bias`` from the inputs' values (constant operands are read by the Promise System
    from saved fields or, for a frozen bias, from the model; an absent bias is ``None``)."""
    def replay(node, xs, nr):
        a, b = xs[kernel.operands[0]], xs[kernel.operands[1]]
        z = kernel.alpha(node) * kernel.f(node, a, b)
        if kernel.bias_pos is not None and len(xs) > kernel.bias_pos and xs[kernel.bias_pos] is not None:
            z = z + kernel.beta(node) * kernel.bias_view(node, xs[kernel.bias_pos], z.shape)
        return z
    return replay


def _routing(replay=None, replay_inputs=None, inputs_saved=(), selection: bool = True) -> OpSpec:
    """A routing row; ``selection=False`` for routing ops that add copies (scatter-add, index-add, fold) or scale
    them (dropout), whose input is not a copy of their output."""
    return OpSpec("routing", K.RoutingKernel(replay), replay=replay, replay_inputs=replay_inputs,
                  inputs_saved=inputs_saved, selection=selection)


def _unary(name: str) -> OpSpec:
    k = K.UNARY[name]
    results = ((0, k.y_field),) if k.y_field else ()
    inputs_saved = ((0, k.x_field),) if k.x_field else ()
    return OpSpec("activation", k, results=results, inputs_saved=inputs_saved, rebuild=k.rebuild,
                  replay=k.replay)


def _sum(forward, coefficients=None, rebuild=None, inputs_saved=(), replay_inputs=None,
         family: str = "add") -> OpSpec:
    return OpSpec(family, K.SumKernel(forward, coefficients, rebuild), rebuild=rebuild, replay=forward,
                  replay_inputs=replay_inputs, inputs_saved=inputs_saved)


def _add_coefs(node) -> tuple[float, ...]:
    return (1.0, K._alpha(node))


def _sub_coefs(node) -> tuple[float, ...]:
    return (1.0, -K._alpha(node))


def _rsub_coefs(node) -> tuple[float, ...]:
    return (-K._alpha(node), 1.0)


def _product(divide: bool, scalar: bool = False) -> OpSpec:
    k = K.ProductKernel(divide=divide, scalar=scalar)
    inputs_saved = ((0, "self"),) if not scalar else ()
    if not scalar:
        inputs_saved = inputs_saved + ((1, "other"),)
    return OpSpec("product", k, inputs_saved=inputs_saved, rebuild=k.rebuild, replay=k.replay,
                  replay_inputs=(0,) if scalar else None)


def _max_pool_rebuild(fn):
    def rebuild(node, nr):
        x = K._s(node, "self")
        if x is None or nr != 0:
            return None
        return fn(node, x)
    return rebuild


def _mp2d(node, x):
    return F.max_pool2d(x, K._s(node, "kernel_size"), K._s(node, "stride") or None, K._s(node, "padding"),
                        K._s(node, "dilation"), K._s(node, "ceil_mode"))


def _mp3d(node, x):
    return F.max_pool3d(x, K._s(node, "kernel_size"), K._s(node, "stride") or None, K._s(node, "padding"),
                        K._s(node, "dilation"), K._s(node, "ceil_mode"))


def _embedding_replay(node, xs, nr):
    return F.embedding(K._s(node, "indices"), xs[0], K._s(node, "padding_idx"))


def _leaf() -> OpSpec:
    return OpSpec("leaf", K.LeafKernel())


def _norm(kind: str) -> OpSpec:
    k = K.NormKernel(kind)
    inputs_saved = ((0, "input"),) + (((1, "weight"),) if kind in ("layer", "batch", "group") else ())
    if kind == "layer":
        inputs_saved = inputs_saved + ((2, "bias"),)
    return OpSpec("norm", k, inputs_saved=inputs_saved, rebuild=k.rebuild, replay=k.replay,
                  replay_inputs=(2,) if kind != "layer" else (),
                  static_fields=("training",) if kind == "batch" else ())


def _softmax(log: bool = False) -> OpSpec:
    return OpSpec("softmax", K.SoftmaxKernel(log), results=((0, "result"),))


def _attention() -> OpSpec:
    return OpSpec("attention", K.AttentionKernel(), results=((0, "output"),),
                  inputs_saved=((0, "query"), (1, "key"), (2, "value")))


def _select_backward_rows() -> dict[str, OpSpec]:
    rows: dict[str, OpSpec] = {}
    for name in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0",
                 "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3", "SqueezeBackward4",
                 "UnsqueezeBackward0", "UnsqueezeBackward1", "FlattenBackward0", "UnflattenBackward0"):
        rows[name] = _routing(K.replay_reshape)
    for name in ("CloneBackward0", "AliasBackward0", "ContiguousBackward0", "LiftFreshBackward0",
                 "DetachBackward0", "ViewAsRealBackward0"):
        rows[name] = _routing(K.replay_identity)
    rows["ToCopyBackward0"] = _routing(K.replay_to_copy)
    rows["TBackward0"] = _routing(K.replay_t)
    rows["TransposeBackward0"] = _routing(K.replay_transpose)
    rows["TransposeBackward1"] = _routing(K.replay_transpose)
    rows["PermuteBackward0"] = _routing(K.replay_permute)
    rows["ExpandBackward0"] = _routing(K.replay_expand)
    rows["SliceBackward0"] = _routing(K.replay_slice)
    rows["SelectBackward0"] = _routing(K.replay_select)
    rows["SelectBackward1"] = _routing(K.replay_select)
    rows["IndexBackward0"] = _routing(K.replay_index)
    rows["IndexSelectBackward0"] = _routing(K.replay_index_select)
    rows["GatherBackward0"] = _routing(K.replay_gather)
    rows["CatBackward0"] = _routing(K.replay_cat)
    rows["StackBackward0"] = _routing(K.replay_stack)
    rows["SplitBackward0"] = _routing(K.replay_split)
    rows["SplitBackward1"] = _routing(K.replay_split)
    rows["SplitWithSizesBackward0"] = _routing(K.replay_split)
    rows["SplitWithSizesBackward1"] = _routing(K.replay_split)
    rows["UnbindBackward0"] = _routing(K.replay_unbind)
    rows["RepeatBackward0"] = _routing(K.replay_repeat)
    rows["FlipBackward0"] = _routing(K.replay_flip)
    rows["RollBackward0"] = _routing(K.replay_roll)
    rows["WhereBackward0"] = _routing(K.replay_where, replay_inputs=(0, 1))
    rows["ConstantPadNdBackward0"] = _routing(K.replay_constant_pad)
    rows["MaskedFillBackward0"] = _routing()
    rows["MaskedFillBackward1"] = _routing()
    # CopySlices: checked routing (family 'inplace'), see _coverage_rows
    rows["IndexPutBackward0"] = _routing(selection=False)  # index_put_(accumulate=True) adds
    rows["ScatterBackward0"] = _routing()
    rows["ScatterBackward1"] = _routing()
    rows["ScatterAddBackward0"] = _routing(selection=False)
    rows["IndexAddBackward0"] = _routing(selection=False)
    rows["NativeDropoutBackward0"] = _routing(selection=False)
    rows["UnfoldBackward0"] = _routing()
    rows["Im2ColBackward0"] = _routing()
    rows["Col2ImBackward0"] = _routing(selection=False)
    rows["PixelShuffleBackward0"] = _routing()
    rows["PixelUnshuffleBackward0"] = _routing()
    rows["UpsampleNearest1DBackward0"] = _routing()
    rows["UpsampleNearest2DBackward0"] = _routing()
    rows["UpsampleNearest3DBackward0"] = _routing()
    rows["UpsampleNearestExact1DBackward0"] = _routing()
    rows["UpsampleNearestExact2DBackward0"] = _routing()
    rows["UpsampleNearestExact3DBackward0"] = _routing()
    rows["ReflectionPad1DBackward0"] = _routing()
    rows["ReflectionPad2DBackward0"] = _routing()
    rows["ReplicationPad1DBackward0"] = _routing()
    rows["ReplicationPad2DBackward0"] = _routing()
    # winner-take-all maxima: the gradient routes everything to the arg-max
    rows["MaxBackward0"] = _routing()
    for name in ("MaxBackward1", "MinBackward1", "AmaxBackward0", "AminBackward0"):  # they keep their result
        rows[name] = OpSpec("routing", K.RoutingKernel(), results=((0, "result"),), inputs_saved=((0, "self"),),
                            selection=True)
    rows["MinBackward0"] = _routing()
    for name, fn in (("MaximumBackward0", torch.maximum), ("MinimumBackward0", torch.minimum),
                     ("FmaxBackward0", torch.fmax), ("FminBackward0", torch.fmin)):
        rows[name] = OpSpec("routing", K.RoutingKernel(), inputs_saved=((0, "self"), (1, "other")),
                            rebuild=K.binary_rebuild(fn), selection=True)
    rows["MaxPool2DWithIndicesBackward0"] = OpSpec(
        "routing", K.RoutingKernel(), inputs_saved=((0, "self"),), rebuild=_max_pool_rebuild(_mp2d), selection=True)
    rows["MaxPool3DWithIndicesBackward0"] = OpSpec(
        "routing", K.RoutingKernel(), inputs_saved=((0, "self"),), rebuild=_max_pool_rebuild(_mp3d), selection=True)
    for name in ("AdaptiveMaxPool2DBackward0", "AdaptiveMaxPool3DBackward0"):
        rows[name] = OpSpec("routing", K.RoutingKernel(K.replay_take_flat_indices), inputs_saved=((0, "self"),),
                            rebuild=K.rebuild_take_flat_indices, replay=K.replay_take_flat_indices, selection=True)
    rows["EmbeddingBackward0"] = OpSpec("embedding", K.EmbeddingKernel(), replay=_embedding_replay,
                                        replay_inputs=(0,), selection=True)
    return rows


def _coverage_rows() -> dict[str, OpSpec]:
    """Rows added for architecture coverage (issue 4); each has a test in ``tests/test_ops_special.py``."""
    from . import special as S

    rows: dict[str, OpSpec] = {}
    # routing: GRU's gate split, MoE top-k/sort values, strided views
    for name in ("UnsafeSplitBackward0", "UnsafeSplitWithSizesBackward0"):
        rows[name] = _routing(K.replay_split)
    for name in ("TopkBackward0", "SortBackward0", "KthvalueBackward0"):
        rows[name] = _routing(K.replay_take_indices)
    for name in ("AsStridedBackward0", "AsStridedBackward1"):
        rows[name] = _routing(K.replay_as_strided)
    # in-place writes into views: routing, after a plan-time check of the wrapped op (family "inplace")
    rows["CopySlices"] = OpSpec("inplace", S.CopySlicesKernel())
    # interpolation: linear maps with constant weights -> the sum rule (family "pool", like average pooling)
    for name, kind in (("UpsampleLinear1DBackward0", "linear1d"), ("UpsampleBilinear2DBackward0", "bilinear2d"),
                       ("UpsampleBicubic2DBackward0", "bicubic2d"), ("UpsampleTrilinear3DBackward0", "trilinear3d"),
                       ("UpsampleBilinear2DAaBackward0", "bilinear2d_aa"),
                       ("UpsampleBicubic2DAaBackward0", "bicubic2d_aa")):
        rows[name] = _sum(K.upsample_forward(kind), family="pool")
    # MoE experts (torch._grouped_mm): a linear op with weights
    rows["GroupedMmBackward0"] = _linear(K.GroupedMmKernel(), ((0, "self"), (1, "mat2")))
    rows["GeneratedBackwardFor_transformers_grouped_mm_fallback_defaultBackward"] = _linear(
        K.GroupedMmFallbackKernel(), ((0, "saved_tensors.0"), (1, "saved_tensors.1")))
    # PReLU: piecewise-linear activation with a learned slope (identity rule on x, nothing to the slope)
    rows["PreluKernelBackward0"] = OpSpec("activation", K.PRELU, inputs_saved=((0, "self"),), rebuild=K.PRELU.rebuild,
                                          replay=K.PRELU.replay, replay_inputs=(0,))
    # fused oneDNN LSTM layer (nn.LSTM on CPU): re-expressed with primitive ops, explained with the rule set
    rnn = S.RecurrentKernel()
    rows["MkldnnRnnLayerBackward0"] = OpSpec(
        "recurrent", rnn, results=((0, "result0"), (1, "result1"), (2, "result2")),
        inputs_saved=((0, "input"), (1, "weight0"), (2, "weight1"), (5, "hx_"), (6, "cx_")), rebuild=rnn.rebuild,
        static_fields=("mode", "has_biases", "batch_sizes"))
    # weight normalisation (wav2vec2's positional convolution)
    wn = S.WeightNormKernel()
    rows["WeightNormInterfaceBackward0"] = OpSpec("parametrization", wn, inputs_saved=((0, "v"), (1, "g")),
                                                  rebuild=wn.rebuild)
    # known custom autograd Functions (matched by node class name, checked against the Function's class)
    rows["GeLUFunctionBackward"] = OpSpec(
        "activation", K.BLOOM_GELU, inputs_saved=((0, "saved_tensors.0"),), rebuild=K.BLOOM_GELU.rebuild,
        replay=K.BLOOM_GELU.replay,
        family_of=S.custom_function_family(K.BLOOM_GELU, "transformers.models.bloom.modeling_bloom", "GeLUFunction",
                                           "activation"))
    rows["SqrtBoundDerivativeBackward"] = OpSpec(
        "activation", K.RG_SQRT, inputs_saved=((0, "saved_tensors.0"),), rebuild=K.RG_SQRT.rebuild,
        replay=K.RG_SQRT.replay,
        family_of=S.custom_function_family(K.RG_SQRT, "transformers.models.recurrent_gemma.modeling_recurrent_gemma",
                                           "SqrtBoundDerivative", "activation"))
    # vector norms (F.normalize, cosine attention, GRN): homogeneous of degree 1 -> the sum rule is conservative
    rows["LinalgVectorNormBackward0"] = OpSpec("reduce", K.VECTOR_NORM, results=((0, "result"),),
                                               inputs_saved=((0, "self"),), rebuild=K.VECTOR_NORM.rebuild,
                                               replay=K.vector_norm_forward)
    return rows


def _build() -> Mapping[str, OpSpec]:
    t: dict[str, OpSpec] = {}
    t["AccumulateGrad"] = _leaf()
    # linear algebra
    t["MmBackward0"] = _linear(K.MmKernel(), ((0, "self"), (1, "mat2")))
    t["BmmBackward0"] = _linear(K.BmmKernel(), ((0, "self"), (1, "mat2")))
    t["AddmmBackward0"] = _linear(K.AddmmKernel(), ((1, "mat1"), (2, "mat2")))
    t["BaddbmmBackward0"] = _linear(K.BaddbmmKernel(), ((1, "batch1"), (2, "batch2")))
    t["MvBackward0"] = _linear(K.MvKernel(), ((0, "self"), (1, "vec")))
    conv = K.ConvKernel()
    t["ConvolutionBackward0"] = OpSpec("conv", conv, inputs_saved=((0, "input"), (1, "weight")),
                                       replay=_linear_replay(conv),
                                       family_of=_family_of_linear, static_fields=("bias_sym_sizes_opt",))
    # sums
    t["AddBackward0"] = _sum(K.add_forward, _add_coefs, replay_inputs=(0, 1))
    t["AddBackward1"] = _sum(None, lambda n: (1.0,))
    t["SubBackward0"] = _sum(K.sub_forward, _sub_coefs, replay_inputs=(0, 1))
    t["SubBackward1"] = _sum(None, lambda n: (1.0,))
    t["RsubBackward0"] = _sum(K.rsub_forward, _rsub_coefs, replay_inputs=(0, 1))
    t["RsubBackward1"] = _sum(None, lambda n: (-K._alpha(n),))
    t["SumBackward0"] = _sum(K.sum_forward, family="reduce")
    t["SumBackward1"] = _sum(K.sum_forward, family="reduce")
    t["MeanBackward0"] = _sum(K.mean_forward, family="reduce")
    t["MeanBackward1"] = _sum(K.mean_forward, family="reduce")
    t["CumsumBackward0"] = _sum(K.cumsum_forward, family="reduce")
    # a loss as the explained output: nll_loss (cross_entropy = log_softmax + nll_loss) is linear in its input
    for name in ("NllLossBackward0", "NllLoss2DBackward0"):
        t[name] = _sum(K.nll_forward, inputs_saved=((0, "self"),), family="reduce")
    t["AvgPool2DBackward0"] = _sum(lambda n, xs, nr: K._avg_pool2d(n, xs[0]),
                                   rebuild=K.avg_pool_rebuild(K._avg_pool2d), inputs_saved=((0, "self"),),
                                   family="pool")
    t["AvgPool3DBackward0"] = _sum(lambda n, xs, nr: K._avg_pool3d(n, xs[0]),
                                   rebuild=K.avg_pool_rebuild(K._avg_pool3d), inputs_saved=((0, "self"),),
                                   family="pool")
    for name in ("AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0"):
        t[name] = _sum(lambda n, xs, nr: K._adaptive_avg_pool_nd(n, xs[0]),
                       rebuild=K.avg_pool_rebuild(K._adaptive_avg_pool_nd), inputs_saved=((0, "self"),),
                       family="pool")
    # products
    t["MulBackward0"] = _product(divide=False)
    t["MulBackward1"] = _product(divide=False, scalar=True)
    t["DivBackward0"] = _product(divide=True)
    t["DivBackward1"] = _product(divide=True, scalar=True)
    t["NegBackward0"] = OpSpec("product", K.NegKernel(), replay=K.NegKernel().replay)
    # element-wise non-linearities
    for name in K.UNARY:
        t[name] = _unary(name)
    # normalisation
    t["NativeLayerNormBackward0"] = _norm("layer")
    t["NativeBatchNormBackward0"] = _norm("batch")
    t["NativeGroupNormBackward0"] = _norm("group")
    # softmax and attention
    t["SoftmaxBackward0"] = _softmax()
    t["SafeSoftmaxBackward0"] = _softmax()
    t["LogSoftmaxBackward0"] = _softmax(log=True)
    for name in ("ScaledDotProductFlashAttentionForCpuBackward0", "ScaledDotProductEfficientAttentionBackward0",
                 "ScaledDotProductFlashAttentionBackward0", "ScaledDotProductCudnnAttentionBackward0"):
        t[name] = _attention()
    t.update(_select_backward_rows())
    t.update(_coverage_rows())
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
