"""Exceptions raised by dynamiclrp. Every message says what happened and what to do about it."""
from __future__ import annotations


class DynamicLRPError(Exception):
    """Base class of every error dynamiclrp raises on purpose."""


class UnsupportedOperationError(DynamicLRPError):
    """The graph contains an autograd node type that has no relevance rule.

    Raised before any relevance is computed, so nothing is half-done. The message names the node type, the
    operation that produced it and how to register a rule for it.
    """


class GraphFreedError(DynamicLRPError):
    """The saved tensors of the graph were freed by an earlier ``backward()`` without ``retain_graph=True``."""


class ValueUnavailableError(DynamicLRPError):
    """A rule needs a forward value that can neither be read from the graph nor rebuilt from it."""


class UnusedInputError(DynamicLRPError, ValueError):
    """A requested input is not in the graph of the outputs (a copy, a slice taken after the forward pass, a tensor
    the outputs do not depend on). ``torch.autograd.grad`` raises here too; pass ``allow_unused=True`` to get zeros
    for such inputs instead."""


class UnsupportedTensorError(DynamicLRPError, TypeError):
    """An output, input or seed is a kind of tensor relevance is not defined for: sparse or complex."""


class RuleError(DynamicLRPError):
    """A rule, rule set or preset was configured with invalid values or keys."""


class ConditionError(DynamicLRPError, ValueError):
    """Concept conditions (``conditions=``) that cannot be applied: a tensor that is not in the graph, a module name
    that does not name one tensor, units out of range, or conditions on parallel branches with
    ``exclude_parallel=True``. The message says which and what to pass instead."""


class UsageError(DynamicLRPError):
    """A problem with the command line: reported without a traceback, exit code 2."""


class SpecError(UsageError, ValueError):
    """A ``module:function`` or ``file.py:function`` spec could not be resolved; the message says why."""


class TargetError(DynamicLRPError):
    """A coverage or explain target (a model type, a zoo entry, a function) could not be resolved or built."""


class StoreError(DynamicLRPError):
    """A relevance store cannot be used for this job (written by a different job, not a relevance store...)."""


class PropertyFailure(DynamicLRPError, AssertionError):
    """A property every explanation must have does not hold for a fuzzed graph (:mod:`dynamiclrp.testing.fuzz`);
    ``kind`` names which (for counting), the message holds the case to reproduce it."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class MissingExtraError(DynamicLRPError, ImportError):
    """An optional dependency is not installed. ``str(err)`` is one line that says what to install.

    Attributes
    ----------
    extra : str or None
        The extra of dynamiclrp that installs the missing package (``"viz"``, ``"hf"``, ``"demo"``...).
    """

    def __init__(self, message: str, *, name: str | None = None, extra: str | None = None) -> None:
        ImportError.__init__(self, message, name=name)
        self.extra = extra
