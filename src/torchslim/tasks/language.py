"""Language modeling: next-token cross-entropy; perplexity (primary, lower is better), bits per token, next-token
accuracy.

Batches are ``(input ids, target ids)`` pairs already shifted (torchslim's text windows), a tensor of token ids, or
a mapping with ``input_ids`` (and ``attention_mask`` / ``labels``): then targets are the inputs shifted by one,
and positions the attention mask marks as padding (or labels of -100) are not scored.

Example:
    >>> import torch
    >>> task = LanguageModelingTask()
    >>> logits = torch.zeros(1, 4, 5)                   # uniform over 5 tokens
    >>> totals = task.start(); task.update(totals, logits, torch.tensor([[1, 2, 3, 4]]))
    >>> round(task.finish(totals)["perplexity"], 3)
    5.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from torchslim.core.errors import TorchslimError
from torchslim.tasks.base import TASKS, Task
from torchslim.tasks.batches import model_inputs, output_tensor
from torchslim.tasks.classification import IGNORE, add_scores, check_range


def next_token_targets(outputs: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, vocabulary) and target ids (N,) (-100 where not scored)."""
    logits = output_tensor(outputs)
    if logits.dim() != 3:
        raise TorchslimError(f"language modeling: expected logits (batch, tokens, vocabulary), got shape {tuple(logits.shape)}")
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        targets = batch[1].to(logits.device)
    elif isinstance(batch, Mapping) and _decoder_fed(batch) and isinstance(batch.get("labels"), torch.Tensor):
        # an encoder-decoder model (T5, BART): its decoder's positions already line up with the labels, no shift
        targets = batch["labels"].to(logits.device)
        mask = batch.get("decoder_attention_mask")
        if isinstance(mask, torch.Tensor):
            targets = targets.masked_fill(mask.to(logits.device) == 0, IGNORE)
    else:
        if isinstance(batch, Mapping):
            ids = batch.get("labels", batch.get("input_ids"))
            mask = batch.get("attention_mask")
        else:
            ids, mask = batch, None
        if not isinstance(ids, torch.Tensor):
            raise TorchslimError("language modeling: batches need token ids (a tensor, (inputs, targets), or a mapping with input_ids)")
        ids = ids.to(logits.device)
        targets = torch.full_like(ids, IGNORE)
        targets[:, :-1] = ids[:, 1:]
        if mask is not None:
            targets[:, :-1] = targets[:, :-1].masked_fill(mask[:, 1:].to(logits.device) == 0, IGNORE)
    if targets.shape != logits.shape[:2]:
        raise TorchslimError(f"language modeling: targets of shape {tuple(targets.shape)} do not fit logits {tuple(logits.shape)}")
    check_range(targets, logits.shape[-1], "language modeling: target token", "vocabulary entries")
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long()


def _decoder_fed(batch: Mapping) -> bool:
    return "decoder_input_ids" in batch or "decoder_inputs_embeds" in batch


class LanguageModelingTask(Task):
    """Next-token cross-entropy; perplexity, bits per token and next-token accuracy."""

    name = "language-modeling"
    metric = "perplexity"
    higher_is_better = False

    def outputs(self, model: nn.Module, batch: Any) -> Any:
        """The model's logits; token ids beyond every embedding table of the model are refused by name first."""
        sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and not (isinstance(batch, Mapping) and _decoder_fed(batch)):
            raise TorchslimError(
                f"language modeling: {type(model).__name__} is an encoder-decoder model; give each batch the decoder's inputs as well: "
                "{'input_ids': ..., 'attention_mask': ..., 'decoder_input_ids': model.prepare_decoder_input_ids_from_labels(labels), 'labels': labels}"
            )
        args, kwargs = model_inputs(batch, model)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if sizes and isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            check_range(ids, max(sizes), "language modeling: token id", "embeddings")
        return super().outputs(model, batch)

    def loss_from(self, outputs: Any, batch: Any) -> torch.Tensor:
        logits, targets = next_token_targets(outputs, batch)
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)

    def start(self) -> dict[str, float]:
        return {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}

    def update(self, totals: dict[str, float], outputs: Any, batch: Any) -> None:
        add_scores(totals, *next_token_targets(outputs, batch))

    def finish(self, totals: dict[str, float]) -> dict[str, float]:
        tokens = int(totals["count"])
        if tokens == 0:
            raise TorchslimError("language-modeling evaluation scored no tokens")
        loss = totals["loss_sum"] / tokens
        accuracy = totals["correct"] / tokens
        return {
            "perplexity": math.exp(min(loss, 700.0)),
            "loss": loss,
            "bits_per_token": loss / math.log(2),
            "accuracy": accuracy,
            "error": 1 - accuracy,
            "tokens": tokens,
        }


TASKS.register("language-modeling", "next-token cross-entropy; perplexity")(LanguageModelingTask)

__all__ = ["LanguageModelingTask", "next_token_targets"]
