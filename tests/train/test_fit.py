import pytest
import torch

import torchslim as ts
from torchslim.train import Callback, TrainConfig, fit
from torchslim.train.fit import learning_rate_factor


@pytest.mark.slow
def test_lenet_learns_real_mnist(mnist_small):
    model = ts.models.create("lenet-300-100")
    history = fit(model, mnist_small, {"epochs": 2, "lr": 0.05, "batch_size": 64}, progress=False)
    assert history.final["accuracy"] > 0.85
    assert history.final["examples"] == 2000
    assert history.epochs[-1]["test_accuracy"] == pytest.approx(history.final["accuracy"])


def test_training_is_reproducible(digits):
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = ts.models.create_for("lenet-300-100", digits)
        fit(model, digits, {"epochs": 1, "seed": 5}, progress=False)
        results.append(model.fc1.weight.detach().clone())
    assert torch.equal(results[0], results[1])


def test_callbacks_are_called_in_order(digits):
    events = []

    class Recorder(Callback):
        def on_train_start(self, state):
            events.append("start")

        def after_backward(self, state):
            assert all(p.grad is not None for p in state.model.parameters())
            events.append("backward")

        def after_step(self, state):
            events.append("step")

        def on_epoch_end(self, state, metrics):
            events.append(f"epoch{metrics['epoch']}")

    model = ts.models.create_for("lenet-300-100", digits)
    fit(model, digits, {"epochs": 2, "max_batches_per_epoch": 3}, callbacks=[Recorder()], progress=False)
    assert events == ["start"] + ["backward", "step"] * 3 + ["epoch1"] + ["backward", "step"] * 3 + ["epoch2"]


def test_train_verb_leaves_original_untouched_and_mode_restored(digits):
    model = ts.models.create_for("lenet-300-100", digits).eval()
    before = model.fc1.weight.detach().clone()
    result = ts.train(model, digits, {"epochs": 1}, progress=False)
    assert torch.equal(model.fc1.weight, before)
    assert not torch.equal(result.model.fc1.weight, before)
    assert model.training is False
    assert result.report.stages[0].metrics["parameters"] == sum(p.numel() for p in model.parameters())


def test_evaluate_restores_mode_and_counts_errors(digits):
    model = ts.models.create_for("lenet-300-100", digits).train()
    metrics = ts.evaluate(model, digits)
    assert model.training is True
    assert metrics["examples"] == 359
    assert metrics["errors"] == round(metrics["error"] * 359)


def test_schedules():
    cosine = TrainConfig(epochs=2, schedule="cosine")
    assert learning_rate_factor(cosine, 0, 10) == pytest.approx(1.0)
    assert learning_rate_factor(cosine, 10, 10) == pytest.approx(0.5)
    step = TrainConfig(epochs=3, schedule="step", step_epochs=(1, 2), gamma=0.1)
    assert learning_rate_factor(step, 25, 10) == pytest.approx(0.01)
    warm = TrainConfig(epochs=2, warmup_epochs=1.0)
    assert learning_rate_factor(warm, 4, 10) == pytest.approx(0.5)


def test_divergence_is_a_clear_error(digits):
    model = ts.models.create_for("lenet-300-100", digits)
    with pytest.raises(ts.TorchslimError, match="loss became .* lower the learning rate"):
        fit(model, digits, {"epochs": 1, "lr": 1e6, "momentum": 0.0}, progress=False)


@pytest.mark.slow
def test_text_model_trains(tmp_path):
    from tests.conftest import shared_data_or_skip

    text = ts.data.load("shakespeare", root=shared_data_or_skip("text"), download=False)
    model = ts.models.create_for("char-transformer", text, block_size=32, layers=1, embed_dim=32, heads=2)
    before = ts.evaluate(model, text, limit=64, batch_size=16)
    assert before["perplexity"] > 30  # about the 65-character vocabulary for an untrained model
    fit(model, text, {"epochs": 1, "optimizer": "adam", "lr": 3e-3, "batch_size": 16, "max_batches_per_epoch": 60, "eval_every_epoch": False}, progress=False)
    after = ts.evaluate(model, text, limit=64, batch_size=16)
    assert after["bits_per_token"] < before["bits_per_token"] - 1.0 and after["perplexity"] < before["perplexity"] / 2


def test_bf16_autocast_trains_with_fp32_weights(digits):
    torch.manual_seed(0)
    model = ts.models.create_for("lenet-300-100", digits)
    seen = []

    class Dtypes(Callback):
        def on_batch_start(self, state):
            if not seen:
                state.model.fc1.register_forward_hook(lambda module, args, output: seen.append(output.dtype))

    history = fit(model, digits, {"epochs": 2, "lr": 0.05, "precision": "bf16"}, callbacks=[Dtypes()], progress=False)
    assert seen[0] == torch.bfloat16  # the forward pass ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights and updates stay fp32
    torch.manual_seed(0)
    full = fit(ts.models.create_for("lenet-300-100", digits), digits, {"epochs": 2, "lr": 0.05}, progress=False)
    assert history.epochs[-1]["train_loss"] < history.epochs[0]["train_loss"]
    assert history.final["accuracy"] > full.final["accuracy"] - 0.05  # learns about as well as fp32


def test_fp16_on_cpu_is_refused_with_the_alternative(digits):
    with pytest.raises(ts.TorchslimError, match="fp16 needs a CUDA device; on CPU use bf16"):
        fit(ts.models.create_for("lenet-300-100", digits), digits, {"epochs": 1, "precision": "fp16"}, progress=False)


def test_task_metric_named_loss_trains_and_shows_both(capsys):
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x.sum(1, keepdim=True)
    data = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    task = ts.Task.custom(
        lambda m, b: F.mse_loss(m(b[0]), b[1]),
        lambda m, batches: {"loss": sum(F.mse_loss(m(a), b).item() for a, b in batches)},
        metric="loss",
        higher_is_better=False,
    )
    result = ts.train(nn.Linear(4, 1), data, {"epochs": 1}, task=task, progress="lines")
    assert "loss" in result.report.stages[0].metrics
    line = capsys.readouterr().err
    assert "train 1/1: loss " in line and "test loss " in line
