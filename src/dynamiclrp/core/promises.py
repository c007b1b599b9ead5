"""The Promise System: recovering forward values that autograd did not save.

Autograd keeps only what gradients need. ``AddBackward0`` keeps neither operand, ``SumBackward0`` keeps no input,
``SoftmaxBackward0`` keeps its output but not its input, and with frozen weights ``AddmmBackward0`` keeps neither
its input activation nor its bias. A rule that needs such a value makes a **promise** (Lee & Millan Arias, Def. 2):
one **branch** per missing value walks *down* the graph (towards the inputs) through pass-through ops, recording
each op's forward step, until it reaches an **Arg Node** — a node whose output can be read or rebuilt from its own
saved tensors (Mm/Bmm/Conv recompute, Mul, norms, activations that save their result, embeddings, leaves,
requested tensors). The value is then **replayed forward** through the recorded steps to the origin, and the
promise is fulfilled.

A branch that meets a node which itself lacks the values to run forward (an ``Add``, a ``Cat``...) spawns a
nested promise on every input of that node: a **promise tree**. Branches that reach the same node share one
retrieval (**aggregation**): values are memoised per slot, so a diamond is computed once.

Three ways to obtain a value, cheapest and most exact first
-----------------------------------------------------------
**Full values** (:meth:`PromiseResolver.recipe`): the tensor everywhere. ``Known`` (a tensor the caller passed:
an explained output or a requested input), ``Leaf``, ``Saved`` (the node's saved output, or a *consumer's*
saved input — ``Mm`` saves its input activation, ``LayerNorm`` its input: a zero-cost Arg Node the paper does
not use), ``Rebuild`` (an Arg Node), ``Replay`` (a branch step or a promise-generating node).

**Constant operands** (:meth:`PromiseResolver.const`): an input that does not require grad has no node in the
graph. Its value is a field the node saved (a frozen weight, a product's constant factor) or, for a frozen bias
that autograd never keeps, the parameter of the module that owns the op's saved weight — only when the caller
passed ``model=`` (:class:`ModelParams`; PyTorch's naming convention ``weight`` → ``bias`` on that module, rows
sliced like the weight).

**Values on the support** (:meth:`PromiseResolver.support`): a z-rule reads a value only where gradient-form
relevance arrives (``R = value · G``), and relevance arrives only where the consumers of the slot send it. So a
value can be recovered *upwards*, from what its consumers kept: through a selection (view, index, gather,
max, pooling with indices...) the selected positions of the input equal the known output; a ReLU's saved output
is its input wherever it passes relevance; ``tanh``/``sigmoid``/``exp`` invert their saved output; an addend is
the sum minus the other operand; a factor is the product divided by the known other factor; and a one-hot
weighted sum ``(z * w).sum(d)`` hands its total back to the single weighted position of each group. Each part
comes with the mask of positions where it is exact, and every position where relevance can arrive is covered.

How this maps to the paper, and where we differ
-----------------------------------------------
* The paper interleaves the downward search with the relevance traversal, which can deadlock on residual
  diamonds; **pre-promises** break the deadlock by letting a branch *reach ahead* of the traversal frontier
  for values only. Here every branch reaches ahead: recipes are resolved at plan time, before any relevance
  moves, and evaluated on demand right before the origin's rule runs. The relevance itself is never carried by
  a branch, it moves through the ordinary topological traversal, which visits each pass-through node exactly
  once (the paper's Prop. 2); so the "backward replay down each branch" of the paper is the regular rule of
  each branch node, and a diamond node waits for all of its consumers as a promoted pre-promise would.
* Consumer-saved inputs, constant operands and support values are ours (the paper only walks down).
* Recipes are keyed by node index, not by node object, so a plan and all its promise structures are reused for
  every graph with the same signature (the paper's cached promise paths, §4.4.1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Hashable, Iterator, Sequence

import torch

from ..errors import ValueUnavailableError
from .checks import DeferredChecks
from .graph import GraphView, call_backward, fit_to, leaf_tensor, output_meta, saved

if TYPE_CHECKING:  # pragma: no cover
    from .params import ModelParams
    from .spec import OpSpec

Tensor = torch.Tensor
Mask = Tensor | None  # positions where a support value is exact; None: everywhere

#: longest chain of consumers a support walk follows (support values come from nearby ops)
_SUPPORT_DEPTH = 48


# -----------------------------------------------------------------------------------------------------------
# Recipes: how to obtain one value
# -----------------------------------------------------------------------------------------------------------
class Recipe:
    """How a value is obtained (a node of a promise tree). ``key`` identifies the value for memoisation."""

    __slots__ = ("key",)
    support = False  # evaluates to (value, mask) instead of a tensor

    def __init__(self, key: Hashable):
        self.key = key

    def children(self) -> tuple["Recipe", ...]:
        return ()


class Known(Recipe):
    """A tensor we hold: a requested input or an explained output."""

    __slots__ = ("index",)

    def __init__(self, slot: int, index: int):
        super().__init__(slot)
        self.index = index


class Leaf(Recipe):
    """An ``AccumulateGrad`` leaf: the parameter or input tensor itself (an Arg Node)."""

    __slots__ = ("node",)

    def __init__(self, slot: int, node: int):
        super().__init__(slot)
        self.node = node


class Saved(Recipe):
    """A value autograd saved: a node's own output, or a consumer's saved input (an Arg Node)."""

    __slots__ = ("node", "field")

    def __init__(self, slot: int, node: int, field: str):
        super().__init__(slot)
        self.node = node
        self.field = field


class Rebuild(Recipe):
    """An Arg Node: the producer recomputes its output from its own saved tensors (``x @ W``, ``conv``...)."""

    __slots__ = ("node", "nr")

    def __init__(self, slot: int, node: int, nr: int):
        super().__init__(slot)
        self.node = node
        self.nr = nr


class Replay(Recipe):
    """A forward step from the values of the producer's inputs.

    With one input recipe this is a pass-through step of a branch (view, permute, slice, scale by a saved
    constant...). With several it is a promise-generating node (``Add``, ``Cat``, ``Stack``...): each input is a
    nested branch, i.e. a promise tree. Inputs that do not require grad are :class:`Const` recipes.
    """

    __slots__ = ("node", "nr", "inputs")

    def __init__(self, slot: int, node: int, nr: int, inputs: tuple["Recipe | None", ...]):
        super().__init__(slot)
        self.node = node
        self.nr = nr
        self.inputs = inputs

    def children(self) -> tuple[Recipe, ...]:
        return tuple(r for r in self.inputs if r is not None)


class Unview(Recipe):
    """The full value of ``slot`` recovered *upwards* through a one-to-one rearrangement that consumes it (a view,
    transpose, permute or clone): the consumer's backward maps its output's value back (``x = y.reshape(...)``).
    Used before recomputing a costly op's output: a projection whose output a reshape hands to an op that saved it
    (attention saves its query, key and value) costs nothing to recover."""

    __slots__ = ("node", "up")

    def __init__(self, slot: int, node: int, up: Recipe):
        super().__init__(slot)
        self.node = node
        self.up = up

    def children(self) -> tuple[Recipe, ...]:
        return (self.up,)


class Total(Recipe):
    """The full value of ``slot`` recovered *upwards*: an addend of a sum whose output and other addend are both
    known in full (``h = sum − other``, e.g. a residual stream from the normalisation layer that saved the sum), or
    the input of an invertible element-wise op that saved its output (``x = logit(sigmoid(x))``), checked to be exact
    everywhere when evaluated."""

    __slots__ = ("slot", "part")

    def __init__(self, slot: int, part: "Part"):
        super().__init__(slot)
        self.slot = slot
        self.part = part

    def children(self) -> tuple[Recipe, ...]:
        return (self.part,)


class Const(Recipe):
    """Input ``pos`` of node ``node``, an operand that does not require grad (no node of its own).

    ``source`` is ``("saved", field)`` (the node saved it), ``("param", name, start, length)`` (a parameter of
    the caller's model, rows ``start:start + length`` when the op used a slice of it) or ``("absent",)`` (the op
    had no such operand, e.g. a convolution without bias: the value is ``None``).
    """

    __slots__ = ("node", "pos", "source")

    def __init__(self, node: int, pos: int, source: tuple):
        super().__init__(("const", node, pos))
        self.node = node
        self.pos = pos
        self.source = source


class Support(Recipe):
    """The value of ``slot`` on the support of the gradient-form relevance it can receive: one part per
    consumer that can send relevance; the parts' masks together cover every such position.

    ``missing`` lists consumers that could not give a part (they keep nothing to recover the value from). Such
    a support is accepted at plan time only if, when evaluated, the other parts know the value *everywhere*
    (e.g. a ``tanh`` that saturates nowhere); otherwise evaluation raises :class:`ValueUnavailableError`.
    """

    __slots__ = ("slot", "parts", "missing")
    support = True

    def __init__(self, slot: int, parts: tuple["Part", ...], missing: str = ""):
        super().__init__(("support", slot))
        self.slot = slot
        self.parts = parts
        self.missing = missing

    def children(self) -> tuple[Recipe, ...]:
        return self.parts


class Part(Recipe):
    """The value of ``slot`` where consumer ``node`` (at input ``pos``) can send relevance back to it."""

    __slots__ = ("slot", "node", "pos", "ups")
    support = True
    kind = "part"

    def __init__(self, slot: int, node: int, pos: int, ups: tuple["Recipe | None", ...] = ()):
        super().__init__(("part", slot, node, pos))
        self.slot = slot
        self.node = node
        self.pos = pos
        self.ups = ups

    def children(self) -> tuple[Recipe, ...]:
        return tuple(r for r in self.ups if r is not None)


class SelectPart(Part):
    """A selection (every output element a copy of one input element, or a constant): the input equals the
    output wherever the node's backward routes something; ``ups`` holds one recipe per output (``None`` for an
    output no one consumes)."""

    kind = "selection"


class InversePart(Part):
    """An element-wise op that saved its output and is invertible where it passes relevance (ReLU: ``x = y``
    where ``y > 0``; ``tanh``, ``sigmoid``, ``exp``...: the inverse map)."""

    kind = "inverse"


class SumPart(Part):
    """An addend of ``out = c0·a + c1·b``: ``(out − c_other·other) / c_self``; ``ups = (out, other)``."""

    kind = "sum"


class ScalePart(Part):
    """A factor of ``out = a·b`` (or ``a / b``) whose other factor is known: ``ups = (out, other)``; exact where
    the other factor is non-zero (elsewhere the product sends no gradient-form relevance back)."""

    kind = "scale"


class WeightedSumPart(Part):
    """``(z · w).sum(dims)`` with ``w`` known: where one position of a group has ``w ≠ 0`` (a one-hot choice),
    that position's ``z`` is the group's total over ``w``. ``node`` is the product, ``ups = (total, w)`` and
    ``reducer`` the sum node."""

    __slots__ = ("reducer",)
    kind = "weighted sum"

    def __init__(self, slot: int, node: int, pos: int, ups: tuple["Recipe | None", ...], reducer: int):
        super().__init__(slot, node, pos, ups)
        self.reducer = reducer


class Unavailable(Recipe):
    """No way to obtain the value; ``reason`` explains the chain that failed."""

    __slots__ = ("reason",)

    def __init__(self, key: Hashable, reason: str):
        super().__init__(key)
        self.reason = reason


def available(recipe: Recipe | None) -> bool:
    """Whether ``recipe`` can be evaluated (it is not :class:`Unavailable`)."""
    return recipe is not None and not isinstance(recipe, Unavailable)


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
        How the branch ended (``"saved"``, ``"rebuild"``, ``"leaf"``, ``"known"``, ``"support"``) and where.
    nested : int
        Number of promise-generating nodes in the tree (0 for a plain branch).
    value : torch.Tensor
    pre_promises : list of str
        Nodes of the tree whose output other consumers also use (the diamonds where the paper creates a
        pre-promise: the value is forwarded up the branch at once, while the node's relevance waits for all
        of its consumers in the regular traversal).
    depth : int
        Longest branch of the tree, in nodes (the paper's promise depth, Def. 4).
    mask : torch.Tensor or None
        For a value on the support: where it is exact (``None``: everywhere).
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
    mask: torch.Tensor | None = None


# -----------------------------------------------------------------------------------------------------------
# Plan time: resolving recipes
# -----------------------------------------------------------------------------------------------------------
class PromiseResolver:
    """Resolves, at plan time, a recipe for every value some rule needs.

    Parameters
    ----------
    graph : GraphView
    specs : list
        The registry row of every node (``None`` for unknown node types).
    known : dict
        ``slot -> index`` of tensors the caller holds (requested inputs and explained outputs).
    params : ModelParams or None
        The caller's model, to resolve frozen constants autograd does not keep.
    """

    def __init__(self, graph: GraphView, specs: Sequence["OpSpec | None"], known: dict[int, int],
                 params: "ModelParams | None" = None):
        self.graph = graph
        self.specs = specs
        self.known = known
        self.params = params
        self.recipes: dict[Hashable, Recipe] = {}
        self.fallbacks: dict[int, Recipe] = {}  # last-resort full values, for the rules that requested them
        self.requests: dict[Hashable, int] = {}  # recipe key -> number of rule requests (for freeing)
        self._upward_busy: set[int] = set()  # slots whose value is being recovered from their consumers
        self._support_busy: set[int] = set()

    # -- what rules call ----------------------------------------------------------------------------------
    def request(self, slot: int) -> Recipe:
        """Register that a rule will read the full value of ``slot`` once per run; returns its recipe.

        When nothing else gives the value, a last resort: the input of an invertible element-wise consumer that
        saved its output (``x = logit(sigmoid(x))``), checked when evaluated to be exact everywhere (not saturated).
        It serves this request only — no other recipe is built on it, and :meth:`recipe` does not offer it — so
        rules that can do without the value are not steered towards a value that may fail at run time."""
        recipe = self.recipe(slot)
        if not available(recipe):
            fallback = self.fallbacks.get(slot) or self._inverse_fallback(slot)
            if fallback is not None:
                self.fallbacks[slot] = fallback
                recipe = fallback
        return self._count(recipe)

    def _inverse_fallback(self, s: int) -> Recipe | None:
        g = self.graph
        for c, pos in g.consumers[s]:
            spec = self.specs[c]
            k = spec.kernel if spec is not None else None
            if (getattr(k, "inverse", None) is not None and getattr(k, "from_output", None) is not None
                    and saved(g.nodes[c], k.y_field) is not None):
                return Total(s, InversePart(s, c, pos))
        return None

    def request_support(self, slot: int) -> Recipe:
        """Register that a rule will read the value of ``slot`` on its support once per run."""
        return self._count(self.support(slot))

    def request_const(self, node: int, pos: int) -> Recipe:
        """Register that a rule will read constant input ``pos`` of ``node`` once per run."""
        return self._count(self.const(node, pos))

    def _count(self, recipe: Recipe) -> Recipe:
        if available(recipe):
            self.requests[recipe.key] = self.requests.get(recipe.key, 0) + 1
        return recipe

    # -- full values --------------------------------------------------------------------------------------
    def recipe(self, slot: int) -> Recipe:
        """The memoised recipe of the full value of ``slot`` (resolved iteratively: no recursion limit on long
        branches)."""
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

    def _resolve(self, s: int) -> list[int]:
        """Direct strategies, cheapest first; returns slots still to resolve (for a replay) or [] when done."""
        g = self.graph
        direct = self._direct(s)
        if direct is not None:
            self.recipes[s] = direct
            return []
        node_i = g.slot_node[s]
        nr = g.slot_nr[s]
        node = g.nodes[node_i]
        spec = self.specs[node_i]
        if spec is None:
            self.recipes[s] = Unavailable(s, f"{g.describe(node_i)} has no registry entry")
            return []
        if spec.costly:  # a matrix product or convolution: first look for its output downstream
            cheap = self._cheap_up(s, 0)
            if cheap is not None:
                self.recipes[s] = cheap
                return []
        if spec.rebuild is not None and _can_rebuild(spec, node, nr):
            self.recipes[s] = Rebuild(s, node_i, nr)
            return []
        if spec.replay is None or not _can_replay(spec, node):
            self.recipes[s] = self._upward(
                s, f"{g.describe(node_i)} saved neither its output nor enough to recompute it")
            return []
        edges = g.edges[node_i]
        wanted = spec.replay_inputs
        if wanted is None:
            wanted = tuple(range(len(edges)))
        elif callable(wanted):
            wanted = tuple(wanted(node, edges))
        todo = [edges[k] for k in wanted if k < len(edges) and edges[k] >= 0 and edges[k] not in self.recipes]
        if todo:
            return todo
        inputs: list[Recipe | None] = [None] * len(edges)
        for k in wanted:
            child = self.recipes[edges[k]] if k < len(edges) and edges[k] >= 0 else self.const(node_i, k)
            if isinstance(child, Unavailable):
                self.recipes[s] = self._upward(s, f"{g.describe(node_i)} <- {child.reason}")
                return []
            inputs[k] = child
        replay = Replay(s, node_i, nr, tuple(inputs))
        if self.avoid(replay):  # a view of a projection's output: look downstream first
            replay = self._cheap_up(s, 0) or replay
        self.recipes[s] = replay
        return []

    def _direct(self, s: int) -> Recipe | None:
        """A value held at no cost: a requested input or explained output, a leaf, a saved output or a consumer's
        saved input."""
        g = self.graph
        if s in self.known:
            return Known(s, self.known[s])
        node_i = g.slot_node[s]
        if g.types[node_i] == "AccumulateGrad":
            return Leaf(s, node_i)
        spec = self.specs[node_i]
        if spec is not None:
            for out_nr, fld in spec.results:
                if out_nr == g.slot_nr[s] and saved(g.nodes[node_i], fld) is not None:
                    return Saved(s, node_i, fld)
        for cons_i, pos in g.consumers[s]:
            cspec = self.specs[cons_i]
            if cspec is None:
                continue
            for in_pos, fld in cspec.inputs_saved:
                if in_pos == pos and saved(g.nodes[cons_i], fld) is not None:
                    return Saved(s, cons_i, fld)
        return None

    def _cheap(self, s: int, depth: int) -> Recipe | None:
        """The full value of ``s`` without recomputing a costly op: held at no cost, rebuilt by a cheap op from its
        own saved tensors, or recovered upwards (:meth:`_cheap_up`)."""
        got = self.recipes.get(s)
        if got is not None:
            return got if available(got) and not self.avoid(got) else None
        got = self._direct(s)
        if got is None:
            g = self.graph
            node_i = g.slot_node[s]
            spec = self.specs[node_i]
            if (spec is not None and not spec.costly and spec.rebuild is not None
                    and _can_rebuild(spec, g.nodes[node_i], g.slot_nr[s])):
                got = Rebuild(s, node_i, g.slot_nr[s])
            else:
                got = self._cheap_up(s, depth)
        if got is not None:
            self.recipes[s] = got
        return got

    def _cheap_up(self, s: int, depth: int) -> Recipe | None:
        """``s`` recovered from a consumer at element-wise cost: through a one-to-one rearrangement
        (:class:`Unview`), or as ``sum − other`` (:class:`Total`) with both held cheaply. ``None`` if neither."""
        g = self.graph
        if depth > 8 or s in self._upward_busy:
            return None
        self._upward_busy.add(s)
        try:
            for c, pos in g.consumers[s]:
                spec = self.specs[c]
                edges = g.edges[c]
                if spec is None:
                    continue
                if spec.bijection and len(edges) == 1 and len(g.slots_of(c)) == 1:
                    up = self._cheap(g.slot_base[c], depth + 1)
                    if up is not None:
                        return Unview(s, c, up)
                elif (getattr(spec.kernel, "support_role", None) == "sum" and len(edges) == 2 and min(edges) >= 0
                        and edges[0] != edges[1] and g.meta(edges[pos]) == g.meta(g.slot_base[c])):
                    total = self._cheap(g.slot_base[c], depth + 1)
                    other = self._cheap(edges[1 - pos], depth + 1) if total is not None else None
                    if other is not None:
                        return Total(s, SumPart(s, c, pos, (total, other)))
        finally:
            self._upward_busy.discard(s)
        return None

    def avoid(self, recipe: Recipe) -> bool:
        """Whether recomputing a value beats evaluating ``recipe``: it recomputes a costly op (a matrix product or
        convolution) itself, or inverts a saturating function in less than float64 (``logit`` of a sigmoid near 1
        keeps few digits). A difference ``sum − other`` is not avoided in any precision: it is exact to the
        rounding of the sum (a few ulp of ``|sum|``), and the rules that read a layer's output that way (the ε
        denominator) depend on it only through ``z / (z + ε)``."""
        g = self.graph
        for r in walk(recipe):
            if isinstance(r, (Rebuild, Replay)):
                spec = self.specs[r.node]
                if spec is not None and spec.costly:
                    return True
            elif (isinstance(r, InversePart) and g.meta(r.slot)[1] != torch.float64
                  and not getattr(self.specs[r.node].kernel, "exact_inverse", False)):
                return True  # atanh/logit/log of a saved tanh/sigmoid/exp lose digits below float64 (saturation)
        return False

    def _upward(self, s: int, reason: str) -> Recipe:
        """The full value of ``s`` from a consumer that adds it to something known: ``s = sum − other`` where
        both the sum's output and the other addend have full values (a residual stream whose sum a norm layer
        saved). ``Unavailable(reason)`` otherwise. Guarded against cycles (the other addend computed from ``s``)."""
        g = self.graph
        if s in self._upward_busy or len(self._upward_busy) > 256:
            return Unavailable(s, reason)
        self._upward_busy.add(s)
        try:
            for c, pos in g.consumers[s]:
                spec = self.specs[c]
                edges = g.edges[c]
                if (spec is None or getattr(spec.kernel, "support_role", None) != "sum" or len(edges) != 2
                        or min(edges) < 0 or edges[0] == edges[1]):
                    continue
                total = self.recipe(g.slot_base[c])
                if not available(total):
                    continue
                other = self._operand(c, 1 - pos)
                if available(other):
                    return Total(s, SumPart(s, c, pos, (total, other)))
        finally:
            self._upward_busy.discard(s)
        return Unavailable(s, reason)

    # -- constant operands ----------------------------------------------------------------------------------
    def const(self, node_i: int, pos: int) -> Recipe:
        """The recipe of input ``pos`` of node ``node_i``, an operand that does not require grad."""
        key = ("const", node_i, pos)
        got = self.recipes.get(key)
        if got is None:
            got = self._const(node_i, pos)
            self.recipes[key] = got
        return got

    def _const(self, node_i: int, pos: int) -> Recipe:
        g = self.graph
        node = g.nodes[node_i]
        spec = self.specs[node_i]
        where = g.describe(node_i)
        if spec is None:
            return Unavailable(("const", node_i, pos), f"{where} has no registry entry")
        for in_pos, fld in spec.inputs_saved:
            if in_pos == pos and saved(node, fld) is not None:
                return Const(node_i, pos, ("saved", fld))
        kernel = spec.kernel
        absent = getattr(kernel, "absent", None)
        if absent is not None and absent(node, pos):
            return Const(node_i, pos, ("absent",))
        companion = getattr(kernel, "companion", None)
        hint = companion(node, pos) if companion is not None else None
        if hint is None:
            return Unavailable(("const", node_i, pos), f"{where}'s input {pos} does not require grad, so autograd "
                               "kept neither it nor what produced it")
        if self.params is not None:
            source = self.params.companion(*hint)
            if source is not None:
                return Const(node_i, pos, source)
            return Unavailable(("const", node_i, pos), f"{where}'s input {pos} (a {hint[3]} that does not require "
                               "grad) is not in the graph, and no parameter named like its companion "
                               f"'{hint[2]}' was found next to the module tensor the node saved")
        return Unavailable(("const", node_i, pos), f"{where}'s {hint[3]} does not require grad, so autograd "
                           "does not keep it; pass model= to read it from the module that owns the layer's "
                           f"{hint[2]}")

    # -- values on the support ------------------------------------------------------------------------------
    def support(self, slot: int) -> Recipe:
        """A recipe of the value of ``slot`` valid wherever gradient-form relevance can reach it: the full value
        when there is one, else a :class:`Support` walk over the slot's consumers."""
        full = self.recipe(slot)
        # an inverse of a saved output is exact only where the op did not saturate: on the support, that is enough
        inverse = inverted(full)
        if available(full) and not inverse and not self.avoid(full):
            return full
        walk = self._support(slot, 0)
        if available(full) and not inverse and (not available(walk) or self.avoid(walk) or _inverts(walk)):
            # recomputing a matrix product beats a walk that recomputes one too, or that inverts a saved output
            # (exact only where the op is well conditioned, while the op's rule may pass relevance everywhere)
            return full
        return walk

    def _support(self, slot: int, depth: int) -> Recipe:
        key = ("support", slot)
        got = self.recipes.get(key)
        if got is not None:
            return got
        g = self.graph
        if depth > _SUPPORT_DEPTH or slot in self._support_busy:
            return Unavailable(key, "too long a chain of consumers" if depth > _SUPPORT_DEPTH else "a cycle")
        cons = g.consumers[slot]
        if not cons:
            got = Unavailable(key, f"output {g.slot_nr[slot]} of {g.describe(g.slot_node[slot])} has no consumer "
                              "that kept it")
        else:
            self._support_busy.add(slot)
            try:
                parts: list[Part] = []
                failed: list[str] = []
                for c, pos in cons:
                    part = self._part(slot, c, pos, depth)
                    if isinstance(part, Unavailable):
                        failed.append(part.reason)
                    else:
                        parts.append(part)
            finally:
                self._support_busy.discard(slot)
            if not parts:
                got = Unavailable(key, "; ".join(dict.fromkeys(failed)))
            else:
                got = Support(slot, tuple(parts), "; ".join(dict.fromkeys(failed)))
        self.recipes[key] = got
        return got

    def _up(self, slot: int, depth: int) -> Recipe:
        """A consumer's output value for a support part: full, or itself on the support."""
        full = self.recipe(slot)
        if available(full) and not self.avoid(full):
            return full
        walk = self._support(slot, depth + 1)
        if available(full) and (not available(walk) or self.avoid(walk)):
            return full
        return walk

    def _part(self, slot: int, c: int, pos: int, depth: int) -> Recipe:
        g = self.graph
        spec = self.specs[c]
        where = g.describe(c)
        key = ("part", slot, c, pos)
        if spec is None:
            return Unavailable(key, f"{where} has no registry entry")
        kernel = spec.kernel
        selects = getattr(kernel, "selects", None)  # a row whose selection depends on the node (CopySlices)
        if spec.selection or (selects is not None and selects(g.nodes[c])):
            ups: list[Recipe | None] = []
            for s in g.slots_of(c):
                if not g.consumers[s] and s not in self.known:
                    ups.append(None)  # an output nobody reads carries no relevance
                    continue
                up = self._up(s, depth)
                if isinstance(up, Unavailable):
                    return Unavailable(key, f"{where} <- {up.reason}")
                ups.append(up)
            return SelectPart(slot, c, pos, tuple(ups))
        if getattr(kernel, "from_output", None) is not None and saved(g.nodes[c], kernel.y_field) is not None:
            return InversePart(slot, c, pos)
        edges = g.edges[c]
        role = getattr(kernel, "support_role", None)
        if role == "sum" and len(edges) == 2:
            other = self._operand(c, 1 - pos)
            if not available(other) and edges[1 - pos] >= 0 and edges[1 - pos] != slot:
                other = self._support(edges[1 - pos], depth + 1)  # checked to cover ours when evaluated
            total = self._up(g.slot_base[c], depth)
            for r in (total, other):
                if isinstance(r, Unavailable):
                    return Unavailable(key, f"{where} <- {r.reason}")
            return SumPart(slot, c, pos, (total, other))
        if role == "scale":
            other = self._operand(c, 1 - pos) if not kernel.scalar else None
            if isinstance(other, Unavailable):
                return Unavailable(key, f"{where} <- {other.reason}")
            out = g.slot_base[c]
            total = self._up(out, depth)
            if isinstance(total, Unavailable):
                weighted = self._weighted_sum(slot, c, pos, other, depth)
                if weighted is not None:
                    return weighted
                return Unavailable(key, f"{where} <- {total.reason}")
            return ScalePart(slot, c, pos, (total, other))
        return Unavailable(key, f"its consumer {where} keeps neither it nor a value to recover it from")

    def _operand(self, c: int, pos: int) -> Recipe:
        """The full value of input ``pos`` of node ``c``: saved by the node, a constant, or the input's value."""
        g = self.graph
        edges = g.edges[c]
        if pos >= len(edges):
            return Unavailable(("const", c, pos), f"{g.describe(c)} has no input {pos}")
        spec = self.specs[c]
        for in_pos, fld in spec.inputs_saved:
            if in_pos == pos and saved(g.nodes[c], fld) is not None:
                return Const(c, pos, ("saved", fld))
        return self.recipe(edges[pos]) if edges[pos] >= 0 else self.const(c, pos)

    def _weighted_sum(self, slot: int, c: int, pos: int, other: Recipe | None, depth: int) -> Recipe | None:
        g = self.graph
        out = g.slot_base[c]
        cons = g.consumers[out]
        if other is None or len(cons) != 1 or self.specs[c].kernel.divide:
            return None
        s = cons[0][0]
        if g.types[s] not in ("SumBackward0", "SumBackward1"):
            return None
        total = self._up(g.slot_base[s], depth)
        if isinstance(total, Unavailable):
            return None
        return WeightedSumPart(slot, c, pos, (total, other), s)


