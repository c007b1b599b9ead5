"""Coverage report: which autograd node types of a graph have a relevance rule, and which rule.

``dynamiclrp.coverage(outputs)`` walks the graph of ``outputs`` like :func:`dynamiclrp.explain` plans it — registry
row, family, rule of the rule set, compiled step — but never raises on a node it cannot handle: it reports it.
Nothing is computed (no relevance, no promised values), so it is cheap and safe on any graph.

The ``dynamiclrp coverage TARGET`` sub-command builds a model, runs one forward pass, prints the table and the
covered share, and exits non-zero when anything is uncovered. ``TARGET`` is, in this order of precedence:

* ``module:function`` or ``path/to/file.py:function`` — a function returning ``(model, example_inputs)`` (a
  tensor, a tuple of positional tensors or a dict of keyword tensors); the current directory is on the import
  path (see :mod:`dynamiclrp.loading`);
* a zoo entry (:func:`dynamiclrp.zoo.names`, e.g. ``llama``, ``tv_vgg16``, ``lstm``);
* a torchvision model name (``resnet50``, ``vit_b_16``...; random weights, one 224×224 image);
* a transformers model type or configuration class name (``gpt_neox``, ``LlamaConfig``...), built offline from
  a tiny configuration with random weights (:func:`dynamiclrp.zoo.build_hf`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from . import graph as G
from .engine import Planner
from .errors import DynamicLRPError
from .rules.base import Site
from .rules.ruleset import RuleSet, resolve_rules

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
class _CoveragePlanner(Planner):
    """The engine's planner state for one graph, without the support check and without binding every node.

    Rules bind against it exactly as during :func:`dynamiclrp.explain` (same activation flags, structure
    queries and value recipes), but a node that cannot be handled is reported instead of raising.
    """

    def __init__(self, graph: G.GraphView, rules: RuleSet, sources: set[int], known: dict[int, int],
                 model: torch.nn.Module | None):
        self.setup(graph, rules, {}, sources, known, everywhere=True, model=model)
        self.needed_below = [True] * len(graph)
        self.run_node = [True] * len(graph)


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


def _uncovered_note(graph: G.GraphView, i: int) -> str:
    node = graph.nodes[i]
    t = graph.types[i]
    if G.is_custom_function(node):
        cls = node._forward_cls
        return (f"custom torch.autograd.Function {cls.__module__}.{cls.__qualname__} has no rule; register one with "
                f"rules.with_ops({{'{t}': dynamiclrp.rules.Routing()}}) (or another rule, or an (OpSpec, Rule) "
                "pair; see dynamiclrp.rules.special)")
    return (f"no registry row for {t} (produced by {G.forward_op_name(node)}); register a rule with "
            f"rules.with_ops({{'{t}': <rule>}})")


def coverage(outputs: Tensor | Sequence[Tensor], rules: Any = None, *, inputs: Tensor | Sequence[Tensor] = (),
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
    rule_set = resolve_rules(rules)
    graph = G.GraphView([(o.grad_fn, o.output_nr) for o in outs])
    known = {graph.root_slots[k]: k for k in range(len(outs))}
    sources: set[int] = set()
    for k, t in enumerate(ins):
        if isinstance(t, torch.autograd.graph.GradientEdge):
            slot = graph.slot_of(t.node, t.output_nr)  # an edge's value is promised, not known
            if slot is not None:
                sources.add(slot)
            continue
        edge = G.gradient_edge(t)
        slot = None if edge is None else graph.slot_of(*edge)
        if slot is not None:
            known[slot] = len(outs) + k
            if not isinstance(t, torch.nn.Parameter):
                sources.add(slot)
    planner = _CoveragePlanner(graph, rule_set, sources, known, model)
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
            site = Site(planner, i, spec, tuple(e >= 0 and planner.active[e] for e in graph.edges[i]))
            try:
                with torch.no_grad():
                    chosen = rule_set.rule_for(site)
                    family = spec.family if t in rule_set.ops else rule_set.family_of(site)
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


# -----------------------------------------------------------------------------------------------------------
# Targets for the CLI
# -----------------------------------------------------------------------------------------------------------
@dataclass
class Target:
    """A model with one forward pass: what the CLI reports on and explains."""

    name: str
    model: torch.nn.Module | None
    outputs: Tensor
    inputs: Tensor | torch.autograd.graph.GradientEdge | None
    description: str = ""


class TargetError(DynamicLRPError):
    """The CLI target could not be resolved or built."""


def _as_float_leaves(example: Any) -> tuple[tuple, dict, list[Tensor]]:
    """Positional and keyword inputs from ``example_inputs``; floating tensors become leaves requiring grad."""
    leaves: list[Tensor] = []

    def prep(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().clone().requires_grad_(True)
            leaves.append(v)
        return v
    if isinstance(example, dict):
        return (), {k: prep(v) for k, v in example.items()}, leaves
    if isinstance(example, (tuple, list)):
        return tuple(prep(v) for v in example), {}, leaves
    return (prep(example),), {}, leaves


def _from_function(spec: str) -> Target:
    from .loading import SpecError, is_file_spec, load_attribute, on_sys_path

    where = spec.rsplit(":", 1)[0]
    folders = [os.getcwd()] + ([str(Path(where).parent)] if is_file_spec(where) else [])
    with on_sys_path(*folders):
        try:
            fn, _, fn_name = load_attribute(spec, expect="a function returning (model, example_inputs)")
        except SpecError as err:
            raise TargetError(f"target {spec!r}: {err}") from None
        if not callable(fn):
            raise TargetError(f"{where!r} has no callable {fn_name!r}; TARGET 'module:function' must name a "
                              "function returning (model, example_inputs)")
        got = fn()
    if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], torch.nn.Module)):
        raise TargetError(f"{spec}() must return (model, example_inputs), got {type(got).__name__}")
    model, example = got
    model.eval()
    args, kwargs, leaves = _as_float_leaves(example)
    with torch.enable_grad():
        out = model(*args, **kwargs)
    from .graph import find_lookups
    from .zoo import _find_tensor_output, top_score

    _, scores = _find_tensor_output(out)
    rel: Any = leaves[0] if leaves else None
    if rel is None:
        # token ids: relevance at the input embedding lookup, found in the graph (the model is not hooked)
        emb = None
        try:
            emb = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            pass
        weight = getattr(emb, "weight", None)
        if isinstance(weight, Tensor):
            hits = find_lookups([scores], weight)
            rel = hits[0] if hits else None
    return Target(spec, model, top_score(scores), rel, f"{spec}() -> {type(model).__name__}")


def _from_torchvision(name: str, attn: str | None) -> Target | None:
    try:
        import torchvision
        from torchvision import models as tvm
    except ImportError:
        return None
    try:
        known = set(tvm.list_models())
    except Exception:  # noqa: BLE001 - old torchvision
        return None
    if name not in known:
        return None
    classification = set(tvm.list_models(module=tvm))
    segmentation = set(tvm.list_models(module=tvm.segmentation))
    video = set(tvm.list_models(module=tvm.video))
    if name not in classification | segmentation | video:
        raise TargetError(f"torchvision model {name!r} is a detection/optical-flow/quantized model; the coverage "
                          "CLI builds classification, segmentation and video models only. Use a 'module:function' "
                          "target returning (model, example_inputs)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tvm.get_model(name, weights=None).eval()
    if attn == "eager":
        from .zoo import _make_mha_eager
        _make_mha_eager(model)
    gen = torch.Generator().manual_seed(0)
    if name in video:
        shape: tuple[int, ...] = (1, 3, 8, 112, 112)
    else:
        size = 299 if name.startswith("inception") else 224
        shape = (1, 3, size, size)
    x = torch.randn(*shape, generator=gen).requires_grad_(True)
    with torch.enable_grad():
        out = model(x)
    if isinstance(out, dict):
        out = out["out"]
    from .zoo import top_score

    return Target(name, model, top_score(out), x, f"torchvision.models.{name} (random weights, input {shape}, "
                  f"torchvision {torchvision.__version__})")


def load_target(target: str, attn: str | None = None) -> Target:
    """Build the model named by ``target`` and run one forward pass (see the module docstring for the forms).

    Raises
    ------
    TargetError
        When the target cannot be resolved or built; the message says why and lists close names.
    """
    from . import zoo

    if ":" in target:
        return _from_function(target)
    try:
        name = zoo._canonical(target)
    except KeyError:
        name = None
    if name is not None:
        impls = zoo.attention_implementations(name)
        if attn is not None and attn not in impls:
            raise TargetError(f"zoo entry {name!r} does not offer --attn {attn} (offers: {impls or 'none'})")
        entry = zoo.build(name, attn_implementation=attn)
        out, rel = entry.run()
        impl = f", attention: {entry.attn_implementation}" if entry.attn_implementation else ""
        return Target(name, entry.model, out, rel, f"zoo entry {name} ({entry.family}{impl}): {entry.output_desc} "
                                                   f"w.r.t. {entry.input_desc}")
    tv = _from_torchvision(target, attn)
    if tv is not None:
        return tv
    try:
        zoo.resolve_config_class(target)
    except ImportError:
        from .extras import missing_extra_message

        raise TargetError(f"unknown target {target!r}: not a zoo entry, a torchvision model nor module:function; "
                          "if it is a transformers model type: "
                          + missing_extra_message("transformers", "resolving model types")) from None
    except KeyError as err:
        raise TargetError(f"unknown target {target!r}: not a zoo entry, a torchvision model, a transformers model "
                          f"type or config class name ({err.args[0] if err.args else ''}), nor module:function") \
            from None
    try:
        entry = zoo.build_hf(target, attn)
        out, rel = entry.run()
    except Exception as err:  # noqa: BLE001 - building arbitrary architectures can fail in many ways
        raise TargetError(f"could not build a tiny {target!r} model offline: {_first_line(err)}") from None
    return Target(entry.name, entry.model, out, rel,
                  f"transformers {entry.info.get('model_class')} from a tiny config ({entry.attn_implementation or 'no'} "
                  f"attention): {entry.output_desc} w.r.t. {entry.input_desc}")


# -----------------------------------------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dynamiclrp coverage``."""
    from .cli import plain

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = plain(__doc__.split("\n\n", 2)[2]) if __doc__ else None
    parser.add_argument("target", metavar="TARGET",
                        help="zoo entry, torchvision model name, transformers model type or config class name, or "
                             "module:function / path/file.py:function returning (model, example_inputs)")
    parser.add_argument("--attn", choices=("eager", "sdpa"), default=None,
                        help="attention implementation (transformers and nn.MultiheadAttention models)")
    parser.add_argument("--rules", default=None, metavar="PRESET",
                        help="rule preset, optionally with parameters ('epsilon:epsilon=0.1'; default: epsilon). "
                             "epsilon_gamma_box takes the example input's range as bounds unless given "
                             "('epsilon_gamma_box:low=L,high=H')")
    parser.add_argument("--explain", action="store_true",
                        help="also run an explanation and print its ledger")


