"""The check that makes structured pruning never hand back a broken model: a removal is tried on a copy, which must
run (in eval and train mode), keep its output shapes and, where no removed channel feeds a cross-channel
normalization, equal the original with the removed channels' readers zeroed; coupled sets (and heads) whose removal
fails it are left intact and named."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.core.copying import copy_model
from torchslim.core.errors import TorchslimError
from torchslim.core.modes import eval_mode
from torchslim.pruning.graph import ChannelGraph, Group, HeadGroup
from torchslim.pruning.removal import remove_channels, zero_readers
from torchslim.tasks.batches import call_model, output_tensor, run_failure


def _outputs(model: nn.Module, example: Any) -> list[torch.Tensor]:
    with eval_mode(model), torch.no_grad():
        output = call_model(model, example)
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if hasattr(output, "values") else output if isinstance(output, (tuple, list)) else [output_tensor(output)]
    return [v for v in values if isinstance(v, torch.Tensor)]


def _cross_channel(model: nn.Module, groups: list[Group]) -> bool:
    """Whether a removed channel feeds a LayerNorm / RMSNorm, whose statistics then change (not GroupNorm: whole groups go)."""
    modules = [model.get_submodule(p.module) for g in groups for p in g.members]
    return any(isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith("RMSNorm") for m in modules)


def check_removal(
    original: nn.Module, pruned: nn.Module, graph: ChannelGraph, groups: list[Group], heads: list[HeadGroup], example: Any, expected: list[torch.Tensor]
) -> str | None:
    """Why ``pruned`` is not a faithful removal of ``groups`` / ``heads`` from ``original``, or None: it must run, keep
    its output shapes, and (unless LayerNorms are involved) equal the original with the removed channels' readers zeroed."""
    try:
        outputs = _outputs(pruned, example)
    except Exception as error:  # any failure of the pruned model is the finding
        return f"the pruned model fails to run ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    shapes, wanted = [tuple(o.shape) for o in outputs], [tuple(e.shape) for e in expected]
    if shapes != wanted:
        return f"output shapes changed from {wanted} to {shapes}"
    failure = run_failure(pruned, example, train=True)
    if failure is not None and run_failure(original, example, train=True) is None:
        # a branch that runs only in training (an auxiliary head) reads channels the eval-mode trace never saw
        return f"the pruned model fails in train mode ({failure})"
    if _cross_channel(original, groups):
        return None
    reference = copy_model(original)
    zero_readers(reference, graph, groups, heads)
    for output, zeroed in zip(outputs, _outputs(reference, example)):
        if output.is_floating_point():
            tolerance = 1e-4 * float(zeroed.abs().max()) + 1e-5 if zeroed.numel() else 1e-5
            if not torch.allclose(output, zeroed, rtol=1e-3, atol=tolerance):
                return f"outputs differ from the model with those channels zeroed (max difference {float((output - zeroed).abs().max()):.3g})"
    return None


def safe_removal(
    model: nn.Module, graph: ChannelGraph, chosen: list[Group], heads: list[HeadGroup], example: Any, notes: list[str]
) -> tuple[list[Group], list[HeadGroup]]:
    """The groups and heads whose removal is checked faithful; sets that break the model are dropped and named."""
    expected = _outputs(model, example)

    def attempt(groups: list[Group], attempt_heads: list[HeadGroup]) -> str | None:
        trial = copy_model(model)
        try:
            remove_channels(trial, graph, groups, attempt_heads)
        except TorchslimError as error:
            return str(error)
        except Exception as error:  # a layer the removal cannot slice (a parametrization with its own buffers): that set stays
            return f"fails ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        return check_removal(model, trial, graph, groups, attempt_heads, example, expected)

    problem, plain = attempt(chosen, heads), [g for g in chosen if not _cross_channel(model, [g])]
    if problem is None and len(plain) < len(chosen) and (plain or heads):  # a LayerNorm's set unchecks the rest: check them alone
        problem = attempt(plain, heads)
    if problem is None:
        return chosen, heads
    parts: dict[tuple[str, str], list[Any]] = {}  # each coupled set of channels, and each module's heads, tried alone
    for g in chosen:
        parts.setdefault(("channels", ", ".join(g.layers)), []).append(g)
    for head in heads:
        parts.setdefault(("heads", head.module), []).append(head)
    kept_groups: list[Group] = []
    kept_heads: list[HeadGroup] = []
    for (kind, label), members in parts.items():
        reason = attempt(members, []) if kind == "channels" else attempt([], members)
        if reason is None:
            (kept_groups if kind == "channels" else kept_heads).extend(members)
        else:
            twice = "; ".join(f"{layer} runs {graph.calls[layer]} times per forward" for layer in label.split(", ") if graph.calls.get(layer, 0) > 1)
            notes.append(f"left intact: {kind} of {label}: removing them {reason.removeprefix('the pruned model ')}" + (f" ({twice})" if twice else ""))
    problem = attempt(kept_groups, kept_heads)
    if problem is not None:
        raise TorchslimError(f"structured pruning could not find a removal that keeps the model working ({problem}); the model is unchanged")
    return kept_groups, kept_heads


__all__ = ["check_removal", "safe_removal"]
