"""Running a plan: the propagation loop.

``compute`` prepares the call (:mod:`.prepare`), gets a plan (:mod:`.plan`, from the caller's cache or new), and
runs :func:`propagate`: for each node in topological order (every consumer before its producers), pop the
messages of its outputs, capture requested slots, call the node's step and add its input messages into the
producers' slots. Forward values come from the Promise System (:class:`~dynamiclrp.core.promises.ValueStore`);
the ledger, when asked for, watches the loop (:class:`~dynamiclrp.core.ledger.LedgerObserver`).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..errors import ConditionError, DynamicLRPError, ValueUnavailableError
from .graph import output_meta, saved
from .ledger import Ledger, LedgerObserver
from .messages import Msg, finite_sum, safe_div
from .params import ModelParams
from .plan import PlanCache, Planner
from .prepare import Prepared, check_unused, prepare
from .promises import ValueStore
from .results import Explanation

if TYPE_CHECKING:  # pragma: no cover
    from .plan import RuleChooser

Tensor = torch.Tensor


class Run:
    """State of one relevance pass: the plan, the values, and the ledger (``None`` unless asked for).

    Steps call :meth:`value`, :meth:`support` and :meth:`const` for forward values, and :meth:`book_local` to book
    a sink they measured themselves; ``local``, ``carried`` and ``carry_out`` are the ledger's per-step state.

    ``functional`` is true when the pass must be a pure function of its messages: relevance that is itself
    differentiable (``create_graph=True``: autograd records every step, so no step may write into a tensor in
    place) or a pass vectorised over concepts (``torch.func.vmap``). Steps then take their out-of-place paths.
    ``conditions`` (``slot -> mask``) and ``exclude_parallel`` are the concept conditions the loop applies.
    """

    __slots__ = ("graph", "values", "ledger", "planner", "local", "carried", "carry_out", "functional",
                 "differentiable", "conditions", "exclude_parallel")

    def __init__(self, planner: Planner, values: ValueStore, ledger: Ledger | None, *, functional: bool = False,
                 differentiable: bool = False, conditions: dict[int, Tensor] | None = None,
                 exclude_parallel: bool = True):
        self.planner = planner
        self.graph = planner.graph
        self.values = values
        self.ledger = ledger
        self.functional = functional or differentiable
        self.differentiable = differentiable
        self.conditions = conditions or {}
        self.exclude_parallel = exclude_parallel
        self.local: Tensor | None = None  # sinks a step booked itself during its current call
        self.carried: list[str] = []  # ledger: constants whose shares ride in the current node's arrived total
        self.carry_out: dict[int, list[str]] = {}  # ledger: input position -> constants carried onwards

    def book_local(self, kind: str, index: int, total: Tensor, note: str = "", where: str | None = None) -> None:
        """Book a sink from inside a step (e.g. a constant bias); it is excluded from the step's residual.
        ``where`` names it (default: the node, with its module when the model is known)."""
        if self.ledger is None:
            return
        self.ledger.book(kind, where or self.planner.label(index), total, note)
        self.local = total if self.local is None else self.local + total

    def value(self, slot: int, origin: str = "") -> Tensor:
        """Forward value of ``slot`` (read, rebuilt or replayed by the Promise System)."""
        return self.values.get(slot, origin)

    def support(self, slot: int, origin: str = "") -> Tensor:
        """The value of ``slot`` wherever gradient-form relevance can reach it (0 where it cannot be known).

        Equals the full value when the Promise System has one; otherwise it is recovered from the slot's consumers
        (selections, a ReLU's saved output, inverses of saved outputs, sums and products with a known other
        operand: :meth:`~dynamiclrp.core.promises.PromiseResolver.support`). A z-rule reads values only where the
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

    def value_under(self, slot: int, r: Tensor, origin: str = "") -> Tensor:
        """The value of ``slot`` wherever the explicit relevance ``r`` lies: the full value when there is one,
        else the value on the support, with a check (read after the loop) that ``r`` is zero where that is not
        exact."""
        if self.planner.can_value(slot):
            return self.value(slot, origin)
        v, mask = self.support_masked(slot, origin)
        if mask is not None:
            graph = self.graph
            self.values.checks.add((r != 0).logical_and_(~mask.expand_as(r)).any(), lambda: ValueUnavailableError(
                f"explicit relevance reaches output {graph.slot_nr[slot]} of "
                f"{graph.describe(graph.slot_node[slot])} where its forward value cannot be recovered "
                "from the graph; pass model= so frozen constants can be read from the model, or choose rules "
                "that keep relevance in gradient form there"))
        return v

    def r_to_g(self, slot: int, r: Tensor) -> Tensor:
        """Turn explicit relevance at ``slot`` into gradient form by dividing by the slot's value (its value on
        the support will do when the relevance lies inside it)."""
        v = self.value_under(slot, r, "conversion to gradient form")
        if v.shape != r.shape:
            v = v.expand_as(r)
        g = safe_div(r, v)
        if self.ledger is not None:
            lost = torch.where(v == 0, r, torch.zeros((), dtype=r.dtype, device=r.device)).sum()
            self.book_local("conversion", self.graph.slot_node[slot], lost,
                            "relevance on a zero activation cannot be passed on in gradient form")
        return g

    def total(self, slot: int, msg: Msg | None) -> Tensor | None:
        """Total relevance of ``msg`` at ``slot`` (needs the slot's value for the gradient-form part, on the
        support: ``g`` is zero wherever the value is not known)."""
        if msg is None:
            return None
        t = None
        if msg.g is not None:
            v = self.support(slot, "ledger")
            # at a complex slot (FFT mixing) the relevance of a gradient-form message is Re(conj(G)·v): what every
            # real-valued composition through it (.real, abs²...) reads back
            t = finite_sum((msg.g.conj() * v).real if v.is_complex() else msg.g * v)
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
            spec = self.planner.specs[c]
            if spec is None:
                return None
            if spec.family == "softmax" and not getattr(spec.kernel, "log", True):
                res = saved(g.nodes[c], "result")
                logs = torch.where(res > 0, torch.log(torch.where(res > 0, res, 1)), 0)
                if logs.numel() != msg.g.numel():
                    return None
                return (logs.reshape(msg.g.shape).to(msg.g.dtype) * msg.g).sum()
            if spec.view and (g.n_out[c] or 1) == 1:
                s = g.slot_base[c]
                continue
            return None
        return None


