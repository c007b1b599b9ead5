"""What dynamiclrp knows about each autograd node type: kernels (an op's forward, its Jacobian transpose, its saved
operands) grouped by family, and the registry with one row per node type (:data:`REGISTRY`)."""
from ..core.spec import OpSpec
from .elementwise import ProductKernel, UnaryKernel
from .linear import LinearKernel
from .norm import NormKernel
from .reduce import HomogeneousKernel, SumKernel
from .registry import REGISTRY, describe, families
from .routing import RoutingKernel
from .special import CompositeKernel

__all__ = ["CompositeKernel", "HomogeneousKernel", "LinearKernel", "NormKernel", "OpSpec", "ProductKernel", "REGISTRY",
           "RoutingKernel", "SumKernel", "UnaryKernel", "describe", "families"]
