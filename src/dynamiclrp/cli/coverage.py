"""``dynamiclrp coverage TARGET``: which autograd node types of a model have a relevance rule.

``dynamiclrp.coverage(outputs)`` walks the graph of ``outputs`` like :func:`dynamiclrp.explain` plans it — registry
row, family, rule of the rule set, compiled step — but never raises on a node it cannot handle: it reports it.
Nothing is computed (no relevance, no promised values), so it is cheap and safe on any graph.

The ``dynamiclrp coverage TARGET`` sub-command builds a model, runs one forward pass, prints the table and the
covered share, and exits non-zero when anything is uncovered. ``TARGET`` is, in this order of precedence:

* ``module:function`` or ``path/to/file.py:function`` — a function returning ``(model, example_inputs)`` (a
  tensor, a tuple of positional tensors or a dict of keyword tensors); the current directory is on the import
  path (see :mod:`dynamiclrp.loading`);
* a zoo entry (:func:`dynamiclrp.testing.zoo.names`, e.g. ``llama``, ``tv_vgg16``, ``lstm``);
* a torchvision model name (``resnet50``, ``vit_b_16``...; random weights, one 224×224 image);
* a transformers model type or configuration class name (``gpt_neox``, ``LlamaConfig``...), built offline from
  a tiny configuration with random weights (:func:`dynamiclrp.testing.zoo.build_hf`).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..coverage import _first_line, coverage
from ..errors import DynamicLRPError, TargetError

Tensor = torch.Tensor


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
    from ..errors import SpecError
    from ..loading import is_file_spec, load_attribute, on_sys_path

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
    from ..core.graph import find_lookups
    from ..testing.zoo import _find_tensor_output, top_score

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
        from ..testing.zoo import _make_mha_eager
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
    from ..testing.zoo import top_score

    return Target(name, model, top_score(out), x, f"torchvision.models.{name} (random weights, input {shape}, "
                  f"torchvision {torchvision.__version__})")


def load_target(target: str, attn: str | None = None) -> Target:
    """Build the model named by ``target`` and run one forward pass (see the module docstring for the forms).

    Raises
    ------
    TargetError
        When the target cannot be resolved or built; the message says why and lists close names.
    """
    from ..testing import zoo

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
        from ..extras import missing_extra_message

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
    from . import plain

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = plain(__doc__.split("\n\n", 1)[1]) if __doc__ else None
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
    from .. import presets

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
            from ..api import explain
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
