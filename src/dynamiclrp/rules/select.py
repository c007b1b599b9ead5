"""Choosing a rule per node: per-op entries, per-node overrides, per-layer rules (module names resolved through the
identity of each node's parameters), the first layer, the family rule, and merged batch norms.

:class:`~dynamiclrp.rules.ruleset.RuleSet` is configuration; everything here reads the graph, memoised per plan in
``planner.analyses``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..core.params import ModelParams
from ..core.step import Site
from ..errors import RuleError
from .base import Rule
from .batchnorm import BatchNormMerges, MergedBatchNorm, batchnorm_merges
from .linear import _LinearRule
from .special import SPECIAL_RULES

if TYPE_CHECKING:  # pragma: no cover
    from ..core.plan import Planner
    from .ruleset import RuleSet

#: convolution modules (Zennit's "first layer" of kind conv: the first of these in ``named_modules()`` order)
_CONV = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
         torch.nn.ConvTranspose3d)


#: ops that may carry a first-layer rule (Zennit's "linear-type" layers)
FIRST_LAYER_KINDS = {"conv": ("conv",), "linear": ("linear",), "linear-type": ("linear", "conv")}


@dataclass(frozen=True)
class NodeInfo:
    """What a per-node override sees about a node.

    Attributes
    ----------
    type : str
        Autograd class name, e.g. ``"AddmmBackward0"``.
    family : str
        Its rule family (``"linear"``, ``"matmul"``...).
    module : str or None
        Name of the module owning its parameters (when the rule set has a model), else ``None``.
    node : Any
        The autograd node itself.
    index : int
        Its position in this graph's discovery order.
    """

    type: str
    family: str
    module: str | None
    node: Any
    index: int


def _module_of(planner: "Planner", rules: "RuleSet", index: int) -> str | None:
    """The module of ``rules.model`` that owns node ``index``'s parameters (trainable or frozen), or ``None``."""
    if rules.model is None:
        return None
    params = planner.resolver.params
    if params is None or params.model is not rules.model:
        key = ("model_params", id(rules.model))
        params = planner.analyses.get(key)
        if params is None:
            params = planner.analyses[key] = ModelParams(rules.model)
    return planner.module_of(index, params)


def _check_layers(planner: "Planner", rules: "RuleSet") -> None:
    """Every per-layer rule must apply to some op of its layer (when the layer takes part in this graph)."""
    key = ("layers_checked", id(rules))
    if planner.analyses.get(key):
        return
    planner.analyses[key] = True
    fams: dict[str, set[str]] = {}
    g = planner.graph
    for i in range(len(g)):
        spec = planner.specs[i]
        mod = _module_of(planner, rules, i) if spec is not None else None
        if mod is None:
            continue
        fam = family_of(planner.site(i))
        for k in rules.layers:
            if mod == k or mod.startswith(k + ".") or k == "":
                fams.setdefault(k, set()).add(fam)
    for k, rule in rules.layers.items():
        seen = fams.get(k)
        if seen and not any(handles(rule, f) for f in seen):
            raise RuleError(f"layers[{k!r}] = {rule!r} applies to families {sorted(rule.families)}, but the ops of "
                            f"layer {k!r} in this graph are of families {sorted(seen)}; choose a rule for one of "
                            "those (e.g. Epsilon() for linear/conv)")


def _first_layer_nodes(planner: "Planner", rules: "RuleSet") -> frozenset[int]:
    key = ("first_layer", id(rules))
    cache = planner.analyses
    got = cache.get(key)
    if got is not None:
        return got
    kinds = FIRST_LAYER_KINDS[rules.first_layer_kind]
    g = planner.graph
    by = rules.first_layer_by
    if by == "auto":
        by = "module" if rules.model is not None else "graph"
    result: set[int] = set()
    if by == "module":
        module_types = {"conv": _CONV, "linear": (torch.nn.Linear,),
                        "linear-type": _CONV + (torch.nn.Linear,)}[rules.first_layer_kind]
        first = None
        for name, mod in rules.model.named_modules():
            if isinstance(mod, module_types):
                first = name
                break
        if first is not None:
            for i in range(len(g)):
                spec = planner.specs[i]
                if spec is None:
                    continue
                fam = family_of(planner.site(i))
                if fam in kinds and _module_of(planner, rules, i) == first:
                    result.add(i)
    else:
        # the matching ops nearest the activation sources: no other matching op between them and the input
        result = _nearest_input_ops(planner, kinds)
    frozen = frozenset(result)
    cache[key] = frozen
    return frozen


