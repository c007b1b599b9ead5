"""Preparing a call: outputs, inputs and seeds checked and mapped onto the graph's slots, once.

Everything the planner and the run need to know about the caller's tensors: the graph reachable from the outputs,
the seeds (default: the outputs' own values), the slots of the requested inputs, which of them are activation
sources, and every tensor the caller holds (the Promise System's ``Known`` values).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import ConditionError, DynamicLRPError, UnsupportedTensorError, UnusedInputError
from .graph import GradientEdge, GraphView, gradient_edge

Tensor = torch.Tensor


@dataclass
class Prepared:
    """A call mapped onto its graph.

    Attributes
    ----------
    outputs, inputs : tuple
        The explained outputs; the requested inputs (tensors or ``GradientEdge`` objects).
    seeds : list of Tensor
        One starting relevance per output, detached, in the output's dtype and device.
    graph : GraphView
    held : list of Tensor or None
        Tensors the caller holds, outputs first, then inputs (``None`` for a ``GradientEdge``).
    known : dict
        ``slot -> index into held`` of every held tensor that is in the graph.
    requested : dict
        ``slot -> index into held`` of the requested inputs in the graph.
    sources : set of int
        Requested slots that are activation sources (not parameters).
    input_slots : list of int or None
        The slot of each input (``None``: not in the graph).
    default_seeds : list of bool
        Per output: seeded with its own value (``seeds=None`` or a ``None`` entry).
    conditions : dict
        ``slot -> mask`` of the conditioned tensors (concept conditions; several on one tensor multiplied).
    """

    outputs: tuple[Tensor, ...]
    inputs: tuple[Any, ...]
    seeds: list[Tensor]
    graph: GraphView
    held: list[Tensor | None]
    known: dict[int, int]
    requested: dict[int, int]
    sources: set[int]
    input_slots: list[int | None]
    default_seeds: list[bool]
    conditions: dict[int, Tensor] = field(default_factory=dict)


def as_tuple(x: Any, what: str, edges_ok: bool = False) -> tuple[Any, ...]:
    """``x`` as a non-empty tuple of tensors (or ``GradientEdge`` objects where ``edges_ok``)."""
    if isinstance(x, torch.Tensor) or (edges_ok and isinstance(x, GradientEdge)):
        return (x,)
    if isinstance(x, (list, tuple)):
        out = tuple(x)
        for k, t in enumerate(out):
            if not (isinstance(t, torch.Tensor) or (edges_ok and isinstance(t, GradientEdge))):
                kinds = "a torch.Tensor or a torch.autograd.graph.GradientEdge" if edges_ok else "a torch.Tensor"
                raise TypeError(f"{what}[{k}] is a {type(t).__name__}, expected {kinds}")
        if not out:
            raise ValueError(f"{what} is empty: pass at least one tensor")
        return out
    raise TypeError(f"{what} must be a tensor or a sequence of tensors, got {type(x).__name__}")


def prepare(outputs: Tensor | Sequence[Tensor], inputs: Any, seeds: Any,
            conditions: Sequence[tuple[Any, Tensor]] = (), keep_graph: bool = False,
            concepts: int | None = None) -> Prepared:
    """Check the arguments of a relevance call and map them onto the graph of ``outputs``.

    ``conditions`` are ``(tensor or GradientEdge, mask)`` pairs, each mask broadcastable to the tensor's shape
    (with a leading dimension of ``concepts`` masks when that is given). ``keep_graph`` (differentiable relevance)
    keeps the seeds attached to the graph: the default seed is then the output itself. Inputs not in the graph get
    the slot ``None``: :func:`check_unused` decides what that means.
    """
    outs = as_tuple(outputs, "outputs")
    ins = as_tuple(inputs, "inputs", edges_ok=True)
    for k, o in enumerate(outs):
        _check_kind(o, f"outputs[{k}]")
        if o.grad_fn is None:
            raise DynamicLRPError(_no_graph_message(k, o))
    for k, t in enumerate(ins):
        if isinstance(t, torch.Tensor):
            _check_kind(t, f"inputs[{k}]")
    seed_tensors = _seeds(outs, seeds, keep_graph)
    graph = GraphView([(o.grad_fn, o.output_nr) for o in outs])
    held: list[Tensor | None] = [o for o in outs] + [None if isinstance(t, GradientEdge) else t for t in ins]
    known: dict[int, int] = {}
    for k, o in enumerate(outs):
        known.setdefault(graph.root_slots[k], k)
    requested: dict[int, int] = {}
    sources: set[int] = set()
    input_slots: list[int | None] = []
    for k, t in enumerate(ins):
        if isinstance(t, GradientEdge):
            slot = graph.slot_of(t.node, t.output_nr)
            input_slots.append(slot)
            if slot is not None:
                requested.setdefault(slot, len(outs) + k)
                sources.add(slot)
            continue
        edge = gradient_edge(t)
        slot = None if edge is None else graph.slot_of(*edge)
        if edge is None and not t.requires_grad:
            raise DynamicLRPError(
                f"inputs[{k}] does not require grad and is not produced by the graph, so no relevance can reach "
                "it. Call .requires_grad_() on it before the forward pass, or pass a tensor computed in the "
                "forward pass (e.g. the input embeddings).")
        input_slots.append(slot)
        if slot is not None:
            requested.setdefault(slot, len(outs) + k)
            known[slot] = len(outs) + k
            if not isinstance(t, torch.nn.Parameter):
                sources.add(slot)
    conds: dict[int, Tensor] = {}
    for k, (key, mask) in enumerate(conditions):
        slot, shape = _condition_slot(graph, key, k)
        if isinstance(key, torch.Tensor) and slot not in known:
            known[slot] = len(held)  # a tensor the caller holds is a value the Promise System can use
            held.append(key)
        m = _check_mask(mask, shape, k, concepts)
        conds[slot] = m if slot not in conds else conds[slot] * m  # "and": both masks apply
    default_seeds = [s is None for s in _seed_list(outs, seeds)]
    return Prepared(outs, ins, seed_tensors, graph, held, known, requested, sources, input_slots, default_seeds,
                    conds)


def check_unused(call: Prepared, allow_unused: bool) -> None:
    """An input that is not in the graph of the outputs (a copy of the tensor the model saw, a slice taken after the
    forward pass, a tensor the outputs do not depend on) raises :class:`UnusedInputError`, as ``torch.autograd.grad``
    does, unless ``allow_unused`` (then its relevance is zeros)."""
    if not isinstance(allow_unused, bool):
        raise TypeError(f"allow_unused must be True or False, got {allow_unused!r}")
    if allow_unused:
        return
    unused = [k for k, slot in enumerate(call.input_slots) if slot is None]
    if unused:
        raise UnusedInputError(_unused_message(unused, call.inputs))


def _check_kind(t: Tensor, what: str) -> None:
    """Refuse tensors relevance is not defined for (sparse, complex), before anything else fails on them."""
    if t.layout != torch.strided:
        raise UnsupportedTensorError(
            f"{what} is a {str(t.layout).replace('torch.', '')} tensor; dynamiclrp explains dense (strided) tensors "
            "only. Convert it with .to_dense() before the forward pass (and pass that dense tensor as the input).")
    if t.is_complex():
        raise UnsupportedTensorError(
            f"{what} is complex ({t.dtype}); relevance is defined for real-valued tensors only (an explanation splits "
            "a real output into real contributions). Explain a real-valued output of real-valued inputs: e.g. pass "
            "the real and imaginary parts as a real tensor (torch.view_as_real(z), or z.real and z.imag) into the "
            "model, and explain a real output such as z.abs() or z.real.")


def _unused_message(unused: list[int], ins: tuple[Any, ...]) -> str:
    which = ", ".join(f"inputs[{k}]" for k in unused)
    verb = "is" if len(unused) == 1 else "are"
    hint = ""
    for k in unused:
        t = ins[k]
        if isinstance(t, torch.Tensor) and t.grad_fn is not None:
            hint = (f" inputs[{k}] was computed from a tensor of the graph ({type(t.grad_fn).__name__}) but is not "
                    "itself part of it: a slice or copy taken after the forward pass (e.g. x[0]) is a new tensor. "
                    "Pass the tensor the model saw and index the result instead (relevance(out, x)[0][0]).")
            break
    return (f"{which} {verb} not in the graph of the outputs, so no relevance can reach {'it' if verb == 'is' else 'them'} "
            "(torch.autograd.grad raises here too). A copy (x.clone(), x.detach(), a tensor preprocessed again) or a "
            "slice taken after the forward pass is a different tensor: pass the tensor that went into the model, or "
            f"an intermediate tensor of the forward pass.{hint} To get zeros for inputs the outputs do not depend "
            "on, pass allow_unused=True.")


def _is_number(s: Any) -> bool:
    return isinstance(s, numbers.Real) and not isinstance(s, bool)


def _seed_list(outs: tuple[Tensor, ...], seeds: Any) -> list[Any]:
    """One entry per output. A Python number is the seed of every element of every output (``seeds=1.0``: each
    output element starts with relevance 1)."""
    if seeds is None:
        return [None] * len(outs)
    if _is_number(seeds):
        return [seeds] * len(outs)
    if isinstance(seeds, torch.Tensor):
        return [seeds]
    if isinstance(seeds, (list, tuple)):
        return list(seeds)
    raise TypeError(f"seeds must be None, a number, a tensor, or a sequence of those (one per output), got "
                    f"{type(seeds).__name__}")


def _condition_slot(graph: GraphView, key: Any, k: int) -> tuple[int, torch.Size]:
    """The slot of a conditioned tensor (a tensor of the graph or a ``GradientEdge``) and its shape."""
    if isinstance(key, GradientEdge):
        edge: tuple[Any, int] | None = (key.node, key.output_nr)
    elif isinstance(key, torch.Tensor):
        edge = gradient_edge(key)
    else:
        raise ConditionError(f"condition {k} is keyed by a {type(key).__name__}; key conditions by a tensor of the "
                             "forward pass or a torch.autograd.graph.GradientEdge (module names are resolved by "
                             "dynamiclrp.relevance(..., model=model))")
    slot = None if edge is None else graph.slot_of(*edge)
    if slot is None:
        raise ConditionError(
            f"condition {k} is on a tensor that is not in the autograd graph of the outputs, so no relevance passes "
            "it. Condition on a tensor computed in the same forward pass that the outputs depend on (e.g. a "
            "feature map), and make sure the input requires grad.")
    return slot, torch.Size(graph.meta(slot)[0])


def _check_mask(mask: Tensor, shape: torch.Size, k: int, concepts: int | None) -> Tensor:
    inner = mask.shape[1:] if concepts is not None else mask.shape
    if concepts is not None and (mask.dim() == 0 or mask.shape[0] != concepts):
        raise ConditionError(f"the mask of condition {k} has shape {tuple(mask.shape)}; with {concepts} concepts "
                             "it needs a leading dimension of that size")
    try:
        ok = torch.broadcast_shapes(inner, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ConditionError(f"the mask of condition {k} has shape {tuple(inner)}, which does not broadcast to the "
                             f"conditioned tensor's shape {tuple(shape)}")
    return mask


def _seeds(outs: tuple[Tensor, ...], seeds: Any, keep_graph: bool = False) -> list[Tensor]:
    seed_list = _seed_list(outs, seeds)
    if len(seed_list) != len(outs):
        raise ValueError(f"got {len(seed_list)} seeds for {len(outs)} outputs; pass one seed per output "
                         "(or None for the default, the output's own value)")
    out: list[Tensor] = []
    for k, (o, s) in enumerate(zip(outs, seed_list)):
        if s is None:
            s = o if keep_graph else o.detach()
        elif _is_number(s):
            if s != s or s in (float("inf"), float("-inf")):
                raise ValueError(f"seeds[{k}] is {s}; a seed must be finite")
            s = torch.full_like(o.detach(), float(s), memory_format=torch.contiguous_format)
        else:
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"seeds[{k}] must be a tensor, a number or None, got {type(s).__name__}")
            _check_kind(s, f"seeds[{k}]")
            if s.shape != o.shape:
                raise ValueError(f"seeds[{k}] has shape {tuple(s.shape)} but outputs[{k}] has shape "
                                 f"{tuple(o.shape)}; a seed is the starting relevance of every output element")
            s = (s if keep_graph else s.detach()).to(dtype=o.dtype, device=o.device)
        out.append(s)
    return out


def _no_graph_message(k: int, out: Tensor) -> str:
    fix = ("Run the forward pass again with grad enabled and the input requiring grad: x.requires_grad_() before "
           "the forward (for token inputs, embeddings = model.get_input_embeddings()(ids).detach().requires_grad_() "
           "passed as inputs_embeds=). The model can stay frozen (model.requires_grad_(False)) and in eval(); that "
           "is the recommended way to explain it.")
    if out.is_inference():
        return (f"outputs[{k}] was computed under torch.inference_mode(), which records no autograd graph, so there "
                f"is nothing to explain. {fix}")
    return (f"outputs[{k}] has no grad_fn, so there is no autograd graph to explain: it was computed under "
            f"torch.no_grad(), or nothing it depends on requires grad. {fix}")
