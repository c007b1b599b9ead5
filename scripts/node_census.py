#!/usr/bin/env python3
"""Census of the autograd node types produced by the models of :mod:`dynamiclrp.testing.zoo`.

For every zoo entry (once per supported attention implementation) the script builds the model, runs
the forward pass of ``ZooEntry.run()``, walks the autograd graph from the outputs' ``grad_fn``
iteratively (no recursion), and records per node type (``type(node).__name__``):

* the total count and the count per model;
* its ``_saved_*`` attributes with the Python types seen (``Tensor[float32]``, ``int``, ``tuple[int]``,
  ``None``...), example tensor shapes and example values;
* the number of inputs (``len(node.next_functions)``), how often each input edge is ``None`` and what
  kind of node each edge leads to (``AccumulateGrad`` leaf, another op, ``None``);
* the number of outputs (``len(node._input_metadata)``);
* for custom ``torch.autograd.Function`` nodes, the forward class, the number of saved tensors and the
  attributes stored on ``ctx``.

Per model it records the status (a model that fails to build or run is recorded with its error and
the census goes on), timings, the total node count and the node types used.  Node class names depend on
the device and backend (CPU here: e.g. ``ScaledDotProductFlashAttentionForCpuBackward0``); the JSON's
``environment`` block says what produced it.

Usage::

    python scripts/node_census.py                       # all entries, writes docs/dev/node_census.{json,md}
    python scripts/node_census.py --models bert,llama   # a subset
    python scripts/node_census.py --out-dir /tmp/census
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from dynamiclrp.testing import zoo

MAX_EXAMPLES = 4


# ----------------------------------------------------------------------------------------------------
# Graph walking and description
# ----------------------------------------------------------------------------------------------------
def walk_graph(roots: list[Any]) -> list[Any]:
    """All autograd nodes reachable from ``roots`` (iterative depth-first walk, each node once).

    Parameters
    ----------
    roots : list
        ``grad_fn`` objects (``None`` entries are skipped).

    Returns
    -------
    list
        The nodes, in visiting order.  The returned list keeps the Python node objects alive, so their
        ``id`` is stable while it exists.
    """
    seen: set[int] = set()
    order: list[Any] = []
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        for child, _ in node.next_functions:
            if child is not None and id(child) not in seen:
                stack.append(child)
    return order


def describe(value: Any) -> tuple[str, str | None, str | None]:
    """Describe a saved value as ``(type_string, shape_or_None, example_or_None)``."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"Tensor[{dtype}]", str(tuple(value.shape)), None
    if value is None:
        return "None", None, None
    if isinstance(value, (bool, int, float, str)):
        return type(value).__name__, None, repr(value)[:60]
    if isinstance(value, (list, tuple)):
        inner = sorted({describe(v)[0] for v in value})
        text = f"{type(value).__name__}[{'|'.join(inner)}]"
        if all(not isinstance(v, torch.Tensor) for v in value):
            return text, None, repr(value)[:60]
        shapes = [str(tuple(v.shape)) for v in value if isinstance(v, torch.Tensor)][:3]
        return text, "; ".join(shapes), None
    return type(value).__name__, None, repr(value)[:60]


def _add_example(bucket: list, item: str | None) -> None:
    if item is not None and item not in bucket and len(bucket) < MAX_EXAMPLES:
        bucket.append(item)


def _edge_kind(child: Any) -> str:
    if child is None:
        return "None"
    name = type(child).__name__
    return "AccumulateGrad" if name == "AccumulateGrad" else "op"


def _new_type_record() -> dict:
    return {
        "count": 0,
        "cpp_name": None,
        "per_model": Counter(),
        "saved": defaultdict(lambda: {"types": Counter(), "shapes": [], "examples": []}),
        "num_inputs": Counter(),
        "none_inputs_by_index": Counter(),
        "nodes_with_none_input": 0,
        "edge_kinds_by_index": defaultdict(Counter),
        "num_outputs": Counter(),
        "custom_function": None,
    }


