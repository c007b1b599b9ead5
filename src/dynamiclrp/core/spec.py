"""The contract between the engine and the op registry: one :class:`OpSpec` row per autograd node type.

The engine (planner, Promise System) reads rows through this interface only; the rows themselves, grouped by op
family, live in :mod:`dynamiclrp.ops`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .step import Site

Tensor = torch.Tensor


@dataclass(frozen=True)
class OpSpec:
    """One row of the registry: how dynamiclrp understands one autograd node type.

    Attributes
    ----------
    family : str
        Which entry of a rule set handles the node (``"linear"``, ``"add"``, ``"routing"``...). Kernels whose
        family depends on the graph (a matmul of two activations is a ``"matmul"``, of an activation and a
        weight a ``"linear"``) provide ``family_of``.
    kernel : Any
        Op semantics the rules need: forward functions, saved-field adapters, Jacobian-transpose products.
    results : tuple
        ``(output number, saved field)`` pairs: forward outputs autograd saved (Arg Nodes by construction).
    inputs_saved : tuple
        ``(input position, saved field)`` pairs: forward inputs autograd saved for this node.
    rebuild : callable or None
        ``rebuild(node, nr) -> tensor``: output ``nr`` recomputed from the node's own saved tensors (an Arg
        Node). It may return ``None`` when a needed field was not saved for this particular node.
    replay : callable or None
        ``replay(node, input_values, nr) -> tensor``: output ``nr`` recomputed from the values of the node's
        inputs (the forward closure of a promise branch step, or the op of a promise-generating node).
        ``replay_inputs`` lists the input positions it needs (default: all of them, so an input that does not
        require grad — a constant autograd did not keep — makes the replay impossible), or is a callable
        ``(node, edges) -> positions`` for ops that read some operands from saved fields.
    static_fields : tuple of str
        Saved non-tensor fields that rules or recipes read *while planning* (e.g. whether a batch norm is in
        training mode). They are part of the graph signature, so a cached plan is never reused for a graph
        that differs in them.
    selection : bool
        Every output element is a copy of one input element or a constant (views, indexing, gather, cat, max
        with indices, max pooling...): where the node's backward routes something to an input, the input's
        value equals the output's. The Promise System recovers values on the support through such nodes.
    view : bool
        The output *is* the input, rearranged, broadcast, copied or cast (view, permute, expand, clone, a cast,
        dropout): structural questions look through it.
    reshape : bool
        A view that keeps the element order (view, reshape, squeeze, clone, a cast).
    bijection : bool
        A one-to-one rearrangement (view, reshape, transpose, permute, clone): the node's backward maps the
        output's value back onto the input's, exactly. The Promise System recovers an input from its output this way.
    costly : bool
        Recomputing the output costs as much as the op itself (a matrix product, a convolution): the Promise
        System first looks for the value downstream (a consumer that saved it, a sum that saved its total).
    elementwise : str or None
        ``"unary"`` (one tensor operand: a non-linearity, or a scale/shift by a scalar) or ``"binary"`` (``+ - * /``
        of two tensors).
    reduction : bool
        A statistic over dimensions (sum, mean, max, vector norm): what makes an operand a normaliser.
    activation : bool
        An element-wise non-linearity used as an activation function (the activated operand of a gated MLP).
    gate : bool
        A sigmoid-like gate: the signal it multiplies takes the relevance.
    data_lookup : bool
        The output is data even though its differentiable input is a parameter (an embedding lookup by indices).
    merges_batchnorm : bool
        A linear op whose output channel is a following batch norm's channel (conv, dense layer): eval-mode batch
        norms after it can be merged into it.
    nonnegative : bool
        The output is ``>= 0`` whatever the input (ReLU, sigmoid, softmax): rules may take a non-negative input's
        fast path, decided from the graph (no look at the values, no host sync).
    keeps_sign : bool
        Every output element is a copy, a maximum or minimum, or a non-negative average of input elements (pooling,
        selections without constants): non-negative inputs give a non-negative output. Views keep the sign too.
    function : tuple of str or None
        For the row of a known custom ``torch.autograd.Function`` (matched by node class name): the
        ``(module, qualname)`` of the Function the node must come from.
    """

    family: str
    kernel: Any = None
    results: tuple[tuple[int, str], ...] = ()
    inputs_saved: tuple[tuple[int, str], ...] = ()
    rebuild: Callable[[Any, int], Tensor | None] | None = None
    replay: Callable[[Any, Sequence[Tensor | None], int], Tensor] | None = None
    replay_inputs: tuple[int, ...] | Callable[[Any, tuple[int, ...]], tuple[int, ...]] | None = None
    family_of: Callable[["Site"], str] | None = field(default=None, compare=False)
    static_fields: tuple[str, ...] = ()
    selection: bool = False
    view: bool = False
    reshape: bool = False
    bijection: bool = False
    costly: bool = False
    elementwise: str | None = None
    reduction: bool = False
    activation: bool = False
    gate: bool = False
    data_lookup: bool = False
    merges_batchnorm: bool = False
    nonnegative: bool = False
    keeps_sign: bool = False
    function: tuple[str, str] | None = None
