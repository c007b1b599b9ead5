"""The two entry points: :func:`relevance` and :func:`explain`."""
from __future__ import annotations

from typing import Sequence

import torch

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
              model: torch.nn.Module | None = None, allow_unused: bool = False) -> tuple[Tensor, ...]:
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

    Returns
    -------
    tuple of Tensor
        One tensor per input, with the input's shape, dtype and device. Inputs the outputs do not depend on get
        zeros.

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
    return compute(outputs, inputs, seeds, rules=resolve(rules), ledger=False, model=model,
                   allow_unused=allow_unused).relevance


def explain(outputs: Tensor | Sequence[Tensor], inputs: InputLike | Sequence[InputLike],
            seeds: Seeds = None, *, rules: Rules = None, ledger: bool = True,
            model: torch.nn.Module | None = None, trace_promises: bool = False,
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

    Returns
    -------
    Explanation
    """
    return compute(outputs, inputs, seeds, rules=resolve(rules), ledger=ledger, model=model,
                   trace_promises=trace_promises, allow_unused=allow_unused)


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
                  seeds: Seeds = None, *, allow_unused: bool = False) -> tuple[Tensor, ...]:
        """:func:`relevance` with this explainer's rules and plan cache."""
        return compute(outputs, inputs, seeds, rules=self.rules, ledger=False, model=self.model,
                       cache=self._cache, allow_unused=allow_unused).relevance

    def explain(self, outputs: Tensor | Sequence[Tensor], inputs: InputLike | Sequence[InputLike],
                seeds: Seeds = None, *, ledger: bool = True, trace_promises: bool = False,
                allow_unused: bool = False) -> Explanation:
        """:func:`explain` with this explainer's rules and plan cache."""
        return compute(outputs, inputs, seeds, rules=self.rules, ledger=ledger, model=self.model,
                       trace_promises=trace_promises, cache=self._cache, allow_unused=allow_unused)

    def cache_info(self) -> dict[str, int]:
        """``{"hits", "misses", "plans", "size"}`` of the plan cache."""
        c = self._cache
        return {"hits": c.hits, "misses": c.misses, "plans": len(c), "size": c.size}

    def __repr__(self) -> str:
        return f"Explainer({self.rules!r}, cache={self.cache_info()})"
