"""Network compression: a model made structurally cheaper. Low-rank factorization (``factorize``), cheaper
activations (``substitute_activations``), fewer blocks (``remove_blocks``), a narrower copy (``narrow``), per-layer
``sensitivity``, and budgets met automatically: a file size (``auto_compress``), MACs or measured latency
(``auto_narrow``)."""

from torchslim.compression.activations import ActivationConfig, substitute_activations
from torchslim.compression.budget import BudgetConfig, auto_compress
from torchslim.compression.depth import DepthConfig, remove_blocks
from torchslim.compression.factorize import FactorizeConfig, FactorizedConv2d, FactorizedLinear, factorize
from torchslim.compression.sensitivity import SensitivityConfig, sensitivity, write_sensitivity_plots
from torchslim.compression.speed_budget import SpeedBudgetConfig, auto_narrow
from torchslim.compression.width import narrow

__all__ = [
    "ActivationConfig",
    "BudgetConfig",
    "DepthConfig",
    "FactorizeConfig",
    "FactorizedConv2d",
    "FactorizedLinear",
    "SensitivityConfig",
    "SpeedBudgetConfig",
    "auto_compress",
    "auto_narrow",
    "factorize",
    "narrow",
    "remove_blocks",
    "sensitivity",
    "substitute_activations",
    "write_sensitivity_plots",
]
