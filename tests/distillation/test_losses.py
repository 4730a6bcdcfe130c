import pytest
import torch
from torch.nn import functional as F

from torchslim.distillation import attention_map, attention_transfer_loss, kl_soft_targets, logit_mse_loss, soft_target_loss


def test_soft_target_loss_matches_the_formula():
    torch.manual_seed(0)
    student, teacher, targets = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    temperature, alpha = 3.0, 0.7
    p_teacher = F.softmax(teacher / temperature, dim=1)
    log_p_student = F.log_softmax(student / temperature, dim=1)
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(dim=1).mean()
    expected = (1 - alpha) * F.cross_entropy(student, targets) + alpha * temperature**2 * kl
    torch.testing.assert_close(soft_target_loss(student, teacher, targets, temperature, alpha), expected)
    torch.testing.assert_close(soft_target_loss(student, teacher, targets, temperature, 0.0), F.cross_entropy(student, targets))
    assert kl_soft_targets(teacher, teacher, 5.0).item() == pytest.approx(0.0, abs=1e-6)


def test_t_squared_keeps_gradient_scale():
    torch.manual_seed(1)
    teacher = torch.randn(32, 10)
    norms = []
    for temperature in (8.0, 16.0, 32.0):
        student = torch.randn(32, 10, generator=torch.Generator().manual_seed(2)).requires_grad_()
        kl_soft_targets(student, teacher, temperature).backward()
        norms.append(student.grad.norm().item())
    assert max(norms) / min(norms) < 1.1  # without T^2 they would shrink 16-fold from T=8 to T=32


def test_teacher_gets_no_gradient_and_mse_option():
    student, teacher = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10, requires_grad=True)
    soft_target_loss(student, teacher, None).backward()
    assert teacher.grad is None and student.grad is not None
    torch.testing.assert_close(logit_mse_loss(student, teacher, None), F.mse_loss(student, teacher))


def test_attention_maps():
    feature = torch.randn(2, 8, 5, 5)
    assert attention_map(feature).shape == (2, 25)
    torch.testing.assert_close(attention_map(feature).norm(dim=1), torch.ones(2))
    assert attention_transfer_loss(feature, 3 * feature).item() == pytest.approx(0.0, abs=1e-7)
    assert attention_transfer_loss(feature, torch.randn(2, 16, 5, 5)).item() > 0
