"""Distillation losses: pure tensor functions.

soft_target_loss: L = (1 - alpha) * CE(y, p_s) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
(Hinton et al. 2015; the T^2 factor keeps the soft term's gradients on the same scale as T changes).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def class_axis(logits: torch.Tensor) -> torch.Tensor:
    """Logits with the class axis last: dense predictions of 4 or more dimensions (B, classes, H, W) carry it on dim 1,
    as torch's convolutions do; (B, classes) and sequence outputs (B, T, classes) carry it last already."""
    return logits.movedim(1, -1) if logits.dim() >= 4 else logits


def _flat(logits: torch.Tensor) -> torch.Tensor:
    logits = class_axis(logits)
    return logits.reshape(-1, logits.shape[-1])


def kl_soft_targets(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), averaged over examples.

    Example:
        >>> z = torch.randn(4, 10)
        >>> float(kl_soft_targets(z, z, 4.0)) == 0.0
        True
    """
    student = F.log_softmax(_flat(student_logits) / temperature, dim=-1)
    teacher = F.log_softmax(_flat(teacher_logits).detach() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None, temperature: float = 4.0, alpha: float = 0.9
) -> torch.Tensor:
    """(1 - alpha) * CE(y, p_s) + alpha * T^2 * KL(p_t^T || p_s^T); without targets, the soft term alone."""
    soft = kl_soft_targets(student_logits, teacher_logits, temperature)
    if targets is None or alpha >= 1.0:
        return soft
    hard = F.cross_entropy(_flat(student_logits), targets.reshape(-1))
    return (1.0 - alpha) * hard + alpha * soft


def logit_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None, alpha: float = 0.9) -> torch.Tensor:
    """(1 - alpha) * CE(y, p_s) + alpha * MSE(z_s, z_t): matching logits directly (Ba & Caruana 2014)."""
    soft = F.mse_loss(student_logits, teacher_logits.detach())
    if targets is None or alpha >= 1.0:
        return soft
    return (1.0 - alpha) * F.cross_entropy(_flat(student_logits), targets.reshape(-1)) + alpha * soft


def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets: mean squared error between the (adapted) student feature and the teacher feature."""
    return F.mse_loss(student_feature, teacher_feature.detach())


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017: sum over channels of |F|^2, flattened and L2-normalized: (B, C, H, W) -> (B, H*W)."""
    return F.normalize(feature.pow(2).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between normalized attention maps (spatial sizes must agree; channels may differ)."""
    return (attention_map(student_feature) - attention_map(teacher_feature.detach())).pow(2).mean()
