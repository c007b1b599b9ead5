"""Coverage report: which autograd node types of a graph have a relevance rule, and which rule.

The ``dynamiclrp coverage TARGET`` command (:mod:`dynamiclrp.cli.coverage`) builds a model, runs one forward pass
and prints this report.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .core.graph import GraphView, forward_cls, forward_op_name, gradient_edge, is_custom_function
from .core.params import ModelParams
from .core.plan import Planner
from .errors import DynamicLRPError
from .presets import Rules, resolve
from .rules.ruleset import RuleSet
from .rules.select import family_of

Tensor = torch.Tensor

__all__ = ["CoverageRow", "CoverageReport", "coverage", "add_arguments", "run", "load_target"]


# -----------------------------------------------------------------------------------------------------------
# Report
# -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CoverageRow:
    """Nodes of one type handled the same way.

    Attributes
    ----------
    node_type : str
        Autograd class name (``"AddmmBackward0"``, ``"MyFunctionBackward"``).
    count : int
        Number of nodes of this type (with this family and rule) in the graph.
    family : str or None
        Registry family (``"linear"``, ``"matmul"``, ``"routing"``...), ``None`` without a registry row.
    rule : str or None
        The rule the rule set gives these nodes (its ``repr``), ``None`` when uncovered.
    covered : bool
        Whether every node of the row has a rule that compiled for it.
    note : str
        Why the row is uncovered (and how to fix it), or what the rule does there.
    steps : dict
        How the rule compiled, per kind of step (e.g. ``{"ProductStep(gate)": 3, "ProductStep(uniform)": 1}``).
    """

    node_type: str
    count: int
    family: str | None
    rule: str | None
    covered: bool
    note: str = ""
    steps: dict[str, int] = field(default_factory=dict)


@dataclass
class CoverageReport:
    """Coverage of one graph under one rule set.

    Attributes
    ----------
    rows : list of CoverageRow
        One row per (node type, family, rule), uncovered rows first, then by decreasing count.
    rules : str
        Name of the rule set.
    """

    rows: list[CoverageRow]
    rules: str = ""

    @property
    def total(self) -> int:
        """Number of nodes in the graph."""
        return sum(r.count for r in self.rows)

    @property
    def covered(self) -> int:
        """Number of nodes with a rule."""
        return sum(r.count for r in self.rows if r.covered)

    @property
    def share(self) -> float:
        """``covered / total`` (1.0 for an empty graph)."""
        return self.covered / self.total if self.total else 1.0

    @property
    def uncovered(self) -> list[CoverageRow]:
        """Rows whose nodes have no usable rule."""
        return [r for r in self.rows if not r.covered]

    @property
    def ok(self) -> bool:
        """Whether every node is covered."""
        return not self.uncovered

    @property
    def node_types(self) -> list[str]:
        """Distinct node types, in row order."""
        return list(dict.fromkeys(r.node_type for r in self.rows))

    @property
    def covered_types(self) -> int:
        """Number of node types all of whose nodes are covered."""
        bad = {r.node_type for r in self.rows if not r.covered}
        return sum(1 for t in self.node_types if t not in bad)

    def counts(self) -> dict[str, int]:
        """Node type -> number of nodes."""
        out: Counter[str] = Counter()
        for r in self.rows:
            out[r.node_type] += r.count
        return dict(out)

    def summary(self) -> str:
        """One line: covered nodes, node types and the share."""
        return (f"{self.covered}/{self.total} nodes covered ({100 * self.share:.2f} %), "
                f"{self.covered_types}/{len(self.node_types)} node types, rules: {self.rules}")

    def table(self, width: int = 60) -> str:
        """A plain-text table: node type, count, family, rule, and how it compiled or why it is uncovered."""
        head = ("node type", "count", "family", "rule", "compiled as")
        body = []
        for r in self.rows:
            mark = "" if r.covered else "UNCOVERED"
            rule = r.rule or "-"
            if len(rule) > width:
                rule = rule[: width - 3] + "..."
            detail = ", ".join(f"{k} x{v}" if len(r.steps) > 1 else k for k, v in r.steps.items()) if r.covered \
                else "(see below)"
            body.append((r.node_type, str(r.count), r.family or "-", rule, (mark + " " + detail).strip()))
        cols = [max(len(x[k]) for x in [head, *body]) for k in range(4)]
        lines = []
        for k, row in enumerate([head, *body]):
            lines.append(f"{row[0]:<{cols[0]}}  {row[1]:>{cols[1]}}  {row[2]:<{cols[2]}}  {row[3]:<{cols[3]}}  "
                         f"{row[4]}".rstrip())
            if k == 0:
                lines.append("-" * (sum(cols) + 8 + len("compiled as")))
        return "\n".join(lines)

    def __str__(self) -> str:
        out = [self.table(), "", self.summary()]
        for r in self.uncovered:
            out.append(f"\n{r.node_type} ({r.count} node{'s' if r.count > 1 else ''}): {r.note}")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form."""
        return {"rules": self.rules, "total": self.total, "covered": self.covered, "share": self.share,
                "rows": [r.__dict__ for r in self.rows]}


