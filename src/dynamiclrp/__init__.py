"""dynamiclrp: Layer-wise Relevance Propagation over the autograd graph of any PyTorch model.

>>> import dynamiclrp
>>> rel = dynamiclrp.relevance(outputs, inputs)            # doctest: +SKIP
>>> ex = dynamiclrp.explain(outputs, inputs)               # doctest: +SKIP
"""
from . import presets, rules
from .api import Explainer, explain, relevance
from .errors import (DynamicLRPError, GraphFreedError, RuleError, UnsupportedOperationError,
                     ValueUnavailableError)
from .results import Explanation, Ledger, Sink
from .rules import RuleSet

__version__ = "0.1.0"

__all__ = [
    "DynamicLRPError", "Explainer", "Explanation", "GraphFreedError", "Ledger", "RuleError", "RuleSet", "Sink",
    "UnsupportedOperationError", "ValueUnavailableError", "explain", "presets", "relevance", "rules",
]

from .adapters import LRP  # noqa: E402  Captum-style adapter (issue 6)
__all__.append("LRP")

from .coverage import coverage  # noqa: E402  coverage report (issue 4); the CLI imports the module itself
__all__.append("coverage")
