"""Relevance rules and rule sets.

A rule is immutable configuration whose ``bind(site)`` compiles it into a step for one node; a
:class:`RuleSet` maps op families to rules and adds per-node, per-layer and first-layer choices.
"""
from ..core.messages import Msg
from ..core.spec import OpSpec
from ..core.step import Site, Step
from ..ops.registry import REGISTRY
from .attention import AttnLRP, CPLRP, Softmax
from .base import Rule
from .elementwise import Gradient, Identity, NormConstant, Pass
from .linear import AlphaBeta, Epsilon, Flat, Gamma, Norm, WSquare, ZBox, Zero, ZPlus
from .paper import MagnitudeSplit
from .products import Product, Uniform
from .routing import Block, Leaf, Routing
from .ruleset import FAMILIES, NodeInfo, RuleSet
from .special import CheckedRouting, Decompose, Recurrent, WeightNorm
from .sums import Sum

__all__ = [
    "AlphaBeta", "AttnLRP", "Block", "CPLRP", "CheckedRouting", "Decompose", "Epsilon", "FAMILIES", "Flat", "Gamma", "Gradient",
    "Identity", "Leaf", "MagnitudeSplit", "Msg", "NodeInfo", "Norm", "NormConstant", "OpSpec", "Pass", "Product",
    "REGISTRY", "Recurrent", "Routing", "Rule", "RuleSet", "Site", "Softmax", "Step", "Sum", "Uniform", "WSquare",
    "WeightNorm", "ZBox", "ZPlus", "Zero",
]
