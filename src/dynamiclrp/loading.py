"""Resolve ``module:function`` and ``path/file.py:function`` specs, as every command line sub-command takes them.

Two forms, accepted everywhere a command line option names your code (``dynamiclrp explain --model``,
``dynamiclrp coverage TARGET``):

* ``package.module:function`` — an importable module. The current directory is on the import path while it is
  imported and while ``function`` runs, as for ``python -m``, so ``mymodels:build`` finds ``./mymodels.py``
  whether the command was started as ``dynamiclrp`` or as ``python -m dynamiclrp``.
* ``path/to/file.py:function`` — a Python file, imported under its file name (``file``) with its directory on
  the import path, so that it can import its neighbours and so that objects it defines can be pickled.

The part after the last ``:`` is an attribute of the module (dotted names such as ``Class.method`` work).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from .errors import SpecError

__all__ = ["SpecError", "is_file_spec", "import_path", "load_attribute", "on_sys_path"]



@contextlib.contextmanager
def on_sys_path(*folders: str | os.PathLike[str]) -> Iterator[None]:
    """Put ``folders`` at the front of ``sys.path`` for the duration of the block (and restore it after)."""
    saved = list(sys.path)
    for folder in reversed([str(Path(f).resolve()) for f in folders]):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path[:] = saved


def is_file_spec(where: str) -> bool:
    """Whether the module part of a spec names a file (``.py`` suffix or a path separator)."""
    return where.endswith(".py") or "/" in where or "\\" in where


def import_path(where: str) -> Any:
    """Import a module given as a dotted name or as a ``.py`` file path.

    Raises
    ------
    SpecError
        The module or file does not exist, or importing it raised (the message names the exception).
    """
    if is_file_spec(where):
        path = Path(where)
        if not path.is_file():
            raise SpecError(f"no such file: {path}")
        name = path.stem
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise SpecError(f"cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(mod_spec)
        previous = sys.modules.get(name)
        sys.modules[name] = module  # dataclasses, pickling and relative lookups need the module registered
        try:
            with on_sys_path(path.parent):
                mod_spec.loader.exec_module(module)
        except BaseException as err:
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise SpecError(f"importing {path} failed: {type(err).__name__}: {err}") from None
        return module
    with on_sys_path(os.getcwd()):
        try:
            return importlib.import_module(where)
        except ModuleNotFoundError as err:
            missing = err.name or ""
            if where == missing or where.startswith(missing + "."):
                raise SpecError(f"cannot import module {where!r} ({err}); is it installed, on PYTHONPATH or in "
                                f"the current directory? A file can be given as path/to/{where.split('.')[-1]}"
                                ".py:function") from None
            raise SpecError(f"importing module {where!r} failed: {err}") from None
        except Exception as err:  # noqa: BLE001 - the user's module may raise anything while importing
            raise SpecError(f"importing module {where!r} failed: {type(err).__name__}: {err}") from None


def load_attribute(spec: str, *, expect: str = "module:function") -> tuple[Any, str, str]:
    """Resolve ``spec`` (``module:attr`` or ``file.py:attr``) to ``(object, module part, attribute part)``.

    Parameters
    ----------
    spec : str
        The spec as given on the command line.
    expect : str
        What the option expects, for the error message (e.g. ``"module:function returning (model, inputs)"``).

    Raises
    ------
    SpecError
        No ``:``, the module or file cannot be imported, or it has no such attribute (the message lists the
        callables it has).
    """
    if ":" not in spec.replace(":\\", "").replace(":/", "/"):
        raise SpecError(f"expected 'package.module:function' or 'path/file.py:function' ({expect}), got {spec!r}")
    where, name = spec.rsplit(":", 1)
    if not where or not name:
        raise SpecError(f"expected 'package.module:function' or 'path/file.py:function' ({expect}), got {spec!r}")
    module = import_path(where)
    obj: Any = module
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            shown = ", ".join(public[:20]) + (" ..." if len(public) > 20 else "")
            raise SpecError(f"{where!r} has no attribute {name!r}; callables there: {shown or '(none)'}")
    return obj, where, name
