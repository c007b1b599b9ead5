"""Planning and executing a relevance pass over an autograd graph.

Data flow (see ``docs/ARCHITECTURE.md``)::

    outputs ──► GraphView (graph.py) ──► Planner: registry rows, activation flags, rule per node (rules/),
                                          value recipes (promises.py) ──► Plan (a flat list of steps)
    seeds ──► Run: execute the steps in topological order, summing messages per slot ──► relevance, Ledger

A plan depends only on the graph's structure (node types, edges, shapes, which saved fields exist) and the
rule set, so it is cached under a signature of those and reused for the next graph with the same signature.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Sequence

import torch

from . import graph as G
from .errors import DynamicLRPError, UnsupportedOperationError, ValueUnavailableError
from .promises import ModelParams, PromiseResolver, Recipe, ValueStore, available
from .results import Explanation, Ledger
from .rules.base import UNKNOWN, Msg, OpSpec, Site, Step, finite_sum as _finite_sum, safe_div
from .rules.ruleset import RuleSet, resolve_rules

Tensor = torch.Tensor


#: nodes whose output is data even though their only differentiable input is a parameter
_DATA_LOOKUPS = frozenset({"EmbeddingBackward0", "EmbeddingBagBackward0", "EmbeddingDenseBackward0"})


# -----------------------------------------------------------------------------------------------------------
# Planner
# -----------------------------------------------------------------------------------------------------------
class Planner:
    """Compiles a rule set against one graph.

    Parameters
    ----------
    graph : GraphView
    rules : RuleSet
    requested : dict
        ``slot -> key`` of the requested input tensors present in the graph.
    sources : set of int
        Slots that are activation sources (requested non-parameter tensors).
    known : dict
        ``slot -> key`` of every tensor the caller holds (requested inputs and outputs).
    everywhere : bool
        Propagate through every node, not only those that lead to a requested input (the ledger needs this).
    model : torch.nn.Module or None
        Used to name parameters and layers, and to read frozen constants autograd does not keep
        (:class:`~dynamiclrp.promises.ModelParams`).
    """

    def __init__(self, graph: G.GraphView, rules: RuleSet, requested: dict[int, int], sources: set[int],
                 known: dict[int, int], everywhere: bool, model: torch.nn.Module | None = None,
                 specs: list[OpSpec | None] | None = None, params: ModelParams | None = None):
        self.setup(graph, rules, requested, sources, known, everywhere, model, specs, params)
        self._check_supported()
        for i in graph.order:
            if everywhere or self.needed_below[i]:
                self.run_node[i] = True
                site = Site(self, i, self.specs[i], tuple(
                    e >= 0 and self.active[e] for e in graph.edges[i]))
                self.steps[i] = rules.rule_for(site).bind(site)
        # slots whose messages someone reads: a node that runs, or a requested tensor (others are dropped)
        self.wanted = [self.run_node[graph.slot_node[s]] or s in requested for s in range(len(graph.slot_node))]

    def setup(self, graph: G.GraphView, rules: RuleSet, requested: dict[int, int], sources: set[int],
              known: dict[int, int], everywhere: bool, model: torch.nn.Module | None = None,
              specs: list[OpSpec | None] | None = None, params: ModelParams | None = None) -> None:
        """Everything a plan knows before rules bind: registry rows, activation flags, pruning, recipes."""
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
        self.structure_cache: dict[Any, Any] = {}
        self.bias_slots: set[int] = set()
        self.steps: list[Step | None] = [None] * n
        self.run_node = [False] * n

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
            op = G.forward_op_name(self.graph.nodes[idx[0]])
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

        Activation sources are data leaves (tensors that require grad but are not ``nn.Parameter``), embedding
        lookups (their indices are data) and requested non-parameter tensors. Product rules treat operands that
        are not activations (weights, parameter-only subgraphs, constants) as constants. The flags are a
        property of the graph, not of which tensors are requested, so requesting more inputs never changes
        the relevance of the others.
        """
        g = self.graph
        active = [False] * len(g.slot_node)
        for i in reversed(g.order):  # producers before consumers
            t = g.types[i]
            if t == "AccumulateGrad":
                a = not isinstance(G.leaf_tensor(g.nodes[i]), torch.nn.Parameter)
            elif t in _DATA_LOOKUPS:
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

    def rebind(self, graph: G.GraphView, model: torch.nn.Module | None) -> "Planner":
        """This plan for another graph with the same signature (the steps hold no graph objects)."""
        clone = copy.copy(self)
        clone.graph = graph
        clone.model = model
        clone.resolver = copy.copy(self.resolver)
        clone.resolver.graph = graph
        clone.resolver.recipes = dict(self.resolver.recipes)
        clone.resolver.params = None if model is None else ModelParams(model)
        clone.structure_cache = {}
        return clone

    # -- helpers for rules ---------------------------------------------------------------------------------
    def need_value(self, slot: int) -> Recipe:
        """Declare that a step will read the full forward value of ``slot`` once per run (a promise, if it is not
        saved); returns its recipe (:class:`~dynamiclrp.promises.Unavailable` when it cannot be had)."""
        return self.resolver.request(slot)

    def need_support(self, slot: int) -> Recipe:
        """Declare that a step will read the value of ``slot`` on the support of its gradient-form relevance once
        per run (:meth:`Run.support`); returns its recipe."""
        return self.resolver.request_support(slot)

    def need_const(self, node: int, pos: int) -> Recipe:
        """Declare that a step will read the constant input ``pos`` of ``node`` once per run (:meth:`Run.const`)."""
        return self.resolver.request_const(node, pos)

    def can_value(self, slot: int) -> bool:
        """Whether the full value of ``slot`` can be obtained (without requesting it)."""
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


