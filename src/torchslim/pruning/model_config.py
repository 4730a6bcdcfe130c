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
from torchslim.pruning.transformer_rules import _head_counts, _is_hf_self_attention, _is_projection_attention

# the per-module sizes a forward reads as numbers (head counts and sizes; not widths such as GPT-2's embed_dim, which
# its forward does not read and removal leaves as they were): equal tensor shapes do not make them equal
# (4 heads of 4 and 2 heads of 8 hold the same weights), so a rebuilt model must agree on these too
MODULE_SIZES = (
    "num_attention_heads",
    "num_heads",
    "n_heads",
    "num_key_value_heads",
    "num_kv_heads",
    "attention_head_size",
    "all_head_size",
    "head_dim",
    "key_value_proj_dim",
    "inner_dim",
    "split_size",
)


def _one(values: set[int], label: str, reasons: list[str]) -> int | None:
    if len(values) > 1:
        reasons.append(f"{label} differs between layers ({', '.join(str(v) for v in sorted(values))})")
        return None
    return next(iter(values)) if values else None


def _widths(model: nn.Module, reasons: list[str]) -> dict[str, int]:
    """The config fields the pruned modules imply, where every layer agrees."""
    found: dict[str, int] = {}
    try:
        embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    except (NotImplementedError, AttributeError):  # a model of no token embeddings (a ConvNext, an audio encoder)
        embeddings = None
    config = getattr(model, "config", None)
    if isinstance(embeddings, nn.Embedding):
        # ALBERT-style factorized embeddings have a width of their own, mapped up to hidden_size
        own = isinstance(getattr(config, "embedding_size", None), int) and config.embedding_size != getattr(config, "hidden_size", None)
        found["embedding_size" if own else "hidden_size"] = embeddings.embedding_dim
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
        ffn, ffn_output = getattr(module, "ffn", None), getattr(module, "ffn_output", None)  # ALBERT's MLP
        if isinstance(ffn, nn.Linear) and isinstance(ffn_output, nn.Linear) and ffn.out_features == ffn_output.in_features:
            mlp.add(ffn.out_features)
        wo = getattr(module, "wo", None)  # T5's MLP: wi (or gated wi_0 / wi_1) and wo
        if isinstance(wo, nn.Linear) and any(isinstance(getattr(module, n, None), nn.Linear) for n in ("wi", "wi_0")):
            mlp.add(wo.in_features)
        if _is_hf_self_attention(module):  # BERT-style query / key / value
            heads.add((module.num_attention_heads, module.num_attention_heads))
            head_dims.add(module.attention_head_size)
        elif _is_projection_attention(module):
            counts = _head_counts(module)
            if counts is not None:
                heads.add(counts)
                head_dims.add(module.head_dim)
        elif is_conv1d(getattr(module, "c_attn", None)) and isinstance(getattr(module, "num_heads", None), int):
            heads.add((module.num_heads, module.num_heads))  # GPT-2: queries, keys and values side by side in c_attn
            head_dims.add(module.head_dim)
    width = _one(mlp, "the MLP width", reasons)
    if width is not None:
        found["intermediate_size"] = found["n_inner"] = found["d_ff"] = width
    pair = heads.pop() if len(heads) == 1 else None
    if len(heads) > 0:
        reasons.append("the number of attention heads differs between layers")
    head_dim = _one(head_dims, "the head size", reasons)
    if pair is not None and head_dim is not None:
        found["num_attention_heads"], found["num_key_value_heads"], found["head_dim"] = pair[0], pair[1], head_dim
    return found


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, and every module's size (``MODULE_SIZES``) as ``(value,)`` under ``module.attribute``."""
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {**{name: tuple(t.shape) for name, t in tensors}, **{key: (value,) for key, value in _sizes(model).items()}}


def _sizes(model: nn.Module) -> dict[str, int]:
    return {
        f"{name}.{key}": value
        for name, module in model.named_modules()
        for key in MODULE_SIZES
        if isinstance(value := getattr(module, key, None), int) and not isinstance(value, bool)
    }


def _rebuilt_shapes(model: nn.Module, config: Any) -> dict[str, tuple[int, ...]] | None:
    """The shapes of the tensors a model built from ``config`` has, and its modules' sizes (``MODULE_SIZES``, as
    ``(value,)`` under ``module.attribute``) where the pruned model has that size as well."""
    try:
        with torch.device("meta"):
            rebuilt = type(model)(config)
    except Exception:  # a config the class cannot build from is a config that does not describe the model
        return None
    sizes = _sizes(model)
    return {**_shapes(rebuilt), **{key: (value,) for key, value in _sizes(rebuilt).items() if key in sizes}}


LEFT = "it is left as it was: save with torchslim.save, not save_pretrained"


def _mismatch(shapes: dict[str, tuple[int, ...]], rebuilt: dict[str, tuple[int, ...]] | None) -> str:
    """The first tensor whose pruned shape the config does not give, as " (name: pruned shape, config's shape)", and
    where it is a layer's weight, the override that keeps that layer whole (a BERT pooler's width, which no config
    field holds)."""
    name = next((n for n in shapes if rebuilt is None or rebuilt.get(n) != shapes[n]), None)
    if name is None:
        return ""
    hint = ""
    config_shape = rebuilt.get(name) if rebuilt is not None else None
    # a layer whose own outputs were removed (not only the inputs an earlier layer lost)
    if name.endswith(".weight") and config_shape is not None and len(shapes[name]) >= 2 and shapes[name][0] != config_shape[0]:
        hint = f"; to keep a config that describes it, leave that layer whole (overrides: {{{name.removesuffix('.weight')!r}: 0.0}})"
    return f" ({name}: {shapes[name]} pruned, {rebuilt.get(name) if rebuilt else None} from the config{hint})"


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
        shapes, rebuilt = _shapes(model), _rebuilt_shapes(model, config)  # widths no field above covers (GPT-2's head count)
        if rebuilt is None or rebuilt == shapes:
            return []  # the config builds the model as it is (Swin's widths differ by stage, by its own ratios)
        if reasons:
            return [f"the config cannot describe the pruned model: {'; '.join(reasons)}; save it with torchslim.save"]
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
