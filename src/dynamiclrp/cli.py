"""Command line interface: ``dynamiclrp demo | explain | coverage``.

Each sub-command lives in its own module and exposes ``add_arguments(parser)`` and ``run(args) -> int``; this
file only wires them together, so ``dynamiclrp --help`` and ``dynamiclrp <command> --help`` work everywhere.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

#: sub-command -> (module, one-line help)
COMMANDS = {
    "demo": ("dynamiclrp.demo", "train a tiny CNN on scikit-learn's digits, explain test digits, write heatmaps"),
    "explain": ("dynamiclrp.explain_cli", "explain a model's prediction for an image or a text, write a heatmap"),
    "coverage": ("dynamiclrp.coverage", "report which autograd node types of a model have a relevance rule"),
    "attribute": ("dynamiclrp.attribute_cli", "explain every sample of a dataset into a resumable Zarr store"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynamiclrp",
        description="Layer-wise Relevance Propagation for any PyTorch model, op by op over the autograd graph.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"dynamiclrp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ImportError as err:  # pragma: no cover - a missing optional dependency
            p.set_defaults(_unavailable=str(err))
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dynamiclrp`` console script. Returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"dynamiclrp {args.command}: unavailable ({args._unavailable})", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:  # pragma: no cover
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