# -----------------------------------------------------------------------------------------------------------
# Run: executing a plan
# -----------------------------------------------------------------------------------------------------------
class Run:
    """State of one relevance pass: messages per slot, values, and the optional ledger."""

    __slots__ = ("graph", "values", "ledger", "planner", "local", "carried", "carry_out")

    def __init__(self, planner: Planner, values: ValueStore, ledger: Ledger | None):
        self.planner = planner
        self.graph = planner.graph
        self.values = values
        self.ledger = ledger
        self.local: Tensor | None = None  # sinks a step booked itself during its current call
        self.carried: list[str] = []  # ledger: constants whose shares ride in the current node's arrived total
        self.carry_out: dict[int, list[str]] = {}  # ledger: input position -> constants carried onwards

    def book_local(self, kind: str, index: int, total: Tensor, note: str = "") -> None:
        """Book a sink from inside a step (e.g. a constant bias); it is excluded from the step's residual."""
        if self.ledger is None:
            return
        self.ledger.book(kind, self.graph.describe(index), total, note)
        self.local = total if self.local is None else self.local + total

    def node(self, i: int) -> Any:
        return self.graph.nodes[i]

    def value(self, slot: int, origin: str = "") -> Tensor:
        """Forward value of ``slot`` (read, rebuilt or replayed by the Promise System)."""
        return self.values.get(slot, origin)

    def support(self, slot: int, origin: str = "") -> Tensor:
        """The value of ``slot`` wherever gradient-form relevance can reach it (0 where it cannot be known).

        Equals the full value when the Promise System has one; otherwise it is recovered from the slot's consumers
        (selections, a ReLU's saved output, inverses of saved outputs, sums and products with a known other
        operand: :meth:`~dynamiclrp.promises.PromiseResolver.support`). A z-rule reads values only where the
        gradient-form message is non-zero, so this is all it needs.
        """
        return self.values.get_support(slot, origin)[0]

    def support_masked(self, slot: int, origin: str = "") -> tuple[Tensor, Tensor | None]:
        """:meth:`support` and the mask where it is exact (``None``: everywhere)."""
        return self.values.get_support(slot, origin)

    def const(self, node: int, pos: int, origin: str = "") -> Tensor | None:
        """Constant input ``pos`` of ``node`` (saved by the node, or a frozen parameter read through ``model=``);
        ``None`` when the op had no such operand."""
        return self.values.get_const(node, pos, origin)

    def r_to_g(self, slot: int, r: Tensor) -> Tensor:
        """Turn explicit relevance at ``slot`` into gradient form by dividing by the slot's value (its value on
        the support will do when the relevance lies inside it)."""
        if self.planner.can_value(slot):
            v = self.value(slot, "conversion to gradient form")
        else:
            v, mask = self.support_masked(slot, "conversion to gradient form")
            if mask is not None and bool((r != 0).logical_and_(~mask.expand_as(r)).any()):
                raise ValueUnavailableError(
                    f"explicit relevance reaches output {self.graph.slot_nr[slot]} of "
                    f"{self.graph.describe(self.graph.slot_node[slot])} where its forward value cannot be recovered "
                    "from the graph; pass model= so frozen constants can be read from the model, or choose rules "
                    "that keep relevance in gradient form there")
        if v.shape != r.shape:
            v = v.expand_as(r)
        g = safe_div(r, v)
        if self.ledger is not None:
            lost = torch.where(v == 0, r, torch.zeros((), dtype=r.dtype, device=r.device)).sum()
            self.book_local("conversion", self.graph.slot_node[slot], lost,
                            "relevance on a zero activation cannot be passed on in gradient form")
        return g

    def total(self, slot: int, msg: Msg | None) -> Tensor | None:
        """Total relevance of ``msg`` at ``slot`` (needs the slot's value for the gradient-form part)."""
        if msg is None:
            return None
        t = None
        if msg.g is not None:
            v = self.support(slot, "ledger")  # g is zero wherever the value is not known
            prod = msg.g * v
            t = _finite_sum(prod)
        if msg.r is not None:
            rt = msg.r.sum()
            t = rt if t is None else t + rt
        return t


    def shifted_total(self, slot: int, msg: Msg) -> Tensor | None:
        """Total relevance at a softmax's input slot whose value autograd did not keep (e.g. logits plus a
        constant mask): ``x = log s + c`` per row and the rule's ``G`` sums to zero per row, so ``c`` drops
        out. Returns ``None`` when the slot does not feed a softmax through views and casts only."""
        if msg.r is not None or msg.g is None:
            return None
        g = self.graph
        s = slot
        for _ in range(6):
            cons = g.consumers[s]
            if len(cons) != 1:
                return None
            c, _pos = cons[0]
            t = g.types[c]
            if t in ("SoftmaxBackward0", "SafeSoftmaxBackward0"):
                res = G.saved(g.nodes[c], "result")
                logs = torch.where(res > 0, torch.log(torch.where(res > 0, res, 1)), 0)
                if logs.numel() != msg.g.numel():
                    return None
                return (logs.reshape(msg.g.shape).to(msg.g.dtype) * msg.g).sum()
            if t in ("ViewBackward0", "UnsafeViewBackward0", "ToCopyBackward0", "CloneBackward0",
                     "ReshapeAliasBackward0"):
                s = g.slot_base[c]
                continue
            return None
        return None


