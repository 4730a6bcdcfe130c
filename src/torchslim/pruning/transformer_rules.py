"""Channel rules for the attention and layer modules of Hugging Face transformers, found by their shape (no import of
transformers): GPT-2's Conv1D, BERT-style self-attention (query/key/value), attention with q/k/v/o projections and a
head size (the current ViT, Llama, Mistral, Qwen; grouped key/value heads go with the query heads that share them),
and RMSNorm (a per-channel scale after a normalization over the channels). Registered in ``pruning.rules``' predicate
rules."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.core.selector import is_conv1d
from torchslim.pruning.graph import ChannelGraph
from torchslim.pruning.rules import PREDICATE_RULES, dense_layer


def _is_gpt_conv1d(module: nn.Module) -> bool:
    return is_conv1d(module) and isinstance(getattr(module, "nf", None), int) and isinstance(getattr(module, "nx", None), int)


def _gpt_conv1d(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    """GPT-2's Conv1D: a Linear with its weight stored (in, out)."""
    dense_layer(graph, name, module, inputs, output, module.nf, 1)


def _is_gpt2_attention(module: nn.Module) -> bool:
    """GPT-2's self-attention: one Conv1D (c_attn) writing queries, keys and values side by side, each ``split_size``
    wide, and a Conv1D (c_proj) reading the heads back (cross-attention, with its own q_attn, is left to the trace)."""
    c_attn, c_proj, split = getattr(module, "c_attn", None), getattr(module, "c_proj", None), getattr(module, "split_size", None)
    return (
        c_attn is not None
        and c_proj is not None
        and _is_gpt_conv1d(c_attn)
        and _is_gpt_conv1d(c_proj)
        and isinstance(split, int)
        and isinstance(getattr(module, "head_dim", None), int)
        and not getattr(module, "is_cross_attention", False)
        and c_attn.nf == 3 * split
        and c_proj.nx == split
    )


