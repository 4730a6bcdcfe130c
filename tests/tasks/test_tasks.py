"""Tasks: classification, language modeling (attention masks respected), fidelity to the original, a user's own."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.tasks import TASKS, ClassificationTask, FidelityTask, LanguageModelingTask, Task, get_task, resolve_task


@pytest.mark.parametrize("name", TASKS.names())
def test_every_preset_trains_and_evaluates(name, digits):
    """Each registered task drives fit and evaluate on real digits (fidelity against the untrained copy)."""
    torch.manual_seed(0)
    model = ts.models.create_for("lenet-300-100", digits)
    if name == "language-modeling":
        text = torch.randint(0, 20, (64, 12))
        model = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 20))
        data = [text[i : i + 16] for i in range(0, 64, 16)]
    else:
        data = digits
    reference = ts.models.create_for("lenet-300-100", digits) if name == "fidelity" else None
    task = resolve_task(name, ts.data.as_source(data), reference)
    before = task.evaluate(model, ts.data.as_source(data).batches("eval"))
    ts.train(model, data, {"epochs": 2, "lr": 0.05}, task=task, inplace=True, progress=False)
    after = task.evaluate(model, ts.data.as_source(data).batches("eval"))
    assert task.better(after[task.metric], before[task.metric])


def test_classification_reads_hugging_face_style_outputs_and_names_bad_labels():
    task = ClassificationTask()

    class Output(dict):  # a ModelOutput is a mapping with attributes
        pass

    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    totals = task.start()
    task.update(totals, Output(logits=logits, hidden_states=torch.zeros(1)), {"input_ids": torch.zeros(2), "labels": torch.tensor([0, 0])})
    assert task.finish(totals)["accuracy"] == 0.5
    with pytest.raises(ts.TorchslimError, match="label 7 is outside the model's 2 classes"):
        task.loss_from(logits, (None, torch.tensor([0, 7])))
    with pytest.raises(ts.TorchslimError, match="carry no labels.*fidelity"):
        task.loss_from(logits, torch.zeros(2, 3))


def test_language_modeling_ignores_padding():
    """Padded positions (attention_mask 0) are not scored: a padded batch scores as its unpadded rows."""

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(11, 8), nn.Linear(8, 11)

        def forward(self, input_ids, attention_mask=None):
            return self.head(self.embed(input_ids))

    torch.manual_seed(0)
    model = TinyLM()
    task = LanguageModelingTask()
    ids = torch.randint(1, 11, (2, 6))
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 3)], dim=1).long()
    plain = task.evaluate(model, [ids])
    masked = task.evaluate(model, [{"input_ids": padded, "attention_mask": mask}])
    assert masked["tokens"] == plain["tokens"] == 10
    assert masked["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-5)
    assert plain["perplexity"] == pytest.approx(math.exp(plain["loss"]))


def test_fidelity_scores_agreement_with_the_original():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8))
    batches = [torch.randn(32, 6) for _ in range(4)]
    task = FidelityTask().with_reference(original)
    assert task.evaluate(original, batches)["cosine"] == pytest.approx(1.0)
    noisy = ts.quantize(original, {"weights": {"bits": 2}}).model
    degraded = task.evaluate(noisy, batches)
    assert degraded["cosine"] < 0.999 and degraded["mse"] > 0
    ts.train(noisy, batches, {"epochs": 3, "lr": 0.01, "optimizer": "adam"}, task=task, inplace=True, progress=False)
    assert task.evaluate(noisy, batches)["mse"] < degraded["mse"]  # training on unlabeled data moves toward the original
    with pytest.raises(ts.TorchslimError, match="no labels and no task was named"):
        resolve_task(None, ts.data.as_source(batches))
    assert resolve_task(None, ts.data.as_source(batches), original).name == "fidelity"


def test_a_users_own_task():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    batches = [(torch.randn(16, 3), torch.randn(16, 1)) for _ in range(4)]

    def loss(net, batch):
        return nn.functional.l1_loss(net(batch[0]), batch[1])

    def evaluate(net, data):
        errors = [float(loss(net, batch)) for batch in data]
        return {"mae": sum(errors) / len(errors)}

    task = Task.custom(loss, evaluate, metric="mae", higher_is_better=False)
    before = ts.evaluate(model, batches, task=task)["mae"]
    trained = ts.train(model, batches, {"epochs": 5, "lr": 0.05}, task=task, progress=False).model
    assert ts.evaluate(trained, batches, task=task)["mae"] < before
    broken = Task.custom(loss, lambda net, data: {"other": 1.0}, metric="mae", higher_is_better=False)
    with pytest.raises(ts.TorchslimError, match="without its metric 'mae'"):
        ts.evaluate(model, batches, task=broken)
    with pytest.raises(ts.TorchslimError, match="unknown task 'regression'"):
        get_task("regression")


def test_fidelity_compares_an_image_output_example_by_example():
    """An autoencoder's (B, 1, 28, 28) output was compared row by row: 7,168 "examples" for 256 images."""
    import torch
    from torch import nn

    from torchslim.tasks.fidelity import FidelityTask

    reference = nn.Conv2d(1, 1, 3, padding=1)
    model = nn.Conv2d(1, 1, 3, padding=1)
    images = torch.randn(16, 1, 28, 28)
    metrics = FidelityTask(reference).evaluate(model, [images])
    with torch.no_grad():
        expected = torch.nn.functional.cosine_similarity(model(images).flatten(1), reference(images).flatten(1), dim=1).mean().item()
    assert metrics["examples"] == 16 and abs(metrics["cosine"] - expected) < 1e-5