# -----------------------------------------------------------------------------------------------------------
# Plan cache
# -----------------------------------------------------------------------------------------------------------
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


# -----------------------------------------------------------------------------------------------------------
# The public entry point (used by dynamiclrp.relevance / dynamiclrp.explain)
# -----------------------------------------------------------------------------------------------------------
_GradientEdge = torch.autograd.graph.GradientEdge


def _as_tuple(x: Any, what: str, edges_ok: bool = False) -> tuple[Any, ...]:
    if isinstance(x, torch.Tensor) or (edges_ok and isinstance(x, _GradientEdge)):
        return (x,)
    if isinstance(x, (list, tuple)):
        out = tuple(x)
        for k, t in enumerate(out):
            if not (isinstance(t, torch.Tensor) or (edges_ok and isinstance(t, _GradientEdge))):
                kinds = "a torch.Tensor or a torch.autograd.graph.GradientEdge" if edges_ok else "a torch.Tensor"
                raise TypeError(f"{what}[{k}] is a {type(t).__name__}, expected {kinds}")
        if not out:
            raise ValueError(f"{what} is empty: pass at least one tensor")
        return out
    raise TypeError(f"{what} must be a tensor or a sequence of tensors, got {type(x).__name__}")


def compute(outputs: Tensor | Sequence[Tensor], inputs: Tensor | Sequence[Tensor],
            seeds: Tensor | Sequence[Tensor | None] | None = None, *, rules: Any = None, ledger: bool = False,
            model: torch.nn.Module | None = None, trace_promises: bool = False,
            cache: PlanCache | None = None) -> Explanation:
    """Run one relevance pass. See :func:`dynamiclrp.explain` for the parameters; ``cache`` reuses plans."""
    outs = _as_tuple(outputs, "outputs")
    ins = _as_tuple(inputs, "inputs", edges_ok=True)
    for k, o in enumerate(outs):
        if o.grad_fn is None:
            raise DynamicLRPError(_no_graph_message(k, o))
    if seeds is None:
        seed_list: list[Tensor | None] = [None] * len(outs)
    elif isinstance(seeds, torch.Tensor):
        seed_list = [seeds]
    else:
        seed_list = list(seeds)
    if len(seed_list) != len(outs):
        raise ValueError(f"got {len(seed_list)} seeds for {len(outs)} outputs; pass one seed per output "
                         "(or None for the default, the output's own value)")
    seed_tensors: list[Tensor] = []
    for k, (o, s) in enumerate(zip(outs, seed_list)):
        if s is None:
            s = o.detach()
        else:
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"seeds[{k}] must be a tensor or None")
            if s.shape != o.shape:
                raise ValueError(f"seeds[{k}] has shape {tuple(s.shape)} but outputs[{k}] has shape "
                                 f"{tuple(o.shape)}; a seed is the starting relevance of every output element")
            s = s.detach().to(dtype=o.dtype, device=o.device)
        seed_tensors.append(s)
    rule_set = resolve_rules(rules)
    if model is None:
        model = rule_set.model
    params = ModelParams(model) if model is not None else None

    graph = G.GraphView([(o.grad_fn, o.output_nr) for o in outs])
    # tensors we hold: outputs, then inputs (a GradientEdge input has no tensor: its value is promised)
    held: list[Tensor | None] = [o for o in outs] + [None if isinstance(t, _GradientEdge) else t for t in ins]
    known: dict[int, int] = {}
    for k, o in enumerate(outs):
        known.setdefault(graph.root_slots[k], k)
    requested: dict[int, int] = {}
    sources: set[int] = set()
    input_slots: list[int | None] = []
    for k, t in enumerate(ins):
        if isinstance(t, _GradientEdge):
            slot = graph.slot_of(t.node, t.output_nr)
            input_slots.append(slot)
            if slot is not None:
                requested.setdefault(slot, len(outs) + k)
                sources.add(slot)
            continue
        edge = G.gradient_edge(t)
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

    with torch.no_grad():
        planner = None
        key = None
        specs = [rule_set.spec_for(t) for t in graph.types]
        if cache is not None and rule_set.override is None:
            static = [spec.static_fields if spec is not None else () for spec in specs]
            key = (graph.signature(static), tuple(sorted(requested.items())), tuple(sorted(sources)),
                   tuple(sorted(known.items())), ledger, id(rule_set), model is not None)
            cached = cache.get(key)
            if cached is not None:
                planner = cached.rebind(graph, model)
        if planner is None:
            planner = Planner(graph, rule_set, requested, sources, known, everywhere=ledger, model=model,
                              specs=specs, params=params)
            if key is not None:
                cache.put(key, planner.rebind(None, None))  # the cache must not keep this graph alive
        values = ValueStore(graph, planner.specs, planner.resolver, held, params=planner.resolver.params,
                            trace=trace_promises)
        book = Ledger(graph) if ledger else None
        run = Run(planner, values, book)
        captured = _execute(run, planner, seed_tensors, requested, held, book)

    relevance = []
    for k, (t, slot) in enumerate(zip(ins, input_slots)):
        r = captured.get(slot) if slot is not None else None
        if isinstance(t, _GradientEdge):
            m = G.output_meta(t.node)[t.output_nr]
            if r is None:
                r = torch.zeros(m.shape, dtype=m.dtype, device=m.device)
            relevance.append(r.detach().to(dtype=m.dtype))
            continue
        if r is None:
            r = torch.zeros_like(t, memory_format=torch.contiguous_format)
        relevance.append(r.detach().to(dtype=t.dtype))
    if book is not None:
        for k, (t, slot) in enumerate(zip(ins, input_slots)):
            if slot is not None and slot in planner.terminal and requested.get(slot) == len(outs) + k:
                book.requested(f"inputs[{k}]", relevance[k].sum())
        book.seed(sum(s.sum() for s in seed_tensors))
        book.finish()
    return Explanation(tuple(relevance), book, values.records if trace_promises else [])


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


