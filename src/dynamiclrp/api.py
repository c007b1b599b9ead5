"""The two entry points: :func:`relevance` and :func:`explain`."""
from __future__ import annotations

from typing import Sequence

import torch

from .conditions import Conditions, resolve_conditions
from .core.plan import PlanCache
from .core.results import Explanation
from .core.run import compute
from .presets import Rules, resolve


Tensor = torch.Tensor
#: a tensor whose relevance is wanted: a tensor of the graph, or an autograd graph edge
InputLike = Tensor | torch.autograd.graph.GradientEdge
#: starting relevance: one tensor (or number, or ``None`` for the default) per output, or one number for all
Seeds = Tensor | float | Sequence[Tensor | float | None] | None


def relevance(outputs: Tensor | Sequence[Tensor], inputs: InputLike | Sequence[InputLike],
              seeds: Seeds = None, *, rules: Rules = None,
              model: torch.nn.Module | None = None, conditions: Conditions | None = None,
              exclude_parallel: bool = True, create_graph: bool = False,
              allow_unused: bool = False) -> tuple[Tensor, ...]:
    """Layer-wise Relevance Propagation relevance of ``inputs`` for ``outputs``, like ``torch.autograd.grad``.

    The autograd graph of an ordinary forward pass is walked operation by operation from ``outputs`` to
    ``inputs``; each node type has an explicit rule (Lee & Millan Arias 2025, "DynamicLRP"). The model is not
    modified, hooked or re-run, its parameters and their ``.grad`` are untouched, and the graph can still be
    used for ``backward()`` afterwards.

    Parameters
    ----------
    outputs : Tensor or sequence of Tensor
        Tensors of the forward pass to explain (each must have a ``grad_fn``). To explain class ``c`` of each
        row of ``logits``, pass ``logits[:, c]`` (or ``logits.gather(1, y[:, None])``); rows are explained
        independently.
    inputs : Tensor or sequence of Tensor
        Tensors whose relevance is wanted: leaves that require grad (inputs, parameters) or intermediate tensors
        of the same graph (e.g. input embeddings).
    seeds : Tensor, number or sequence of (Tensor, number or None), optional
        Starting relevance of each output, same shape (a number: that value at every element, e.g. ``seeds=1.0``).
        Default: the outputs' own values, so that with a conservative rule set the input relevance sums to the
        explained outputs. Explaining a whole logits matrix with the default seed explains the *sum* of all its
        classes and raises a warning: select the class (``logits[:, c]``) or pass the seeds explicitly.
    rules : None, str or RuleSet, optional
        ``None`` for the default (:func:`dynamiclrp.presets.epsilon`), a preset name (``"epsilon"``,
        ``"zero"``, ``"attnlrp"``, ``"cplrp"``, ``"paper"``, ``"epsilon_plus"``...) or a
        :class:`~dynamiclrp.rules.RuleSet`.
    model : torch.nn.Module, optional
        The model that produced ``outputs``. Pass it when its parameters are frozen (``requires_grad_(False)``,
        the usual way to explain): autograd does not keep a frozen bias, and some rules need it where no op of
        the graph kept the layer's output; it is then read, never modified, from the module that owns the
        layer's saved weight. Without ``model=`` such a case raises :class:`ValueUnavailableError` naming the op.
    conditions : mapping, optional
        Concept Relevance Propagation (Achtibat et al. 2023, Nat. Mach. Intell. 5:1006): explain the outputs
        *through* chosen units of intermediate tensors, ``{tensor: units}`` — e.g. ``{feature_map: {"channel":
        [12, 40]}}``, ``{"features.10": [12]}`` (a module name, resolved through the graph with ``model=``),
        ``{edge: dynamiclrp.conditions.heads([3], 8)}``. The relevance passing each tensor is masked to its units;
        several tensors combine with "and". See :mod:`dynamiclrp.conditions` for every way to name tensors and
        units, and :mod:`dynamiclrp.concepts` for many concepts at once, concept relevance and reference samples.
    exclude_parallel : bool
        With ``conditions``: only relevance that passed every conditioned tensor continues below it; relevance on
        parallel paths (a residual connection around a conditioned block) is dropped (zennit-crp's default).
        ``False`` masks the conditioned tensors and lets everything else flow.
    create_graph : bool
        Record the relevance pass with autograd, so that the returned relevance is differentiable with respect
        to the inputs and the model's parameters (those that require grad) and can be part of a training loss —
        explanation-guided learning, e.g. "right for the right reasons" (Ross et al. 2017, IJCAI). Costs about
        one more backward pass when differentiated.
    allow_unused : bool, optional
        Like ``torch.autograd.grad``: an input that is not in the graph of ``outputs`` (a copy of the tensor the
        model saw, a slice taken after the forward pass, a tensor the outputs do not depend on) raises
        :class:`UnusedInputError` by default; with ``allow_unused=True`` its relevance is zeros.

    Returns
    -------
    tuple of Tensor
        One tensor per input, with the input's shape, dtype and device. Detached, unless ``create_graph=True``.

    Raises
    ------
    UnsupportedOperationError
        A node type without a rule (e.g. a custom ``torch.autograd.Function``): register one with
        ``RuleSet.with_ops``.
    UnusedInputError
        An input is not in the graph of the outputs (and ``allow_unused`` is false).
    UnsupportedTensorError
        A sparse or complex output, input or seed.
    GraphFreedError
        The graph's saved tensors were freed by an earlier ``backward()``.

    Examples
    --------
    >>> import torch, dynamiclrp
    >>> lin = torch.nn.Linear(3, 2)
    >>> x = torch.randn(4, 3, requires_grad=True)
    >>> (r,) = dynamiclrp.relevance(lin(x)[:, 0], x, rules="zero")
    >>> r.shape
    torch.Size([4, 3])
    """
    ruleset = resolve(rules)
    conds = resolve_conditions(outputs, conditions, model or ruleset.model, ruleset)
    return compute(outputs, inputs, seeds, rules=ruleset, ledger=False, model=model, conditions=conds,
                   exclude_parallel=exclude_parallel, create_graph=create_graph,
                   allow_unused=allow_unused).relevance