def compute(outputs: Tensor | Sequence[Tensor], inputs: Any, seeds: Any = None, *, rules: "RuleChooser",
            ledger: bool = False, model: torch.nn.Module | None = None, trace_promises: bool = False,
            cache: PlanCache | None = None, seed_messages: Sequence[Msg] | None = None,
            finish_ledger: bool = True, conditions: Sequence[tuple[Any, Tensor]] = (),
            exclude_parallel: bool = True, concepts: int | None = None, vectorize: bool = True,
            create_graph: bool = False, values: bool = False, allow_unused: bool = False) -> Explanation:
    """Run one relevance pass with the rule set ``rules`` (see :func:`dynamiclrp.explain` for the parameters);
    ``cache`` reuses plans.

    ``conditions`` are ``(tensor or GradientEdge, mask)`` pairs: the relevance passing each tensor is multiplied
    by its mask (Concept Relevance Propagation's conditions, "and" over several tensors); with
    ``exclude_parallel`` only relevance that passed the conditioned tensors goes on below them. With ``concepts``
    (an int) every mask has a leading dimension of that many concepts and every relevance tensor gets one: the
    pass is vectorised over the concepts (``torch.func.vmap``) where every step allows it, and repeated per
    concept otherwise (or when ``vectorize`` is false). ``create_graph`` records the pass with autograd, so the
    relevance is differentiable with respect to the inputs and parameters. ``values`` returns the forward value
    of every requested input with the relevance (:attr:`Explanation.values`). ``allow_unused``: inputs not in the
    graph get zeros instead of an :class:`~dynamiclrp.errors.UnusedInputError`.

    For rules that run an inner pass on a re-expressed node: ``seed_messages`` gives the starting messages
    themselves, one per output, in the form they arrived at the node (``seeds`` must still be their explicit
    relevance, for the ledger); ``finish_ledger=False`` leaves the ledger's totals unread on the device
    (:meth:`~dynamiclrp.core.ledger.Ledger.pending`), so that the outer pass books them without a sync.

    Works inside ``torch.inference_mode()`` too, for a graph recorded outside it: the pass itself runs with
    inference mode off (it reads the graph and creates ordinary tensors).
    """
    with torch.inference_mode(False):
        return _compute(outputs, inputs, seeds, rules, ledger, model, trace_promises, cache, seed_messages,
                        finish_ledger, conditions, exclude_parallel, concepts, vectorize, create_graph, values,
                        allow_unused)