def _execute(run: Run, planner: Planner, seeds: list[Tensor], requested: dict[int, int], held: list[Tensor],
             book: Ledger | None) -> dict[int, Tensor]:
    g = planner.graph
    msgs: list[Msg | None] = [None] * len(g.slot_node)
    for k, (slot, s) in enumerate(zip(g.root_slots, seeds)):
        m = _seed_message(s, held[k].detach())
        if msgs[slot] is None:
            msgs[slot] = m
        else:
            msgs[slot].add(m)
    captured: dict[int, Tensor] = {}
    arrived: dict[int, Any] = {}  # ledger: relevance total delivered into each slot so far
    carry: dict[int, list[str]] = {}  # ledger: slot -> constants whose shares its arrived total includes
    if book is not None:
        for slot, s in zip(g.root_slots, seeds):
            arrived[slot] = s.sum() if slot not in arrived else arrived[slot] + s.sum()
    terminal = planner.terminal
    steps = planner.steps
    run_node = planner.run_node
    wanted = planner.wanted
    slot_base = g.slot_base
    n_out = g.n_out
    edges = g.edges
    for i in g.order:
        base = slot_base[i]
        k = n_out[i] or 1
        if k == 1:
            outs = [msgs[base]]
            msgs[base] = None
        else:
            outs = msgs[base:base + k]
            for j in range(base, base + k):
                msgs[j] = None
        if requested:
            for j in range(k):
                s = base + j
                if s in requested:
                    m = outs[j]
                    value = held[requested[s]]
                    if value is None and m is not None and m.g is not None:
                        value = run.value(s, "requested graph edge")  # a GradientEdge input: promised
                    captured[s] = _relevance_of(m, value)
                    if s in terminal:
                        outs[j] = None  # relevance ends at a requested tensor
        if not run_node[i]:
            continue
        if all(m is None for m in outs):
            if book is not None:
                for j in range(k):
                    arrived.pop(base + j, None)
            continue
        step = steps[i]
        if book is None:
            ins = step(run, outs)
        else:
            t_out = _arrived_total(run, arrived, base, k, outs)
            run.carried = []
            for j in range(k):
                run.carried += carry.pop(base + j, [])
            run.local = None
            ins = step(run, outs)
            if t_out is not UNKNOWN and run.local is not None:
                t_out = t_out - run.local
            run.carry_out = {}
            t_ins = step.book(run, t_out, step.input_totals(run, ins), outs)
            for pos, names in run.carry_out.items():
                if edges[i][pos] >= 0:
                    carry.setdefault(edges[i][pos], []).extend(names)
            for s_in, t in zip(edges[i], t_ins):
                if s_in >= 0 and t is not None:
                    prev = arrived.get(s_in)
                    if prev is None:
                        arrived[s_in] = t
                    elif prev is UNKNOWN or t is UNKNOWN:
                        arrived[s_in] = UNKNOWN
                    else:
                        arrived[s_in] = prev + t
        row = edges[i]
        for pos, m in enumerate(ins):
            if m is None:
                continue
            s = row[pos]
            if s < 0 or not wanted[s]:
                continue
            cur = msgs[s]
            if cur is None:
                msgs[s] = m
            else:
                cur.add(m)
        # release this node's incoming messages now, not when the next node overwrites the names
        outs = ins = m = cur = None
    return captured