def record_node(rec: dict, node: Any, model_key: str) -> None:
    """Add one node to its type record."""
    rec["count"] += 1
    rec["per_model"][model_key] += 1
    if rec["cpp_name"] is None:
        try:
            rec["cpp_name"] = node.name()
        except Exception as exc:  # noqa: BLE001
            rec["cpp_name"] = f"<name() failed: {exc}>"
    for attr in dir(node):
        if not attr.startswith("_saved_"):
            continue
        field = rec["saved"][attr[len("_saved_"):]]
        try:
            value = getattr(node, attr)
        except Exception as exc:  # noqa: BLE001 - e.g. a freed buffer
            field["types"][f"<error {type(exc).__name__}>"] += 1
            continue
        kind, shape, example = describe(value)
        field["types"][kind] += 1
        _add_example(field["shapes"], shape)
        _add_example(field["examples"], example)
    edges = node.next_functions
    rec["num_inputs"][len(edges)] += 1
    any_none = False
    for i, (child, _) in enumerate(edges):
        kind = _edge_kind(child)
        rec["edge_kinds_by_index"][i][kind] += 1
        if child is None:
            rec["none_inputs_by_index"][i] += 1
            any_none = True
    rec["nodes_with_none_input"] += int(any_none)
    try:
        rec["num_outputs"][len(node._input_metadata)] += 1
    except Exception:  # noqa: BLE001
        rec["num_outputs"]["unknown"] += 1
    forward_cls = getattr(node, "_forward_cls", None)
    if forward_cls is not None:
        custom = rec["custom_function"] or {"forward_classes": [], "saved_tensors": Counter(), "ctx_attrs": []}
        _add_example(custom["forward_classes"], f"{forward_cls.__module__}.{forward_cls.__qualname__}")
        try:
            custom["saved_tensors"][len(node.saved_tensors)] += 1
        except Exception as exc:  # noqa: BLE001
            custom["saved_tensors"][f"<error {type(exc).__name__}>"] += 1
        for key in sorted(vars(node)) if hasattr(node, "__dict__") else []:
            if key not in custom["ctx_attrs"]:
                custom["ctx_attrs"].append(key)
        rec["custom_function"] = custom


def _inputs_in_graph(inputs: torch.Tensor, nodes: list[Any]) -> bool:
    if inputs.grad_fn is not None:
        return any(n is inputs.grad_fn for n in nodes)
    return any(type(n).__name__ == "AccumulateGrad" and n.variable is inputs for n in nodes)


# ----------------------------------------------------------------------------------------------------
# Census
# ----------------------------------------------------------------------------------------------------
def census(model_names: list[str], log: bool = True) -> dict:
    """Run the census over ``model_names`` and return the JSON-ready result."""
    types: dict[str, dict] = defaultdict(_new_type_record)
    models: dict[str, dict] = {}
    t_start = time.perf_counter()
    for name in model_names:
        try:
            impls: list[str | None] = list(zoo.attention_implementations(name)) or [None]
        except Exception as exc:  # noqa: BLE001
            impls = [None]
            if log:
                print(f"  ! attention_implementations({name}) failed: {exc}", flush=True)
        for impl in impls:
            key = name if impl is None else f"{name}[{impl}]"
            entry_rec: dict[str, Any] = {"model": name, "attn_implementation": impl, "status": "ok"}
            models[key] = entry_rec
            t0 = time.perf_counter()
            stage = "build"
            try:
                entry = zoo.build(name, attn_implementation=impl)
                entry_rec.update(family=entry.family, effective_attn_implementation=entry.attn_implementation,
                                 output_desc=entry.output_desc, input_desc=entry.input_desc,
                                 info={k: str(v) for k, v in entry.info.items()})
                entry_rec["build_s"] = round(time.perf_counter() - t0, 3)
                stage = "run"
                t1 = time.perf_counter()
                outputs, inputs = entry.run()
                entry_rec["run_s"] = round(time.perf_counter() - t1, 3)
                stage = "walk"
                t2 = time.perf_counter()
                nodes = walk_graph([outputs.grad_fn])
                counts = Counter(type(n).__name__ for n in nodes)
                for node in nodes:
                    record_node(types[type(node).__name__], node, key)
                entry_rec.update(
                    walk_s=round(time.perf_counter() - t2, 3),
                    total_nodes=len(nodes),
                    unique_node_types=len(counts),
                    node_types=dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
                    output_grad_fn=type(outputs.grad_fn).__name__ if outputs.grad_fn is not None else None,
                    output_shape=list(outputs.shape),
                    inputs_shape=list(inputs.shape),
                    inputs_is_leaf=inputs.is_leaf,
                    inputs_grad_fn=type(inputs.grad_fn).__name__ if inputs.grad_fn is not None else None,
                    inputs_in_graph=_inputs_in_graph(inputs, nodes),
                    parameters=sum(p.numel() for p in entry.model.parameters()),
                )
                del nodes, outputs, inputs, entry
            except Exception as exc:  # noqa: BLE001 - record and go on
                entry_rec.update(status="error", stage=stage, error=f"{type(exc).__name__}: {exc}"[:2000],
                                 traceback=traceback.format_exc(limit=-4)[-3000:])
            entry_rec["total_s"] = round(time.perf_counter() - t0, 3)
            if log:
                if entry_rec["status"] == "ok":
                    print(f"  {key:32s} ok    {entry_rec['total_nodes']:6d} nodes {entry_rec['unique_node_types']:4d} types"
                          f"  {entry_rec['total_s']:.2f}s", flush=True)
                else:
                    print(f"  {key:32s} ERROR ({stage}) {entry_rec['error'][:150]}", flush=True)
    elapsed = time.perf_counter() - t_start
    return {"environment": _environment(), "runtime_s": round(elapsed, 2),
            "node_types": _finalise_types(types), "models": models}


