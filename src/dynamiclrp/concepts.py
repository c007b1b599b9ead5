"""Concept Relevance Propagation (CRP) on any architecture.

Achtibat et al. (2023, "From attribution maps to human-understandable explanations through Concept Relevance
Propagation", Nat. Mach. Intell. 5:1006) explain a prediction not only by *where* (a heatmap) but by *what*: the
concepts — channels, neurons, attention heads — an intermediate tensor encodes, how much each contributes, which
lower-level concepts make it up, and which samples of a dataset it stands for. Because conditions are placed on
tensors of the autograd graph (:mod:`dynamiclrp.conditions`), not on module types, everything here works for
CNNs, ResNets and transformers alike.

=================================  ================================================================================
function                           what it answers
=================================  ================================================================================
:func:`dynamiclrp.relevance`       ``conditions=``: one conditional heatmap ("where is concept c used?")
:func:`conditional_relevance`      many concepts at once: one heatmap per concept, vectorised over the concepts
:func:`concept_relevance`          the relevance of every unit of a tensor (ranked): the concept atlas view
:func:`decompose`, :func:`hierarchy`  which lower-layer concepts make up a chosen upper-layer concept
:func:`reference_samples`          Relevance Maximization over a dataset store (``attribute_dataset(concepts=)``)
:func:`reference_heatmaps`         the reference samples' conditional heatmaps, cropped
:func:`plot_references`            a figure of them
=================================  ================================================================================
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch

from .api import InputLike, relevance
from .conditions import (Conditions, Layer, Unit, as_layer, layer_key, mask_for, resolve_conditions, resolve_keys,
                         unit_dim, unit_maxima, unit_totals)
from .core.run import compute
from .dataset import concept_path, open_store
from .errors import ConditionError
from .presets import Rules, resolve

__all__ = ["conditional_relevance", "concept_relevance", "ConceptRelevance", "decompose", "hierarchy",
           "ConceptNode", "unit_totals", "unit_maxima", "reference_samples", "References", "reference_heatmaps",
           "Reference", "plot_references", "layer_key"]

Tensor = torch.Tensor


def _outs(outputs: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)


def _key_id(key: Any) -> Any:
    return ("name", key) if isinstance(key, (str, Layer)) else ("obj", id(key))


# ----------------------------------------------------------------------------------------------------------------
# conditional heatmaps for many concepts
# ----------------------------------------------------------------------------------------------------------------
def conditional_relevance(outputs: Tensor | Sequence[Tensor], inputs: InputLike | Sequence[InputLike],
                          conditions: Sequence[Conditions], seeds: Tensor | Sequence[Tensor | None] | None = None, *,
                          rules: Rules = None, model: torch.nn.Module | None = None, exclude_parallel: bool = True,
                          vectorize: bool = True) -> tuple[Tensor, ...]:
    """Conditional relevance (CRP) of ``inputs`` for several concepts, one forward pass.

    Each entry of ``conditions`` is one concept, a mapping ``{tensor: units}`` as in
    :func:`dynamiclrp.relevance` (several tensors: "and"). Concepts that condition the same tensors are computed
    in one relevance pass vectorised over the concepts (``torch.func.vmap``; the part of the graph above the
    conditioned tensors runs once), where every step of the graph allows it, otherwise one pass per concept —
    never a new forward pass. zennit-crp instead repeats the input once per concept in the batch.

    Parameters
    ----------
    outputs, inputs, seeds, rules, model, exclude_parallel
        As in :func:`dynamiclrp.relevance`.
    conditions : sequence of mapping
        One condition mapping per concept.
    vectorize : bool
        Try the vectorised pass first (default); ``False``: one pass per concept.

    Returns
    -------
    tuple of Tensor
        One tensor per input, of shape ``(len(conditions), *input.shape)``.

    Examples
    --------
    >>> heat = conditional_relevance(logits[:, c], x, [{"features.10": [k]} for k in range(64)],
    ...                              model=model)                                   # doctest: +SKIP
    >>> heat[0].shape                                                               # doctest: +SKIP
    torch.Size([64, 1, 3, 224, 224])
    """
    if isinstance(conditions, Mapping):
        raise ConditionError("conditional_relevance takes a sequence of condition mappings, one per concept; for "
                             "one concept use dynamiclrp.relevance(..., conditions={...})")
    conds = list(conditions)
    if not conds:
        raise ConditionError("conditions is empty: pass at least one concept")
    ruleset = resolve(rules)
    mdl = model or ruleset.model
    outs = _outs(outputs)
    unique: dict[Any, Any] = {}
    for c in conds:
        for k in c:
            unique.setdefault(_key_id(k), k)
    resolved = dict(zip(unique, resolve_keys(outs, list(unique.values()), mdl, ruleset)))
    groups: dict[tuple[Any, ...], list[int]] = {}
    for n, c in enumerate(conds):
        groups.setdefault(tuple(sorted({_key_id(k) for k in c}, key=repr)), []).append(n)
    results: list[Tensor | None] | None = None
    for ids, members in groups.items():
        pairs = []
        for kid in ids:
            masks = []
            for n in members:
                spec = next(v for k, v in conds[n].items() if _key_id(k) == kid)
                masks.append(mask_for(spec, resolved[kid]))
            same = torch.broadcast_tensors(*masks)  # type: ignore[no-untyped-call]
            pairs.append((resolved[kid], torch.stack(same)))
        ex = compute(outputs, inputs, seeds, rules=ruleset, model=model, conditions=pairs,
                     exclude_parallel=exclude_parallel, concepts=len(members), vectorize=vectorize)
        if results is None:
            results = [None] * len(ex.relevance)
        for j, r in enumerate(ex.relevance):
            if results[j] is None:
                results[j] = r.new_zeros((len(conds), *r.shape[1:]))
            results[j][torch.tensor(members, device=r.device)] = r  # type: ignore[index]
    assert results is not None
    return tuple(r for r in results if r is not None)


# ----------------------------------------------------------------------------------------------------------------
# relevance per unit
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConceptRelevance:
    """The relevance of every unit of a tensor for the explained outputs (CRP's concept relevance).

    Attributes
    ----------
    relevance : Tensor
        ``(N, units)``: relevance of each unit (summed over its positions) for each batch row.
    activation : Tensor or None
        ``(N, units)``: the largest activation of each unit over its positions.
    layer : str
        What the tensor is, in words.
    """

    relevance: Tensor
    activation: Tensor | None
    layer: str

    def normalized(self) -> Tensor:
        """Relevance as a share of the row's total absolute unit relevance (zennit-crp's ``abs_norm``)."""
        return self.relevance / (self.relevance.abs().sum(-1, keepdim=True) + 1e-10)

    def ranked(self, row: int = 0) -> list[tuple[int, float]]:
        """Every unit of batch row ``row`` as ``(unit, relevance)``, most relevant first."""
        r = self.relevance[row]
        order = torch.argsort(r, descending=True)
        return [(int(u), float(r[u])) for u in order]

    def top(self, k: int = 5, row: int = 0) -> list[tuple[int, float]]:
        """The ``k`` most relevant units of batch row ``row``."""
        return self.ranked(row)[:k]

    def __repr__(self) -> str:
        top = ", ".join(f"{u}: {v:.3g}" for u, v in self.top(5))
        return f"ConceptRelevance({self.layer}, units={self.relevance.shape[-1]}, top=[{top}])"


def _layer_label(layer: Any) -> str:
    if isinstance(layer, (str, Layer)):
        return layer_key(layer)
    return "a tensor" if isinstance(layer, torch.Tensor) else "a graph edge"


def concept_relevance(outputs: Tensor | Sequence[Tensor], layer: Any,
                      seeds: Tensor | Sequence[Tensor | None] | None = None, *, rules: Rules = None,
                      model: torch.nn.Module | None = None, unit: Unit = "channel", heads: int | None = None,
                      conditions: Conditions | None = None, exclude_parallel: bool = True) -> ConceptRelevance:
    """The relevance of every channel, neuron or head of ``layer`` for ``outputs``, ranked (the concept atlas).

    Parameters
    ----------
    outputs, seeds, rules, model, exclude_parallel
        As in :func:`dynamiclrp.relevance`.
    layer : Tensor, GradientEdge, str or Layer
        The tensor whose units are scored (a module name needs ``model=``).
    unit : {"channel", "neuron", "head"} or int
        The unit dimension: 1 (channels, a ``Linear``'s features), the last (neurons, heads) or a dimension.
    heads : int, optional
        With ``unit="head"``: the number of heads the last dimension is split into.
    conditions : mapping, optional
        Score the units under a condition (e.g. on a higher layer's concept: see :func:`decompose`).

    Returns
    -------
    ConceptRelevance
    """
    ruleset = resolve(rules)
    mdl = model or ruleset.model
    outs = _outs(outputs)
    (key,) = resolve_keys(outs, [as_layer(layer)], mdl, ruleset)
    conds = resolve_conditions(outs, conditions, mdl, ruleset)
    ex = compute(outputs, [key], seeds, rules=ruleset, model=model, conditions=conds,
                 exclude_parallel=exclude_parallel, values=True)
    rel = ex.relevance[0]
    d = unit_dim(unit, rel.dim())
    groups = _groups(unit, heads)
    act = ex.values[0] if ex.values is not None else None
    return ConceptRelevance(unit_totals(rel, d, groups), None if act is None else unit_maxima(act.detach(), d, groups),
                            _layer_label(layer))


def _groups(unit: Unit, heads: int | None) -> int | None:
    if unit == "head":
        if heads is None:
            raise ConditionError("unit='head' needs the number of heads: heads=config.num_attention_heads")
        return int(heads)
    return None


def decompose(outputs: Tensor | Sequence[Tensor], upper: Any, concept: Any, lower: Any,
              seeds: Tensor | Sequence[Tensor | None] | None = None, *, rules: Rules = None,
              model: torch.nn.Module | None = None, unit: Unit = "channel", heads: int | None = None,
              exclude_parallel: bool = True) -> ConceptRelevance:
    """Which units of ``lower`` make up ``concept`` of ``upper``: their relevance for the outputs *through* the
    concept (CRP's hierarchical decomposition; Achtibat et al. 2023, Fig. 1).

    ``concept`` is any units value (``[12]``, ``neurons([3])``...). Returns the relevance of every unit of
    ``lower`` conditioned on it; :meth:`ConceptRelevance.top` gives the sub-concepts.
    """
    return concept_relevance(outputs, lower, seeds, rules=rules, model=model, unit=unit, heads=heads,
                             conditions={as_layer(upper): concept}, exclude_parallel=exclude_parallel)


@dataclass
class ConceptNode:
    """One concept in a hierarchy: its layer and unit, its relevance on the path that leads to it, and the
    lower-layer concepts that make it up."""

    layer: str
    unit: int
    relevance: float
    children: list["ConceptNode"] = field(default_factory=list)

    def lines(self, depth: int = 0) -> list[str]:
        out = [f"{'  ' * depth}{self.layer}[{self.unit}]  {self.relevance:.4g}"]
        for c in self.children:
            out += c.lines(depth + 1)
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def hierarchy(outputs: Tensor | Sequence[Tensor], layers: Sequence[Any], concept: int, *, k: int = 3,
              rules: Rules = None, model: torch.nn.Module | None = None, unit: Unit = "channel",
              exclude_parallel: bool = True, row: int = 0) -> ConceptNode:
    """The concept tree of unit ``concept`` of ``layers[0]``: the ``k`` most relevant units of each next layer
    through the concepts above them ("and" conditions along the path), down to ``layers[-1]``.

    Each level is one relevance pass, vectorised over the concepts of the level. Relevance values are for batch
    row ``row``.
    """
    if not layers:
        raise ConditionError("hierarchy needs at least one layer")
    ruleset = resolve(rules)
    mdl = model or ruleset.model
    outs = _outs(outputs)
    keys = resolve_keys(outs, [as_layer(lay) for lay in layers], mdl, ruleset)
    names = [_layer_label(lay) for lay in layers]
    top = concept_relevance(outputs, keys[0], rules=ruleset, model=model, unit=unit,
                            exclude_parallel=exclude_parallel)
    root = ConceptNode(names[0], int(concept), float(top.relevance[row, concept]))
    frontier: list[tuple[ConceptNode, list[int]]] = [(root, [int(concept)])]
    for depth in range(1, len(keys)):
        # one pass per level, vectorised over the frontier: each concept conditioned on its whole path ("and")
        pairs = [(keys[lvl], torch.stack([mask_for([path[lvl]], keys[lvl]) for _, path in frontier]))
                 for lvl in range(depth)]
        ex = compute(outputs, [keys[depth]], rules=ruleset, model=model, conditions=pairs,
                     exclude_parallel=exclude_parallel, concepts=len(frontier))
        rel = ex.relevance[0]
        nxt: list[tuple[ConceptNode, list[int]]] = []
        for (node, path), r in zip(frontier, rel):
            scores = unit_totals(r, unit_dim(unit, r.dim()))[row]
            for u in torch.argsort(scores, descending=True)[:k].tolist():
                child = ConceptNode(names[depth], int(u), float(scores[u]))
                node.children.append(child)
                nxt.append((child, path + [int(u)]))
        frontier = nxt
    return root


# ----------------------------------------------------------------------------------------------------------------
# reference samples: Relevance Maximization over a dataset store
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class References:
    """The samples of a dataset that make each unit of a layer most relevant (or most active).

    Attributes
    ----------
    layer : str
    by : {"relevance", "activation"}
    indices : numpy.ndarray
        ``(units, k)`` sample indices into the store's dataset, best first (``-1``: fewer samples).
    scores : numpy.ndarray
        ``(units, k)`` their scores (normalised relevance share, relevance or activation).
    """

    layer: str
    by: str
    indices: np.ndarray
    scores: np.ndarray

    def of(self, unit: int) -> list[tuple[int, float]]:
        """``(sample index, score)`` of the references of ``unit``."""
        return [(int(i), float(s)) for i, s in zip(self.indices[unit], self.scores[unit]) if i >= 0]


def reference_samples(store: Any, layer: Any, *, k: int = 8, by: Literal["relevance", "activation"] = "relevance",
                      normalized: bool = True, target: int | None = None) -> References:
    """Relevance Maximization (Achtibat et al. 2023, Sec. 4): the ``k`` samples of a dataset store in which each
    unit of ``layer`` is most relevant — or, ``by="activation"``, most active (activation maximization, the
    classic feature visualisation by examples, for comparison).

    The store is written by :func:`dynamiclrp.attribute_dataset` with ``concepts=[layer]``, which keeps the
    relevance and activation of every unit for every sample next to the heatmaps (one relevance pass per batch,
    resumable, distributed).

    Parameters
    ----------
    store : str, os.PathLike or zarr.Group
        The store (see :func:`dynamiclrp.dataset.open_store`).
    layer : str or Layer
        A layer the store was written with.
    k : int
        References per unit.
    by : {"relevance", "activation"}
    normalized : bool
        With ``by="relevance"``: rank by the unit's share of the sample's total absolute unit relevance
        (zennit-crp's ``sum_normed``), so that samples are compared by how much of their explanation the concept
        is, not by how confident the model is.
    target : int, optional
        Only samples whose explained target is this class.

    Returns
    -------
    References
    """
    group = open_store(store) if isinstance(store, (str, os.PathLike)) else store
    name = layer_key(layer)
    if by not in ("relevance", "activation"):
        raise ValueError(f"by must be 'relevance' or 'activation', got {by!r}")
    try:
        arr = group[f"{concept_path(layer)}/{by}"]
    except KeyError as err:
        raise ConditionError(f"the store has no concept arrays for {name!r}: write it with "
                             f"attribute_dataset(..., concepts=[{name!r}])") from err
    data = np.asarray(arr[:], dtype=np.float64)
    if by == "relevance" and normalized:
        data = data / (np.abs(data).sum(1, keepdims=True) + 1e-10)
    ok = np.ones(len(data), dtype=bool)
    if target is not None:
        ok &= np.asarray(group["target"][:]) == int(target)
    data = np.where(ok[:, None], data, -np.inf)
    order = np.argsort(-data, axis=0, kind="stable")[:k].T  # (units, k)
    scores = np.take_along_axis(data.T, order, axis=1)
    indices = np.where(np.isfinite(scores), order, -1)
    return References(name, by, indices, np.where(np.isfinite(scores), scores, np.nan))


@dataclass(frozen=True)
class Reference:
    """One reference sample of a concept: the image, its conditional heatmap, both cropped to where the concept
    is relevant."""

    index: int
    unit: int
    score: float
    image: Tensor
    heatmap: Tensor
    box: tuple[int, int, int, int]  # top, left, bottom, right (exclusive) in the full image


def _crop_box(heat: Tensor, frac: float, pad: int, min_size: int) -> tuple[int, int, int, int]:
    h, w = heat.shape[-2:]
    a = heat.abs()
    m = float(a.max())
    if m == 0:
        return 0, 0, h, w
    ys, xs = torch.nonzero(a >= frac * m, as_tuple=True)
    top, bottom = int(ys.min()) - pad, int(ys.max()) + 1 + pad
    left, right = int(xs.min()) - pad, int(xs.max()) + 1 + pad
    if bottom - top < min_size:
        c = (top + bottom) // 2
        top, bottom = c - min_size // 2, c - min_size // 2 + min_size
    if right - left < min_size:
        c = (left + right) // 2
        left, right = c - min_size // 2, c - min_size // 2 + min_size
    top, left = max(0, top), max(0, left)
    bottom, right = min(h, bottom), min(w, right)
    return top, left, bottom, right


def reference_heatmaps(model: torch.nn.Module, data: Any, references: References, units: Sequence[int], *,
                       store: Any, rules: Rules = None, crop: bool = True, frac: float = 0.25, pad: int = 1,
                       min_size: int = 3, device: str | torch.device | None = None) -> dict[int, list[Reference]]:
    """The conditional heatmaps of each unit's reference samples: the explanation of the sample's stored target
    *through* that unit, cropped to the box where its absolute relevance exceeds ``frac`` of its maximum.

    Parameters
    ----------
    model : torch.nn.Module
        The model the store was written with (eval mode; it is run on the references, not modified).
    data : map-style dataset or tensor
        The dataset the store was written from: ``data[i]`` is a sample (or ``(sample, label)``).
    references : References
        From :func:`reference_samples`.
    units : sequence of int
        The units to explain.
    store : str, os.PathLike or zarr.Group
        The store (for each sample's explained target).
    rules : None, str or RuleSet
        As the store was written with (default: the default rule set).
    crop, frac, pad, min_size
        Crop to the relevant box (padded by ``pad`` pixels, at least ``min_size`` wide).

    Returns
    -------
    dict
        ``unit -> list of Reference``, best first.
    """
    group = open_store(store) if isinstance(store, (str, os.PathLike)) else store
    targets = np.asarray(group["target"][:])
    layer = as_layer(references.layer)
    dev = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    out: dict[int, list[Reference]] = {}
    for u in units:
        picks = references.of(u)
        if not picks:
            out[u] = []
            continue
        xs = []
        for i, _ in picks:
            item = data[i]
            xs.append(item[0] if isinstance(item, (tuple, list)) else item)
        x = torch.stack([torch.as_tensor(v) for v in xs]).to(dev)
        dtype = next((p.dtype for p in model.parameters()), x.dtype)
        x = x.to(dtype if x.is_floating_point() else x.dtype).requires_grad_(True)
        t = torch.as_tensor(targets[[i for i, _ in picks]], device=dev)
        with torch.enable_grad():
            scores = model(x)
            outputs = scores.gather(1, t[:, None]).squeeze(1)
            (heat,) = relevance(outputs, x, rules=rules, model=model, conditions={layer: [u]})
        refs = []
        for n, (i, score) in enumerate(picks):
            img, h = x[n].detach(), heat[n]
            h2 = h.sum(0) if h.dim() == 3 else h
            box = _crop_box(h2, frac, pad, min_size) if crop and h2.dim() == 2 else (0, 0, *h2.shape[-2:])
            if crop and h2.dim() == 2:
                img = img[..., box[0]:box[2], box[1]:box[3]]
                h = h[..., box[0]:box[2], box[1]:box[3]]
            refs.append(Reference(i, u, score, img.cpu(), h.cpu(), box))
        out[u] = refs
    return out


def plot_references(rows: Mapping[str, Sequence[Reference]], *, path: str | os.PathLike[str] | None = None,
                    title: str | None = None, cell_size: float = 1.4) -> Any:
    """A figure with one row per entry of ``rows`` (``label -> references``): each reference's cropped image
    with its conditional heatmap laid over it (:func:`dynamiclrp.viz.overlay`).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from . import viz
    labels = list(rows)
    ncols = max((len(v) for v in rows.values()), default=0)
    if not labels or ncols == 0:
        raise ValueError("plot_references needs at least one row with at least one reference")
    images: list[Any] = []
    titles: list[str] = []
    for lab in labels:
        refs = list(rows[lab])
        for j in range(ncols):
            if j < len(refs):
                r = refs[j]
                img = r.image
                if img.dim() == 3 and img.shape[0] == 1:
                    img = img[0]
                images.append(viz.overlay(img.float(), r.heatmap.float(), alpha=0.7))
                titles.append(f"{lab}\n#{r.index}" if j == 0 else f"#{r.index}")
            else:
                images.append(np.full((4, 4, 3), 255, dtype=np.uint8))
                titles.append("")
    return viz.grid(images, ncols=ncols, titles=titles, cell_size=cell_size, suptitle=title, path=path)