# -----------------------------------------------------------------------------------------------------------
# Planning without failing
# -----------------------------------------------------------------------------------------------------------
def _plan_without_binding(graph: GraphView, rules: RuleSet, sources: set[int], known: dict[int, int],
                          model: torch.nn.Module | None) -> Planner:
    """The engine's planner state for one graph, without the support check and without binding every node.

    Rules bind against it exactly as during :func:`dynamiclrp.explain` (same activation flags, structure
    queries and value recipes), but a node that cannot be handled is reported instead of raising.
    """
    # with the model, frozen constants (a bias autograd does not keep) are read from it, as explain() does
    params = ModelParams(model) if model is not None else None
    planner = Planner(graph, rules, {}, sources, known, everywhere=True, model=model, bind=False, params=params)
    planner.needed_below = [True] * len(graph)
    planner.run_node = [True] * len(graph)
    return planner


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _step_name(step: Any) -> str:
    name = type(step).__name__
    reason = getattr(step, "reason", None)
    if isinstance(reason, str) and reason:
        return f"{name}({reason})"
    kind = getattr(step, "kind", None)
    if isinstance(kind, str) and kind and name == "LinearStep":
        return f"{name}({kind})"
    return name


def _uncovered_note(graph: GraphView, i: int) -> str:
    node = graph.nodes[i]
    t = graph.types[i]
    if is_custom_function(node):
        cls = forward_cls(node)
        return (f"custom torch.autograd.Function {cls.__module__}.{cls.__qualname__} has no rule; register one with "
                f"rules.with_ops({{'{t}': dynamiclrp.rules.Routing()}}) (or another rule, or an (OpSpec, Rule) "
                "pair; see dynamiclrp.rules.special)")
    return (f"no registry row for {t} (produced by {forward_op_name(node)}); register a rule with "
            f"rules.with_ops({{'{t}': <rule>}})")


def coverage(outputs: Tensor | Sequence[Tensor], rules: Rules = None, *, inputs: Tensor | Sequence[Tensor] = (),
             model: torch.nn.Module | None = None) -> CoverageReport:
    """Which node types of the graph of ``outputs`` have a rule under ``rules``, and which rule.

    Every node is planned as :func:`dynamiclrp.explain` would plan it (registry row, family, the rule set's rule,
    the rule compiled for the node), but failures are reported instead of raised, and no relevance is computed.

    Parameters
    ----------
    outputs : Tensor or sequence of Tensor
        Tensors of a forward pass (each with a ``grad_fn``).
    rules : None, str or RuleSet, optional
        As in :func:`dynamiclrp.relevance` (default: the ``epsilon`` preset).
    inputs : Tensor or sequence of Tensor, optional
        The tensors an explanation would be computed for (e.g. input embeddings). They mark activation sources,
        which decide whether a product is ``linear`` (activation × weight) or ``matmul`` (two activations).
        Data leaves and embedding lookups are sources anyway.
    model : torch.nn.Module, optional
        Used by rule sets with per-layer rules.

    Returns
    -------
    CoverageReport
        ``report.share`` is the covered fraction of nodes, ``report.uncovered`` the rows without a usable rule,
        ``print(report)`` shows the table.

    Examples
    --------
    >>> import torch, dynamiclrp
    >>> lin = torch.nn.Linear(3, 2)
    >>> report = dynamiclrp.coverage(lin(torch.randn(4, 3)).relu().sum(1))
    >>> report.ok, report.share
    (True, 1.0)
    """
    outs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    if not outs:
        raise ValueError("outputs is empty: pass at least one tensor")
    for k, o in enumerate(outs):
        if not isinstance(o, torch.Tensor) or o.grad_fn is None:
            raise DynamicLRPError(f"outputs[{k}] has no grad_fn, so there is no autograd graph to report on; run the "
                                  "forward pass with gradients enabled")
    single = isinstance(inputs, (torch.Tensor, torch.autograd.graph.GradientEdge))
    ins = (inputs,) if single else tuple(inputs)
    rule_set = resolve(rules)
    graph = GraphView([(o.grad_fn, o.output_nr) for o in outs])
    known = {graph.root_slots[k]: k for k in range(len(outs))}
    sources: set[int] = set()
    for k, t in enumerate(ins):
        if isinstance(t, torch.autograd.graph.GradientEdge):
            slot = graph.slot_of(t.node, t.output_nr)  # an edge's value is promised, not known
            if slot is not None:
                sources.add(slot)
            continue
        edge = gradient_edge(t)
        slot = None if edge is None else graph.slot_of(*edge)
        if slot is not None:
            known[slot] = len(outs) + k
            if not isinstance(t, torch.nn.Parameter):
                sources.add(slot)
    planner = _plan_without_binding(graph, rule_set, sources, known, model)
    groups: dict[tuple[str, str | None, str | None, bool, str], Counter[str]] = {}
    for i in graph.order:
        t = graph.types[i]
        spec = planner.specs[i]
        family = rule = None
        note = ""
        step_name = None
        if spec is None:
            note = _uncovered_note(graph, i)
        else:
            family = spec.family
            site = planner.site(i)
            try:
                with torch.no_grad():
                    chosen = rule_set.rule_for(site)
                    family = spec.family if t in rule_set.ops else family_of(site)
                    rule = repr(chosen)
                    step = chosen.bind(site)
                step_name = _step_name(step)
            except Exception as err:  # noqa: BLE001 - a coverage report never fails on a node
                note = _first_line(err)
        key = (t, family, rule, step_name is not None, note)
        steps = groups.setdefault(key, Counter())
        steps[step_name or ""] += 1
    rows = []
    for (t, family, rule, ok, note), steps in groups.items():
        count = sum(steps.values())
        rows.append(CoverageRow(t, count, family, rule, ok, note,
                                {k: v for k, v in steps.most_common() if k}))
    rows.sort(key=lambda r: (r.covered, -r.count, r.node_type))
    return CoverageReport(rows, rule_set.name)