def run(args: argparse.Namespace) -> int:
    """Run ``dynamiclrp coverage``. Exit codes: 0 all covered, 1 something uncovered (or the explanation failed),
    2 a bad target or preset."""
    from . import presets

    spec = args.rules or "epsilon"
    try:
        presets.parse(spec, low=0.0, high=1.0)  # report a bad spec before building the model
    except DynamicLRPError as err:
        print(f"dynamiclrp coverage: --rules: {err}", file=sys.stderr)
        return 2
    try:
        target = load_target(args.target, args.attn)
    except DynamicLRPError as err:
        print(f"dynamiclrp coverage: {err}", file=sys.stderr)
        return 2
    low = high = None
    if isinstance(target.inputs, Tensor) and target.inputs.is_floating_point():
        low, high = float(target.inputs.detach().min()), float(target.inputs.detach().max())
    try:
        rules = presets.parse(spec, low=low, high=high)
    except DynamicLRPError as err:
        print(f"dynamiclrp coverage: --rules: {err}", file=sys.stderr)
        return 2
    report = coverage(target.outputs, rules, inputs=() if target.inputs is None else (target.inputs,),
                      model=target.model)
    print(f"{target.description}\n")
    print(report)
    code = 0 if report.ok else 1
    if args.explain:
        print()
        if not report.ok:
            print("not explaining: some nodes have no rule (see above)")
        elif target.inputs is None:
            print("not explaining: the target has no floating-point input or input embeddings to attribute to")
            code = 1
        else:
            from .api import explain
            try:
                ex = explain(target.outputs, target.inputs, rules=rules, model=target.model)
            except DynamicLRPError as err:
                print(f"explanation failed: {err}")
                return 1
            rel = ex.relevance[0]
            print(f"explanation ({rules.name}) of {tuple(target.outputs.shape)} outputs w.r.t. "
                  f"{tuple(rel.shape)} inputs: relevance finite: {bool(torch.isfinite(rel).all())}")
            print(ex.ledger.summary())
    return code
