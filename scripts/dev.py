#!/usr/bin/env python3
"""Set up a local virtual environment and run the demo or the test suite.

Usage (from anywhere, with only python3 and pip on the machine)::

    python3 scripts/dev.py demo [demo options]   # installs .[demo], runs `dynamiclrp demo`
    python3 scripts/dev.py test [pytest options] # installs .[test], runs the whole test suite, slow sweeps
                                                 # included (what CI runs); --fast leaves the sweeps out

The environment lives in ``.venv`` next to this repository's ``pyproject.toml``. Installs are pinned by
``requirements/constraints.txt`` and skipped when nothing they depend on has changed.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
EXTRAS = {"demo": "demo", "test": "test", "bench": "test,bench"}


def _python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(cmd: list[str]) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def ensure_env(extra: str) -> Path:
    """Create ``.venv`` and install the project with ``extra`` unless an identical install is recorded."""
    if not _python().exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "requirements/constraints.txt", "requirements/no-deps.txt"):
        digest.update((ROOT / name).read_bytes())
    digest.update(extra.encode())
    stamp = VENV / f".dynamiclrp-installed-{extra.replace(',', '-')}"
    if stamp.exists() and stamp.read_text() == digest.hexdigest():
        return _python()
    _run([_python(), "-m", "pip", "install", "--disable-pip-version-check", "-q",
          "-c", ROOT / "requirements/constraints.txt", "-e", f".[{extra}]"])
    if "test" in extra.split(","):
        _run([_python(), "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
              "-r", ROOT / "requirements/no-deps.txt"])
    stamp.write_text(digest.hexdigest())
    return _python()


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    python = ensure_env(EXTRAS[command])
    if command == "demo":
        cmd = [python, "-m", "dynamiclrp", "demo", *rest]
    elif command == "test":
        # the slow sweeps (zoo models under every preset, frozen = trainable on every architecture, the long fuzz
        # run, the CLI's heads...) run too, so every commit CI accepts passes them; --fast is the quick local loop
        fast = "--fast" in rest
        rest = [a for a in rest if a != "--fast"]
        cmd = [python, "-m", "pytest", *([] if fast else ["--slow"]), *rest]
    else:
        cmd = [python, ROOT / "benchmarks" / "run.py", *rest]
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.call([str(c) for c in cmd], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
