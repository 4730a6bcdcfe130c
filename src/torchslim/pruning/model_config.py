"""Keeping a Hugging Face model's config true to its shapes after structured pruning, so that ``save_pretrained`` and
``from_pretrained`` round-trip.

A config describes one width for every layer: the residual width (``hidden_size``), the MLP width
(``intermediate_size``, GPT-2's ``n_inner``), the query and key/value head counts and the head size. After removal
each is set from the pruned modules where every layer agrees; the head size is then written out explicitly (many
configs otherwise derive it from ``hidden_size / num_attention_heads``). The new config is checked by building the
model from it on the meta device (no memory) and comparing every tensor's shape; a config that cannot describe the
pruned model (widths that differ from layer to layer, a head size the class derives) is put back as it was and the
note says so; the model still saves and loads with ``torchslim.save`` / ``torchslim.load``, which record the shapes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from torchslim.core.selector import is_conv1d
from torchslim.pruning.transformer_rules import _head_counts, _is_projection_attention


def _one(values: set[int], label: str, reasons: list[str]) -> int | None:
    if len(values) > 1:
        reasons.append(f"{label} differs between layers ({', '.join(str(v) for v in sorted(values))})")
        return None
    return next(iter(values)) if values else None


def _widths(model: nn.Module, reasons: list[str]) -> dict[str, int]:
    """The config fields the pruned modules imply, where every layer agrees."""
    found: dict[str, int] = {}
    embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    if isinstance(embeddings, nn.Embedding):
        found["hidden_size"] = embeddings.embedding_dim
    mlp: set[int] = set()
    heads: set[tuple[int, int]] = set()
    head_dims: set[int] = set()
    for name, module in model.named_modules():
        up = getattr(module, "up_proj", None)
        if isinstance(up, nn.Linear) and isinstance(getattr(module, "down_proj", None), nn.Linear):
            mlp.add(up.out_features)
        first, second = getattr(module, "fc1", None), getattr(module, "fc2", None)  # ViT, CLIP, OPT
        if isinstance(first, nn.Linear) and isinstance(second, nn.Linear) and first.out_features == second.in_features:
            mlp.add(first.out_features)
        fc = getattr(module, "c_fc", None)  # GPT-2's MLP
        if is_conv1d(fc) and isinstance(getattr(fc, "nf", None), int):
            mlp.add(fc.nf)
        if name.endswith("intermediate") and isinstance(getattr(module, "dense", None), nn.Linear):  # BERT / ViT
            mlp.add(module.dense.out_features)
        if _is_projection_attention(module):
            counts = _head_counts(module)
            if counts is not None:
                heads.add(counts)
                head_dims.add(module.head_dim)
        elif is_conv1d(getattr(module, "c_attn", None)) and isinstance(getattr(module, "num_heads", None), int):
            heads.add((module.num_heads, module.num_heads))  # GPT-2: queries, keys and values side by side in c_attn
            head_dims.add(module.head_dim)
    width = _one(mlp, "the MLP width", reasons)
    if width is not None:
        found["intermediate_size"] = found["n_inner"] = width
    pair = heads.pop() if len(heads) == 1 else None
    if len(heads) > 0:
        reasons.append("the number of attention heads differs between layers")
    head_dim = _one(head_dims, "the head size", reasons)
    if pair is not None and head_dim is not None:
        found["num_attention_heads"], found["num_key_value_heads"], found["head_dim"] = pair[0], pair[1], head_dim
    return found


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))}


def _rebuilt_shapes(model: nn.Module, config: Any) -> dict[str, tuple[int, ...]] | None:
    try:
        with torch.device("meta"):
            rebuilt = type(model)(config)
    except Exception:  # a config the class cannot build from is a config that does not describe the model
        return None
    return _shapes(rebuilt)


LEFT = "it is left as it was: save with torchslim.save, not save_pretrained"


def _mismatch(shapes: dict[str, tuple[int, ...]], rebuilt: dict[str, tuple[int, ...]] | None) -> str:
    """The first tensor whose pruned shape the config does not give, as " (name: pruned shape, config's shape)"."""
    name = next((n for n in shapes if rebuilt is None or rebuilt.get(n) != shapes[n]), None)
    return f" ({name}: {shapes[name]} pruned, {rebuilt.get(name) if rebuilt else None} from the config)" if name else ""


def update_model_config(model: nn.Module) -> list[str]:
    """Set a Hugging Face model's config to its pruned widths (in place); returns notes for the report. Models without
    a Hugging Face config are left alone."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)) or not type(model).__module__.startswith("transformers."):
        return []
    reasons: list[str] = []
    wanted = {key: value for key, value in _widths(model, reasons).items() if hasattr(config, key)}
    changed: dict[str, Any] = {key: value for key, value in wanted.items() if getattr(config, key) != value}
    if not changed:
        if reasons:
            return [f"the config cannot describe the pruned model: {'; '.join(reasons)}; save it with torchslim.save"]
        shapes, rebuilt = _shapes(model), _rebuilt_shapes(model, config)  # widths no field above covers (GPT-2's head count)
        if rebuilt is None or rebuilt == shapes:
            return []
        return [f"the config cannot describe the pruned model ({type(config).__name__} does not describe these widths{_mismatch(shapes, rebuilt)}); {LEFT}"]
    if "num_attention_heads" in changed or "hidden_size" in changed:
        changed["head_dim"] = wanted.get("head_dim", getattr(config, "head_dim", None))
    trial = copy.deepcopy(config)
    for key, value in changed.items():
        if value is not None:
            setattr(trial, key, value)
    shapes = _shapes(model)
    rebuilt = _rebuilt_shapes(model, trial)
    if rebuilt != shapes:
        detail = _mismatch(shapes, rebuilt)
        why = "; ".join(reasons) or f"{type(config).__name__} does not describe these widths{detail}"
        return [f"the config cannot describe the pruned model ({why}); {LEFT}"]
    for key, value in changed.items():
        if value is not None:
            setattr(config, key, value)
    return [f"config updated for save_pretrained: {', '.join(f'{k}={v}' for k, v in sorted(changed.items()) if v is not None)}"]


__all__ = ["update_model_config"]
