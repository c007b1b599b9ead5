"""The installed version of dynamiclrp (its one source is ``pyproject.toml``; installed metadata carries it)."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__: str = _version("dynamiclrp")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"
