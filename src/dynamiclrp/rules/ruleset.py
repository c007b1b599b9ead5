"""Rule sets: which rule handles which node.

A :class:`RuleSet` maps op *families* to rules and adds, from most to least specific:

1. per-node overrides — a callable ``(NodeInfo) -> Rule | None`` or a mapping from autograd nodes to rules;
2. per-layer rules — module names (``"features.0"``, or a prefix such as ``"features"``), resolved from the
   graph through the identity of each node's parameters (needs ``model=``);
3. a first-layer rule — Zennit's meaning (the first matching module in ``model.named_modules()`` order) when a
   model is given, otherwise the op of that kind nearest the input in the graph;
4. the family rule.

Rule sets are immutable: every ``with_*`` method returns a new one.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from .. import graph as G
from ..errors import RuleError
from .base import OpSpec, Rule, Site
from .registry import REGISTRY

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Planner

#: families every complete rule set must map
FAMILIES = ("linear", "conv", "matmul", "product", "add", "reduce", "pool", "activation", "norm", "softmax",
            "attention", "routing", "embedding", "leaf")

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


@dataclass(frozen=True)
class RuleSet:
    """Which rule applies where.

    Parameters
    ----------
    families : mapping
        Family name -> :class:`~dynamiclrp.rules.base.Rule`. Every family in :data:`FAMILIES` must be present.
    name : str
        A label for messages and ``repr``.
    first_layer : Rule or None
        Rule for the first layer of kind ``first_layer_kind``.
    first_layer_kind : str
        ``"conv"``, ``"linear"`` or ``"linear-type"`` (either), as Zennit's composites define "first layer".
    first_layer_by : str
        ``"auto"`` (module order when a model is given, else graph), ``"module"`` (Zennit: first matching
        module in ``named_modules()`` order; needs ``model``) or ``"graph"`` (the matching op nearest the input).
    layers : mapping
        Module name or prefix -> rule (needs ``model``).
    model : torch.nn.Module or None
        Used to resolve layer names. Never modified.
    override : callable or None
        ``(NodeInfo) -> Rule | None``: an explicit rule for individual nodes.
    ops : mapping
        Node type -> rule (or ``(OpSpec, rule)``) for node types the registry does not know (custom
        ``autograd.Function``s) or to replace the rule of a known type.
    merge_batchnorm : bool
        Merge an eval-mode BatchNorm that directly follows a linear/conv op into that op for its rule (as
        Zennit's ``SequentialMergeBatchNorm`` canonizer does).
    """

    families: Mapping[str, Rule]
    name: str = "custom"
    first_layer: Rule | None = None
    first_layer_kind: str = "linear-type"
    first_layer_by: str = "auto"
    layers: Mapping[str, Rule] = field(default_factory=dict)
    model: torch.nn.Module | None = field(default=None, compare=False)
    override: Callable[[NodeInfo], Rule | None] | None = field(default=None, compare=False)
    ops: Mapping[str, Any] = field(default_factory=dict)
    merge_batchnorm: bool = True

    def __post_init__(self) -> None:
        missing = [f for f in FAMILIES if f not in self.families]
        if missing:
            raise RuleError(f"rule set {self.name!r} has no rule for families {missing}; every family in "
                            f"{list(FAMILIES)} needs one (start from a preset and change what you need)")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise RuleError(f"unknown families {unknown}; valid families are {list(FAMILIES)}")
        for fam, rule in self.families.items():
            _check_rule(rule, f"families[{fam!r}]")
            if rule.families and fam not in rule.families and "any" not in rule.families:
                raise RuleError(f"{rule!r} cannot handle family {fam!r}; it applies to {sorted(rule.families)}")
        if self.first_layer is not None:
            _check_rule(self.first_layer, "first_layer")
        if self.first_layer_kind not in FIRST_LAYER_KINDS:
            raise RuleError(f"first_layer_kind must be one of {sorted(FIRST_LAYER_KINDS)}, "
                            f"got {self.first_layer_kind!r}")
        if self.first_layer_by not in ("auto", "module", "graph"):
            raise RuleError(f"first_layer_by must be 'auto', 'module' or 'graph', got {self.first_layer_by!r}")
        if self.first_layer_by == "module" and self.first_layer is not None and self.model is None:
            raise RuleError("first_layer_by='module' needs the model: pass model=... (e.g. with .with_model(m))")
        for key, rule in self.layers.items():
            _check_rule(rule, f"layers[{key!r}]")
        if self.layers and self.model is None:
            raise RuleError("per-layer rules need the model to resolve layer names: use .with_model(model)")
        if self.model is not None and self.layers:
            names = {n for n, _ in self.model.named_modules()}
            bad = [k for k in self.layers if k not in names]
            if bad:
                import difflib
                ordered = [n for n, _ in self.model.named_modules() if n]
                close = {k: difflib.get_close_matches(k, ordered, n=3) for k in bad}
                hints = "; ".join(f"{k!r}: did you mean {v}?" for k, v in close.items() if v)
                listing = ", ".join(ordered)
                if len(listing) > 600:
                    listing = listing[:600] + " ..."
                raise RuleError(f"no module named {bad} in the model{' (' + hints + ')' if hints else ''}; the "
                                f"model's module names are: {listing}")
            mods = dict(self.model.named_modules())
            empty = [k for k in self.layers if next(mods[k].parameters(), None) is None]
            if empty:
                with_params = ", ".join(n for n, m in mods.items() if n and next(m.parameters(recurse=False), None)
                                        is not None)
                if len(with_params) > 600:
                    with_params = with_params[:600] + " ..."
                raise RuleError(f"layers {empty} have no parameters, so none of their ops can be found in the graph "
                                "(layers are recognised through their parameters); give parameter-free ops a rule "
                                "by family (with_families) or per node (with_override). Modules with parameters: "
                                f"{with_params}")
        for key, val in self.ops.items():
            if not isinstance(key, str):
                raise RuleError(f"ops keys are autograd node type names such as 'AddmmBackward0' or "
                                f"'MyFunctionBackward', got {key!r}")
            if isinstance(val, tuple):
                if len(val) != 2 or not isinstance(val[0], OpSpec):
                    raise RuleError(f"ops[{key!r}] must be a Rule or an (OpSpec, Rule) pair, got {val!r}")
                rule = val[1]
            else:
                rule = val
            _check_rule(rule, f"ops[{key!r}]")

    # -- construction helpers --------------------------------------------------------------------------------
    def with_families(self, **rules: Rule) -> "RuleSet":
        """A copy with some family rules replaced (``with_families(conv=Gamma(0.25))``)."""
        fams = dict(self.families)
        fams.update(rules)
        return replace(self, families=fams)

    def with_layers(self, layers: Mapping[str, Rule], model: torch.nn.Module | None = None) -> "RuleSet":
        """A copy with per-layer rules (module names or prefixes of ``model``)."""
        merged = dict(self.layers)
        merged.update(layers)
        return replace(self, layers=merged, model=model if model is not None else self.model)

    def with_model(self, model: torch.nn.Module) -> "RuleSet":
        """A copy that resolves layer names and Zennit's first layer against ``model``."""
        return replace(self, model=model)

    def with_first_layer(self, rule: Rule | None, kind: str | None = None, by: str | None = None) -> "RuleSet":
        """A copy with a different first-layer rule, kind (``conv``/``linear``/``linear-type``) or resolution."""
        return replace(self, first_layer=rule, first_layer_kind=kind or self.first_layer_kind,
                       first_layer_by=by or self.first_layer_by)

    def with_merge_batchnorm(self, merge: bool = True) -> "RuleSet":
        """A copy that merges (``True``, the default of every preset) or keeps separate (``False``) eval-mode
        batch norms that directly follow a linear/conv op (see :attr:`merge_batchnorm`)."""
        return replace(self, merge_batchnorm=bool(merge))

    def with_override(self, fn: Callable[[NodeInfo], Rule | None]) -> "RuleSet":
        """A copy with a per-node override ``fn(NodeInfo) -> Rule | None`` (``None`` keeps the default)."""
        return replace(self, override=fn)

    def with_nodes(self, nodes: Mapping[Any, Rule]) -> "RuleSet":
        """A copy with explicit rules for particular autograd nodes: keys are nodes (``logits.grad_fn``) or the
        tensors they produced (``{h: Epsilon(0)}`` means the node that computed ``h``)."""
        keep = []
        table = {}
        for k, v in nodes.items():
            node = k.grad_fn if isinstance(k, torch.Tensor) else k
            if node is None or not hasattr(node, "next_functions"):
                raise RuleError(f"with_nodes keys must be autograd nodes (tensor.grad_fn) or tensors computed with "
                                f"grad enabled, got {type(k).__name__}" + (" without a grad_fn (a leaf or a tensor "
                                "computed under no_grad)" if isinstance(k, torch.Tensor) else ""))
            _check_rule(v, f"nodes[{G.node_type(node)}]")
            keep.append(node)  # hold the nodes so their ids stay theirs
            table[id(node)] = v
        previous = self.override

        def fn(info: NodeInfo) -> Rule | None:
            _ = keep
            got = table.get(id(info.node))
            if got is None and previous is not None:
                return previous(info)
            return got
        return replace(self, override=fn)

    def with_ops(self, ops: Mapping[str, Any]) -> "RuleSet":
        """A copy with rules for node types: custom ``autograd.Function`` nodes (by their class name, e.g.
        ``"MyFunctionBackward"``) or replacements for built-in types. A value is a rule, or ``(OpSpec, rule)``
        to also tell the Promise System how to read or rebuild the op's values."""
        merged = dict(self.ops)
        merged.update(ops)
        return replace(self, ops=merged)

    # -- used by the planner -----------------------------------------------------------------------------------
    def spec_for(self, node_type: str) -> OpSpec | None:
        val = self.ops.get(node_type)
        if val is not None:
            if isinstance(val, tuple):
                return val[0]
            base = REGISTRY.get(node_type)
            return base if base is not None else OpSpec("custom")
        return REGISTRY.get(node_type)

    def family_of(self, site: Site) -> str:
        spec = site.spec
        return spec.family_of(site) if spec.family_of is not None else spec.family

    def rule_for(self, site: Site) -> Rule:
        """The rule for the node of ``site``: an op rule, a per-node override, a per-layer rule, the first-layer
        rule or the family rule, in that order. An eval-mode batch norm merged into the op before it (see
        :attr:`merge_batchnorm`) gets :class:`~dynamiclrp.rules.library.MergedBatchNorm` instead of its family
        rule."""
        rule, source = self._chosen(site)
        if source == "family" and site.index in self.batchnorm_merges(site.planner).op_of:
            from .library import MergedBatchNorm
            return MergedBatchNorm()
        return rule

    def _chosen(self, site: Site) -> tuple[Rule, str]:
        val = self.ops.get(site.type)
        if val is not None:
            return (val[1] if isinstance(val, tuple) else val), "op"
        family = self.family_of(site)
        planner = site.planner
        if self.override is not None:
            got = self.override(NodeInfo(site.type, family, _module_of(planner, self, site.index), site.node,
                                         site.index))
            if got is not None:
                _check_rule(got, "override(...)")
                return got, "override"
        if self.layers:
            _check_layers(planner, self)
            mod = _module_of(planner, self, site.index)
            if mod is not None:
                best = None
                for key, rule in self.layers.items():
                    if not _handles(rule, family):
                        continue  # e.g. a conv rule given to "features" does not apply to its batch norms
                    if mod == key or mod.startswith(key + ".") or key == "":
                        if best is None or len(key) > len(best):
                            best = key
                if best is not None:
                    return self.layers[best], "layer"
        if self.first_layer is not None and family in FIRST_LAYER_KINDS[self.first_layer_kind]:
            if site.index in _first_layer_nodes(planner, self):
                return self.first_layer, "first_layer"
        rule = self.families.get(family)
        if rule is None:  # registry rows outside FAMILIES (fused recurrent layers, weight norm) carry their rule
            rule = getattr(site.spec.kernel, "rule", None)
            if rule is None:
                raise RuleError(f"rule set {self.name!r} has no rule for family {family!r} ({site.describe()})")
        return rule, "family"

    def batchnorm_merges(self, planner: "Planner"):
        """Which batch norms of ``planner``'s graph are merged into the op before them (memoised per plan).

        Returns
        -------
        dynamiclrp.rules.structure.BatchNormMerges
        """
        key = ("batchnorm_merges", id(self))
        got = planner.structure_cache.get(key)
        if got is not None:
            return got
        from .library import _LinearRule
        from .structure import BatchNormMerges, batchnorm_merges

        if not self.merge_batchnorm:
            got = BatchNormMerges({})
        else:
            def chosen(i: int) -> tuple[Rule, str]:
                spec = planner.specs[i]
                site = Site(planner, i, spec, tuple(e >= 0 and planner.active[e] for e in planner.graph.edges[i]))
                return self._chosen(site)

            def linear_rule(i: int) -> Rule | None:
                rule = chosen(i)[0]
                return rule if isinstance(rule, _LinearRule) else None

            def family_ruled(i: int) -> bool:  # a batch norm given its own rule explicitly is left alone
                return chosen(i)[1] == "family"
            got = batchnorm_merges(planner, linear_rule, family_ruled)
        planner.structure_cache[key] = got
        return got

    def __repr__(self) -> str:
        fams = ", ".join(f"{k}={v!r}" for k, v in self.families.items()
                         if k not in ("routing", "leaf", "embedding"))
        extra = f", first_layer={self.first_layer!r}" if self.first_layer is not None else ""
        return f"RuleSet({self.name!r}: {fams}{extra})"


def _handles(rule: Rule, family: str) -> bool:
    return not rule.families or family in rule.families or "any" in rule.families


def _rule_names() -> str:
    from . import library
    return ", ".join(sorted(n for n in library.__all__))


def _check_rule(rule: Any, where: str) -> None:
    if not isinstance(rule, Rule):
        hint = " (a rule class, not an instance: add parentheses)" if isinstance(rule, type) and issubclass(
            rule, Rule) else ""
        raise RuleError(f"{where} must be a dynamiclrp Rule instance{hint}, got {rule!r}; the rules in "
                        f"dynamiclrp.rules are: {_rule_names()}")


# -----------------------------------------------------------------------------------------------------------
# module resolution through parameter identity
# -----------------------------------------------------------------------------------------------------------
_THROUGH = frozenset({"TBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
                      "ExpandBackward0", "PermuteBackward0", "TransposeBackward0", "ToCopyBackward0",
                      "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "CloneBackward0",
                      "AliasBackward0"})


def _param_owner(planner: "Planner", rules: RuleSet) -> dict[int, str]:
    cache = planner.structure_cache
    key = ("param_owner", id(rules.model))
    got = cache.get(key)
    if got is None:
        got = {}
        if rules.model is not None:
            for mname, mod in rules.model.named_modules():
                for _, p in mod.named_parameters(recurse=False):
                    got.setdefault(id(p), mname)
        cache[key] = got
    return got


def node_params(planner: "Planner", index: int) -> list[torch.Tensor]:
    """Parameter leaves feeding node ``index`` directly or through transposes/views/casts."""
    g = planner.graph
    out = []
    for e in g.edges[index]:
        hops = 0
        while e >= 0 and hops < 4:
            j = g.slot_node[e]
            t = g.types[j]
            if t == "AccumulateGrad":
                out.append(G.leaf_tensor(g.nodes[j]))
                break
            if t not in _THROUGH:
                break
            edges = [x for x in g.edges[j] if x >= 0]
            if len(edges) != 1:
                break
            e = edges[0]
            hops += 1
    return out


def _module_of(planner: "Planner", rules: RuleSet, index: int) -> str | None:
    if rules.model is None:
        return None
    owners = _param_owner(planner, rules)
    for p in node_params(planner, index):
        name = owners.get(id(p))
        if name is not None:
            return name
    return None


def _check_layers(planner: "Planner", rules: RuleSet) -> None:
    """Every per-layer rule must apply to some op of its layer (when the layer takes part in this graph)."""
    key = ("layers_checked", id(rules))
    if planner.structure_cache.get(key):
        return
    planner.structure_cache[key] = True
    fams: dict[str, set[str]] = {}
    g = planner.graph
    for i in range(len(g)):
        spec = planner.specs[i]
        mod = _module_of(planner, rules, i) if spec is not None else None
        if mod is None:
            continue
        site = Site(planner, i, spec, tuple(e >= 0 and planner.active[e] for e in g.edges[i]))
        fam = spec.family_of(site) if spec.family_of is not None else spec.family
        for k in rules.layers:
            if mod == k or mod.startswith(k + ".") or k == "":
                fams.setdefault(k, set()).add(fam)
    for k, rule in rules.layers.items():
        seen = fams.get(k)
        if seen and not any(_handles(rule, f) for f in seen):
            raise RuleError(f"layers[{k!r}] = {rule!r} applies to families {sorted(rule.families)}, but the ops of "
                            f"layer {k!r} in this graph are of families {sorted(seen)}; choose a rule for one of "
                            "those (e.g. Epsilon() for linear/conv)")


def _first_layer_nodes(planner: "Planner", rules: RuleSet) -> frozenset[int]:
    key = ("first_layer", id(rules))
    cache = planner.structure_cache
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
        module_types = {"conv": (torch.nn.modules.conv._ConvNd,), "linear": (torch.nn.Linear,),
                        "linear-type": (torch.nn.modules.conv._ConvNd, torch.nn.Linear)}[rules.first_layer_kind]
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
                fam = spec.family_of(Site(planner, i, spec, tuple(
                    e >= 0 and planner.active[e] for e in g.edges[i]))) if spec.family_of else spec.family
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
            site_active = tuple(e >= 0 and planner.active[e] for e in g.edges[i])
            fam = spec.family_of(Site(planner, i, spec, site_active)) if spec.family_of else spec.family
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


# -----------------------------------------------------------------------------------------------------------
def resolve_rules(rules: Any) -> RuleSet:
    """Turn the ``rules=`` argument into a :class:`RuleSet` (``None`` -> the default preset, a name -> that
    preset)."""
    from .. import presets

    if rules is None:
        return presets.default()
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, str):
        return presets.by_name(rules)
    raise RuleError(f"rules must be None, a preset name ({', '.join(presets.names())}) or a RuleSet, "
                    f"got {type(rules).__name__}")
