"""Planning: a rule set compiled against one graph.

A plan depends only on the graph's structure (node types, edges, shapes, which saved fields exist) and the rule
set, so it is cached under a signature of those (:class:`PlanCache`) and reused for the next graph with the same
signature. The planner reads registry rows through the rule set (``rules.spec_for(type)``) and asks it for a rule
per node (``rules.rule_for(site)``); everything graph-specific a rule decides is compiled into its step.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Protocol

import torch

from ..errors import UnsupportedOperationError
from .graph import GraphView, forward_op_name, leaf_tensor, saved
from .params import ModelParams
from .promises import PromiseResolver, Recipe, available
from .spec import OpSpec
from .step import Site, Step

Tensor = torch.Tensor


class RuleChooser(Protocol):
    """What the planner needs from a rule set (:class:`dynamiclrp.rules.RuleSet` implements it)."""

    @property
    def model(self) -> torch.nn.Module | None: ...

    @property
    def override(self) -> Any: ...

    def spec_for(self, node_type: str) -> OpSpec | None: ...

    def rule_for(self, site: Site) -> Any: ...


class Planner:
    """Compiles a rule set against one graph.

    Parameters
    ----------
    graph : GraphView
    rules : RuleChooser
        The rule set (registry rows and a rule per node).
    requested : dict
        ``slot -> key`` of the requested input tensors present in the graph.
    sources : set of int
        Slots that are activation sources (requested non-parameter tensors).
    known : dict
        ``slot -> key`` of every tensor the caller holds (requested inputs and outputs).
    everywhere : bool
        Propagate through every node, not only those that lead to a requested input (the ledger needs this).
    model : torch.nn.Module or None
        Used to name parameters and layers.
    specs : list of OpSpec or None
        The registry row of every node, when the caller already looked them up.
    params : ModelParams or None
        The model's parameters, to read frozen constants autograd does not keep.
    bind : bool
        Bind a rule to every node that must run (``False``: only the analysis, as the coverage report uses).
    """

    def __init__(self, graph: GraphView, rules: RuleChooser, requested: dict[int, int], sources: set[int],
                 known: dict[int, int], everywhere: bool, model: torch.nn.Module | None = None,
                 specs: list[OpSpec | None] | None = None, params: ModelParams | None = None, bind: bool = True):
        self.graph = graph
        self.rules = rules
        self.requested = requested
        self.model = model
        self.everywhere = everywhere
        n = len(graph)
        self.specs: list[OpSpec | None] = specs if specs is not None else [rules.spec_for(t) for t in graph.types]
        self.active = self._activation_flags(sources)
        self.needed_below = self._needed_below()
        # requested slots with nothing requested below them: relevance stops there
        self.terminal = {s for s in requested if not self.needed_below[graph.slot_node[s]]}
        self.resolver = PromiseResolver(graph, self.specs, known, params)
        self.analyses: dict[Any, Any] = {}  # per-plan memo for the rules' structural analyses
        self.bias_slots: set[int] = set()
        self._labels: dict[int, str] = {}
        self.steps: list[Step | None] = [None] * n
        self.run_node = [False] * n
        self.wanted: list[bool] = []
        if not bind:
            return
        self._check_supported()
        for i in graph.order:
            if everywhere or self.needed_below[i]:
                self.run_node[i] = True
                site = self.site(i)
                self.steps[i] = rules.rule_for(site).bind(site)
        # slots whose messages someone reads: a node that runs, or a requested tensor (others are dropped)
        self.wanted = [self.run_node[graph.slot_node[s]] or s in requested for s in range(len(graph.slot_node))]

    def site(self, i: int) -> Site:
        """The plan-time view of node ``i`` that rules bind to."""
        spec = self.specs[i]
        assert spec is not None
        return Site(self, i, spec, tuple(e >= 0 and self.active[e] for e in self.graph.edges[i]))

    # -----------------------------------------------------------------------------------------------------
    def _check_supported(self) -> None:
        missing: dict[str, list[int]] = {}
        for i, spec in enumerate(self.specs):
            if spec is None:
                missing.setdefault(self.graph.types[i], []).append(i)
        if not missing:
            return
        lines = []
        for name, idx in missing.items():
            op = forward_op_name(self.graph.nodes[idx[0]])
            lines.append(f"  - {name} ({len(idx)} node{'s' if len(idx) > 1 else ''}), produced by {op}")
        first = next(iter(missing))
        raise UnsupportedOperationError(
            "dynamiclrp has no relevance rule for these autograd node types:\n" + "\n".join(lines) + "\n"
            "Every op needs an explicit rule; nothing falls back silently. Register one on your rule set, e.g.\n"
            f"    rules = dynamiclrp.presets.epsilon().with_ops({{'{first}': dynamiclrp.rules.Routing()}})\n"
            "choosing the rule that matches the op (Routing for index/shape ops, Identity for element-wise "
            "non-linearities, Gradient when gradient x input is the right relevance, or your own Rule). See "
            "docs/rules.md, 'Custom operations'.")

    def _activation_flags(self, sources: set[int]) -> list[bool]:
        """Per slot: does the forward value depend on the data rather than on parameters alone?

        Activation sources are data leaves, lookups whose indices are data (registry rows with ``data_lookup``:
        embeddings) and requested non-parameter tensors. A leaf is data unless it is a parameter: an
        ``nn.Parameter``, or a plain tensor *used as one* (:meth:`_weights_by_use`: the weights of
        ``torch.func.functional_call``). Product rules treat operands that are not activations (weights,
        parameter-only subgraphs, constants) as constants. The flags are a property of the graph and of which
        tensors the caller declares data by requesting them.
        """
        weights = self._weights_by_use(sources)
        active = self._flags(sources, weights)
        if weights:
            # a plain tensor is a weight only where the other operand carries data (x @ W, conv(x, W)); a product
            # of two such tensors with no data in it (A @ B) keeps both as data
            wrong = {i for i in weights if not self._other_operand_active(i, active)}
            if wrong:
                active = self._flags(sources, weights - wrong)
        self.weights_by_use = weights
        return active

    def _flags(self, sources: set[int], weights: set[int]) -> list[bool]:
        g = self.graph
        active = [False] * len(g.slot_node)
        for i in reversed(g.order):  # producers before consumers
            spec = self.specs[i]
            if spec is not None and spec.family == "leaf":
                a = not isinstance(leaf_tensor(g.nodes[i]), torch.nn.Parameter) and i not in weights
            elif spec is not None and spec.data_lookup:
                a = True
            else:
                a = False
                for e in g.edges[i]:
                    if e >= 0 and active[e]:
                        a = True
                        break
            for s in g.slots_of(i):
                active[s] = a or s in sources
        return active

    def _layer_uses(self, i: int) -> list[tuple[int, int]] | None:
        """Where leaf ``i`` is used, through views: ``(node, input position)`` pairs, each a place where a model's
        parameter goes — an operand or the bias of a ``linear``/``conv`` op (kernels with ``operands`` and
        ``bias_pos``), an operand of an element-wise product, the weight or bias of a normalisation, the table of an
        embedding lookup, an addend — or ``None`` if it is used any other way."""
        g = self.graph
        uses: list[tuple[int, int]] = []
        todo = [g.slot_base[i]]
        seen = 0
        while todo:
            s = todo.pop()
            for c, pos in g.consumers[s]:
                seen += 1
                if seen > 64:
                    return None
                spec = self.specs[c]
                if spec is None:
                    return None
                if spec.family in ("linear", "conv"):
                    k = spec.kernel
                    if pos in getattr(k, "operands", ()) or pos == getattr(k, "bias_pos", None):
                        uses.append((c, pos))
                        continue
                    return None
                if ((spec.family == "product" and spec.elementwise == "binary" and pos in (0, 1))
                        or (spec.family == "norm" and pos >= 1) or (spec.family == "embedding" and pos == 0)
                        or (spec.family == "add" and spec.elementwise == "binary")):
                    uses.append((c, pos))
                    continue
                if spec.view and sum(1 for e in g.edges[c] if e >= 0) == 1 and (g.n_out[c] or 1) == 1:
                    todo.append(g.slot_base[c])
                    continue
                return None
        return uses or None

    def _weights_by_use(self, sources: set[int]) -> set[int]:
        """Leaves holding plain tensors (not ``nn.Parameter``, not requested) that are used only as operands or
        biases of linear/convolution ops: candidates for weights passed as plain tensors."""
        g = self.graph
        found: set[int] = set()
        self._uses: dict[int, list[tuple[int, int]]] = {}
        for i, t in enumerate(g.types):
            if t != "AccumulateGrad" or g.slot_base[i] in sources:
                continue
            if isinstance(leaf_tensor(g.nodes[i]), torch.nn.Parameter):
                continue
            uses = self._layer_uses(i)
            if uses is not None:
                found.add(i)
                self._uses[i] = uses
        return found

    def _other_operand_active(self, i: int, active: list[bool]) -> bool:
        """Whether every use of leaf ``i`` meets data: the other operand of a layer op, a product or a sum is an
        activation (a normalisation's weight or an embedding table qualify by their place alone)."""
        g = self.graph
        for c, pos in self._uses[i]:
            spec = self.specs[c]
            edges = g.edges[c]
            if spec.family in ("linear", "conv"):
                ops = tuple(getattr(spec.kernel, "operands", ()))
                others = [ops[1 - ops.index(pos)]] if pos in ops else list(ops)  # a bias: any data operand
            elif spec.family in ("product", "add"):  # a factor or an addend of data (a scale, a bias)
                others = [1 - pos]
            else:
                continue
            if not any(0 <= o < len(edges) and edges[o] >= 0 and active[edges[o]] for o in others):
                return False
        return True

    def _needed_below(self) -> list[bool]:
        """Per node: does some requested slot lie strictly below it (so its rule must run)?"""
        g = self.graph
        has_req = [False] * len(g)
        for s in self.requested:
            has_req[g.slot_node[s]] = True
        needed = [False] * len(g)  # node or something below it is requested
        below = [False] * len(g)
        for i in reversed(g.order):
            b = False
            for e in g.edges[i]:
                if e >= 0 and needed[g.slot_node[e]]:
                    b = True
                    break
            below[i] = b
            needed[i] = b or has_req[i]
        return below

    def rebind(self, graph: GraphView | None, model: torch.nn.Module | None) -> "Planner":
        """This plan for another graph with the same signature (the steps hold no graph objects)."""
        clone = copy.copy(self)
        clone.graph = graph  # type: ignore[assignment]  # None only inside the cache, never run
        clone.model = model
        clone.resolver = copy.copy(self.resolver)
        clone.resolver.graph = graph  # type: ignore[assignment]
        clone.resolver.recipes = dict(self.resolver.recipes)
        clone.resolver.fallbacks = dict(self.resolver.fallbacks)
        clone.resolver.params = None if model is None else ModelParams(model)
        clone.analyses = {}
        clone._labels = {}
        return clone

    # -- what rules call while binding -----------------------------------------------------------------------
    def need_value(self, slot: int) -> Recipe:
        """Declare that a step will read the full forward value of ``slot`` once per run (a promise, if it is not
        saved); returns its recipe (:class:`~dynamiclrp.core.promises.Unavailable` when it cannot be had)."""
        return self.resolver.request(slot)

    def need_support(self, slot: int) -> Recipe:
        """Declare that a step will read the value of ``slot`` on the support of its gradient-form relevance once
        per run (:meth:`~dynamiclrp.core.run.Run.support`); returns its recipe."""
        return self.resolver.request_support(slot)

    def need_const(self, node: int, pos: int) -> Recipe:
        """Declare that a step will read the constant input ``pos`` of ``node`` once per run."""
        return self.resolver.request_const(node, pos)

    def can_value(self, slot: int) -> bool:
        """Whether the full value of ``slot`` can be obtained (without requesting it; a rule that must have it can
        still get a last resort from :meth:`need_value`: :meth:`PromiseResolver.request`)."""
        return available(self.resolver.recipe(slot))

    def can_support(self, slot: int) -> bool:
        """Whether the value of ``slot`` on its support can be obtained (without requesting it)."""
        return available(self.resolver.support(slot))

    def can_const(self, node: int, pos: int) -> bool:
        """Whether constant input ``pos`` of ``node`` can be obtained (without requesting it)."""
        return available(self.resolver.const(node, pos))

    def mark_bias(self, slot: int) -> None:
        """Record that ``slot`` is the additive bias of a linear/conv/norm op (for ledger names)."""
        self.bias_slots.add(slot)

    # -- names for messages and ledgers ----------------------------------------------------------------------
    def label(self, i: int) -> str:
        """Node ``i`` for messages and ledgers: ``"AddmmBackward0#12"``, or ``"classifier.2 (AddmmBackward0#12)"``
        when the model is known (the module owning the node's parameters, found by identity)."""
        got = self._labels.get(i)
        if got is None:
            got = self.graph.describe(i)
            module = self._module_of(i)
            if module is not None:
                got = f"{module or '(model)'} ({got})"
            self._labels[i] = got
        return got

    def _module_of(self, i: int) -> str | None:
        params = self.resolver.params
        return None if params is None else self.module_of(i, params)

    def module_of(self, i: int, params: ModelParams) -> str | None:
        """The module owning node ``i``'s parameters, found by identity: parameter leaves feeding it directly or
        through views (a trainable model), or the tensors it saved (a frozen one keeps its weight)."""
        g = self.graph
        tensors: list[Any] = []
        for e in g.edges[i]:
            hops = 0
            while e >= 0 and hops < 4:
                j = g.slot_node[e]
                spec = self.specs[j]
                if spec is not None and spec.family == "leaf":
                    tensors.append(leaf_tensor(g.nodes[j]))
                    break
                edges = [x for x in g.edges[j] if x >= 0]
                if spec is None or not spec.view or len(edges) != 1:
                    break
                e = edges[0]
                hops += 1
        spec = self.specs[i]
        if spec is not None:
            tensors += [saved(g.nodes[i], f) for _, f in spec.inputs_saved]
        for t in tensors:
            if isinstance(t, Tensor):
                owner = params.owner(t)
                if owner is not None:
                    return owner[0]
        return None

    def leaf_label(self, i: int) -> str:
        """An ``AccumulateGrad`` leaf: its parameter name when the model is known, else its kind and shape."""
        t = leaf_tensor(self.graph.nodes[i])
        params = self.resolver.params
        owner = params.owner(t) if params is not None else None
        if owner is not None and owner[2] is t:
            return f"{owner[0]}.{owner[1]}" if owner[0] else owner[1]
        kind = "parameter" if isinstance(t, torch.nn.Parameter) else "tensor"
        return f"{kind} {tuple(t.shape)} (AccumulateGrad#{i})"


class PlanCache:
    """Plans keyed by graph signature, least recently used evicted first.

    A plan is reused only for a graph whose signature (node types, edges, output shapes and dtypes, parameter
    leaves, planning-relevant saved fields, requested and known slots, ledger mode) is identical, so a
    different graph never gets a stale plan. Owned by a :class:`dynamiclrp.Explainer`; there is no global cache.
    """

    def __init__(self, size: int = 16):
        if size < 1:
            raise ValueError("the plan cache needs room for at least one plan")
        self.size = size
        self._plans: OrderedDict[tuple, Planner] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> Planner | None:
        plan = self._plans.get(key)
        if plan is None:
            self.misses += 1
            return None
        self._plans.move_to_end(key)
        self.hits += 1
        return plan

    def put(self, key: tuple, plan: Planner) -> None:
        self._plans[key] = plan
        self._plans.move_to_end(key)
        while len(self._plans) > self.size:
            self._plans.popitem(last=False)

    def __len__(self) -> int:
        return len(self._plans)