def _compute(outputs: Any, inputs: Any, seeds: Any, rules: "RuleChooser", ledger: bool, model: torch.nn.Module | None,
             trace_promises: bool, cache: PlanCache | None, seed_messages: Sequence[Msg] | None,
             finish_ledger: bool, conditions: Sequence[tuple[Any, Tensor]], exclude_parallel: bool,
             concepts: int | None, vectorize: bool, create_graph: bool, values: bool,
             allow_unused: bool) -> Explanation:
    if concepts is not None and not conditions:
        raise ConditionError("concepts= counts the concepts along the conditions' first dimension: pass conditions")
    if concepts is not None and ledger:
        raise ValueError("a ledger is kept for one pass at a time: explain the concepts one by one "
                         "(conditions without a concept dimension) to get a ledger for each")
    call = prepare(outputs, inputs, seeds, conditions, keep_graph=create_graph, concepts=concepts)
    check_unused(call, allow_unused)
    _warn_whole_matrix(call, rules)
    if model is None:
        model = rules.model
    mode = torch.enable_grad() if create_graph else torch.no_grad()
    with mode:
        planner = _plan(call, rules, ledger, model, cache)
        if call.conditions and exclude_parallel:
            _check_chain(call.graph, list(call.conditions))
        book = Ledger() if ledger else None

        def new_run(conds: dict[int, Tensor], functional: bool) -> Run:
            store = ValueStore(call.graph, planner.specs, planner.resolver, call.held,
                               params=planner.resolver.params, trace=trace_promises, differentiable=create_graph)
            return Run(planner, store, book, functional=functional, differentiable=create_graph,
                       conditions=conds, exclude_parallel=exclude_parallel)

        def one_pass(run: Run) -> dict[int, Tensor]:
            return propagate(run, call.seeds, call.held, call.default_seeds, seed_messages)

        run = None
        passes = 1
        if concepts is None:
            run = new_run(call.conditions, False)
            relevance = _collect(call, one_pass(run), create_graph)
        else:
            relevance, passes = _per_concept(call, new_run, one_pass, concepts, vectorize, create_graph)
        held_values = _values(call, run or new_run({}, False), create_graph) if values else None
    if book is not None and run is not None:
        n_out = len(call.outputs)
        for k, slot in enumerate(call.input_slots):
            if slot is not None and slot in planner.terminal and call.requested.get(slot) == n_out + k:
                book.requested(f"inputs[{k}]", relevance[k].sum())
        book.seed(sum(s.sum() for s in call.seeds))
        if finish_ledger:
            book.finish()
    records = run.values.records if (trace_promises and run is not None) else []
    return Explanation(tuple(relevance), book, records, held_values, passes)


