"""Knowledge distillation: soft targets with temperature, logit MSE, FitNets hints, attention transfer."""

from torchslim.distillation.losses import (
    attention_map,
    attention_transfer_loss,
    hint_loss,
    kl_soft_targets,
    logit_mse_loss,
    soft_target_loss,
)
from torchslim.distillation.trainer import DistillConfig, FeaturePair, distill

__all__ = [
    "DistillConfig",
    "FeaturePair",
    "attention_map",
    "attention_transfer_loss",
    "distill",
    "hint_loss",
    "kl_soft_targets",
    "logit_mse_loss",
    "soft_target_loss",
]