def explain(outputs: Tensor | Sequence[Tensor], inputs: InputLike | Sequence[InputLike],
            seeds: Seeds = None, *, rules: Rules = None, ledger: bool = True,
            model: torch.nn.Module | None = None, trace_promises: bool = False, conditions: Conditions | None = None,
            exclude_parallel: bool = True, create_graph: bool = False, values: bool = False,
            allow_unused: bool = False) -> Explanation:
    """Like :func:`relevance`, returning an :class:`~dynamiclrp.core.results.Explanation` with the ledger.

    Parameters
    ----------
    outputs, inputs, seeds, rules, allow_unused
        As in :func:`relevance`.
    ledger : bool, optional
        Account for every unit of seed relevance: requested inputs, or named sinks (biases, unrequested leaves,
        constants, stabilizers, non-conservative rules). Propagates through the whole graph, so it costs more
        than :func:`relevance`. ``ex.unaccounted`` is ≈ 0.
    model : torch.nn.Module, optional
        As in :func:`relevance`; also names parameters in the ledger.
    trace_promises : bool, optional
        Keep every value the Promise System recovered (``ex.promises``), for inspection and tests.
    conditions, exclude_parallel, create_graph
        As in :func:`relevance`. With a ledger, the relevance a condition removes is booked as ``condition``
        sinks, so the ledger still closes.
    values : bool, optional
        Also return the forward value of every requested input (``ex.values``): for an intermediate tensor
        requested as a graph edge, its activation, recovered by the Promise System.

    Returns
    -------
    Explanation
    """
    ruleset = resolve(rules)
    conds = resolve_conditions(outputs, conditions, model or ruleset.model, ruleset)
    return compute(outputs, inputs, seeds, rules=ruleset, ledger=ledger, model=model,
                   trace_promises=trace_promises, conditions=conds, exclude_parallel=exclude_parallel,
                   create_graph=create_graph, values=values, allow_unused=allow_unused)


class Explainer:
    """A reusable explainer: fixed rules, and a cache of plans for graphs it has seen.

    Explaining many inputs of the same shape with one model re-plans nothing after the first call: the plan
    (rule per node, value recipes, traversal order) is looked up by the graph's signature. A graph that differs
    in any node type, edge, shape or planning-relevant saved field gets a new plan.

    Parameters
    ----------
    rules : None, str or RuleSet
        As in :func:`relevance`.
    model : torch.nn.Module, optional
        As in :func:`relevance` (frozen constants; names in ledgers).
    cache_size : int
        Number of plans kept (least recently used evicted first).

    Examples
    --------
    >>> import torch, dynamiclrp
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> explainer = dynamiclrp.Explainer("epsilon")
    >>> for _ in range(3):
    ...     x = torch.randn(5, 3, requires_grad=True)
    ...     (r,) = explainer.relevance(net(x)[:, 0], x)
    >>> explainer.cache_info()["hits"]
    2
    """

    def __init__(self, rules: Rules = None, *, model: torch.nn.Module | None = None, cache_size: int = 16):
        self.rules = resolve(rules)
        self.model = model
        self._cache = PlanCache(cache_size)

    def relevance(self, outputs: Tensor | Sequence[Tensor], inputs: InputLike | Sequence[InputLike],
                  seeds: Seeds = None, *, conditions: Conditions | None = None,
                  exclude_parallel: bool = True, create_graph: bool = False,
                  allow_unused: bool = False) -> tuple[Tensor, ...]:
        """:func:`relevance` with this explainer's rules and plan cache."""
        conds = resolve_conditions(outputs, conditions, self.model or self.rules.model, self.rules)
        return compute(outputs, inputs, seeds, rules=self.rules, ledger=False, model=self.model,
                       cache=self._cache, conditions=conds, exclude_parallel=exclude_parallel,
                       create_graph=create_graph, allow_unused=allow_unused).relevance

    def explain(self, outputs: Tensor | Sequence[Tensor], inputs: InputLike | Sequence[InputLike],
                seeds: Seeds = None, *, ledger: bool = True,
                trace_promises: bool = False, conditions: Conditions | None = None, exclude_parallel: bool = True,
                create_graph: bool = False, values: bool = False,
                allow_unused: bool = False) -> Explanation:
        """:func:`explain` with this explainer's rules and plan cache."""
        conds = resolve_conditions(outputs, conditions, self.model or self.rules.model, self.rules)
        return compute(outputs, inputs, seeds, rules=self.rules, ledger=ledger, model=self.model,
                       trace_promises=trace_promises, cache=self._cache, conditions=conds,
                       exclude_parallel=exclude_parallel, create_graph=create_graph, values=values,
                       allow_unused=allow_unused)

    def cache_info(self) -> dict[str, int]:
        """``{"hits", "misses", "plans", "size"}`` of the plan cache."""
        c = self._cache
        return {"hits": c.hits, "misses": c.misses, "plans": len(c), "size": c.size}

    def __repr__(self) -> str:
        return f"Explainer({self.rules!r}, cache={self.cache_info()})"
