"""Relevance rules, the registry of node types, and rule sets."""
from .base import Msg, OpSpec, Rule, Site, Step
from .library import (AlphaBeta, AttnLRP, Block, CPLRP, Epsilon, Flat, Gamma, Gradient, Identity, Leaf,
                      MagnitudeSplit, Norm, NormConstant, Pass, Product, Routing, Softmax, Sum, Uniform, WSquare,
                      ZBox, Zero, ZPlus)
from .registry import REGISTRY
from .ruleset import FAMILIES, NodeInfo, RuleSet

__all__ = [
    "AlphaBeta", "AttnLRP", "Block", "CPLRP", "Epsilon", "FAMILIES", "Flat", "Gamma", "Gradient", "Identity",
    "Leaf", "MagnitudeSplit", "Msg", "NodeInfo", "Norm", "NormConstant", "OpSpec", "Pass", "Product", "REGISTRY",
    "Routing", "Rule", "RuleSet", "Site", "Softmax", "Step", "Sum", "Uniform", "WSquare", "ZBox", "ZPlus", "Zero",
]
