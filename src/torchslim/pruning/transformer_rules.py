"""Channel rules for the attention and layer modules of Hugging Face transformers, found by their shape (no import of
transformers): GPT-2's Conv1D, BERT-style self-attention (query/key/value), and attention with q/k/v/o projections
and a head size (the current ViT, Llama, Mistral, Qwen). Registered in ``pruning.rules``' predicate rules."""

from __future__ import annotations

from typing import Any

from torch import nn

from torchslim.pruning.graph import ChannelGraph
from torchslim.pruning.rules import PREDICATE_RULES, dense_layer


def _is_gpt_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int) and isinstance(getattr(module, "nx", None), int)


def _gpt_conv1d(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    """GPT-2's Conv1D: a Linear with its weight stored (in, out)."""
    dense_layer(graph, name, module, inputs, output, module.nf, 1)


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
    return (
        all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        and isinstance(getattr(module, "num_attention_heads", getattr(module, "num_heads", None)), int)
        and isinstance(getattr(module, "head_dim", None), int)
    )


def _projection_attention(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    """Attention with q/k/v/o projections and a head size: q/k/v read the input channels, o_proj produces the output
    channels, and each head's q/k/v rows and o_proj columns may go whole. Grouped key/value heads (fewer k/v heads
    than query heads) keep their heads."""
    result = output[0] if isinstance(output, (tuple, list)) else output
    count_name = "num_attention_heads" if isinstance(getattr(module, "num_attention_heads", None), int) else "num_heads"
    heads, width = getattr(module, count_name), module.head_dim
    if not module.q_proj.out_features == module.k_proj.out_features == module.v_proj.out_features == heads * width:
        graph.attention(name, module, inputs, ("q_proj", "k_proj", "v_proj"), 0, width, output_projection="o_proj", output=result)
        graph.unsupported.append(f"{name}: grouped key/value heads are kept whole")
        return
    graph.attention(
        name, module, inputs, ("q_proj", "k_proj", "v_proj"), heads, width, output_projection="o_proj", output=result, attributes={"count": count_name}
    )


PREDICATE_RULES.extend([(_is_gpt_conv1d, _gpt_conv1d), (_is_hf_self_attention, _hf_self_attention), (_is_projection_attention, _projection_attention)])
