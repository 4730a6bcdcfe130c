"""From scores to masks: pure tensor functions (per layer or one global threshold).

Masks are boolean tensors of the weight's shape: True keeps a weight. Exactly ``round(sparsity * n)`` entries are
pruned per layer (or across all layers for the global scope), ties broken by position.
"""

from __future__ import annotations

import math

import torch

from torchslim.core.errors import TorchslimError


def check_sparsity(sparsity: float, where: str) -> None:
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise TorchslimError(f"{where}: sparsity must be in [0, 1), got {sparsity!r}")


def mask_by_count(scores: torch.Tensor, prune_count: int) -> torch.Tensor:
    """Keep all but the ``prune_count`` lowest-scoring entries."""
    flat = scores.reshape(-1)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if prune_count > 0:
        order = torch.argsort(flat, stable=True)
        mask[order[:prune_count]] = False
    return mask.view_as(scores)


def layer_masks(scores: dict[str, torch.Tensor], sparsity: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """Each layer pruned to its own sparsity (one number for all, or a mapping by layer name).

    Example:
        >>> layer_masks({"a": torch.tensor([3.0, 1.0, 2.0, 4.0])}, 0.5)["a"].tolist()
        [True, False, False, True]
    """
    masks = {}
    for name, score in scores.items():
        target = sparsity[name] if isinstance(sparsity, dict) else sparsity
        check_sparsity(target, name)
        masks[name] = mask_by_count(score, int(round(target * score.numel())))
    return masks


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold across all layers: the ``sparsity`` fraction of all weights with the lowest scores is pruned."""
    check_sparsity(sparsity, "global")
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    keep = mask_by_count(flat, int(round(sparsity * flat.numel())))
    masks, offset = {}, 0
    for name in names:
        size = scores[name].numel()
        masks[name] = keep[offset : offset + size].view_as(scores[name])
        offset += size
    return masks


FLOOR = 0.01  # the share of its weights a layer that one global threshold would empty keeps


def keep_a_floor(masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> dict[str, int]:
    """A layer whose every weight (or row) falls under one global threshold (weights of a small scale that a
    normalization after it undoes) would leave the model its bias alone: it keeps its highest-scored ``FLOOR`` share
    instead, in place. Returns {layer: weights kept} of those layers."""
    kept_counts = {}
    for name, mask in masks.items():
        if mask.numel() and not bool(mask.any()):
            count = max(1, math.ceil(FLOOR * mask.numel()))
            kept = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
            kept[torch.topk(scores[name].reshape(-1).float(), count).indices] = True
            masks[name] = kept.view_as(mask)
            kept_counts[name] = count
    return kept_counts


def row_masks(scores: dict[str, torch.Tensor], sparsity: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """Each output row (neuron, filter) pruned to the sparsity on its own: Wanda's comparison group, which keeps
    every neuron working.

    Example:
        >>> row_masks({"a": torch.tensor([[3.0, 1.0], [0.5, 0.1]])}, 0.5)["a"].tolist()
        [[True, False], [True, False]]
    """
    masks = {}
    for name, score in scores.items():
        target = sparsity[name] if isinstance(sparsity, dict) else sparsity
        check_sparsity(target, name)
        rows = score.reshape(score.shape[0], -1)
        count = int(round(target * rows.shape[1]))
        mask = torch.ones_like(rows, dtype=torch.bool)
        if count:
            mask.scatter_(1, torch.argsort(rows, dim=1, stable=True)[:, :count], False)
        masks[name] = mask.view_as(score)
    return masks


def parse_pattern(pattern: str) -> tuple[int, int]:
    """(kept, group) of an N:M pattern such as "2:4" (at most N weights kept in every M consecutive inputs)."""
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 0 < int(parts[0]) < int(parts[1]):
        raise TorchslimError(f"pattern must look like N:M with 0 < N < M (e.g. 2:4), got {pattern!r}")
    return int(parts[0]), int(parts[1])


def n_m_masks(scores: dict[str, torch.Tensor], pattern: str) -> dict[str, torch.Tensor]:
    """N:M semi-structured sparsity: in every group of M consecutive weights along a row's inputs, the N with the
    highest scores are kept (2:4 is what sparse tensor cores run).

    Example:
        >>> n_m_masks({"a": torch.tensor([[4.0, 1.0, 3.0, 2.0]])}, "2:4")["a"].tolist()
        [[True, False, True, False]]
    """
    kept, group = parse_pattern(pattern)
    masks = {}
    for name, score in scores.items():
        rows = score.reshape(score.shape[0], -1)
        if rows.shape[1] % group:
            raise TorchslimError(f"{name}: pattern {pattern} needs the input width ({rows.shape[1]}) to be a multiple of {group}")
        groups = rows.reshape(rows.shape[0], -1, group)
        mask = torch.zeros_like(groups, dtype=torch.bool)
        mask.scatter_(2, torch.topk(groups, kept, dim=2).indices, True)
        masks[name] = mask.reshape(score.shape)
    return masks


def threshold_masks(scores: dict[str, torch.Tensor], threshold: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """Keep entries whose score is above the threshold (one for all layers, or per layer)."""
    return {name: score > (threshold[name] if isinstance(threshold, dict) else threshold) for name, score in scores.items()}


def std_threshold_masks(weights: dict[str, torch.Tensor], quality: float) -> dict[str, torch.Tensor]:
    """Han et al. 2015: prune |w| below ``quality`` times the layer's weight standard deviation."""
    if quality < 0:
        raise TorchslimError(f"quality must be >= 0, got {quality}")
    return {name: weight.abs() > quality * weight.float().std() for name, weight in weights.items()}
