"""Running a plan: the propagation loop.

``compute`` prepares the call (:mod:`.prepare`), gets a plan (:mod:`.plan`, from the caller's cache or new), and
runs :func:`propagate`: for each node in topological order (every consumer before its producers), pop the
messages of its outputs, capture requested slots, call the node's step and add its input messages into the
producers' slots. Forward values come from the Promise System (:class:`~dynamiclrp.core.promises.ValueStore`);
the ledger, when asked for, watches the loop (:class:`~dynamiclrp.core.ledger.LedgerObserver`).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..errors import ValueUnavailableError
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
    """

    __slots__ = ("graph", "values", "ledger", "planner", "local", "carried", "carry_out")

    def __init__(self, planner: Planner, values: ValueStore, ledger: Ledger | None):
        self.planner = planner
        self.graph = planner.graph
        self.values = values
        self.ledger = ledger
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

    def r_to_g(self, slot: int, r: Tensor) -> Tensor:
        """Turn explicit relevance at ``slot`` into gradient form by dividing by the slot's value (its value on
        the support will do when the relevance lies inside it)."""
        if self.planner.can_value(slot):
            v = self.value(slot, "conversion to gradient form")
        else:
            v, mask = self.support_masked(slot, "conversion to gradient form")
            if mask is not None:
                graph = self.graph
                self.values.checks.add((r != 0).logical_and_(~mask.expand_as(r)).any(), lambda: ValueUnavailableError(
                    f"explicit relevance reaches output {graph.slot_nr[slot]} of "
                    f"{graph.describe(graph.slot_node[slot])} where its forward value cannot be recovered "
                    "from the graph; pass model= so frozen constants can be read from the model, or choose rules "
                    "that keep relevance in gradient form there"))
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
            t = finite_sum(msg.g * self.support(slot, "ledger"))
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
            finish_ledger: bool = True, allow_unused: bool = False) -> Explanation:
    """Run one relevance pass with the rule set ``rules`` (see :func:`dynamiclrp.explain` for the parameters);
    ``cache`` reuses plans. For rules that run an inner pass on a re-expressed node: ``seed_messages`` gives the
    starting messages themselves, one per output, in the form they arrived at the node (``seeds`` must still be
    their explicit relevance, for the ledger); ``finish_ledger=False`` leaves the ledger's totals unread on the
    device (:meth:`~dynamiclrp.core.ledger.Ledger.pending`), so that the outer pass books them without a sync.

    Works inside ``torch.inference_mode()`` too, for a graph recorded outside it: the pass itself runs with
    inference mode off (it reads the graph and creates ordinary tensors; nothing is recorded)."""
    with torch.inference_mode(False):
        return _compute(outputs, inputs, seeds, rules, ledger, model, trace_promises, cache, seed_messages,
                        finish_ledger, allow_unused)


def _compute(outputs: Any, inputs: Any, seeds: Any, rules: "RuleChooser", ledger: bool, model: torch.nn.Module | None,
             trace_promises: bool, cache: PlanCache | None, seed_messages: Sequence[Msg] | None,
             finish_ledger: bool, allow_unused: bool) -> Explanation:
    call = prepare(outputs, inputs, seeds)
    check_unused(call, allow_unused)
    _warn_whole_matrix(call, rules)
    if model is None:
        model = rules.model
    with torch.no_grad():
        planner = _plan(call, rules, ledger, model, cache)
        values = ValueStore(call.graph, planner.specs, planner.resolver, call.held, params=planner.resolver.params,
                            trace=trace_promises)
        book = Ledger() if ledger else None
        run = Run(planner, values, book)
        captured = propagate(run, call.seeds, call.held, call.default_seeds, seed_messages)
    relevance = _collect(call, captured)
    if book is not None:
        n_out = len(call.outputs)
        for k, slot in enumerate(call.input_slots):
            if slot is not None and slot in planner.terminal and call.requested.get(slot) == n_out + k:
                book.requested(f"inputs[{k}]", relevance[k].sum())
        book.seed(sum(s.sum() for s in call.seeds))
        if finish_ledger:
            book.finish()
    return Explanation(tuple(relevance), book, values.records if trace_promises else [])


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


def _collect(call: Prepared, captured: dict[int, Tensor]) -> list[Tensor]:
    """One relevance tensor per input, with the input's shape and dtype (zeros where nothing arrived)."""
    out = []
    for t, slot in zip(call.inputs, call.input_slots):
        r = captured.get(slot) if slot is not None else None
        if isinstance(t, torch.Tensor):
            if r is None:
                r = torch.zeros_like(t, memory_format=torch.contiguous_format)
            out.append(r.detach().to(dtype=t.dtype))
            continue
        m = output_meta(t.node)[t.output_nr]  # a GradientEdge
        if r is None:
            r = torch.zeros(m.shape, dtype=m.dtype, device=m.device)
        out.append(r.detach().to(dtype=m.dtype))
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
    msgs: list[Msg | None] = [None] * len(g.slot_node)
    for k, (slot, s) in enumerate(zip(g.root_slots, seeds)):
        if seed_messages is not None:
            m = Msg(seed_messages[k].g, seed_messages[k].r)
        else:
            m = _seed_message(s, held[k].detach(), k < len(default_seeds) and default_seeds[k])
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
    if m is None:
        return None if value is None else torch.zeros_like(value.detach())
    return m.explicit(value.detach() if value is not None else None)
