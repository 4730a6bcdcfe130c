"""Network compression: a model made structurally cheaper. Low-rank factorization (``factorize``), cheaper
activations (``substitute_activations``), fewer blocks (``remove_blocks``) and a narrower copy (``narrow``)."""

from torchslim.compression.activations import ActivationConfig, substitute_activations
from torchslim.compression.depth import DepthConfig, remove_blocks
from torchslim.compression.factorize import FactorizeConfig, FactorizedConv2d, FactorizedLinear, factorize
from torchslim.compression.width import narrow

__all__ = [
    "ActivationConfig",
    "DepthConfig",
    "FactorizeConfig",
    "FactorizedConv2d",
    "FactorizedLinear",
    "factorize",
    "narrow",
    "remove_blocks",
    "substitute_activations",
]
