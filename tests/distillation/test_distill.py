import pytest
import torch

import torchslim as ts
from torchslim.core.errors import TorchslimError
from torchslim.pruning import masks_of
from torchslim.train import fit

pytestmark = pytest.mark.slow  # every test here trains or runs a recipe


@pytest.fixture(scope="module")
def teacher(mnist_small):
    torch.manual_seed(0)
    model = ts.models.create("mlp", hidden=(256, 256))
    fit(model, mnist_small, {"epochs": 2, "lr": 0.05, "eval_every_epoch": False}, progress=False)
    return model


def test_distilled_student_learns_and_teacher_untouched(teacher, mnist_small):
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = ts.models.create("mlp", hidden=(32,))
    config = {"temperature": 4.0, "alpha": 0.9, "train": {"epochs": 1, "lr": 0.05, "batch_size": 64, "max_batches_per_epoch": 60}}
    result = ts.distill(student, teacher, mnist_small, config, progress=False)
    metrics = result.report.stages[0].metrics
    assert metrics["accuracy"] > 0.8
    assert metrics["teacher_calls"] == 60  # once per batch
    assert teacher.training is True
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # the caller's student is untouched
    assert not torch.equal(student.head.weight, result.model.head.weight)


def test_cached_teacher_gives_the_same_run(teacher, mnist_small):
    config = {"temperature": 4.0, "alpha": 0.9, "train": {"epochs": 1, "lr": 0.05, "max_batches_per_epoch": 20, "seed": 3}}
    torch.manual_seed(0)
    student = ts.models.create("mlp", hidden=(32,))
    live = ts.distill(student, teacher, mnist_small, config, progress=False)
    cached = ts.distill(student, teacher, mnist_small, {**config, "cache_teacher": True}, progress=False)
    assert cached.report.stages[0].metrics["teacher_calls"] == 0
    torch.testing.assert_close(cached.model.head.weight, live.model.head.weight, rtol=1e-4, atol=1e-5)


def test_hint_features_with_adapter(teacher, mnist_small):
    student = ts.models.create("mlp", hidden=(32,))
    config = {"features": [{"student": "layers.0", "teacher": "layers.1", "weight": 0.5}], "train": {"epochs": 1, "max_batches_per_epoch": 20}}
    result = ts.distill(student, teacher, mnist_small, config, progress=False)
    assert result.report.stages[0].metrics["accuracy"] > 0.5
    assert not hasattr(result.model, "adapters") and set(result.model.state_dict()) == set(student.state_dict())


def test_attention_transfer_between_convnets(mnist_small):
    torch.manual_seed(0)
    teacher = ts.models.create("lenet-5")
    student = ts.models.create("lenet-5", channels=(8, 16), hidden=64)
    config = {
        "features": [{"student": "conv2", "teacher": "conv2", "kind": "attention", "weight": 10.0}, {"student": "conv1", "teacher": "conv1", "kind": "hint"}],
        "train": {"epochs": 1, "max_batches_per_epoch": 5},
    }
    result = ts.distill(student, teacher, mnist_small, config, progress=False)
    assert result.model(mnist_small.example_input(2)).shape == (2, 10)


def test_recovery_of_a_pruned_model(teacher, mnist_small):
    pruned = ts.prune(teacher, {"sparsity": 0.95, "scope": "global"}).model
    damaged = ts.evaluate(pruned, mnist_small)["accuracy"]
    result = ts.distill(pruned, teacher, mnist_small, {"train": {"epochs": 1, "lr": 0.01, "max_batches_per_epoch": 40}}, progress=False)
    assert result.report.stages[0].metrics["accuracy"] > damaged
    masks = masks_of(result.model)
    for name, module in result.model.named_modules():
        if name in masks:
            assert torch.all(module.weight[~masks[name]] == 0)


def test_bad_input(teacher, mnist_small):
    with pytest.raises(TorchslimError, match=r"teacher output \(2, 10\) and student output \(2, 5\) differ"):
        ts.distill(ts.models.create("mlp", hidden=(8,), num_classes=5), teacher, mnist_small)
    with pytest.raises(TorchslimError, match="student has no layer named 'layers.7'; its layers: input_dropout, layers, layers.0"):
        ts.distill(ts.models.create("mlp", hidden=(8,)), teacher, mnist_small, {"features": [{"student": "layers.7", "teacher": "layers.0"}]})
    with pytest.raises(TorchslimError, match="teacher has no layer named 'conv9'"):
        ts.distill(ts.models.create("mlp", hidden=(8,)), teacher, mnist_small, {"features": [{"student": "layers.0", "teacher": "conv9"}]})
    with pytest.raises(ts.ConfigError, match="alpha must be in"):
        ts.distill(ts.models.create("mlp", hidden=(8,)), teacher, mnist_small, {"alpha": 1.5})


def test_the_teacher_is_called_by_its_own_signature():
    """The teacher was called with the student's keyword arguments: forward(idx) got input_ids= and training failed."""
    from torch import nn

    class Teacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(32, 16), nn.Linear(16, 4)

        def forward(self, idx):
            return self.head(self.embed(idx).mean(1))

    class Student(Teacher):
        def forward(self, input_ids, attention_mask=None):
            return self.head(self.embed(input_ids).mean(1))

    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 32, (8, 6)), "labels": torch.randint(0, 4, (8,))} for _ in range(4)]
    teacher = ts.train(Teacher(), batches, {"epochs": 2, "lr": 0.1, "eval_every_epoch": False}, progress=False).model
    result = ts.distill(Student(), teacher, batches, {"train": {"epochs": 2, "lr": 0.1, "eval_every_epoch": False}}, progress=False)
    assert result.report.stages[0].metrics["teacher_accuracy"] == ts.evaluate(teacher, batches)["accuracy"]
    assert result.report.stages[0].metrics["evaluated_on"] == "training data"  # no evaluation data apart
