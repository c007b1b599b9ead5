"""The Promise System: recovering forward values that autograd did not save.

Autograd keeps only what gradients need. ``AddBackward0`` keeps neither operand, ``SumBackward0`` keeps no input,
``SoftmaxBackward0`` keeps its output but not its input, and with frozen weights ``AddmmBackward0`` does not keep
its input activation. A rule that needs such a value makes a **promise** (Lee & Millan Arias, Def. 2): one
**branch** per missing value walks *down* the graph (towards the inputs) through pass-through ops, recording
each op's forward step, until it reaches an **Arg Node** — a node whose output can be read or rebuilt from its
own saved tensors (Mm/Bmm/Conv recompute, Mul, norms, activations that save their result, embeddings, leaves,
requested tensors). The value is then **replayed forward** through the recorded steps to the origin, and the
promise is fulfilled.

A branch that meets a node which itself lacks the values to run forward (an ``Add``, a ``Cat``...) spawns a
nested promise on every input of that node: a **promise tree**. Branches that reach the same node share one
retrieval (**aggregation**): values are memoised per slot, so a diamond is computed once.

How this maps to the paper, and where we differ
-----------------------------------------------
* The paper interleaves the downward search with the relevance traversal, which can deadlock on residual
  diamonds; **pre-promises** break the deadlock by letting a branch *reach ahead* of the traversal frontier
  for values only. Here every branch reaches ahead: recipes are resolved at plan time, before any relevance
  moves, and evaluated on demand right before the origin's rule runs. The relevance itself is never carried by
  a branch, it moves through the ordinary topological traversal, which visits each pass-through node exactly
  once (the paper's Prop. 2); so the "backward replay down each branch" of the paper is the regular rule of
  each branch node, and a diamond node waits for all of its consumers as a promoted pre-promise would.
* In addition to walking down, a branch first checks whether a *consumer* of the slot saved it as an input
  (``Mm`` saves its input activation, ``LayerNorm`` saves its input...). That is a zero-cost Arg Node the paper
  does not use.
* Recipes are keyed by node index, not by node object, so a plan and all its promise structures are reused for
  every graph with the same signature (the paper's cached promise paths, §4.4.1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from . import graph as G
from .errors import ValueUnavailableError

if TYPE_CHECKING:  # pragma: no cover
    from .rules.base import OpSpec


# -----------------------------------------------------------------------------------------------------------
# Recipes: how to obtain the forward value of one slot
# -----------------------------------------------------------------------------------------------------------
class Recipe:
    """How the forward value of one slot is obtained (a node of a promise tree)."""

    __slots__ = ("slot",)
    is_arg = False  # Arg Nodes terminate a branch

    def __init__(self, slot: int):
        self.slot = slot

    def children(self) -> tuple["Recipe", ...]:
        return ()


class Known(Recipe):
    """A tensor we hold: a requested input or an explained output."""

    __slots__ = ("key",)
    is_arg = True

    def __init__(self, slot: int, key: int):
        super().__init__(slot)
        self.key = key


class Leaf(Recipe):
    """An ``AccumulateGrad`` leaf: the parameter or input tensor itself (an Arg Node)."""

    __slots__ = ("node",)
    is_arg = True

    def __init__(self, slot: int, node: int):
        super().__init__(slot)
        self.node = node


class Saved(Recipe):
    """A value autograd saved: a node's own output, or a consumer's saved input (an Arg Node)."""

    __slots__ = ("node", "field")
    is_arg = True

    def __init__(self, slot: int, node: int, field: str):
        super().__init__(slot)
        self.node = node
        self.field = field


class Rebuild(Recipe):
    """An Arg Node: the producer recomputes its output from its own saved tensors (``x @ W``, ``conv``...)."""

    __slots__ = ("node", "nr")
    is_arg = True

    def __init__(self, slot: int, node: int, nr: int):
        super().__init__(slot)
        self.node = node
        self.nr = nr


class Replay(Recipe):
    """A forward step from the values of the producer's inputs.

    With one input recipe this is a pass-through step of a branch (view, permute, slice, scale by a saved
    constant...). With several it is a promise-generating node (``Add``, ``Cat``, ``Stack``...): each input is a
    nested branch, i.e. a promise tree.
    """

    __slots__ = ("node", "nr", "inputs")

    def __init__(self, slot: int, node: int, nr: int, inputs: tuple["Recipe | None", ...]):
        super().__init__(slot)
        self.node = node
        self.nr = nr
        self.inputs = inputs

    def children(self) -> tuple[Recipe, ...]:
        return tuple(r for r in self.inputs if r is not None)

    @property
    def generates_promise(self) -> bool:
        return len(self.children()) > 1


class Unavailable(Recipe):
    """No way to obtain the value; ``reason`` explains the chain that failed."""

    __slots__ = ("reason",)

    def __init__(self, slot: int, reason: str):
        super().__init__(slot)
        self.reason = reason


@dataclass
class PromiseRecord:
    """A fulfilled promise, kept when tracing is on (tests compare ``value`` with the true forward value).

    Attributes
    ----------
    slot : int
        The slot whose value was recovered.
    node, output_nr : autograd node and output number that produced the value in the forward pass.
    origin : str
        The rule (node) that asked for the value.
    path : list of str
        The branch, from the origin's operand down to the Arg Node (``"ViewBackward0#3 -> MmBackward0#4"``).
    arg : str
        How the branch ended (``"saved"``, ``"rebuild"``, ``"leaf"``, ``"known"``) and at which node.
    nested : int
        Number of promise-generating nodes in the tree (0 for a plain branch).
    pre_promises : list of str
        Nodes of the tree whose output other consumers also use (the diamonds where the paper creates a
        pre-promise: the value is forwarded up the branch at once, while the node's relevance waits for all
        of its consumers in the regular traversal).
    depth : int
        Longest branch of the tree, in nodes (the paper's promise depth, Def. 4).
    value : torch.Tensor
    """

    slot: int
    node: Any
    output_nr: int
    origin: str
    path: list[str]
    arg: str
    nested: int
    value: torch.Tensor
    pre_promises: list[str] = field(default_factory=list)
    depth: int = 0


# -----------------------------------------------------------------------------------------------------------
# Plan time: resolving recipes
# -----------------------------------------------------------------------------------------------------------
class PromiseResolver:
    """Resolves, at plan time, a recipe for every slot whose value some rule needs.

    Parameters
    ----------
    graph : GraphView
    specs : list
        The registry row of every node (``None`` for unknown node types).
    known : dict
        ``slot -> key`` of tensors the caller holds (requested inputs and explained outputs).
    """

    def __init__(self, graph: G.GraphView, specs: Sequence["OpSpec | None"], known: dict[int, int]):
        self.graph = graph
        self.specs = specs
        self.known = known
        self.recipes: dict[int, Recipe] = {}
        self.requests: dict[int, int] = {}  # slot -> number of rule requests (for freeing)

    def request(self, slot: int) -> Recipe:
        """Register that a rule will need the value of ``slot`` and return its recipe."""
        self.requests[slot] = self.requests.get(slot, 0) + 1
        return self.recipe(slot)

    def recipe(self, slot: int) -> Recipe:
        """The memoised recipe of ``slot`` (resolved iteratively: no recursion limit on long branches)."""
        got = self.recipes.get(slot)
        if got is not None:
            return got
        stack = [slot]
        while stack:
            s = stack[-1]
            if s in self.recipes:
                stack.pop()
                continue
            pending = self._resolve(s)
            if pending:
                stack.extend(pending)
            else:
                stack.pop()
        return self.recipes[slot]

    # direct strategies, cheapest first; returns slots still to resolve (for replay) or [] when done
    def _resolve(self, s: int) -> list[int]:
        g = self.graph
        if s in self.known:
            self.recipes[s] = Known(s, self.known[s])
            return []
        node_i = g.slot_node[s]
        nr = g.slot_nr[s]
        node = g.nodes[node_i]
        spec = self.specs[node_i]
        if g.types[node_i] == "AccumulateGrad":
            self.recipes[s] = Leaf(s, node_i)
            return []
        if spec is not None:
            for out_nr, fld in spec.results:
                if out_nr == nr and G.saved(node, fld) is not None:
                    self.recipes[s] = Saved(s, node_i, fld)
                    return []
        for cons_i, pos in g.consumers[s]:
            cspec = self.specs[cons_i]
            if cspec is None:
                continue
            for in_pos, fld in cspec.inputs_saved:
                if in_pos == pos and G.saved(g.nodes[cons_i], fld) is not None:
                    self.recipes[s] = Saved(s, cons_i, fld)
                    return []
        if spec is None:
            self.recipes[s] = Unavailable(s, f"{g.describe(node_i)} has no registry entry")
            return []
        if spec.rebuild is not None and _can_rebuild(spec, node, nr):
            self.recipes[s] = Rebuild(s, node_i, nr)
            return []
        if spec.replay is not None:
            edges = g.edges[node_i]
            wanted = spec.replay_inputs
            if wanted is None:
                wanted = tuple(range(len(edges)))  # every input: a constant we do not know blocks the replay
            elif callable(wanted):
                wanted = tuple(wanted(node, edges))
            missing_const = [k for k in wanted if k >= len(edges) or edges[k] < 0]
            if missing_const:
                self.recipes[s] = Unavailable(
                    s, f"{g.describe(node_i)} needs input {missing_const[0]}, a constant autograd did not keep")
                return []
            todo = [edges[k] for k in wanted if edges[k] not in self.recipes]
            if todo:
                return todo
            inputs: list[Recipe | None] = [None] * len(edges)
            for k in wanted:
                child = self.recipes[edges[k]]
                if isinstance(child, Unavailable):
                    self.recipes[s] = Unavailable(s, f"{g.describe(node_i)} <- {child.reason}")
                    return []
                inputs[k] = child
            self.recipes[s] = Replay(s, node_i, nr, tuple(inputs))
            return []
        self.recipes[s] = Unavailable(
            s, f"{g.describe(node_i)} saved neither its output nor enough to recompute it")
        return []


def _can_rebuild(spec: "OpSpec", node: Any, nr: int) -> bool:
    probe = getattr(spec.kernel, "can_rebuild", None)
    return True if probe is None else bool(probe(node, nr))


# -----------------------------------------------------------------------------------------------------------
# Run time: evaluating recipes
# -----------------------------------------------------------------------------------------------------------
class ValueStore:
    """Evaluates recipes on demand with memoisation (aggregation) and frees values after their last use.

    Parameters
    ----------
    graph : GraphView
    specs : list of OpSpec or None
    resolver : PromiseResolver
    tensors : list of torch.Tensor
        Tensors the caller holds, indexed by the keys used in ``Known`` recipes.
    trace : bool
        Keep a :class:`PromiseRecord` for every value obtained through a branch (tests, debugging).
    """

    def __init__(self, graph: G.GraphView, specs, resolver: PromiseResolver, tensors: Sequence[torch.Tensor],
                 trace: bool = False):
        self.graph = graph
        self.specs = specs
        self.resolver = resolver
        self.tensors = tensors
        self.memo: dict[int, torch.Tensor] = {}
        self.remaining = dict(resolver.requests)
        self.trace = trace
        self.records: list[PromiseRecord] = []

    def get(self, slot: int, origin: str = "") -> torch.Tensor:
        """The forward value of ``slot``.

        Raises
        ------
        ValueUnavailableError
            When the graph holds no way to obtain it (e.g. a bias that does not require grad).
        """
        val = self.memo.get(slot)
        if val is None:
            recipe = self.resolver.recipe(slot)
            val = self._evaluate(recipe)
            if self.trace:
                self._record(recipe, val, origin)
        left = self.remaining.get(slot)
        if left is not None:
            if left <= 1:
                self.remaining.pop(slot)
                self.memo.pop(slot, None)
            else:
                self.remaining[slot] = left - 1
                self.memo[slot] = val
        return val

    def _evaluate(self, root: Recipe) -> torch.Tensor:
        # iterative post-order evaluation; children are memoised so shared sub-trees run once
        local: dict[int, torch.Tensor] = {}
        stack: list[Recipe] = [root]
        while stack:
            rec = stack[-1]
            if rec.slot in local:
                stack.pop()
                continue
            hit = self.memo.get(rec.slot)
            if hit is not None:
                local[rec.slot] = hit
                stack.pop()
                continue
            kids = [c for c in rec.children() if c.slot not in local]
            if kids:
                stack.extend(kids)
                continue
            local[rec.slot] = self._compute(rec, local)
            stack.pop()
        return local[root.slot]

    def _compute(self, rec: Recipe, local: dict[int, torch.Tensor]) -> torch.Tensor:
        g = self.graph
        if isinstance(rec, Known):
            return self.tensors[rec.key].detach()
        if isinstance(rec, Leaf):
            return G.leaf_tensor(g.nodes[rec.node]).detach()
        if isinstance(rec, Saved):
            return G.saved(g.nodes[rec.node], rec.field).detach()
        if isinstance(rec, Rebuild):
            spec = self.specs[rec.node]
            with torch.no_grad():
                out = spec.rebuild(g.nodes[rec.node], rec.nr)
            if out is None:
                raise ValueUnavailableError(f"{g.describe(rec.node)} could not rebuild its output")
            return out
        if isinstance(rec, Replay):
            spec = self.specs[rec.node]
            args = [None if r is None else local[r.slot] for r in rec.inputs]
            with torch.no_grad():
                return spec.replay(g.nodes[rec.node], args, rec.nr)
        assert isinstance(rec, Unavailable)
        node_i = g.slot_node[rec.slot]
        raise ValueUnavailableError(
            f"The forward value of output {g.slot_nr[rec.slot]} of {g.describe(node_i)} is needed by a rule but "
            f"cannot be recovered from the graph ({rec.reason}). This happens when an operand does not require "
            "grad, so autograd keeps neither it nor what produced it (e.g. a frozen bias). Let the parameters "
            "require grad (model.requires_grad_(True)) or choose a rule that does not need this value.")

    def _record(self, recipe: Recipe, value: torch.Tensor, origin: str) -> None:
        g = self.graph
        path: list[str] = []
        nested = 0
        rec: Recipe | None = recipe
        while isinstance(rec, Replay):
            path.append(g.describe(rec.node))
            kids = rec.children()
            if len(kids) > 1:
                nested += 1 + _count_nested(kids)
                break
            rec = kids[0] if kids else None
        arg = "promise tree" if nested else "unresolved"
        if rec is not None and not isinstance(rec, Replay):
            kind = type(rec).__name__.lower()
            where = getattr(rec, "node", None)
            arg = f"{kind} at {g.describe(where)}" if where is not None else kind
            if not isinstance(rec, Known):
                path.append(g.describe(where) if where is not None else kind)
        pre, depth = self._tree_facts(recipe)
        self.records.append(PromiseRecord(
            slot=recipe.slot, node=g.nodes[g.slot_node[recipe.slot]], output_nr=g.slot_nr[recipe.slot],
            origin=origin, path=path, arg=arg, nested=nested, value=value, pre_promises=pre, depth=depth))

    def _tree_facts(self, recipe: Recipe) -> tuple[list[str], int]:
        """Shared nodes (pre-promise sites) and the depth of a promise tree."""
        g = self.graph
        pre: list[str] = []
        depth: dict[int, int] = {}
        order: list[Recipe] = []
        stack = [recipe]
        seen: set[int] = set()
        while stack:
            r = stack.pop()
            if r.slot in seen:
                continue
            seen.add(r.slot)
            order.append(r)
            stack.extend(r.children())
        for r in reversed(order):
            kids = r.children()
            depth[r.slot] = 1 + max((depth[k.slot] for k in kids), default=0)
            if r is not recipe and len(g.consumers[r.slot]) > 1:
                pre.append(g.describe(g.slot_node[r.slot]))
        return pre, depth[recipe.slot]


def recover_all(outputs: torch.Tensor | Sequence[torch.Tensor], inputs: Sequence[torch.Tensor] = (),
                rules: Any = None) -> list[tuple[Any, int, str, torch.Tensor]]:
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

    Returns
    -------
    list of (node, output_nr, how, value)
        ``how`` is the recipe kind at the top of the branch (``"saved"``, ``"rebuild"``, ``"replay"``,
        ``"leaf"``, ``"known"``).
    """
    from .rules.ruleset import resolve_rules

    outs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    rule_set = resolve_rules(rules)
    graph = G.GraphView([(o.grad_fn, o.output_nr) for o in outs])
    held = list(outs) + list(inputs)
    known: dict[int, int] = {}
    for k, o in enumerate(outs):
        known.setdefault(graph.root_slots[k], k)
    for k, t in enumerate(inputs):
        edge = G.gradient_edge(t)
        slot = None if edge is None else graph.slot_of(*edge)
        if slot is not None:
            known.setdefault(slot, len(outs) + k)
    specs = [rule_set.spec_for(t) for t in graph.types]
    resolver = PromiseResolver(graph, specs, known)
    store = ValueStore(graph, specs, resolver, held)
    found = []
    with torch.no_grad():
        for slot in range(len(graph.slot_node)):
            recipe = resolver.recipe(slot)
            if isinstance(recipe, Unavailable):
                continue
            value = store.get(slot)
            found.append((graph.nodes[graph.slot_node[slot]], graph.slot_nr[slot], type(recipe).__name__.lower(),
                          value))
    return found


def _count_nested(recipes: Sequence[Recipe]) -> int:
    count = 0
    stack = list(recipes)
    seen: set[int] = set()
    while stack:
        r = stack.pop()
        if r.slot in seen:
            continue
        seen.add(r.slot)
        kids = r.children()
        if len(kids) > 1:
            count += 1
        stack.extend(kids)
    return count