def _can_rebuild(spec: "OpSpec", node: Any, nr: int) -> bool:
    probe = getattr(spec.kernel, "can_rebuild", None)
    return True if probe is None else bool(probe(node, nr))


def _can_replay(spec: "OpSpec", node: Any) -> bool:
    """Whether the row's replay applies to this node (``CopySlices`` replays copies and zeroing only)."""
    probe = getattr(spec.kernel, "can_replay", None)
    return True if probe is None else bool(probe(node))


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
        Tensors the caller holds, indexed by the indices of ``Known`` recipes.
    params : ModelParams or None
        The caller's model (for constants resolved through it).
    trace : bool
        Keep a :class:`PromiseRecord` for every value obtained through a branch (tests, debugging).
    differentiable : bool
        Keep values attached to the autograd graph (differentiable relevance): nothing is detached and rebuilt or
        replayed values are recorded, so relevance computed from them has gradients with respect to the inputs
        and parameters.
    """

    def __init__(self, graph: GraphView, specs, resolver: PromiseResolver, tensors: Sequence[torch.Tensor | None],
                 params: "ModelParams | None" = None, trace: bool = False, differentiable: bool = False):
        self.graph = graph
        self.specs = specs
        self.resolver = resolver
        self.tensors = tensors
        self.params = params
        self.memo: dict[Hashable, Any] = {}
        self.remaining = dict(resolver.requests)
        self.trace = trace
        self.records: list[PromiseRecord] = []
        #: exactness checks on recovered values, read after the propagation loop (no host sync inside it)
        self.checks = DeferredChecks()
        self.differentiable = differentiable

    def _detach(self, t: Any) -> Any:
        return t if (self.differentiable or not isinstance(t, torch.Tensor)) else t.detach()

    def _mode(self) -> Any:
        """Rebuilds and replays: recorded by autograd for differentiable relevance, not otherwise."""
        return torch.enable_grad() if self.differentiable else torch.no_grad()

    def get(self, slot: int, origin: str = "") -> torch.Tensor:
        """The full forward value of ``slot``.

        Raises
        ------
        ValueUnavailableError
            When the graph holds no way to obtain it (e.g. an activation only a frozen layer consumed).
        """
        recipe = self.resolver.recipe(slot)
        if not available(recipe):
            recipe = self.resolver.fallbacks.get(slot, recipe)
        return self._get(recipe, origin)

    def get_support(self, slot: int, origin: str = "") -> tuple[torch.Tensor, Mask]:
        """The value of ``slot`` on its support and the mask where it is exact (``None``: everywhere); zero
        outside the mask."""
        recipe = self.resolver.support(slot)
        out = self._get(recipe, origin)
        return out if recipe.support else (out, None)

    def get_const(self, node: int, pos: int, origin: str = "") -> torch.Tensor | None:
        """Constant input ``pos`` of ``node`` (``None`` when the op had no such operand)."""
        return self._get(self.resolver.const(node, pos), origin)

    def _get(self, recipe: Recipe, origin: str) -> Any:
        key = recipe.key
        val = self.memo.get(key)
        if val is None:
            if isinstance(recipe, Unavailable):
                raise ValueUnavailableError(self._explain(recipe, origin))
            val = self._evaluate(recipe)
            if self.trace and not isinstance(recipe, Const):
                self._record(recipe, val, origin)
        left = self.remaining.get(key)
        if left is not None:
            if left <= 1:
                self.remaining.pop(key)
                self.memo.pop(key, None)
            else:
                self.remaining[key] = left - 1
                self.memo[key] = val
        return val

    def _explain(self, recipe: Unavailable, origin: str) -> str:
        g = self.graph
        key = recipe.key
        if isinstance(key, int):
            what = f"The forward value of output {g.slot_nr[key]} of {g.describe(g.slot_node[key])}"
        elif key[0] == "const":
            what = f"Input {key[2]} of {g.describe(key[1])}"
        else:
            what = f"The value of output {g.slot_nr[key[1]]} of {g.describe(g.slot_node[key[1]])}"
        by = f" by {origin}" if origin else ""
        fix = ("pass model= (relevance(..., model=model) or explain(..., model=model)) so that frozen constants "
               "can be read from the module that owns the layer's weight" if self.params is None and (
                   "pass model=" in recipe.reason) else "choose a rule that does not need this value")
        return (f"{what} is needed{by} but cannot be recovered from the graph ({recipe.reason}). Autograd keeps "
                f"only what gradients need; {fix}.")

    def _evaluate(self, root: Recipe) -> Any:
        # iterative post-order evaluation; children are memoised so shared sub-trees run once
        local: dict[Hashable, Any] = {}
        stack: list[Recipe] = [root]
        while stack:
            rec = stack[-1]
            if rec.key in local:
                stack.pop()
                continue
            hit = self.memo.get(rec.key)
            if hit is not None:
                local[rec.key] = hit
                stack.pop()
                continue
            kids = [c for c in rec.children() if c.key not in local]
            if kids:
                stack.extend(kids)
                continue
            local[rec.key] = self._compute(rec, local)
            stack.pop()
        return local[root.key]

    def _compute(self, rec: Recipe, local: dict[Hashable, Any]) -> Any:
        g = self.graph
        if isinstance(rec, Known):
            return self._detach(self.tensors[rec.index])
        if isinstance(rec, Leaf):
            return self._detach(leaf_tensor(g.nodes[rec.node]))
        if isinstance(rec, Saved):
            return self._detach(saved(g.nodes[rec.node], rec.field))
        if isinstance(rec, Const):
            return self._const(rec)
        if isinstance(rec, Rebuild):
            spec = self.specs[rec.node]
            with self._mode():
                out = spec.rebuild(g.nodes[rec.node], rec.nr)
            if out is None:
                raise ValueUnavailableError(f"{g.describe(rec.node)} could not rebuild its output")
            return out
        if isinstance(rec, Replay):
            spec = self.specs[rec.node]
            args = [None if r is None else local[r.key] for r in rec.inputs]
            with self._mode():
                return spec.replay(g.nodes[rec.node], args, rec.nr)
        if isinstance(rec, Unview):
            node = g.nodes[rec.node]
            with self._mode():
                out = call_backward(node, [local[rec.up.key]])[0]
            meta = g.meta(rec.key)
            return out if out.dtype == meta[1] else out.to(meta[1])
        if isinstance(rec, Total):
            v, m = local[rec.part.key]
            if m is not None:  # an inverse: exact where the op did not saturate, checked after the loop
                self.checks.add(~m.all(), lambda: ValueUnavailableError(
                    f"The forward value of output {g.slot_nr[rec.slot]} of {g.describe(g.slot_node[rec.slot])} is "
                    f"needed in full, but the graph holds it only through {g.describe(rec.part.node)}'s saved output, "
                    "which cannot be inverted where it saturates (e.g. a sigmoid at exactly 0 or 1). Choose a rule "
                    "that does not need this value, or explain in float64."))
            return v
        if isinstance(rec, Support):
            v, m = _combine([local[p.key] for p in rec.parts], g.meta(rec.slot))
            if rec.missing:
                if m is not None:
                    self.checks.add(~m.all(), lambda: ValueUnavailableError(
                        f"The value of output {g.slot_nr[rec.slot]} of {g.describe(g.slot_node[rec.slot])} cannot be "
                        f"recovered everywhere relevance reaches it ({rec.missing}; the other consumers know it only "
                        "in part, e.g. a saturated tanh). Pass model= so frozen constants can be read from the "
                        "model, or choose a rule that does not need this value."))
                m = None
            return v, m
        if isinstance(rec, Part):
            with self._mode():
                return self._part(rec, [None if r is None else _vm(local[r.key]) for r in rec.ups])
        assert isinstance(rec, Unavailable)
        raise ValueUnavailableError(self._explain(rec, ""))

    def _const(self, rec: Const) -> torch.Tensor | None:
        kind = rec.source[0]
        if kind == "absent":
            return None
        node = self.graph.nodes[rec.node]
        if kind == "saved":
            v = saved(node, rec.source[1])
            if v is not None and not isinstance(v, torch.Tensor):
                v = torch.tensor(v, dtype=torch.float64) if isinstance(v, float) else torch.tensor(v)
            return self._detach(v)
        _, name, start, length = rec.source
        if self.params is None:  # a plan made with a model, run without one
            raise ValueUnavailableError(f"{self.graph.describe(rec.node)} needs {name} of the model: pass model=")
        t = self._detach(self.params.tensor(name))
        return t if (start == 0 and length == t.shape[0]) else t.narrow(0, start, length)

    # -- support parts ---------------------------------------------------------------------------------------
    def _part(self, rec: Part, ups: list[tuple[Tensor, Mask] | None]) -> tuple[Tensor, Mask]:
        g = self.graph
        node = g.nodes[rec.node]
        meta = g.meta(rec.slot)
        shape, dtype = torch.Size(meta[0]), meta[1]
        if isinstance(rec, SelectPart):
            metas = output_meta(node)
            vals, masks = [], []
            for up, m in zip(ups, metas):
                if up is None:
                    z = torch.zeros(m.shape, dtype=m.dtype, device=m.device)
                    vals.append(z)
                    masks.append(z)
                    continue
                v, mk = up
                vals.append(v.to(m.dtype))
                masks.append(torch.ones(m.shape, dtype=m.dtype, device=m.device) if mk is None else mk.to(m.dtype))
            num = call_backward(node, [v * mk if mk is not None else v for v, mk in zip(vals, masks)])[rec.pos]
            cnt = call_backward(node, masks)[rec.pos]
            return _masked_mean(num, cnt, shape, dtype)
        if isinstance(rec, InversePart):
            kernel = self.specs[rec.node].kernel
            x, mask = kernel.from_output(node, saved(node, kernel.y_field))
            return torch.where(mask, x, 0).to(dtype), mask
        (total, tmask), other = ups[0], ups[1]
        if isinstance(rec, SumPart):
            c = self.specs[rec.node].kernel.coefficients(node)
            ov, omask = other
            if omask is not None:  # the other addend known on its support only: it must cover ours
                need = torch.ones_like(total, dtype=torch.bool) if tmask is None else tmask
                self.checks.add((need & ~torch.broadcast_to(omask, need.shape)).any(), lambda: ValueUnavailableError(
                    f"The value of output {g.slot_nr[rec.slot]} of {g.describe(g.slot_node[rec.slot])} cannot be "
                    f"recovered from the sum {g.describe(rec.node)}: the other addend is not known everywhere "
                    "relevance reaches the sum. Pass model= so frozen constants can be read from the model."))
            a, b = c[1 - rec.pos], c[rec.pos]
            v = total - (ov if _is_one(a) else a * ov)
            if not _is_one(b):
                v = v / b
            if tmask is None and v.shape == shape:  # the common case (a residual stream): nothing to reduce
                return (v if v.dtype == dtype else v.to(dtype)), None
            return _masked_mean(_masked(v, tmask), _ones_or(tmask, v), shape, dtype)
        kernel = self.specs[rec.node].kernel
        ov = other[0] if other is not None else kernel.operand(node, 1)
        if isinstance(rec, WeightedSumPart):
            red = g.nodes[rec.reducer]
            w = torch.broadcast_to(ov, output_meta(node)[0].shape).to(total.dtype)
            chosen = (w != 0).to(total.dtype)
            (back,) = call_backward(red, [self.specs[rec.reducer].kernel.forward(red, [chosen], 0)])[:1]
            (tb,) = call_backward(red, [_masked(total, tmask)])[:1]
            self.checks.add(((chosen != 0) & (back > 1)).any(), lambda: ValueUnavailableError(
                f"The value of output {g.slot_nr[rec.slot]} of {g.describe(g.slot_node[rec.slot])} cannot be "
                f"recovered from the graph: it is weighted and summed by {g.describe(rec.node)} and "
                f"{g.describe(rec.reducer)} with several non-zero weights per sum, so the sum does not tell the "
                "parts apart. Pass model= so frozen constants can be read from the model, or choose a rule "
                "that does not need this value."))
            ok = (chosen != 0) & (back == 1)
            if tmask is not None:
                (mb,) = call_backward(red, [tmask.to(total.dtype)])[:1]
                ok = ok & (mb != 0)
            v = torch.where(ok, tb / torch.where(ok, w, 1), 0)
            return _masked_mean(v, ok.to(v.dtype), shape, dtype)
        # ScalePart
        okv = torch.ones((), dtype=torch.bool, device=total.device) if tmask is None else tmask
        if not kernel.divide:
            ok = okv & (ov != 0)
            v = torch.where(ok, total / torch.where(ok, ov, 1), 0)
        elif rec.pos == 0:
            ok = okv & torch.isfinite(ov) & (ov != 0)
            v = torch.where(ok, total * ov, 0)
        else:
            ok = okv & (total != 0)
            v = torch.where(ok, ov / torch.where(ok, total, 1), 0)
        ok = torch.broadcast_to(ok, v.shape)
        return _masked_mean(v, ok.to(v.dtype), shape, dtype)

    # -- tracing -------------------------------------------------------------------------------------------
    def _record(self, recipe: Recipe, value: Any, origin: str) -> None:
        g = self.graph
        slot = recipe.key if isinstance(recipe.key, int) else recipe.key[1]
        mask = None
        if recipe.support:
            value, mask = value
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
        if isinstance(rec, Support):
            arg = "support of " + ", ".join(f"{p.kind} at {g.describe(p.node)}" for p in rec.parts)
        elif rec is not None and not isinstance(rec, Replay):
            kind = type(rec).__name__.lower()
            where = getattr(rec, "node", None)
            arg = f"{kind} at {g.describe(where)}" if where is not None else kind
            if not isinstance(rec, Known):
                path.append(g.describe(where) if where is not None else kind)
        pre, depth = self._tree_facts(recipe)
        self.records.append(PromiseRecord(
            slot=slot, node=g.nodes[g.slot_node[slot]], output_nr=g.slot_nr[slot], origin=origin, path=path,
            arg=arg, nested=nested, value=value, pre_promises=pre, depth=depth, mask=mask))

    def _tree_facts(self, recipe: Recipe) -> tuple[list[str], int]:
        """Shared nodes (pre-promise sites) and the depth of a promise tree."""
        g = self.graph
        pre: list[str] = []
        depth: dict[Hashable, int] = {}
        order: list[Recipe] = []
        stack = [recipe]
        seen: set[Hashable] = set()
        while stack:
            r = stack.pop()
            if r.key in seen:
                continue
            seen.add(r.key)
            order.append(r)
            stack.extend(r.children())
        for r in reversed(order):
            kids = r.children()
            depth[r.key] = 1 + max((depth[k.key] for k in kids), default=0)
            if r is not recipe and isinstance(r.key, int) and len(g.consumers[r.key]) > 1:
                pre.append(g.describe(g.slot_node[r.key]))
        return pre, depth[recipe.key]


def inverted(recipe: Recipe) -> bool:
    """Whether ``recipe`` is a full value read back through an invertible op's saved output (exact only where the
    op did not saturate; checked when evaluated)."""
    return isinstance(recipe, Total) and isinstance(recipe.part, InversePart)


def walk(recipe: Recipe) -> Iterator[Recipe]:
    """Every distinct recipe of a promise tree (``recipe`` and what it is built on), each once."""
    stack, seen = [recipe], set()
    while stack:
        r = stack.pop()
        if r.key in seen:
            continue
        seen.add(r.key)
        yield r
        stack.extend(r.children())


def _inverts(recipe: Recipe) -> bool:
    """Whether ``recipe`` reads a value by inverting an element-wise op's saved output somewhere."""
    return any(isinstance(r, InversePart) for r in walk(recipe))


