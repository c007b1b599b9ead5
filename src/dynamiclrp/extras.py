"""Optional dependencies: which extra provides them, and the one-line error when one is missing.

The core of dynamiclrp needs only torch and numpy. Heatmaps, the Hugging Face helpers and the demo need more;
each lives in an *extra* of the package (``pyproject.toml``)::

    pip install ".[viz]"            # from a checkout of the repository
    pip install "dynamiclrp[viz]"   # from a package index

:func:`require` imports a module or raises :class:`MissingExtraError`, whose message names the missing package,
the extra that provides it and both install commands. The command line prints that message as its one-line
error (exit code 2).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

__all__ = ["EXTRAS", "MissingExtraError", "install_hint", "missing_extra_message", "require"]

#: top-level module -> (distribution name, extra that installs it; ``None``: in no user-facing extra)
EXTRAS: dict[str, tuple[str, str | None]] = {
    "matplotlib": ("matplotlib", "viz"),
    "PIL": ("Pillow", "viz"),
    "transformers": ("transformers", "hf"),
    "sklearn": ("scikit-learn", "demo"),
    "scipy": ("scipy", "metrics"),
    "tqdm": ("tqdm", "progress"),
    "torchvision": ("torchvision", None),
    "zarr": ("zarr", "data"),
    "umap": ("umap-learn", "umap"),
}



def install_hint(extra: str) -> str:
    """Both ways to install an extra: from a package index and from a checkout of the repository."""
    return f'pip install "dynamiclrp[{extra}]" (from a checkout: pip install ".[{extra}]")'


def missing_extra_message(module: str, purpose: str | None = None) -> str:
    """The one-line message for a missing module ``module`` (a dotted name is reduced to its top level)."""
    top = module.split(".")[0]
    package, extra = EXTRAS.get(top, (top, None))
    what = f"{purpose} needs {package}" if purpose else f"{package} is needed"
    if extra is None:
        return f"{what}, which is not installed: pip install {package}"
    return f"{what}, which is not installed; it comes with the '{extra}' extra: {install_hint(extra)}"


def require(module: str, purpose: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` with what to install.

    Parameters
    ----------
    module : str
        Module to import, e.g. ``"matplotlib"`` or ``"PIL.Image"``.
    purpose : str, optional
        What needs it, for the message (``"dynamiclrp.viz"``, ``"dynamiclrp demo"``).

    Returns
    -------
    types.ModuleType
        The imported module.

    Raises
    ------
    MissingExtraError
        The module (or its top-level package) is not installed.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        if err.name is not None and err.name.split(".")[0] != top:
            raise  # the module is there but one of *its* dependencies is missing: not ours to explain
        extra = EXTRAS.get(top, (top, None))[1]
        raise MissingExtraError(missing_extra_message(module, purpose), name=top, extra=extra) from None