def _nearest_input_ops(planner: "Planner", kinds: Sequence[str]) -> set[int]:
    g = planner.graph
    n = len(g)
    # below[i]: some matching op (or a fused layer with weights, e.g. an LSTM) lies strictly below node i on a
    # path to an activation source
    below = [False] * n
    is_match = [False] * n
    is_layer = [False] * n
    for i in reversed(g.order):
        spec = planner.specs[i]
        if spec is not None:
            fam = family_of(planner.site(i))
            is_match[i] = fam in kinds
            is_layer[i] = is_match[i] or fam in ("linear", "conv", "recurrent")
        b = False
        for e in g.edges[i]:
            if e >= 0 and planner.active[e]:
                c = g.slot_node[e]
                if is_layer[c] or below[c]:
                    b = True
                    break
        below[i] = b
    return {i for i in range(n) if is_match[i] and not below[i]
            and any(e >= 0 and planner.active[e] for e in g.edges[i])}


def family_of(site: Site) -> str:
    """The rule family of ``site``'s node (its row's ``family_of`` decides for ops whose family depends on the
    graph, e.g. a matmul of two activations versus one with a weight)."""
    spec = site.spec
    return spec.family_of(site) if spec.family_of is not None else spec.family


def rule_for(rules: "RuleSet", site: Site) -> Rule:
    """The rule for the node of ``site``: an op rule, a per-node override, a per-layer rule, the first-layer rule
    or the family rule, in that order. An eval-mode batch norm merged into the op before it (see
    ``RuleSet.merge_batchnorm``) gets :class:`~dynamiclrp.rules.batchnorm.MergedBatchNorm` instead of its family
    rule."""
    rule, source = _chosen(rules, site)
    if source == "family" and site.index in merges(rules, site.planner).op_of:
        return MergedBatchNorm()
    return rule


def _chosen(rules: "RuleSet", site: Site) -> tuple[Rule, str]:
    val = rules.ops.get(site.type)
    if val is not None:
        return (val[1] if isinstance(val, tuple) else val), "op"
    family = family_of(site)
    planner = site.planner
    if rules.override is not None:
        got = rules.override(NodeInfo(site.type, family, _module_of(planner, rules, site.index), site.node,
                                      site.index))
        if got is not None:
            _check_override(got)
            return got, "override"
    if rules.layers:
        _check_layers(planner, rules)
        mod = _module_of(planner, rules, site.index)
        if mod is not None:
            best = None
            for key, rule in rules.layers.items():
                if not handles(rule, family):
                    continue  # e.g. a conv rule given to "features" does not apply to its batch norms
                if mod == key or mod.startswith(key + ".") or key == "":
                    if best is None or len(key) > len(best):
                        best = key
            if best is not None:
                return rules.layers[best], "layer"
    if rules.first_layer is not None and family in FIRST_LAYER_KINDS[rules.first_layer_kind]:
        if site.index in _first_layer_nodes(planner, rules):
            return rules.first_layer, "first_layer"
    rule = rules.families.get(family)
    if rule is None:  # the special families (fused recurrent layers, weight norm...) have their own rules
        rule = SPECIAL_RULES.get(family)
        if rule is None:
            raise RuleError(f"rule set {rules.name!r} has no rule for family {family!r} ({site.describe()})")
    return rule, "family"


def _check_override(rule: Any) -> None:
    if not isinstance(rule, Rule):
        raise RuleError(f"override(...) must be a dynamiclrp Rule instance (or None to keep the default rule), "
                        f"got {rule!r}")


def handles(rule: Rule, family: str) -> bool:
    """Whether ``rule`` applies to ``family``."""
    return not rule.families or family in rule.families or "any" in rule.families


def merges(rules: "RuleSet", planner: "Planner") -> BatchNormMerges:
    """Which batch norms of ``planner``'s graph are merged into the op before them (memoised per plan)."""
    key = ("batchnorm_merges", id(rules))
    got = planner.analyses.get(key)
    if got is not None:
        return got
    if not rules.merge_batchnorm:
        got = BatchNormMerges({})
    else:
        def linear_rule(i: int) -> Rule | None:
            rule = _chosen(rules, planner.site(i))[0]
            return rule if isinstance(rule, _LinearRule) else None

        def family_ruled(i: int) -> bool:  # a batch norm given its own rule explicitly is left alone
            return _chosen(rules, planner.site(i))[1] == "family"
        got = batchnorm_merges(planner, linear_rule, family_ruled)
    planner.analyses[key] = got
    return got
