"""Griffe extension for the API reference: Sphinx cross-reference roles in NumPy docstrings become links.

dynamiclrp's docstrings follow the NumPy docstring standard, which writes cross-references as Sphinx roles
(``:func:`text```, ``:class:`~dynamiclrp.rules.RuleSet```). mkdocstrings renders Markdown, where such roles
would show up raw. This extension rewrites each role, once the package is loaded, into an mkdocs-autorefs
cross-reference to the object's full path:

* the target is resolved like Python resolves a name in the docstring's scope (members of the object and of
  its parents, the module's imports), then among the package's top-level names;
* ``~`` shows only the last component, as in Sphinx; functions and methods get ``()``;
* links are *optional* references: a target that the reference pages do not render (a private helper, an
  external library) is shown as code without a link, and a full ``dynamiclrp.`` path that names nothing is a
  build warning (so ``mkdocs build --strict`` fails on such a typo).

Configured in ``mkdocs.yml`` under the python handler's ``extensions``; the docstrings themselves stay plain
NumPy style for ``help()`` and IDEs.
"""
from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?P<role>func|class|mod|meth|attr|data|exc|obj):`(?P<tilde>~?)(?P<target>[^`<]+?)`")
_CALLABLE = {"func", "meth"}
_logger = griffe.get_logger("dynamiclrp.docs.sphinx_roles")


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`target``` in every docstring of the package into autorefs cross-references."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None and ":" in obj.docstring.value:
                obj.docstring.value = _ROLE.sub(lambda m, o=obj: _replace(m, o, pkg), obj.docstring.value)


def _walk(obj: griffe.Object) -> Any:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _exists(pkg: griffe.Module, path: str) -> bool:
    if path == pkg.path:
        return True
    if not path.startswith(pkg.path + "."):
        return False
    try:
        pkg[path[len(pkg.path) + 1:]]
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return True


def _resolve(obj: griffe.Object, target: str, pkg: griffe.Module) -> str | None:
    """Full path of ``target`` as seen from ``obj``, or ``None`` when it names nothing known."""
    if target.startswith(pkg.path + ".") or target == pkg.path:
        return target if _exists(pkg, target) else None
    first, _, rest = target.partition(".")
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            base = scope.resolve(first)
        except griffe.NameResolutionError:
            scope = scope.parent
            continue
        return f"{base}.{rest}" if rest else base
    if first in pkg.members:  # a top-level name of the package (dynamiclrp.explain, dynamiclrp.RuleSet, ...)
        return f"{pkg.path}.{target}"
    return None


def _replace(match: re.Match[str], obj: griffe.Object, pkg: griffe.Module) -> str:
    role = match.group("role")
    target = re.sub(r"\s+", "", match.group("target"))  # a role may be wrapped across lines
    shown = target.rsplit(".", 1)[-1] if match.group("tilde") else target
    if role in _CALLABLE and not shown.endswith(")"):
        shown += "()"
    path = _resolve(obj, target, pkg)
    if path is None:
        if target.startswith(pkg.path + "."):
            _logger.warning(f"{obj.path}: cannot resolve the cross-reference :{role}:`{target}`")
        else:
            _logger.debug(f"{obj.path}: :{role}:`{target}` is not a name in scope; shown without a link")
        path = target  # external (torch, PIL, matplotlib...): shown as code, linked if an inventory has it
    code = f"<code>{html.escape(shown)}</code>"
    return f'<autoref identifier="{html.escape(path, quote=True)}" optional>{code}</autoref>'
