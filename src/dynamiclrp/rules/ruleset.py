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

import difflib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch

from ..core.graph import is_node, node_type
from ..core.spec import OpSpec
from ..core.step import Site
from ..errors import RuleError
from ..ops.registry import REGISTRY
from . import select
from .base import Rule
from .select import FIRST_LAYER_KINDS, NodeInfo

__all__ = ["FAMILIES", "FIRST_LAYER_KINDS", "NodeInfo", "RuleSet"]


#: families every complete rule set must map
FAMILIES = ("linear", "conv", "matmul", "product", "add", "reduce", "pool", "activation", "norm", "softmax",
            "attention", "routing", "embedding", "leaf")


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
            if node is None or not is_node(node):
                raise RuleError(f"with_nodes keys must be autograd nodes (tensor.grad_fn) or tensors computed with "
                                f"grad enabled, got {type(k).__name__}" + (" without a grad_fn (a leaf or a tensor "
                                "computed under no_grad)" if isinstance(k, torch.Tensor) else ""))
            _check_rule(v, f"nodes[{node_type(node)}]")
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

    # -- used by the planner (the rule-choosing logic itself is in dynamiclrp.rules.select) -----------------
    def spec_for(self, node_type: str) -> OpSpec | None:
        """The registry row of ``node_type`` (an ``ops`` entry of this rule set first)."""
        val = self.ops.get(node_type)
        if val is not None:
            if isinstance(val, tuple):
                return val[0]
            base = REGISTRY.get(node_type)
            return base if base is not None else OpSpec("custom")
        return REGISTRY.get(node_type)

    def rule_for(self, site: Site) -> Rule:
        """The rule for the node of ``site`` (:func:`dynamiclrp.rules.select.rule_for`)."""
        return select.rule_for(self, site)

    def __repr__(self) -> str:
        fams = ", ".join(f"{k}={v!r}" for k, v in self.families.items()
                         if k not in ("routing", "leaf", "embedding"))
        extra = f", first_layer={self.first_layer!r}" if self.first_layer is not None else ""
        return f"RuleSet({self.name!r}: {fams}{extra})"


def _handles(rule: Rule, family: str) -> bool:
    return not rule.families or family in rule.families or "any" in rule.families


def _rule_names() -> str:
    names: set[str] = set()
    todo = list(Rule.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if not cls.__name__.startswith("_") and cls.__module__.startswith("dynamiclrp."):
            names.add(cls.__name__)
    return ", ".join(sorted(names))


def _check_rule(rule: Any, where: str) -> None:
    if not isinstance(rule, Rule):
        hint = " (a rule class, not an instance: add parentheses)" if isinstance(rule, type) and issubclass(
            rule, Rule) else ""
        raise RuleError(f"{where} must be a dynamiclrp Rule instance{hint}, got {rule!r}; the rules in "
                        f"dynamiclrp.rules are: {_rule_names()}")