def _per_concept(call: Prepared, new_run: Callable[[dict[int, Tensor], bool], "Run"],
                 one_pass: Callable[["Run"], dict[int, Tensor]], n: int, vectorize: bool,
                 keep_graph: bool) -> tuple[list[Tensor], int]:
    """One pass per concept: the conditions' masks carry a leading concept dimension. Vectorised with
    ``torch.func.vmap`` (the part of the graph above the conditioned tensors, which no mask touches, runs once);
    a step that branches on the values of its messages cannot be vectorised, and then each concept runs alone."""
    slots = list(call.conditions)
    masks = [call.conditions[s] for s in slots]

    def one(*ms: Tensor) -> tuple[Tensor, ...]:
        run = new_run(dict(zip(slots, ms)), True)
        return tuple(_collect(call, one_pass(run), keep_graph))

    if vectorize and n > 1:
        try:
            return list(torch.func.vmap(one)(*masks)), 1
        except DynamicLRPError:
            raise
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            pass  # a step that cannot be vectorised: one pass per concept below (which re-raises a real error)
    per = [one(*(m[k] for m in masks)) for k in range(n)]
    return [torch.stack([p[j] for p in per]) for j in range(len(per[0]))], n


def _values(call: Prepared, run: "Run", keep_graph: bool) -> tuple[Tensor | None, ...]:
    """The forward value of every requested input: the tensor itself, or, for a graph edge, what the Promise
    System recovers (``None`` where it cannot)."""
    out: list[Tensor | None] = []
    for t, slot in zip(call.inputs, call.input_slots):
        if isinstance(t, torch.Tensor):
            out.append(t if keep_graph else t.detach())
            continue
        try:
            v = run.value(slot, "values=True") if slot is not None else None
        except ValueUnavailableError:
            v = None
        out.append(v if (v is None or keep_graph) else v.detach())
    return tuple(out)


def _check_chain(graph: Any, slots: list[int]) -> None:
    """With ``exclude_parallel``, conditioned tensors must lie one below the other: only relevance that passed the
    upper one reaches the lower one, so one on a parallel branch would receive none."""
    pos = {node: k for k, node in enumerate(graph.order)}
    chain = sorted(slots, key=lambda s: (pos[graph.slot_node[s]], s))
    for a, b in zip(chain, chain[1:]):
        target = graph.slot_node[b]
        start = graph.slot_node[a]
        seen = {start}
        stack = [start]
        found = False
        while stack and not found:
            i = stack.pop()
            for e in graph.edges[i]:
                if e < 0:
                    continue
                j = graph.slot_node[e]
                if j == target:
                    found = True
                    break
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        if not found:
            raise ConditionError(
                f"conditions on output {graph.slot_nr[a]} of {graph.describe(graph.slot_node[a])} and output "
                f"{graph.slot_nr[b]} of {graph.describe(target)}: neither lies below the other (parallel branches), "
                "so with exclude_parallel=True (only relevance that passed every conditioned tensor goes on) the "
                "lower one would receive nothing. Pass exclude_parallel=False, or condition on tensors that lie on "
                "one path.")


def _warn_whole_matrix(call: Prepared, rules: "RuleChooser") -> None:
    """Warn when an output explained with the default seed looks like a whole logits matrix: the explanation is then
    that of the *sum* of all its classes, which is rarely what was meant (``relevance(logits, x)``)."""
    for k, default in enumerate(call.default_seeds):
        if not default:
            continue
        o = call.outputs[k]
        if o.dim() < 2 or o.shape[-1] < 2:
            continue
        spec = rules.spec_for(call.graph.types[call.graph.slot_node[call.graph.root_slots[k]]])
        if spec is not None and spec.selection:  # logits[:, c], logits.gather(...): a chosen part
            continue
        warnings.warn(
            f"outputs[{k}] has shape {tuple(o.shape)} and the default seed (its own value), so the explanation is "
            f"that of the sum of all its {o.shape[-1]} entries along the last dimension (e.g. all classes of a "
            "logits matrix), which is rarely what is meant. To explain class c of each row pass logits[:, c] (or "
            "logits.gather(1, y[:, None])); to explain the sum on purpose, pass the seed explicitly "
            "(seeds=out.detach()).", UserWarning, stacklevel=4)


