"""What every rule shares: the :class:`Rule` base class and small helpers.

A rule is immutable configuration (``Epsilon(1e-6)``, ``Uniform()``...). At plan time the engine calls
``rule.bind(site)`` for every node, which returns a compiled :class:`~dynamiclrp.core.step.Step` holding everything
that could be decided from the graph's structure (:mod:`dynamiclrp.core.step`).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import torch

from ..core.graph import fit_to
from ..core.messages import Msg, safe_div, stabilize
from ..core.step import Site, Step
from ..errors import RuleError

Tensor = torch.Tensor
Stabilizer = float | Callable[[Tensor], Tensor]


class Rule:
    """Base class of relevance rules. A rule is immutable configuration; :meth:`bind` compiles it for a node.

    Subclasses state which op families they apply to in ``families`` (used to validate rule sets).
    """

    families: frozenset[str] = frozenset()

    def bind(self, site: Site) -> Step:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted((k, repr(v)) for k, v in vars(self).items()))))


def _stab(stabilizer: Stabilizer, z: Tensor) -> Tensor:
    if callable(stabilizer):
        return stabilizer(z)
    return stabilize(z, float(stabilizer))


def _wrong_family(rule: Rule, site: Site, family: str) -> RuleError:
    return RuleError(f"{type(rule).__name__} does not apply to {site.describe()} (family '{family}'); it "
                     f"applies to: {', '.join(sorted(rule.families))}")


def _child_meta(site: Site) -> list[tuple[torch.Size, torch.dtype] | None]:
    g = site.graph
    return [None if e < 0 else g.meta(e) for e in site.edges]


def _fit(t: Tensor | None, meta: tuple[torch.Size, torch.dtype] | None) -> Tensor | None:
    if t is None or meta is None:
        return None
    return fit_to(t, meta[0], meta[1])


def _fit_mask(mask: Tensor, like: Tensor) -> Tensor:
    return mask if mask.shape == like.shape else mask.expand_as(like)


def _check_number(name: str, v: Any, minimum: float | None = 0.0) -> float:
    """``v`` as a float, after checking it is a real number (not a bool or a string), finite and ``>= minimum``;
    raises :class:`RuleError` saying which parameter is wrong and what is valid."""
    valid = "a real number" if minimum is None else f"a number >= {minimum:g}"
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool:
            v = v.item()
        else:
            raise RuleError(f"{name} must be {valid}, got {v!r} ({type(v).__name__})")
    f = float(v)
    if not math.isfinite(f) or (minimum is not None and f < minimum):
        bound = "finite" if minimum is None else f">= {minimum:g} and finite"
        raise RuleError(f"{name} must be {bound}, got {f}")
    return f


def _check_stabilizer(stabilizer: Any) -> None:
    if callable(stabilizer) and not isinstance(stabilizer, torch.Tensor):
        return
    if isinstance(stabilizer, bool) or not isinstance(stabilizer, (numbers.Real, torch.Tensor)):
        raise RuleError(f"a stabilizer must be a float >= 0 or a callable z -> stabilized z, got "
                        f"{stabilizer!r} ({type(stabilizer).__name__})")
    _check_number("a stabilizer", stabilizer)


def _message(R: Tensor, value: Tensor, meta: tuple[torch.Size, torch.dtype] | None) -> Msg:
    """Explicit relevance ``R`` at an input whose forward value is ``value``, as a message: gradient form
    ``R / value`` where the value is non-zero, explicit relevance where it is zero (nothing is lost either way)."""
    zero = value == 0
    m = Msg(g=_fit(safe_div(R, value), meta))
    if bool(zero.any()):
        rest = torch.where(zero, R, torch.zeros((), dtype=R.dtype, device=R.device))
        if bool(rest.any()):
            m.r = _fit(rest, meta)
    return m