def _vm(value: Any) -> tuple[Tensor, Mask]:
    return value if isinstance(value, tuple) else (value, None)


def _is_one(c: Any) -> bool:
    return isinstance(c, (int, float)) and c == 1


def _masked(v: Tensor, mask: Mask) -> Tensor:
    return v if mask is None else torch.where(mask, v, 0)


def _ones_or(mask: Mask, like: Tensor) -> Tensor:
    return torch.ones_like(like) if mask is None else mask.to(like.dtype)


def _masked_mean(num: Tensor, cnt: Tensor, shape: torch.Size, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Values summed over copies (``num``) divided by their number (``cnt``), reduced to ``shape`` the way a
    broadcast is: ``(value, mask)`` with the value 0 where nothing was known."""
    if cnt.shape != num.shape:
        cnt = cnt.expand_as(num)
    num = fit_to(num, shape)
    cnt = fit_to(cnt, shape)
    ok = cnt > 0
    v = torch.where(ok, num / torch.where(ok, cnt, 1), 0)
    return v.to(dtype), ok


def _combine(parts: list[tuple[Tensor, Mask]], meta: tuple) -> tuple[Tensor, Mask]:
    """The parts of a support value merged: each exact on its mask (they agree where masks overlap)."""
    v, m = parts[0]
    for pv, pm in parts[1:]:
        if m is None:
            break
        if pm is None:
            v, m = pv, None
            break
        v = torch.where(m, v, pv)
        m = m | pm
    return v, m


def _count_nested(recipes: Sequence[Recipe]) -> int:
    count = 0
    stack = list(recipes)
    seen: set[Hashable] = set()
    while stack:
        r = stack.pop()
        if r.key in seen:
            continue
        seen.add(r.key)
        if len(r.children()) > 1:
            count += 1
        stack.extend(r.children())
    return count
