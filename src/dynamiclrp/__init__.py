"""dynamiclrp: Layer-wise Relevance Propagation over the autograd graph of any PyTorch model.

>>> import dynamiclrp
>>> rel = dynamiclrp.relevance(outputs, inputs)            # doctest: +SKIP
>>> ex = dynamiclrp.explain(outputs, inputs)               # doctest: +SKIP
"""
from . import concepts, conditions, presets, rules
from .adapters import LRP
from .api import Explainer, explain, relevance
from .coverage import coverage
from .dataset import attribute_dataset
from .errors import (ConditionError, DynamicLRPError, GraphFreedError, RuleError, UnsupportedOperationError,
                     UnsupportedTensorError, UnusedInputError, ValueUnavailableError)
from .core.ledger import Ledger, Sink
from .core.results import Explanation
from .rules import RuleSet
from .version import __version__


__all__ = [
    "ConditionError", "DynamicLRPError", "Explainer", "Explanation", "GraphFreedError", "LRP", "Ledger", "RuleError",
    "RuleSet", "Sink", "UnsupportedOperationError", "UnsupportedTensorError", "UnusedInputError",
    "ValueUnavailableError", "attribute_dataset", "concepts", "conditions", "coverage", "explain", "presets",
    "relevance", "rules", "__version__",
]