def _plan(call: Prepared, rules: "RuleChooser", ledger: bool, model: torch.nn.Module | None,
          cache: PlanCache | None) -> Planner:
    """The plan for this call: from the cache (same graph signature), or made now."""
    specs = [rules.spec_for(t) for t in call.graph.types]
    key = None
    if cache is not None and rules.override is None:
        static = [spec.static_fields if spec is not None else () for spec in specs]
        key = (call.graph.signature(static), tuple(sorted(call.requested.items())), tuple(sorted(call.sources)),
               tuple(sorted(call.known.items())), ledger, id(rules), model is not None)
        cached = cache.get(key)
        if cached is not None:
            return cached.rebind(call.graph, model)
    params = ModelParams(model) if model is not None else None
    planner = Planner(call.graph, rules, call.requested, call.sources, call.known, everywhere=ledger, model=model,
                      specs=specs, params=params)
    if cache is not None and key is not None:
        cache.put(key, planner.rebind(None, None))  # the cache must not keep this graph alive
    return planner


def _collect(call: Prepared, captured: dict[int, Tensor], keep_graph: bool = False) -> list[Tensor]:
    """One relevance tensor per input, with the input's shape and dtype (zeros where nothing arrived); attached
    to the autograd graph when ``keep_graph`` (differentiable relevance), detached otherwise."""
    out = []
    for t, slot in zip(call.inputs, call.input_slots):
        r = captured.get(slot) if slot is not None else None
        if isinstance(t, torch.Tensor):
            if r is None:
                r = torch.zeros_like(t, memory_format=torch.contiguous_format)
            out.append((r if keep_graph else r.detach()).to(dtype=t.dtype))
            continue
        m = output_meta(t.node)[t.output_nr]  # a GradientEdge
        if r is None:
            r = torch.zeros(m.shape, dtype=m.dtype, device=m.device)
        out.append((r if keep_graph else r.detach()).to(dtype=m.dtype))
    return out


def propagate(run: Run, seeds: list[Tensor], held: list[Tensor | None], default_seeds: Sequence[bool] = (),
              seed_messages: Sequence[Msg] | None = None) -> dict[int, Tensor]:
    """The relevance pass: every node in topological order, messages summed per slot; returns the relevance
    captured at the requested slots.

    The loop never waits for the device: no step reads a tensor's value on the host except the ledger's totals
    (``explain(..., ledger=True)``). Checks on values are deferred (:class:`~dynamiclrp.core.checks.DeferredChecks`)
    and read once, after the loop. ``default_seeds[k]`` says that output ``k`` is seeded with its own value;
    ``seed_messages`` replaces the seeds' messages (see :func:`compute`).
    """
    try:
        captured = _loop(run, seeds, held, default_seeds, seed_messages)
    except Exception:
        run.values.checks.raise_first()  # a failed value check explains what went wrong next
        raise
    run.values.checks.raise_first()
    return captured