def _finalise_types(types: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for name in sorted(types, key=lambda n: (-types[n]["count"], n)):
        rec = types[name]
        per_model = dict(sorted(rec["per_model"].items(), key=lambda kv: (-kv[1], kv[0])))
        out[name] = {
            "count": rec["count"],
            "cpp_name": rec["cpp_name"],
            "num_models": len({k.split("[")[0] for k in per_model}),
            "per_model": per_model,
            "saved": {f: {"types": dict(v["types"]), "shapes": v["shapes"], "examples": v["examples"]}
                      for f, v in sorted(rec["saved"].items())},
            "num_inputs": {str(k): v for k, v in sorted(rec["num_inputs"].items())},
            "none_inputs_by_index": {str(k): v for k, v in sorted(rec["none_inputs_by_index"].items())},
            "nodes_with_none_input": rec["nodes_with_none_input"],
            "edge_kinds_by_index": {str(i): dict(c) for i, c in sorted(rec["edge_kinds_by_index"].items())},
            "num_outputs": {str(k): v for k, v in sorted(rec["num_outputs"].items(), key=lambda kv: str(kv[0]))},
            "custom_function": None if rec["custom_function"] is None else {
                "forward_classes": rec["custom_function"]["forward_classes"],
                "saved_tensors": {str(k): v for k, v in rec["custom_function"]["saved_tensors"].items()},
                "ctx_attrs": rec["custom_function"]["ctx_attrs"],
            },
        }
    return out


def _environment() -> dict:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "device": "cpu",
        "num_threads": torch.get_num_threads(),
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "cuda_available": torch.cuda.is_available(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for mod in ("transformers", "torchvision"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            env[mod] = None
    return env


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------
def _saved_summary(saved: dict) -> str:
    parts = []
    for field, info in saved.items():
        kinds = "|".join(sorted(info["types"]))
        parts.append(f"{field}: {kinds}")
    return "; ".join(parts) if parts else "-"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(result: dict) -> str:
    env = result["environment"]
    models = result["models"]
    ok = [k for k, v in models.items() if v["status"] == "ok"]
    failed = [k for k, v in models.items() if v["status"] != "ok"]
    lines = [
        "# Autograd node census",
        "",
        "Generated by `scripts/node_census.py` (do not edit by hand). Node class names depend on the device and "
        f"backend: this census was produced on **{env['device']}** with torch {env['torch']}, transformers "
        f"{env.get('transformers')}, torchvision {env.get('torchvision')} ({env['platform']}, mkldnn "
        f"{'available' if env['mkldnn_available'] else 'unavailable'}).",
        "",
        f"{len(ok)} model runs succeeded, {len(failed)} failed; {len(result['node_types'])} distinct node types; "
        f"census runtime {result['runtime_s']} s. Machine-readable details (saved-field shapes and examples, edge "
        "kinds, per-model counts) are in `node_census.json`.",
        "",
        "## Node types",
        "",
        "Inputs = `len(next_functions)` (values seen); None-in = how many nodes had at least one `None` input edge "
        "(by edge index); outputs = `len(_input_metadata)`.",
        "",
        "| node type | total | inputs | None-in | outputs | models | saved fields |",
        "| --- | ---: | --- | --- | --- | --- | --- |",
    ]
    for name, rec in result["node_types"].items():
        model_names = sorted({k.split("[")[0] for k in rec["per_model"]})
        none_in = "-"
        if rec["nodes_with_none_input"]:
            none_in = f"{rec['nodes_with_none_input']} (" + ", ".join(
                f"#{i}:{c}" for i, c in rec["none_inputs_by_index"].items()) + ")"
        label = name
        if rec["custom_function"]:
            label += " (custom: " + ", ".join(rec["custom_function"]["forward_classes"]) + ")"
        lines.append(
            f"| `{_md_escape(label)}` | {rec['count']} | {'/'.join(rec['num_inputs'])} | {none_in} | "
            f"{'/'.join(rec['num_outputs'])} | {len(model_names)}: {', '.join(model_names)} | "
            f"{_md_escape(_saved_summary(rec['saved']))} |"
        )
    lines += [
        "",
        "## Models",
        "",
        "| model | family | status | nodes | node types | inputs | seconds |",
        "| --- | --- | --- | ---: | ---: | --- | ---: |",
    ]
    for key, rec in models.items():
        if rec["status"] == "ok":
            inputs = f"{'leaf' if rec['inputs_is_leaf'] else rec['inputs_grad_fn']} {tuple(rec['inputs_shape'])}"
            lines.append(f"| {key} | {rec.get('family', '')} | ok | {rec['total_nodes']} | {rec['unique_node_types']} | "
                         f"{inputs} | {rec['total_s']} |")
        else:
            lines.append(f"| {key} | {rec.get('family', '')} | **error** ({rec.get('stage')}) | | | | {rec['total_s']} |")
    if failed:
        lines += ["", "## Failures", ""]
        for key in failed:
            lines.append(f"- `{key}`: {_md_escape(models[key]['error'][:300])}")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="comma-separated zoo entries (default: all)")
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "dev"), help="where to write node_census.{json,md}")
    parser.add_argument("--no-write", action="store_true", help="print the summary only")
    args = parser.parse_args(argv)
    selected = [m.strip() for m in args.models.split(",") if m.strip()] or zoo.names()
    print(f"node census over {len(selected)} zoo entries (torch {torch.__version__}, cpu)", flush=True)
    result = census(selected)
    types = result["node_types"]
    models = result["models"]
    n_ok = sum(1 for m in models.values() if m["status"] == "ok")
    print(f"\n{n_ok}/{len(models)} model runs ok, {len(types)} distinct node types, {result['runtime_s']} s")
    for name, rec in types.items():
        flag = ""
        if rec["custom_function"]:
            flag += "  [custom Function: " + ", ".join(rec["custom_function"]["forward_classes"]) + "]"
        if rec["nodes_with_none_input"]:
            flag += f"  [None inputs in {rec['nodes_with_none_input']} nodes]"
        print(f"  {name:48s} {rec['count']:7d}  in {rec['num_models']:3d} models{flag}")
    failed = {k: v for k, v in models.items() if v["status"] != "ok"}
    if failed:
        print("\nfailures:")
        for key, rec in failed.items():
            print(f"  {key}: {rec['error'][:200]}")
    if not args.no_write:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "node_census.json").write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
        (out / "node_census.md").write_text(to_markdown(result))
        print(f"\nwrote {out / 'node_census.json'} and {out / 'node_census.md'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