def _seed_message(seed: Tensor, out: Tensor) -> Msg:
    """A seed in gradient form, ``G = seed / output`` (exactly 1 for the default seed), so that no rule needs
    the output's value to read it; seed elements on an exactly-zero output stay explicit relevance."""
    zero = out == 0
    if not bool(zero.any()):
        return Msg(g=seed / out)
    g = torch.where(zero, torch.zeros((), dtype=seed.dtype, device=seed.device), seed / torch.where(zero, 1, out))
    r = torch.where(zero, seed, torch.zeros((), dtype=seed.dtype, device=seed.device))
    return Msg(g=g, r=r if bool(r.any()) else None)


def _arrived_total(run: Run, arrived: dict[int, Any], base: int, k: int, outs: list[Msg | None]) -> Any:
    """Relevance that arrived at a node: the totals its consumers reported, measured from the node's output
    value where a consumer could not report one."""
    total = None
    for j in range(k):
        m = outs[j]
        t = arrived.pop(base + j, None)
        if m is None:
            continue
        if t is None or t is UNKNOWN:
            try:
                t = run.total(base + j, m)
            except Exception:  # noqa: BLE001
                t = run.shifted_total(base + j, m)
                if t is None:
                    return UNKNOWN
        total = t if total is None else total + t
    return total


def _relevance_of(m: Msg | None, value: Tensor | None) -> Tensor | None:
    if m is None:
        return None if value is None else torch.zeros_like(value.detach())
    return m.explicit(value.detach() if value is not None else None)
