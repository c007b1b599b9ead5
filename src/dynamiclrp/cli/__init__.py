"""Command line interface: ``dynamiclrp demo | explain | coverage``.

Each sub-command lives in its own module and exposes ``add_arguments(parser)`` and ``run(args) -> int``; this
file only wires them together, so ``dynamiclrp --help`` and ``dynamiclrp <command> --help`` work everywhere.

Errors a user can fix — a missing file, an unknown model, a missing optional dependency — are reported in one
line on standard error with exit code 2, never with a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import Sequence

from ..errors import MissingExtraError
from ..extras import EXTRAS, missing_extra_message

#: sub-command -> (module, one-line help)
COMMANDS = {
    "demo": ("dynamiclrp.cli.demo", "train a tiny CNN on scikit-learn's digits, explain test digits, write heatmaps"),
    "explain": ("dynamiclrp.cli.explain", "explain a model's prediction for an image or a text, write a heatmap"),
    "coverage": ("dynamiclrp.cli.coverage", "report which autograd node types of a model have a relevance rule"),
    "attribute": ("dynamiclrp.cli.attribute", "explain every sample of a dataset into a resumable Zarr store"),
}

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|ref|doc):`~?([^`<]*?)(?:\s*<[^>]*>)?`")


def plain(text: str) -> str:
    """Docstring text for a terminal: reStructuredText roles and ``literals`` become plain words.

    ``:func:`~dynamiclrp.hf.text``` becomes ``text``, ``:mod:`dynamiclrp.testing.zoo``` becomes ``dynamiclrp.testing.zoo`` and
    double back-quoted literals lose their quotes, so that ``--help`` shows no markup.
    """
    def role(m: re.Match[str]) -> str:
        target = m.group(1).strip()
        return target.rsplit(".", 1)[-1] if m.group(0).split("`", 1)[1].startswith("~") else target

    text = _ROLE.sub(role, text)
    return re.sub(r"``([^`]+)``", r"\1", text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynamiclrp",
        description="Layer-wise Relevance Propagation for any PyTorch model, op by op over the autograd graph.")
    from ..version import __version__
    parser.add_argument("--version", action="version", version=f"dynamiclrp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ImportError as err:  # pragma: no cover - a missing optional dependency
            p.set_defaults(_unavailable=_missing_message(err, name) or str(err))
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _missing_message(err: ImportError, command: str) -> str | None:
    """The one-line message for a missing optional dependency, or ``None`` for any other import error."""
    if isinstance(err, MissingExtraError):
        return str(err)
    name = getattr(err, "name", None) or ""
    if isinstance(err, ModuleNotFoundError) and name.split(".")[0] in EXTRAS:
        return missing_extra_message(name, f"dynamiclrp {command}")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dynamiclrp`` console script. Returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"dynamiclrp {args.command}: error: {args._unavailable}", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except ImportError as err:
        message = _missing_message(err, args.command)
        if message is None:
            raise
        print(f"dynamiclrp {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
