"""Fidelity to the original model: for data without labels (sentence embeddings, features, any output), the
compressed model is trained and judged by how closely its outputs follow the uncompressed model's on the same
batches: mean cosine similarity (primary, higher is better) and mean squared error.

Outputs of shape (batch, tokens, features) are compared position by position (with an ``attention_mask`` in the
batch, at the unmasked positions only), (batch, features) row by row, and images or maps of four or more dimensions
(batch, channels, H, W) example by example, over all their values (an autoencoder's image is one vector, not 28 rows).

Example:
    >>> import torch
    >>> from torch import nn
    >>> reference = nn.Linear(4, 4)
    >>> task = FidelityTask(reference)
    >>> round(task.evaluate(reference, [torch.randn(8, 4)])["cosine"], 4)   # a model against itself
    1.0
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from torchslim.core.copying import copy_model
from torchslim.core.errors import TorchslimError
from torchslim.core.modes import eval_mode, model_device
from torchslim.tasks.base import TASKS, Task
from torchslim.tasks.batches import model_inputs, move_to, output_tensor


def _positions(tensor: torch.Tensor, batch: Any) -> torch.Tensor:
    """Rows of features to compare: (N, features), masked positions dropped; one row per example of an output of four
    or more dimensions."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is not None and tensor.dim() == 3 and tuple(mask.shape) == tuple(tensor.shape[:2]):
        return tensor[mask.to(tensor.device) != 0]
    if tensor.dim() >= 4:
        return tensor.reshape(tensor.shape[0], -1)
    return tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() > 1 else tensor.reshape(1, -1)


class FidelityTask(Task):
    """Agreement with a reference model: MSE loss; cosine similarity (primary) and MSE."""

    name = "fidelity"
    metric = "cosine"
    higher_is_better = True

    def __init__(self, reference: nn.Module | None = None) -> None:
        self.reference = reference

    def with_reference(self, reference: nn.Module) -> Task:
        if self.reference is not None:
            return self
        frozen = copy_model(reference).eval()
        for parameter in frozen.parameters():
            parameter.requires_grad_(False)
        return FidelityTask(frozen)

    def _reference_output(self, batch: Any) -> torch.Tensor:
        if self.reference is None:
            raise TorchslimError("the fidelity task compares against the original model, and none was given")
        args, kwargs = model_inputs(move_to(batch, model_device(self.reference)), self.reference)
        with torch.no_grad(), eval_mode(self.reference):
            return output_tensor(self.reference(*args, **kwargs), "reference output").float()

    def _pair(self, outputs: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        output = output_tensor(outputs).float()
        reference = self._reference_output(batch).to(output.device)
        if output.shape != reference.shape:
            raise TorchslimError(f"fidelity: the model's output {tuple(output.shape)} and the original's {tuple(reference.shape)} differ")
        return _positions(output, batch), _positions(reference, batch)

    def loss_from(self, outputs: Any, batch: Any) -> torch.Tensor:
        output, reference = self._pair(outputs, batch)
        return F.mse_loss(output, reference)

    def start(self) -> dict[str, float]:
        return {"cosine_sum": 0.0, "squared_sum": 0.0, "reference_sum": 0.0, "rows": 0.0, "values": 0.0}

    def update(self, totals: dict[str, float], outputs: Any, batch: Any) -> None:
        output, reference = self._pair(outputs, batch)
        totals["cosine_sum"] += F.cosine_similarity(output, reference, dim=-1, eps=1e-12).sum().item()
        totals["squared_sum"] += (output - reference).pow(2).sum().item()
        totals["reference_sum"] += reference.pow(2).sum().item()
        totals["rows"] += output.shape[0]
        totals["values"] += output.numel()

    def finish(self, totals: dict[str, float]) -> dict[str, float]:
        if totals["rows"] == 0:
            raise TorchslimError("fidelity evaluation compared no outputs")
        mse = totals["squared_sum"] / totals["values"]
        return {
            "cosine": totals["cosine_sum"] / totals["rows"],
            "mse": mse,
            "loss": mse,  # the training loss (loss_from), for what ranks choices by the loss
            "relative_error": (totals["squared_sum"] / max(totals["reference_sum"], 1e-30)) ** 0.5,
            "examples": int(totals["rows"]),
        }


TASKS.register("fidelity", "agreement with the original model's outputs: cosine similarity and MSE (unlabeled data)")(FidelityTask)

__all__ = ["FidelityTask"]
