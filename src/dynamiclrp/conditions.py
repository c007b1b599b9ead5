"""Naming tensors and their units for Concept Relevance Propagation, without hooks.

Concept Relevance Propagation (Achtibat et al. 2023, "From attribution maps to human-understandable explanations
through Concept Relevance Propagation", Nat. Mach. Intell. 5:1006) explains an output *through* chosen units of
an intermediate tensor — channels of a feature map, neurons of an MLP, attention heads — by masking the relevance
that passes that tensor. A condition is ``{tensor: units}``:

tensor
    * a tensor of the forward pass that the caller holds (a feature map returned by the model, a hidden state of
      ``output_hidden_states=True``, or one computed by running the model in pieces);
    * a ``torch.autograd.graph.GradientEdge`` (e.g. from :func:`layer_edge`);
    * a module name (``"features.10"``) or :class:`Layer` (``Layer("layers.0.mlp.down_proj", at="input")``),
      resolved through the autograd graph with ``model=``: the output (or input) of the op that uses the
      module's own weight, found by parameter identity — the model is not hooked, patched or re-run.
units
    * :func:`channels`, :func:`neurons`, :func:`heads` or a :class:`Units`;
    * a dict ``{"channel": [12, 40]}``, ``{"neuron": [3]}``, ``{"head": [2], "heads": 8}`` or
      ``{"units": [...], "dim": d, "groups": g}``;
    * a list of ints or an int: channels (dimension 1, zennit-crp's convention, also a ``Linear``'s features);
    * a tensor: an explicit mask, broadcastable to the tensor's shape.

A list of lists of units gives each batch row its own units (as zennit-crp's one-condition-per-row).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch

from .core.graph import GradientEdge, GraphView, output_meta
from .core.params import ModelParams
from .core.plan import Planner
from .errors import ConditionError
from .presets import default as default_rules
from .rules import RuleSet

__all__ = ["Units", "Layer", "channels", "neurons", "heads", "as_units", "layer_edge", "resolve_conditions",
           "ConditionKey", "UnitSpec", "Conditions", "Unit", "unit_totals", "unit_maxima", "layer_key"]

Tensor = torch.Tensor

#: reshape-like nodes a module's output or input may pass through (a ``Linear`` on a 3-d input is view-mm-view)
_RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "_ReshapeAliasBackward0"})


@dataclass(frozen=True)
class Units:
    """Units of a tensor along one dimension: channels, neurons, heads (groups of neurons), tokens...

    Parameters
    ----------
    index : int, sequence of int, or sequence of sequences of int
        The chosen units. A sequence of sequences gives each batch row (dimension 0) its own units.
    dim : int
        The dimension the units lie along (1: channels of ``(N, C, ...)`` or features of ``(N, F)``; -1: the
        last dimension, e.g. hidden neurons of ``(N, T, F)``).
    groups : int, optional
        Split the dimension into this many equal groups, each one unit (attention heads: ``groups=n_heads`` on
        the concatenated head outputs).
    """

    index: Any
    dim: int = 1
    groups: int | None = None

    def count(self, shape: Sequence[int]) -> int:
        """Number of units of a tensor of ``shape``."""
        d = _dim(self.dim, len(shape))
        n = int(shape[d])
        if self.groups is None:
            return n
        if self.groups < 1 or n % self.groups:
            raise ConditionError(f"cannot split dimension {d} of size {n} into {self.groups} equal groups")
        return self.groups

    def per_row(self) -> bool:
        """Whether each batch row has its own units."""
        idx = self.index
        return isinstance(idx, (list, tuple)) and len(idx) > 0 and all(isinstance(i, (list, tuple)) for i in idx)

    def mask(self, shape: Sequence[int], dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> Tensor:
        """A 0/1 mask broadcastable to ``shape``: 1 on the chosen units."""
        shape = tuple(int(s) for s in shape)
        d = _dim(self.dim, len(shape))
        n_units = self.count(shape)
        size = shape[d] // n_units
        rows = [list(r) for r in self.index] if self.per_row() else [_ints(self.index)]
        for r in rows:
            bad = [u for u in r if not -n_units <= int(u) < n_units]
            if bad:
                raise ConditionError(f"units {bad} are out of range: dimension {d} of a tensor of shape {shape} has "
                                     f"{n_units} units")
        if self.per_row() and len(rows) != shape[0]:
            raise ConditionError(f"{len(rows)} rows of units for a tensor with {shape[0]} rows (dimension 0); give "
                                 "one list of units per row, or one list for every row")
        m = torch.zeros(len(rows), n_units, dtype=dtype, device=device)
        for k, r in enumerate(rows):
            if r:
                m[k, torch.tensor([int(u) % n_units for u in r], dtype=torch.long, device=device)] = 1
        if size > 1:
            m = m.repeat_interleave(size, dim=1)
        if self.per_row():
            if d == 0:
                raise ConditionError("per-row units need the units along a dimension other than 0 (the rows)")
            return m.reshape(shape[0], *([1] * (d - 1)), shape[d], *([1] * (len(shape) - d - 1)))
        view = [1] * len(shape)
        view[d] = shape[d]
        return m.reshape(view)


def _dim(dim: int, rank: int) -> int:
    if not -rank <= dim < rank:
        raise ConditionError(f"unit dimension {dim} does not exist in a tensor with {rank} dimensions")
    return dim % rank


def _ints(index: Any) -> list[int]:
    if isinstance(index, torch.Tensor):
        return [int(v) for v in index.flatten().tolist()]
    if isinstance(index, int):
        return [index]
    try:
        return [int(v) for v in index]
    except (TypeError, ValueError) as err:
        raise ConditionError(f"units must be an int or a sequence of ints, got {index!r}") from err


def channels(index: Any) -> Units:
    """Channels (dimension 1) of a feature map ``(N, C, ...)`` or features of ``(N, F)``."""
    return Units(index, dim=1)


def neurons(index: Any) -> Units:
    """Neurons along the last dimension (the hidden units of an MLP on ``(N, T, F)`` or ``(N, F)``)."""
    return Units(index, dim=-1)


def heads(index: Any, n_heads: int) -> Units:
    """Attention heads of the concatenated head outputs ``(N, T, heads·d)`` (the input of the output
    projection): the last dimension in ``n_heads`` equal groups."""
    return Units(index, dim=-1, groups=int(n_heads))


@dataclass(frozen=True)
class Layer:
    """A tensor named by the module that computes it, resolved through the autograd graph with ``model=``.

    Parameters
    ----------
    name : str
        A module that owns parameters (``"features.10"``, ``"layers.0.mlp.down_proj"``). A container of other
        modules (``"layer3"``) has no op of its own: name its last layer, or pass the tensor.
    at : {"output", "input"}
        The module's output (a conv's feature map) or the input of its op (the concatenated heads entering an
        attention output projection, the hidden neurons entering an MLP's down projection).
    """

    name: str
    at: Literal["output", "input"] = "output"


ConditionKey = Tensor | GradientEdge | str | Layer
#: the unit dimension of a tensor: channels (1), neurons or heads (the last), or a dimension
Unit = Literal["channel", "neuron", "head"] | int
UnitSpec = Units | Mapping[str, Any] | Sequence[int] | Sequence[Sequence[int]] | int | Tensor
Conditions = Mapping[Any, UnitSpec]


def as_units(spec: Any) -> Units | Tensor:
    """The :class:`Units` (or explicit mask) a condition value stands for."""
    if isinstance(spec, (Units, torch.Tensor)):
        return spec
    if isinstance(spec, Mapping):
        keys = set(spec)
        if "channel" in spec or "channels" in spec:
            return Units(spec.get("channel", spec.get("channels")), dim=int(spec.get("dim", 1)))
        if "neuron" in spec or "neurons" in spec:
            return Units(spec.get("neuron", spec.get("neurons")), dim=int(spec.get("dim", -1)))
        if "head" in spec:
            if "heads" not in spec:
                raise ConditionError('{"head": [...]} needs the number of heads: {"head": [2], "heads": 8}')
            return Units(spec["head"], dim=int(spec.get("dim", -1)), groups=int(spec["heads"]))
        if "units" in spec:
            g = spec.get("groups")
            return Units(spec["units"], dim=int(spec.get("dim", 1)), groups=None if g is None else int(g))
        raise ConditionError(f"a condition dict needs one of 'channel', 'neuron', 'head' or 'units', got keys "
                             f"{sorted(keys)}")
    if isinstance(spec, (int, list, tuple, range)):
        return Units(list(spec) if isinstance(spec, range) else spec, dim=1)
    raise ConditionError(f"cannot read units from a {type(spec).__name__}: pass channels([...]), neurons([...]), "
                         "heads([...], n), a dict such as {'channel': [12, 40]}, a list of ints or a mask tensor")


# ----------------------------------------------------------------------------------------------------------------
# naming tensors through the graph
# ----------------------------------------------------------------------------------------------------------------
class _GraphIndex:
    """The graph of some outputs with the owner module of every node (by parameter identity), built once per call."""

    def __init__(self, outputs: Sequence[Tensor], model: torch.nn.Module, rules: RuleSet):
        roots = [(o.grad_fn, o.output_nr) for o in outputs if o.grad_fn is not None]
        self.graph = GraphView(roots)
        self.params = ModelParams(model)
        self.model = model
        self.planner = Planner(self.graph, rules, {}, set(), {}, everywhere=True, model=model, bind=False,
                               params=self.params)
        self._owners: list[str | None] | None = None

    def owners(self) -> list[str | None]:
        if self._owners is None:
            self._owners = [self.planner.module_of(i, self.params) if self.planner.specs[i] is not None else None
                            for i in range(len(self.graph))]
        return self._owners


def _below(graph: GraphView, start: int) -> set[int]:
    seen: set[int] = set()
    stack = [start]
    while stack:
        i = stack.pop()
        for e in graph.edges[i]:
            if e >= 0:
                j = graph.slot_node[e]
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
    return seen


def _edge(index: _GraphIndex, layer: Layer) -> GradientEdge:
    g, model = index.graph, index.model
    names = dict(model.named_modules())
    if layer.name not in names:
        close = difflib.get_close_matches(layer.name, list(names), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConditionError(f"the model has no module {layer.name!r}.{hint}")
    module = names[layer.name]
    if not any(True for _ in module.parameters(recurse=False)):
        inner = [n for n, m in module.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
        what = (f"it contains {len(inner)} layers with parameters (the last: {layer.name}.{inner[-1]!s})" if inner
                else "it has no parameters")
        raise ConditionError(
            f"module {layer.name!r} owns no parameters of its own ({what}), so no op of the graph can be attributed "
            "to it without hooks. Name a module that owns its weight (a Conv2d, a Linear...), or pass the tensor "
            "itself: run the model in pieces and keep the intermediate tensor, or return it from forward().")
    owners = index.owners()
    owned = [i for i, o in enumerate(owners) if o == layer.name]
    if not owned:
        raise ConditionError(f"module {layer.name!r} does not take part in the graph of the outputs (none of its "
                             "parameters feeds an op the outputs depend on)")
    tops = [i for i in owned if not any(i in _below(g, j) for j in owned if j != i)]
    if len(tops) != 1:
        raise ConditionError(f"module {layer.name!r} is applied {len(tops)} times in parallel in this graph, so its "
                             "name does not identify one tensor; pass the tensor (or a GradientEdge) instead")
    top = tops[0]
    if layer.at == "output":
        slot = g.slot_base[top]
        while True:
            cons = g.consumers[slot]
            if len(cons) != 1:
                break
            c = cons[0][0]
            shape, _ = g.meta(slot)
            up, _ = g.meta(g.slot_base[c])
            if g.types[c] not in _RESHAPES or up[-1:] != shape[-1:] or len(up) <= len(shape):
                break
            slot = g.slot_base[c]
        return GradientEdge(g.nodes[g.slot_node[slot]], g.slot_nr[slot])
    if layer.at != "input":
        raise ConditionError(f"Layer.at must be 'output' or 'input', got {layer.at!r}")
    active = [e for e in g.edges[top] if e >= 0 and index.planner.active[e]]
    if len(active) != 1:
        raise ConditionError(f"the op of module {layer.name!r} ({g.describe(top)}) has {len(active)} inputs that "
                             "depend on the data, so its input is not one tensor; pass the tensor instead")
    slot = active[0]
    while True:
        p = g.slot_node[slot]
        ins = [e for e in g.edges[p] if e >= 0]
        if g.types[p] not in _RESHAPES or len(ins) != 1:
            break
        shape, _ = g.meta(slot)
        down, _ = g.meta(ins[0])
        if down[-1:] != shape[-1:] or len(down) <= len(shape) or len(g.consumers[ins[0]]) != 1:
            break
        slot = ins[0]
    return GradientEdge(g.nodes[g.slot_node[slot]], g.slot_nr[slot])


def layer_edge(outputs: Tensor | Sequence[Tensor], layer: str | Layer, model: torch.nn.Module,
               rules: RuleSet | None = None) -> GradientEdge:
    """The graph edge of a module's output (or input) in the autograd graph of ``outputs``, found by parameter
    identity: usable as a condition key or as an input of :func:`dynamiclrp.relevance`.

    Parameters
    ----------
    outputs : Tensor or sequence of Tensor
        The outputs of a forward pass of ``model``.
    layer : str or Layer
        A module name (its output) or a :class:`Layer`.
    model : torch.nn.Module
        The model (read only: nothing is hooked, patched or re-run).
    rules : RuleSet, optional
        Registry rows to read the graph with (default: the default rule set's).

    Returns
    -------
    torch.autograd.graph.GradientEdge
    """
    from_outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    return _edges(from_outputs, [layer], model, rules)[0]


def _edges(outputs: Sequence[Tensor], layers: Sequence[str | Layer], model: torch.nn.Module | None,
           rules: RuleSet | None) -> list[GradientEdge]:
    if model is None:
        raise ConditionError(f"the layer name {layers[0]!r} can only be resolved with the model: pass model=model "
                             "(it is read, never modified), or key the condition by the tensor itself")
    if rules is None:
        rules = default_rules()
    index = _GraphIndex(outputs, model, rules)
    return [_edge(index, as_layer(lay) if isinstance(lay, str) else lay) for lay in layers]


def key_meta(key: Tensor | GradientEdge) -> tuple[torch.Size, torch.dtype, torch.device]:
    """Shape, dtype and device of a condition's tensor."""
    if isinstance(key, torch.Tensor):
        return key.shape, key.dtype, key.device
    m = output_meta(key.node)[key.output_nr]
    return m.shape, m.dtype, m.device


def resolve_keys(outputs: Sequence[Tensor], keys: Sequence[Any], model: torch.nn.Module | None,
                 rules: RuleSet | None) -> list[Tensor | GradientEdge]:
    """Tensors and graph edges for condition keys (module names resolved through the graph)."""
    named = [k for k in keys if isinstance(k, (str, Layer))]
    found = dict(zip([id(k) for k in named], _edges(outputs, named, model, rules))) if named else {}
    out: list[Tensor | GradientEdge] = []
    for k in keys:
        if isinstance(k, (str, Layer)):
            out.append(found[id(k)])
        elif isinstance(k, (torch.Tensor, GradientEdge)):  # type: ignore[misc]  # GradientEdge: a NamedTuple
            out.append(k)
        else:
            raise ConditionError(f"a condition key must be a tensor, a GradientEdge, a module name or a Layer, got "
                                 f"{type(k).__name__}")
    return out


def mask_for(spec: Any, key: Tensor | GradientEdge) -> Tensor:
    """The mask of one condition value on one resolved tensor."""
    shape, dtype, device = key_meta(key)
    units = as_units(spec)
    if isinstance(units, torch.Tensor):
        return units.to(device=device)
    return units.mask(shape, dtype if dtype.is_floating_point else torch.float32, device)


def resolve_conditions(outputs: Tensor | Sequence[Tensor], conditions: Conditions | None,
                       model: torch.nn.Module | None = None, rules: RuleSet | None = None
                       ) -> list[tuple[Tensor | GradientEdge, Tensor]]:
    """``(tensor or graph edge, mask)`` pairs for :func:`dynamiclrp.core.run.compute` from a condition mapping."""
    if not conditions:
        return []
    if not isinstance(conditions, Mapping):
        raise ConditionError(f"conditions must be a mapping {{tensor or module name: units}}, got "
                             f"{type(conditions).__name__}; for several concepts at once use "
                             "dynamiclrp.concepts.conditional_relevance")
    outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    keys = resolve_keys(outs, list(conditions.keys()), model, rules)
    return [(k, mask_for(spec, k)) for k, spec in zip(keys, conditions.values())]


# ----------------------------------------------------------------------------------------------------------------
# units of a tensor
# ----------------------------------------------------------------------------------------------------------------
def layer_key(layer: Any) -> str:
    """The name a layer is stored under (``"features.3"``, ``"layers.0.mlp.down_proj:input"``)."""
    if isinstance(layer, Layer):
        return layer.name if layer.at == "output" else f"{layer.name}:{layer.at}"
    if isinstance(layer, str):
        return layer
    raise ConditionError(f"a stored layer is named by a module name or a Layer, got {type(layer).__name__}")


def as_layer(layer: Any) -> Any:
    """A module name as the :class:`Layer` it names (``"name:input"`` -> ``Layer(name, at="input")``); anything
    else unchanged."""
    if isinstance(layer, str):
        return Layer(layer[: -len(":input")], at="input") if layer.endswith(":input") else Layer(layer)
    return layer


def unit_dim(unit: Unit, rank: int) -> int:
    """The dimension ``unit`` means in a tensor of ``rank`` dimensions (never 0, the batch)."""
    if unit == "channel":
        d = 1
    elif unit in ("neuron", "head"):
        d = rank - 1
    elif isinstance(unit, int):
        d = unit % rank if -rank <= unit < rank else -1
    else:
        raise ConditionError(f"unit must be 'channel', 'neuron', 'head' or a dimension, got {unit!r}")
    if not 0 < d < rank:
        raise ConditionError(f"units along dimension {unit!r} of a tensor with {rank} dimensions: units need a "
                             "dimension other than 0 (the batch)")
    return d


def unit_totals(t: Tensor, dim: int = 1, groups: int | None = None) -> Tensor:
    """Sum a tensor ``(N, ...)`` over everything but the batch and the unit dimension: ``(N, units)``, with the
    unit dimension in ``groups`` equal groups when given (heads)."""
    d = dim % t.dim()
    x = t.movedim(d, 1)
    x = x.reshape(x.shape[0], x.shape[1], -1).sum(-1)
    if groups is not None:
        x = x.reshape(x.shape[0], groups, -1).sum(-1)
    return x


def unit_maxima(t: Tensor, dim: int = 1, groups: int | None = None) -> Tensor:
    """Largest value of each unit over the positions (``(N, units)``; a group is summed per position first)."""
    d = dim % t.dim()
    x = t.movedim(d, -1)
    if groups is not None:
        x = x.reshape(*x.shape[:-1], groups, -1).sum(-1)
    return x.reshape(x.shape[0], -1, x.shape[-1]).amax(1)


