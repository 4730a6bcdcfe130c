"""Block-by-block (layer-wise) calibration of transformers: the model's repeated blocks (decoder layers) are found,
the inputs of the first block and the other arguments of every block (attention mask, position embeddings: a layer
of sliding-window attention gets its own mask) are captured for every calibration batch in one forward pass, and
then each block in turn is handed to a method (GPTQ, AWQ, SparseGPT, Wanda, ...) with its inputs, changed, and run
to give the next block's hidden states. Only one block's weights are worked on and one set of hidden states is held
at a time (the blocks' other arguments are mostly the same tensors), so calibration of a model that barely fits in
memory still fits.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed = nn.Embedding(10, 8)
    ...         self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))
    ...     def forward(self, ids):
    ...         x = self.embed(ids)
    ...         for layer in self.layers:
    ...             x = layer(x)
    ...         return x
    >>> seen = []
    >>> _ = sequential(Net(), [torch.randint(0, 10, (2, 5))], lambda name, block, inputs: seen.append(name))
    >>> seen
    ['layers.0', 'layers.1', 'layers.2']
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.core.modes import eval_mode, model_device
from torchslim.core.selector import is_conv1d
from torchslim.tasks.batches import model_inputs, move_to

# what one calibration batch gives a block: its positional and keyword arguments
BlockInput = tuple[tuple[Any, ...], dict[str, Any]]
BlockMethod = Callable[[str, nn.Module, list[BlockInput]], Any]
Blocks = nn.ModuleList | nn.Sequential  # a model's repeated blocks, in the order it runs them


class _Captured(Exception):
    """Raised by the hook on the last block once it has its arguments: nothing after it needs to run."""


class NoBlocks(TorchslimError):
    """The model has no repeated blocks."""


def _candidates(model: nn.Module) -> list[tuple[str, Blocks]]:
    """Containers that may hold the repeated blocks, longest first (model order among equals): an ``nn.ModuleList``
    or ``nn.Sequential`` of modules of one class holding Linear layers (a Sequential of bare layers is a layer stack,
    not blocks)."""
    found: list[tuple[str, Blocks]] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        children = list(module)
        if len({type(child) for child in children}) != 1:
            continue
        if isinstance(module, nn.Sequential) and (len(children) < 2 or isinstance(children[0], nn.Linear) or is_conv1d(children[0])):
            continue
        if not any(isinstance(m, nn.Linear) or is_conv1d(m) for m in children[0].modules()):
            continue
        found.append((name, module))
    return sorted(found, key=lambda item: -len(item[1]))


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _chained(model: nn.Module, candidates: list[tuple[str, Blocks]], batch: Any) -> set[str]:
    """The candidates whose members run one after another on one forward pass of ``batch``: each at most once, in
    order, each given the hidden states the one before returned (a decoder's layers), not all given the same input (a
    layer's parallel heads, a mixture's experts)."""
    calls: dict[str, list[tuple[int, torch.Tensor | None, torch.Tensor | None]]] = {name: [] for name, _ in candidates}

    def record(name: str, index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        given = _first_tensor(args) if args else kwargs.get("hidden_states")
        calls[name].append((index, given, _first_tensor(output)))

    handles = [
        member.register_forward_hook(functools.partial(record, name, index), with_kwargs=True)
        for name, container in candidates
        for index, member in enumerate(container)
    ]
    extra = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    try:
        with eval_mode(model), torch.no_grad():
            args, kwargs = model_inputs(move_to(batch, model_device(model)), model)
            model(*args, **kwargs, **extra)
    finally:
        for handle in handles:
            handle.remove()
    chained = set()
    for name, _ in candidates:
        seen = calls[name]
        indices = [index for index, _, _ in seen]
        if not indices or indices != sorted(set(indices)):  # each at most once, in order (a block the forward skips is allowed)
            continue
        links = zip(seen, seen[1:])
        if all(
            out is not None and given is not None and (given is out or (given.shape == out.shape and torch.equal(given, out)))
            for (_, _, out), (_, given, _) in links
        ):
            chained.add(name)
    return chained


def find_blocks(model: nn.Module, batch: Any = None) -> tuple[str, Blocks]:
    """The model's repeated blocks: the longest ``ModuleList`` (or ``Sequential``) of modules of one class that hold
    Linear layers (a decoder's layers, a ViT's blocks); with a calibration ``batch``, the longest whose members run
    in a chain on it, each on the hidden states the one before returned (so not a layer's parallel heads or a
    mixture's experts, which all read one input)."""
    candidates = _candidates(model)
    if batch is not None and candidates:
        chained = _chained(model, candidates, batch)
        candidates = [(name, module) for name, module in candidates if name in chained]
    if not candidates:
        raise NoBlocks(
            "block-by-block calibration needs the model's repeated blocks (an nn.ModuleList or nn.Sequential of layers holding "
            "Linear layers, run one after another, such as a decoder's layers); this model has none"
        )
    return candidates[0]


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def capture_inputs(model: nn.Module, block: nn.Module, batches: Iterable[Any]) -> list[BlockInput]:
    """The arguments ``block`` is called with, for each batch, stopping the forward pass there (nothing after it
    runs). A Hugging Face model is called without its key/value cache."""
    return capture_arguments(model, [block], batches)[0]


def capture_arguments(model: nn.Module, blocks: Sequence[nn.Module], batches: Iterable[Any]) -> list[list[BlockInput]]:
    """The arguments each of ``blocks`` (in the order the model runs them) is called with, for each batch, in one
    forward pass stopped at the last block. The first block's are whole; a later block's hidden states are left out
    (``None`` in their place: ``run_block`` puts the previous block's output there), so only its own other arguments
    are held. A block the forward pass skips gets the arguments of the block before it. A Hugging Face model is
    called without its key/value cache."""
    captured: list[list[BlockInput]] = [[] for _ in blocks]
    batch = [0]

    def grab(index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if len(captured[index]) == batch[0]:  # not yet called in this pass (a block run twice keeps its first arguments)
            kept = {k: _detach(v) for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
            if index == 0:
                captured[0].append((_detach(args), kept))
            elif args:
                captured[index].append(((None, *_detach(args[1:])), kept))
            else:
                captured[index].append(((), {k: v for k, v in kept.items() if k != "hidden_states"}))
        if index == len(blocks) - 1:
            raise _Captured

    handles = [block.register_forward_pre_hook(functools.partial(grab, index), with_kwargs=True) for index, block in enumerate(blocks)]
    device = model_device(model)
    extra = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    try:
        with eval_mode(model), torch.no_grad():
            for data in batches:
                args, kwargs = model_inputs(move_to(data, device), model)
                with contextlib.suppress(_Captured):  # the last block's hook stops the pass
                    model(*args, **kwargs, **extra)
                if len(captured[0]) == batch[0]:
                    raise TorchslimError("block-by-block calibration: the model's forward pass never reached its first block")
                batch[0] += 1
                for index in range(1, len(blocks)):
                    if len(captured[index]) < batch[0]:
                        before, named = captured[index - 1][-1]
                        captured[index].append(((None, *before[1:]) if before else (), {k: v for k, v in named.items() if k != "hidden_states"}))
    finally:
        for handle in handles:
            handle.remove()
    if not captured[0]:
        raise TorchslimError("block-by-block calibration got no calibration batches")
    return captured


def block_output(output: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first entry of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TorchslimError(f"a block returned {type(output).__name__}; expected hidden states (a tensor or a tuple starting with one)")


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[BlockInput], following: list[BlockInput] | None = None) -> list[BlockInput]:
    """The next block's inputs: each input's hidden states replaced by what ``block`` makes of them, with the next
    block's own other arguments (``following``, one per input, as ``capture_arguments`` gives them) or, without
    them, this block's."""
    outputs = []
    with eval_mode(block):
        for index, (args, kwargs) in enumerate(inputs):
            hidden = block_output(block(*args, **kwargs))
            args, kwargs = following[index] if following is not None else (args, kwargs)
            outputs.append(((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden}))
    return outputs


def forward_inputs(block: nn.Module, inputs: list[BlockInput], layers: dict[str, nn.Module], observe: Callable[[str, torch.Tensor], None]) -> None:
    """Run ``block`` over its inputs, calling ``observe(name, x)`` with the input of each of ``layers`` (flattened to
    (tokens, features)) as it is computed."""
    handles = [
        layer.register_forward_hook(lambda module, args, output, name=name: observe(name, args[0].detach().reshape(-1, args[0].shape[-1])))
        for name, layer in layers.items()
    ]
    try:
        run_block(block, inputs)
    finally:
        for handle in handles:
            handle.remove()


@dataclasses.dataclass
class SequentialRun:
    """What a block-by-block pass measured."""

    blocks: int
    calibration_batches: int
    tokens: int
    seconds: float
    peak_rss_mib: float
    results: dict[str, Any]
    prefix: str = ""  # where the blocks are ("" where none were found: the whole model was one block)


def sequential(model: nn.Module, batches: Iterable[Any], method: BlockMethod, progress: Callable[[str], None] | None = None) -> SequentialRun:
    """Hand each of the model's blocks in turn to ``method(name, block, inputs)`` (which may change the block in
    place), then run the changed block to give the next one its inputs. Returns what each call returned, by block.
    A model without repeated blocks is one block: the whole model, calibrated in one pass."""
    started = time.perf_counter()
    batches = list(batches)
    try:
        prefix, blocks = find_blocks(model, batches[0] if batches else None)
        arguments = capture_arguments(model, list(blocks), batches)
    except NoBlocks:
        prefix, blocks = "", nn.ModuleList([model])
        device = model_device(model)
        arguments = [[model_inputs(move_to(batch, device), model) for batch in batches]]
    inputs, arguments[0] = arguments[0], []
    tokens = sum(int(args[0].shape[0] * args[0].shape[1]) if args and args[0].dim() >= 2 else 0 for args, _ in inputs)
    results = {}
    for index, block in enumerate(blocks):
        name = f"{prefix}.{index}" if prefix else (str(index) if block is not model else "")
        results[name] = method(name, block, inputs)
        if index + 1 < len(blocks):
            inputs = run_block(block, inputs, arguments[index + 1])
            arguments[index + 1] = []  # held as inputs now
        if progress is not None:
            progress(f"{name} done ({index + 1}/{len(blocks)}, {time.perf_counter() - started:.0f} s)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return SequentialRun(len(blocks), len(inputs), tokens, time.perf_counter() - started, peak, results, prefix)


def block_layers(block: nn.Module, selected: set[nn.Module] | None = None) -> dict[str, nn.Module]:
    """The Linear layers (and GPT-2 Conv1D) inside a block, by name within it, in execution-independent model order;
    only those in ``selected`` when given."""
    return {
        name: module
        for name, module in block.named_modules()
        if (isinstance(module, nn.Linear) or is_conv1d(module)) and (selected is None or module in selected)
    }


__all__ = [
    "BlockInput",
    "SequentialRun",
    "block_layers",
    "block_output",
    "capture_arguments",
    "capture_inputs",
    "find_blocks",
    "forward_inputs",
    "run_block",
    "sequential",
]
