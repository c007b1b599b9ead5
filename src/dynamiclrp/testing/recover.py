"""Recover every forward value of a graph that the Promise System can, to compare with the true values."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..core.graph import GraphView, gradient_edge
from ..core.params import ModelParams
from ..core.promises import PromiseResolver, Recipe, SumPart, Unavailable, ValueStore, walk
from ..presets import Rules, resolve


def recover_all(outputs: torch.Tensor | Sequence[torch.Tensor], inputs: Sequence[torch.Tensor] = (),
                rules: Rules = None, model: torch.nn.Module | None = None,
                support: bool = False, scales: bool = False) -> list[tuple[Any, ...]]:
    """Recover the forward value of every slot of the graph that the Promise System can recover.

    A diagnostic (and the basis of the tests that check recovered values against the true forward values).

    Parameters
    ----------
    outputs : Tensor or sequence of Tensor
        Outputs whose graph to walk.
    inputs : sequence of Tensor
        Tensors the caller holds (known values), as in :func:`dynamiclrp.relevance`.
    rules : optional
        A rule set whose ``with_ops`` rows extend the registry.
    model : torch.nn.Module, optional
        Resolve frozen constants through it.
    support : bool
        Also return values known only on their support, as ``(value, mask)`` pairs with ``how == "support"``.
    scales : bool
        Append to each entry the largest ``|sum|`` among the sums the value was recovered from by a difference
        (``addend = sum − other``; ``0.0`` if none). Such a value is exact to the rounding of that sum: in
        float32 its error is a few units in the last place of ``|sum|``, not of the value itself.

    Returns
    -------
    list of (node, output_nr, how, value), or (node, output_nr, how, value, scale) with ``scales=True``
        ``how`` is the recipe kind at the top of the branch (``"saved"``, ``"rebuild"``, ``"replay"``,
        ``"leaf"``, ``"known"``, ``"total"``, ``"unview"``, ``"support"``).
    """
    outs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    rule_set = resolve(rules)
    graph = GraphView([(o.grad_fn, o.output_nr) for o in outs])
    held: list[torch.Tensor | None] = list(outs) + list(inputs)
    known: dict[int, int] = {}
    for k, o in enumerate(outs):
        known.setdefault(graph.root_slots[k], k)
    for k, t in enumerate(inputs):
        edge = gradient_edge(t)
        slot = None if edge is None else graph.slot_of(*edge)
        if slot is not None:
            known.setdefault(slot, len(outs) + k)
    specs = [rule_set.spec_for(t) for t in graph.types]
    params = ModelParams(model) if model is not None else None
    resolver = PromiseResolver(graph, specs, known, params)
    store = ValueStore(graph, specs, resolver, held, params)
    found: list[tuple[Any, int, str, Any]] = []
    with torch.no_grad():
        for slot in range(len(graph.slot_node)):
            recipe = resolver.support(slot) if support else resolver.recipe(slot)
            if isinstance(recipe, Unavailable):
                continue
            node, nr = graph.nodes[graph.slot_node[slot]], graph.slot_nr[slot]
            if recipe.support:
                entry: tuple[Any, ...] = (node, nr, "support", store.get_support(slot))
            else:
                entry = (node, nr, type(recipe).__name__.lower(), store.get(slot))
            if scales:
                entry += (_difference_scale(recipe, graph, store),)
            found.append(entry)
    return found


def _difference_scale(recipe: Recipe, graph: GraphView, store: ValueStore) -> float:
    """The largest ``|sum|`` of the sums a recipe takes a difference of (``0.0`` if it takes none)."""
    scale = 0.0
    for r in walk(recipe):
        if isinstance(r, SumPart):
            total = store.get(graph.slot_base[r.node])
            scale = max(scale, float(total.abs().max()) if total.numel() else 0.0)
    return scale
