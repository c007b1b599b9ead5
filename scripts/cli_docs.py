#!/usr/bin/env python3
"""Generate the sample outputs in ``docs/cli.md`` from the real commands, or check that they have not drifted.

Each sample sits between two markers in ``docs/cli.md``::

    <!-- cli-output: demo -->
    ```text
    ...what `dynamiclrp demo --no-progress` prints...
    ```
    <!-- /cli-output -->

Usage::

    python scripts/cli_docs.py           # run the commands and rewrite the samples
    python scripts/cli_docs.py --check   # exit 1 if a sample differs from what the command prints now

The comparison (:func:`drift`) is exact on words and tolerant on numbers (relative 5 %, absolute 0.02), because
float results differ in their last digits between CPUs and BLAS libraries. ``tests/test_cli.py`` checks the demo
sample against the demo run it makes anyway.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"

#: sample name -> command line (after ``dynamiclrp``); outputs go to a temporary directory
COMMANDS: dict[str, list[str]] = {
    "demo": ["demo", "--no-progress"],
    "explain": ["explain", "--hf", "bert", "--text", "a gripping, beautifully shot film"],
}

_BLOCK = re.compile(r"(<!-- cli-output: (?P<name>[\w-]+) -->\n```text\n)(?P<body>.*?)(```\n<!-- /cli-output -->)",
                    re.S)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?")


def clean(output: str) -> str:
    """What the docs show of an output: without the final ``wrote ...`` line (temporary paths, timings)."""
    lines = [line.rstrip() for line in output.rstrip().splitlines()]
    while lines and (lines[-1].startswith("wrote ") or not lines[-1].strip()):
        lines.pop()
    return "\n".join(lines) + "\n"


def run(name: str) -> str:
    """Run sample ``name`` in-process (as the console script would) and return what it printed, cleaned."""
    import torch

    from dynamiclrp import cli

    threads = torch.get_num_threads()
    buf = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(buf):
        argv = list(COMMANDS[name])
        argv += ["--out", str(Path(tmp) / ("out" if name == "demo" else "out.html"))]
        code = cli.main(argv)
    torch.set_num_threads(threads)
    if code != 0:
        raise RuntimeError(f"dynamiclrp {' '.join(COMMANDS[name])} exited with {code}")
    return clean(buf.getvalue())


def samples(text: str) -> dict[str, str]:
    """Sample name -> body, as written in the page."""
    return {m.group("name"): m.group("body") for m in _BLOCK.finditer(text)}


def _numbers_close(a: str, b: str) -> bool:
    x, y = float(a.rstrip("%")), float(b.rstrip("%"))
    return math.isclose(x, y, rel_tol=0.05, abs_tol=0.02)


def drift(documented: str, actual: str) -> list[str]:
    """Lines where the documented sample and the actual output differ (words exactly, numbers with tolerance)."""
    problems = []
    doc_lines, act_lines = documented.rstrip().splitlines(), actual.rstrip().splitlines()
    if len(doc_lines) != len(act_lines):
        problems.append(f"{len(doc_lines)} lines documented, {len(act_lines)} printed")
    for k, (d, a) in enumerate(zip(doc_lines, act_lines), 1):
        if _NUMBER.sub("#", d).split() != _NUMBER.sub("#", a).split():
            problems.append(f"line {k}: documented {d.strip()!r}, printed {a.strip()!r}")
        elif not all(_numbers_close(p, q) for p, q in zip(_NUMBER.findall(d), _NUMBER.findall(a))):
            problems.append(f"line {k}: numbers differ: documented {d.strip()!r}, printed {a.strip()!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on drift")
    args = parser.parse_args(argv)
    text = DOC.read_text(encoding="utf-8")
    found = samples(text)
    missing = set(COMMANDS) - set(found)
    if missing:
        print(f"docs/cli.md has no marker for: {', '.join(sorted(missing))}", file=sys.stderr)
        return 1
    actual = {name: run(name) for name in COMMANDS}
    if args.check:
        bad = {name: drift(found[name], actual[name]) for name in COMMANDS}
        for name, problems in bad.items():
            for p in problems:
                print(f"{name}: {p}", file=sys.stderr)
        return 1 if any(bad.values()) else 0
    new = _BLOCK.sub(lambda m: m.group(1) + actual[m.group("name")] + m.group(4)
                     if m.group("name") in actual else m.group(0), text)
    DOC.write_text(new, encoding="utf-8")
    print(f"updated {DOC.relative_to(ROOT)}: {', '.join(COMMANDS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
