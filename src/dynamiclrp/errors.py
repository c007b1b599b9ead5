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


class RuleError(DynamicLRPError):
    """A rule, rule set or preset was configured with invalid values or keys."""