def _gpt2_attention(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    """GPT-2's attention: c_attn reads the input channels (its weight's rows), c_proj produces the output channels (its
    weight's columns). A head is its columns in each of the query, key and value thirds of c_attn (weight and bias)
    and its rows of c_proj, which read its output; ``split_size`` and ``num_heads`` follow the removal (the forward
    splits c_attn's output by ``split_size`` and shapes heads of ``head_dim``)."""
    result = output[0] if isinstance(output, (tuple, list)) else output
    info = graph.get_info(inputs[0]) if inputs else None
    if info is not None and info.axis != inputs[0].dim() - 1:
        graph.unsupported_op(name, "GPT-2 attention over a tensor whose channels are not on the last axis", inputs[:1])
        info = None
    graph.consume(f"{name}.c_attn", info, 0)
    graph.produce(f"{name}.c_proj", module.c_proj, result, module.c_proj.nf, -1, weight_dim=1)
    width, split = module.head_dim, module.split_size
    if width <= 0 or split % width:
        graph.unsupported.append(f"{name}: split_size {split} is not whole heads of {width}; heads kept whole")
        return
    attributes = {"size": "split_size", "head": "head_dim", "count": "num_heads"} if isinstance(getattr(module, "num_heads", None), int) else {}
    for head in range(split // width):
        rows = list(range(head * width, (head + 1) * width))
        columns = [part * split + row for part in range(3) for row in rows]
        slices = [graph.slice(f"{name}.c_attn", "weight", 1, columns), graph.slice(f"{name}.c_attn", "bias", 0, columns)]
        slices.append(graph.slice(f"{name}.c_proj", "weight", 0, rows))
        graph.add_head(name, head, slices, attributes=attributes, readers=[f"{name}.c_proj"])


def _is_hf_self_attention(module: nn.Module) -> bool:
    return (
        all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key", "value"))
        and isinstance(getattr(module, "num_attention_heads", None), int)
        and isinstance(getattr(module, "attention_head_size", None), int)
    )


def _hf_self_attention(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    """BERT-style self-attention (query/key/value, num_attention_heads): heads are pruned whole; the projection that
    reads the heads' output is found through the traced slots."""
    result = output[0] if isinstance(output, (tuple, list)) else output
    width, heads = module.attention_head_size, module.num_attention_heads
    slots = graph.new_slots(width * heads)
    graph.block(slots, f"{name}: attention head dimensions (whole heads go with head_ratio)")
    graph.set_info(result, slots, -1)
    graph.attention(
        name,
        module,
        inputs,
        ("query", "key", "value"),
        heads,
        width,
        head_slots=slots,
        attributes={"count": "num_attention_heads", "size": "all_head_size", "head": "attention_head_size"},
    )


def _is_projection_attention(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and isinstance(
        getattr(module, "head_dim", None), int
    )


def _head_counts(module: Any) -> tuple[int, int] | None:
    """(query heads, key/value heads) of a q/k/v/o attention module, from its projections' widths (which every
    version of the module agrees with), or None when they are not whole heads."""
    width = module.head_dim
    queries, keys = module.q_proj.out_features, module.k_proj.out_features
    if width <= 0 or queries % width or keys % width or module.v_proj.out_features != keys or module.o_proj.in_features != queries:
        return None
    heads, kv_heads = queries // width, keys // width
    return (heads, kv_heads) if kv_heads and heads % kv_heads == 0 else None


def _projection_attention(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    """Attention with q/k/v/o projections and a head size: q/k/v read the input channels, o_proj produces the output
    channels. A unit that may go whole is one key/value head with the query heads that share it (grouped-query
    attention; one query head per unit when every head has its own keys): their q/k/v rows and o_proj columns. The
    module's own head-count attributes (where its version keeps any) follow; the model's config is updated by
    ``pruning.model_config`` after removal."""
    result = output[0] if isinstance(output, (tuple, list)) else output
    counts = _head_counts(module)
    width = module.head_dim
    if counts is None:
        graph.attention(name, module, inputs, ("q_proj", "k_proj", "v_proj"), 0, width, output_projection="o_proj", output=result)
        graph.unsupported.append(f"{name}: projection widths are not whole heads of {width}; heads kept whole")
        return
    heads, kv_heads = counts
    share = heads // kv_heads
    attributes = {"per_unit": str(share)}
    for key, candidates in (("count", ("num_heads", "num_attention_heads")), ("kv_count", ("num_key_value_heads", "num_kv_heads"))):
        found = next((c for c in candidates if isinstance(getattr(module, c, None), int)), None)
        if found is not None:
            attributes[key] = found
    graph.attention(name, module, inputs, ("q_proj", "k_proj", "v_proj"), 0, width, output_projection="o_proj", output=result)
    for unit in range(kv_heads):
        query_rows = list(range(unit * share * width, (unit + 1) * share * width))
        kv_rows = list(range(unit * width, (unit + 1) * width))
        slices = [graph.slice(f"{name}.q_proj", "weight", 0, query_rows), graph.slice(f"{name}.o_proj", "weight", 1, query_rows)]
        slices += [graph.slice(f"{name}.{p}", "weight", 0, kv_rows) for p in ("k_proj", "v_proj")]
        slices += [graph.slice(f"{name}.q_proj", "bias", 0, query_rows)] if module.q_proj.bias is not None else []
        slices += [graph.slice(f"{name}.{p}", "bias", 0, kv_rows) for p in ("k_proj", "v_proj") if getattr(module, p).bias is not None]
        graph.add_head(name, unit, slices, attributes=attributes)


def _is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and not any(True for _ in module.children())
        and (hasattr(module, "variance_epsilon") or hasattr(module, "eps"))
    )


def _rms_norm(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    """RMSNorm over the last axis (Llama, Mistral, Qwen, T5): its scale is a per-channel member of the group; the
    normalization mixes channels, so removal is checked by running the model rather than output equality."""
    info = graph.get_info(inputs[0]) if inputs else None
    if info is None or not isinstance(output, torch.Tensor):
        return
    if info.axis != inputs[0].dim() - 1 or module.weight.numel() != inputs[0].shape[-1] or output.shape != inputs[0].shape:
        graph.unsupported_op(name, f"{type(module).__name__} over an axis other than the channels", inputs[:1])
        return
    for index, slot in enumerate(info.slots):
        graph.param(slot, "member", name, "weight", 0, index)
    graph.set_info(output, info.slots, info.axis)


PREDICATE_RULES.extend(
    [
        (_is_gpt_conv1d, _gpt_conv1d),
        (_is_gpt2_attention, _gpt2_attention),
        (_is_hf_self_attention, _hf_self_attention),
        (_is_projection_attention, _projection_attention),
        (_is_rms_norm, _rms_norm),
    ]
)


def heads_kept_note(model: nn.Module, graph: ChannelGraph) -> list[str]:
    """Where heads were asked for: a note naming the attention modules whose heads no rule could take apart (torch's
    nn.MultiheadAttention computes them inside one fused function), as nothing else would say so."""
    headed = {head.module for head in graph.heads}
    kept = [name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention) and name not in headed]
    if not kept:
        return []
    listed = ", ".join(kept[:6]) + (f" and {len(kept) - 6} more" if len(kept) > 6 else "")
    return [f"heads kept whole in {listed}: nn.MultiheadAttention computes its heads inside one fused function, which head removal cannot take apart"]