def _loop(run: Run, seeds: list[Tensor], held: list[Tensor | None], default_seeds: Sequence[bool],
          seed_messages: Sequence[Msg] | None) -> dict[int, Tensor]:
    planner, g = run.planner, run.graph
    requested, terminal, steps, wanted = planner.requested, planner.terminal, planner.steps, planner.wanted
    observer = LedgerObserver(run) if run.ledger is not None else None
    conditions, cut = run.conditions, run.exclude_parallel
    keep = run.differentiable
    msgs: list[Msg | None] = [None] * len(g.slot_node)
    for k, (slot, s) in enumerate(zip(g.root_slots, seeds)):
        if seed_messages is not None:
            m = Msg(seed_messages[k].g, seed_messages[k].r)
        else:
            m = _seed_message(s, held[k] if keep else held[k].detach(),
                              k < len(default_seeds) and default_seeds[k])
        cur = msgs[slot]
        if cur is None:
            msgs[slot] = m
        else:
            cur.add(m)
        if observer is not None:
            observer.seeded(slot, s)
    captured: dict[int, Tensor] = {}
    for i in g.order:
        base, k = g.slot_base[i], g.n_out[i] or 1
        outs, msgs[base:base + k] = msgs[base:base + k], [None] * k
        if conditions and any(base + j in conditions for j in range(k)):
            _condition(run, msgs, outs, base, k, cut, observer)
        if requested:
            for j in range(k):
                if base + j in requested:
                    captured[base + j] = _capture(run, base + j, outs[j], held[requested[base + j]])
                    if base + j in terminal:
                        outs[j] = None  # relevance ends at a requested tensor
        if not planner.run_node[i]:
            continue
        if all(m is None for m in outs):
            if observer is not None:
                observer.skipped(base, k)
            continue
        step = steps[i]
        t_out = observer.before(base, k, outs) if observer is not None else None
        ins = step(run, outs)
        if observer is not None:
            observer.after(i, step, outs, ins, t_out)
        for s, m in zip(g.edges[i], ins):
            if m is not None and s >= 0 and wanted[s]:
                cur = msgs[s]
                if cur is None:
                    msgs[s] = m
                else:
                    cur.add(m)
        outs = ins = m = cur = None  # release this node's messages now, not when the next node rebinds the names
    return captured


def _condition(run: Run, msgs: list[Msg | None], outs: list[Msg | None], base: int, k: int, cut: bool,
               observer: LedgerObserver | None) -> None:
    """Concept conditions at a node's outputs: mask the relevance of each conditioned output (in both message
    forms: a mask on ``G`` is the same mask on ``R = value·G``); with ``cut`` (exclude_parallel) drop every other
    message still in flight, which has not passed the conditioned tensor."""
    conditions = run.conditions
    for j in range(k):
        mask = conditions.get(base + j)
        if mask is None:
            continue
        before = outs[j]
        outs[j] = after = _masked(before, mask)
        if observer is not None:
            observer.conditioned(base + j, before, after)
    if not cut:
        return
    for j in range(k):
        if base + j not in conditions and outs[j] is not None:
            if observer is not None:
                observer.dropped(base + j, outs[j])
            outs[j] = None
    for s, m in enumerate(msgs):
        if m is not None:
            if observer is not None:
                observer.dropped(s, m)
            msgs[s] = None


def _masked(m: Msg | None, mask: Tensor) -> Msg | None:
    if m is None:
        return None
    ref = m.g if m.g is not None else m.r
    assert ref is not None
    mk = mask.to(ref.dtype)
    return Msg(g=None if m.g is None else m.g * mk, r=None if m.r is None else m.r * mk)


def _seed_message(seed: Tensor, out: Tensor, default: bool = False) -> Msg:
    """A seed in gradient form, ``G = seed / output`` (exactly 1 for the default seed), so that no rule needs
    the output's value to read it; seed elements on an exactly-zero output stay explicit relevance.

    The default seed (the output's own value) is zero wherever the output is, so it needs no explicit part and
    no look at the values on the host; another seed costs one host sync per output, before the loop."""
    zero = out == 0
    if default:
        return Msg(g=torch.where(zero, torch.zeros((), dtype=seed.dtype, device=seed.device),
                                 seed / torch.where(zero, 1, out)))
    if not bool(zero.any()):
        return Msg(g=seed / out)
    g = torch.where(zero, torch.zeros((), dtype=seed.dtype, device=seed.device), seed / torch.where(zero, 1, out))
    r = torch.where(zero, seed, torch.zeros((), dtype=seed.dtype, device=seed.device))
    return Msg(g=g, r=r if bool(r.any()) else None)


def _capture(run: Run, slot: int, m: Msg | None, value: Tensor | None) -> Tensor | None:
    """The relevance a requested slot received, in explicit form."""
    if value is None and m is not None and m.g is not None:
        value = run.value(slot, "requested graph edge")  # a GradientEdge input: promised
    if value is not None and not run.differentiable:
        value = value.detach()
    if m is None:
        return None if value is None else torch.zeros_like(value)
    return m.explicit(value)
