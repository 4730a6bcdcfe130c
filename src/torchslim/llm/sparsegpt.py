"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning that, like GPTQ, walks a layer's columns against the inverse
Hessian of its inputs: within each block of columns the weights with the lowest w^2 / [H^-1]_jj are pruned (to the
sparsity, or N of every M inputs), and each pruned weight's error is spread over the columns not yet visited, so
the layer's output on the calibration tokens changes as little as it can. Runs block by block (``llm.blocks``) so
each block is pruned on the inputs the already-pruned blocks give it. The ``ts.prune`` solver ``sparsegpt``.

Example:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> weight, inputs = torch.randn(16, 64), torch.randn(512, 64) @ torch.randn(64, 64)
    >>> from torchslim.llm.gptq import hessian_of, layer_error
    >>> hessian = hessian_of(inputs)
    >>> pruned, mask = sparsegpt(weight, hessian, sparsity=0.5)
    >>> float(1 - mask.float().mean())
    0.5
    >>> magnitude = weight * (weight.abs() > weight.abs().median(dim=1, keepdim=True).values)
    >>> bool(layer_error(weight, pruned, hessian) < layer_error(weight, magnitude, hessian))
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.core.selector import is_conv1d
from torchslim.llm.blocks import block_layers, forward_inputs, sequential
from torchslim.llm.gptq import HessianAccumulator, inverse_hessian_factor
from torchslim.pruning.apply import get_mask, set_mask
from torchslim.pruning.importance import parametrized_weight
from torchslim.pruning.masks import parse_pattern


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    pattern: str | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    keep: torch.Tensor | None = None,
    per_row: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned and updated weight, mask: True kept) of ``weight`` (out, in) for inputs with Hessian ``hessian``.
    ``keep`` is an earlier mask whose pruned weights stay pruned; ``per_row`` prunes each row of a column block to
    the sparsity instead of the block as a whole."""
    if (sparsity is None) == (pattern is None):
        raise TorchslimError("SparseGPT takes a sparsity or an N:M pattern")
    kept_per_group, group = parse_pattern(pattern) if pattern is not None else (0, 0)
    weight = weight.detach().float().clone(memory_format=torch.contiguous_format)  # GPT-2's transposed weight too: rows in memory
    columns = weight.shape[1]
    if pattern is not None and columns % group:
        raise TorchslimError(f"pattern {pattern} needs the input width ({columns}) to be a multiple of {group}")
    hessian = hessian.detach().float().clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    inverse = inverse_hessian_factor(hessian, damp)
    keep = torch.ones_like(weight, dtype=torch.bool) if keep is None else keep.to(torch.bool).clone(memory_format=torch.contiguous_format)
    mask = torch.ones_like(weight, dtype=torch.bool)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = weight[:, start:end].clone()
        errors = torch.zeros_like(block)
        inverse_block = inverse[start:end, start:end]
        diagonal = inverse_block.diagonal().reshape(1, -1)
        pruned = (~keep[:, start:end]).contiguous()
        if sparsity is not None:
            saliency = block.pow(2) / diagonal.pow(2)
            saliency[pruned] = -1.0  # already pruned: first to go
            if per_row:
                count = int(round(sparsity * (end - start)))
                if count:
                    pruned.scatter_(1, torch.argsort(saliency, dim=1, stable=True)[:, :count], True)
            else:
                count = int(round(sparsity * saliency.numel()))
                if count:
                    flat = pruned.view(-1)  # a view: the marks land in pruned
                    flat[torch.argsort(saliency.reshape(-1), stable=True)[:count]] = True
        for i in range(end - start):
            if pattern is not None and i % group == 0:
                saliency = block[:, i : i + group].pow(2) / diagonal[:, i : i + group].pow(2)
                saliency[~keep[:, start + i : start + i + group]] = -1.0
                lowest = torch.topk(saliency, group - kept_per_group, dim=1, largest=False).indices
                pruned[:, i : i + group].scatter_(1, lowest, True)
            w = block[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(w), w)
            error = (w - q) / inverse_block[i, i]
            block[:, i:] -= error.unsqueeze(1) @ inverse_block[i, i:].unsqueeze(0)
            block[:, i] = q
            errors[:, i] = error
        weight[:, start:end] = block
        mask[:, start:end] = ~pruned
        weight[:, end:] -= errors @ inverse[start:end, end:]
    return weight * mask, mask


def prune_sparsegpt(
    model: nn.Module, modules: list[tuple[str, nn.Module]], batches: Any, sparsity: dict[str, float] | float | None, config: Any
) -> dict[str, Any]:
    """SparseGPT over the selected layers of ``model`` (in place: weights updated, masks attached as pruning
    masks), block by block on ``batches``. ``sparsity`` is one number or per layer; ``config`` gives pattern,
    scope ("row" prunes each row of a column block on its own), block_size and damp. Returns what the pass measured."""
    selected = {module: name for name, module in modules}
    done: set[str] = set()
    uncalled: list[str] = []

    def prune_block(block_name: str, block: nn.Module, inputs: list) -> None:
        layers = block_layers(block, set(selected))
        hessians = {local: HessianAccumulator(_weight(layer).shape[1]) for local, layer in layers.items()}
        forward_inputs(block, inputs, layers, lambda local, x: hessians[local].add(x))
        for local, layer in layers.items():
            name = selected[layer]
            target = sparsity.get(name) if isinstance(sparsity, dict) else sparsity
            if target is None and config.pattern is None:
                continue
            if hessians[local].count == 0:
                uncalled.append(name)  # its block reads the weight directly (nn.MultiheadAttention's out_proj): left dense
                continue
            previous = get_mask(layer)
            keep = _oriented(layer, previous) if previous is not None else None
            new_weight, mask = sparsegpt(
                _weight(layer), hessians[local].hessian(), target, config.pattern, config.block_size, config.damp, keep, config.scope == "row"
            )
            transposed = is_conv1d(layer)
            stored = new_weight.t() if transposed else new_weight
            stored_mask = mask.t() if transposed else mask
            original = parametrized_weight(layer)
            original.data.copy_(stored.to(original.dtype))
            set_mask(layer, stored_mask)
            done.add(name)

    run = sequential(model, batches, prune_block)
    wanted = [name for name, _ in modules if config.pattern is not None or _target(sparsity, name)]
    if wanted and not done:
        raise TorchslimError("SparseGPT prunes the Linear (and Conv1D) layers of the model's repeated blocks; none of the selected layers is one")
    left = [name for name in wanted if name not in done]
    return {
        "blocks": run.blocks,
        "calibration_tokens": run.tokens,
        "calibration_seconds": round(run.seconds, 2),
        "peak_rss_mib": round(run.peak_rss_mib, 1),
        "left_dense": left,
        "uncalled": uncalled,
        "found_blocks": bool(run.prefix),
    }


def _target(sparsity: dict[str, float] | float | None, name: str) -> float | None:
    return sparsity.get(name) if isinstance(sparsity, dict) else sparsity


def _weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in) (GPT-2's Conv1D stores it transposed)."""
    weight = layer.weight.detach().float()
    return weight.t() if is_conv1d(layer) else weight


def _oriented(layer: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    return mask.t() if is_conv1d(layer) else mask


__all__ = ["prune_sparsegpt", "sparsegpt"]
