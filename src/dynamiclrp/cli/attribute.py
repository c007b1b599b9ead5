"""``dynamiclrp attribute``: explain every sample of a dataset and write the relevance to a Zarr store.

The model and the data come from your code: ``--model package.module:function`` (or ``path/file.py:function``)
returns a ``torch.nn.Module`` (or ``(model, preprocess)``; the preprocess part is ignored here), and ``--data
package.module:function`` returns a ``torch.utils.data.Dataset``, a non-shuffling ``DataLoader``, a Hugging Face
``datasets.Dataset`` or an iterable of batches (see ``dynamiclrp.attribute_dataset``). Put the model in eval mode
in ``function``. Runs unchanged under ``torchrun --nproc_per_node N -m dynamiclrp attribute ...``: samples are
sharded over the processes and the store equals the single-process one bit for bit. Run the same command again
after an interruption and it continues where it stopped.

Exit codes: 0 success, 2 bad arguments (missing module, unusable data, a store of a different job), 1 the
explanation failed (e.g. an operation without a rule).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError

__all__ = ["add_arguments", "run", "load_object"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dynamiclrp attribute``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n", 1)[1] if __doc__ else None
    parser.epilog = ("examples:\n"
                     "  dynamiclrp attribute --model dynamiclrp.clever_hans:model "
                     "--data dynamiclrp.clever_hans:test_set --target label --out digits.zarr\n"
                     "  torchrun --nproc_per_node 2 -m dynamiclrp attribute --model mymodels.py:build "
                     "--data mydata.py:dataset --out relevance.zarr --reduce channels --dtype float16")
    parser.add_argument("--model", required=True, metavar="MODULE:FUNCTION",
                        help="FUNCTION() in an importable module or a .py file returns the torch.nn.Module")
    parser.add_argument("--data", required=True, metavar="MODULE:NAME",
                        help="NAME() (or the object NAME) in an importable module or a .py file: a Dataset, a "
                             "DataLoader, a datasets.Dataset or an iterable of batches")
    parser.add_argument("--out", "-o", type=Path, default=Path("relevance.zarr"), metavar="PATH",
                        help="the Zarr store (default relevance.zarr)")
    parser.add_argument("--rules", default=None,
                        help="rule preset (default: attnlrp for transformers models, epsilon otherwise)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="samples per batch (default 64, or the DataLoader's)")
    parser.add_argument("--target", default="predicted", metavar="T",
                        help="what to explain: 'predicted' (default), 'label', or a class index")
    parser.add_argument("--reduce", default=None, metavar="STEPS",
                        help="reduce the relevance before storing: channels, hidden, pool<k>, joined by + "
                             "(e.g. channels+pool4)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "float64"),
                        help="stored relevance dtype (default float32)")
    parser.add_argument("--inputs", default=None, metavar="KEY",
                        help="dict batches: the key of the tensor to attribute (input_ids: the input embeddings)")
    parser.add_argument("--ledger-every", type=int, default=16, metavar="K",
                        help="run the ledger on every K-th batch (default 16; 0: never)")
    parser.add_argument("--chunk-size", type=int, default=None, metavar="N",
                        help="samples per store chunk, a multiple of the batch size (default: about 512 "
                             "samples, at least 16 chunks)")
    parser.add_argument("--num-workers", type=int, default=0, metavar="N", help="DataLoader workers (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of each batch's RNG (default 0)")
    parser.add_argument("--device", default=None,
                        help="where batches go (default: the device of the model's first parameter)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads per process (default: torch's; torchrun sets 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a store written by a different job instead of refusing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar and summary")
    parser.add_argument("--concepts", nargs="+", default=(), metavar="LAYER",
                        help="also store every unit's relevance and activation at these layers (module names; "
                             "NAME:input for a module's input), for reference samples "
                             "(dynamiclrp.concepts.reference_samples)")
    parser.add_argument("--concept-unit", default="channel", choices=("channel", "neuron"),
                        help="the unit dimension of those layers: channel (dimension 1, default) or neuron (the last)")



def load_object(spec: str, what: str) -> Any:
    """``module:name`` or ``file.py:name`` (:mod:`dynamiclrp.loading`) -> the object, called if it is a function
    or a class.

    Raises
    ------
    UsageError
        The module, file or attribute does not exist.
    """
    import inspect

    from ..errors import SpecError
    from ..loading import load_attribute, on_sys_path

    try:
        obj, where, _ = load_attribute(spec, expect=f"--{what}")
    except SpecError as err:
        raise UsageError(f"--{what}: {err}") from None
    if inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isclass(obj):
        with on_sys_path(os.getcwd()):  # as while importing it: the function may import its neighbours
            return obj()
    return obj


def _target(value: str) -> Any:
    if value in ("predicted", "label"):
        return value
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"--target must be 'predicted', 'label' or a class index, got {value!r}") from None


def run(args: argparse.Namespace) -> int:
    """Run ``dynamiclrp attribute``; returns the exit code."""
    import torch
    from torch import nn

    from ..errors import DynamicLRPError
    from ..dataset import attribute_dataset
    from ..errors import StoreError

    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        model = load_object(args.model, "model")
        if isinstance(model, tuple) and len(model) == 2:
            model = model[0]
        if not isinstance(model, nn.Module):
            raise UsageError(f"--model {args.model} gave a {type(model).__name__}, not a torch.nn.Module")
        data = load_object(args.data, "data")
        rules = args.rules
        if rules is None and any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
            rules = "attnlrp"
        summary = attribute_dataset(
            model, data, rules=rules, target=_target(args.target), batch_size=args.batch_size, out=args.out,
            inputs=args.inputs, reduce=args.reduce, dtype=args.dtype, ledger_every=args.ledger_every,
            seed=args.seed, device=args.device, chunk_size=args.chunk_size, num_workers=args.num_workers,
            overwrite=args.overwrite, progress=not args.no_progress, concepts=tuple(args.concepts),
            concept_unit=args.concept_unit)
    except (UsageError, StoreError, ValueError, TypeError, KeyError, ImportError) as err:
        print(f"dynamiclrp attribute: error: {err}", file=sys.stderr)
        return 2
    except DynamicLRPError as err:
        print(f"dynamiclrp attribute: error: the explanation failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    del summary
    return 0
