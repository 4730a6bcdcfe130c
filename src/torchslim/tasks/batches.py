"""Batches as users have them: a tensor, a tuple ``(inputs, targets)``, or a mapping (``input_ids``,
``attention_mask``, ``labels``), and model outputs as models give them: a tensor, a tuple, or a Hugging Face
``ModelOutput`` / mapping.

Example:
    >>> import torch
    >>> args, kwargs = model_inputs({"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2)})
    >>> args, sorted(kwargs)
    ((), ['input_ids'])
    >>> tuple(output_tensor({"logits": torch.ones(2, 3), "hidden": torch.zeros(1)}).shape)
    (2, 3)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from torchslim.core.checks import unwrapped
from torchslim.core.errors import TorchslimError
from torchslim.core.modes import eval_mode, model_device

# keys of a mapping batch that hold targets, not model inputs
TARGET_KEYS = ("labels", "label", "targets", "target")
# keys of a model output mapping, in the order a task looks for the tensor it scores
OUTPUT_KEYS = ("logits", "last_hidden_state", "pooler_output", "prediction_logits", "sentence_embedding", "embeddings")
PLAIN_OUTPUT_KEYS = ("out", "output", "outputs", "pred", "preds", "prediction", "predictions", "scores", "y_hat")  # a user's own dict


class KeyedBatch(dict):
    """A mapping batch whose targets are under the user's own key (``ts.Data(targets="mask")``): that entry is the
    targets, never a model input, and a task of the user's reads the batch as it was given."""

    def __init__(self, items: Mapping[str, Any], target_key: str) -> None:
        super().__init__(items)
        self.target_key = target_key

    def rebuilt(self, items: Mapping[str, Any]) -> KeyedBatch:
        return KeyedBatch(items, self.target_key)


def target_keys(batch: Mapping[str, Any]) -> tuple[str, ...]:
    """The keys of a mapping batch that hold targets, not model inputs."""
    return (batch.target_key, *TARGET_KEYS) if isinstance(batch, KeyedBatch) else TARGET_KEYS


def move_to(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor in it moved to ``device`` (tuples, lists and mappings kept as they are)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, KeyedBatch):
        return value.rebuilt({key: move_to(item, device) for key, item in value.items()})
    if isinstance(value, Mapping):
        return {key: move_to(item, device) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(move_to(item, device) for item in value)
    if isinstance(value, list):
        return [move_to(item, device) for item in value]
    return value


def as_precision(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating-point tensor in it cast to ``dtype`` (containers kept; a model-output mapping
    keeps its class where it can be rebuilt from its items)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, Mapping):
        items = {key: as_precision(item, dtype) for key, item in value.items()}
        if isinstance(value, KeyedBatch):
            return value.rebuilt(items)
        try:
            return type(value)(**items)
        except TypeError:
            return items
    if isinstance(value, tuple):
        return tuple(as_precision(item, dtype) for item in value)
    if isinstance(value, list):
        return [as_precision(item, dtype) for item in value]
    return value


def model_inputs(batch: Any, model: Any = None) -> tuple[tuple, dict[str, Any]]:
    """(positional, keyword) arguments the model is called with: a tensor is the input; a tuple's first entry is
    the input (the rest are targets), or the inputs where it is itself a tuple of tensors (``((a, b), y)`` calls
    ``model(a, b)``, unless ``model``'s forward takes one positional argument: then ``model([a, b])``, a model of
    several views); a mapping's entries other than targets are keyword arguments."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return keyword_or_positional(model, {key: value for key, value in batch.items() if key not in target_keys(batch)})
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if isinstance(first, Mapping):
            return (), dict(first)
        if _positional_inputs(first, batch[1] if len(batch) > 1 else None) and not takes_one_input(model):
            return tuple(first), {}  # several positional inputs
        return (first,), {}
    raise TorchslimError(f"cannot read a batch of type {type(batch).__name__}: give tensors, (inputs, targets) tuples or mappings")


def keyword_or_positional(model: Any, inputs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """``model(**inputs)``'s arguments, or, where ``model``'s forward takes no such keyword (``forward(idx)`` fed
    ``{"input_ids": ...}`` batches), the one input given positionally."""
    if model is None:
        return (), inputs
    parameters = forward_parameters(model)
    if len(inputs) != 1:
        accepted = {p.name for p in parameters or [] if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY)}
        unknown = [key for key in inputs if key not in accepted]
        if parameters is not None and unknown and not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters):
            raise TorchslimError(
                f"the batch's {', '.join(repr(key) for key in unknown)} {'is not an argument' if len(unknown) == 1 else 'are not arguments'} of "
                f"{type(unwrapped(model)).__name__}.forward({', '.join(p.name for p in parameters)}): a mapping's entries are passed by name, "
                f"and its labels go under one of {', '.join(TARGET_KEYS)} (or name their key: ts.Data(train=..., targets='mask'); "
                "or give (inputs, labels) tuples)"
            )
        return (), inputs
    if parameters is None or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters) or next(iter(inputs)) in {p.name for p in parameters}:
        return (), inputs
    return (next(iter(inputs.values())),), {}


def forward_parameters(model: Any) -> list[inspect.Parameter] | None:
    """The parameters of ``model``'s forward (of the module a compiled or DDP-wrapped model holds); None where unknown."""
    inner = unwrapped(model)
    try:
        return list(inspect.signature(inner.forward if isinstance(inner, nn.Module) else inner).parameters.values())
    except (TypeError, ValueError):
        return None


def takes_one_input(model: Any) -> bool:
    """Whether ``model``'s forward takes exactly one positional argument (no ``*args``): a list of tensors given to it
    is one argument (its views), not several. False where it cannot be told (no model, no signature)."""
    parameters = forward_parameters(model) if model is not None else None
    if parameters is None:
        return False
    kinds = [p.kind for p in parameters]
    positional = [k for k in kinds if k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return len(positional) == 1 and inspect.Parameter.VAR_POSITIONAL not in kinds


def _positional_inputs(first: Any, targets: Any) -> bool:
    """Whether a batch's first entry is several positional inputs: two or more tensors of one batch size, with no
    targets or tensor targets of that size (a tuple of images of several sizes, or with per-image target mappings, as
    detection data gives them, stays one argument)."""
    if not (isinstance(first, (tuple, list)) and len(first) > 1 and all(isinstance(item, torch.Tensor) and item.dim() > 0 for item in first)):
        return False
    sizes = {item.shape[0] for item in first}
    return len(sizes) == 1 and (targets is None or (isinstance(targets, torch.Tensor) and targets.dim() > 0 and targets.shape[0] in sizes))


def batch_targets(batch: Any) -> Any | None:
    """The targets a batch carries, or None for unlabeled data."""
    if isinstance(batch, Mapping):
        return next((batch[key] for key in target_keys(batch) if key in batch), None)
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    return None


def example_of(batch: Any, count: int | None = None) -> Any:
    """The model inputs of ``batch`` (its first ``count`` examples), as ``model(*x)`` / ``model(**x)`` take them: a
    tensor, a tuple of tensors, or a mapping."""
    args, kwargs = model_inputs(batch)
    if count is not None:
        args = tuple(a[:count] if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v[:count] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    if kwargs:
        return kwargs
    return args[0] if len(args) == 1 else args


def first_examples(example: Any, count: int) -> Any:
    """The first ``count`` examples of an example input (a tensor, a tuple of tensors, or a mapping)."""
    if isinstance(example, torch.Tensor):
        return example[:count]
    if isinstance(example, Mapping):
        return {k: v[:count] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in example.items()}
    if isinstance(example, tuple):
        return tuple(v[:count] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for v in example)
    return example


def repeat_example(example: Any, batch_size: int) -> Any:
    """A batch of ``batch_size`` copies of the first example (contiguous), of the same form as ``example``."""

    def repeat(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value[:1].expand(batch_size, *value.shape[1:]).contiguous()
        return value

    if isinstance(example, Mapping):
        return {k: repeat(v) for k, v in example.items()}
    if isinstance(example, tuple):
        return tuple(repeat(v) for v in example)
    return repeat(example)


def call_model(model: Any, example: Any) -> Any:
    """Run ``model`` on an example as ``example_of`` gives it (a tensor, a tuple of positional inputs, a mapping),
    moved to the model's device."""
    if isinstance(model, nn.Module):
        example = move_to(example, model_device(model))
    if isinstance(example, Mapping):
        args, kwargs = keyword_or_positional(model, dict(example))
        return model(*args, **kwargs)
    if isinstance(example, list) and len(example) > 1 and all(isinstance(t, torch.Tensor) for t in example) and not takes_one_input(model):
        example = tuple(example)  # a list of a model's positional inputs, as a user may give an example
    if isinstance(example, tuple):
        return model(list(example)) if len(example) > 1 and takes_one_input(model) else model(*example)
    return model(example)


def run_failure(model: nn.Module, example: Any, train: bool = False, ran: set[int] | None = None) -> str | None:
    """Why ``model`` fails to run on ``example`` in eval (or train) mode under no_grad, naming the innermost module that
    failed (None: it runs). Its modes, buffers (BatchNorm statistics a train-mode pass moves) and the random state (its
    dropout draws) are put back. ``ran`` collects the ids of the modules that ran."""
    saved = {name: buffer.clone() for name, buffer in model.named_buffers()} if train else {}
    modes = {name: module.training for name, module in model.named_modules()}
    entered: list[str] = []
    handles = [module.register_forward_pre_hook(lambda _m, _i, name=name: entered.append(name)) for name, module in model.named_modules() if name]
    handles += [module.register_forward_hook(lambda _m, _i, _o: entered.pop() and None) for name, module in model.named_modules() if name]
    if ran is not None:
        handles += [module.register_forward_hook(lambda m, _i, _o: ran.add(id(m))) for module in model.modules()]
    try:
        with torch.no_grad(), torch.random.fork_rng():
            model.train(train)
            call_model(model, example)
        return None
    except Exception as error:  # any failure of the user's model is the finding
        where = f" in {entered[-1]}" if entered else ""
        return f"{type(error).__name__}{where}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    finally:
        for handle in handles:
            handle.remove()
        for name, module in model.named_modules():
            module.training = modes[name]
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in saved:
                    buffer.copy_(saved[name])


def batch_size_of(batch: Any) -> int:
    """Examples in a batch (the leading size of its first tensor)."""
    args, kwargs = model_inputs(batch)
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def output_tensor(output: Any, where: str = "model output", strict: bool = True) -> torch.Tensor:
    """The tensor a task scores from a model's output: the tensor itself; ``logits`` (or ``last_hidden_state``, ...)
    of a Hugging Face ``ModelOutput`` or mapping, or its first tensor; a plain dict's only tensor, or the one under
    ``out`` / ``output`` / ``pred`` / ...; the first entry of a tuple. A plain dict of several tensors under none of
    those keys is refused by its keys where ``strict`` (scoring the wrong one would train and report the wrong thing),
    its first tensor otherwise (an exporter's output)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) or hasattr(output, "keys"):
        model_output = hasattr(output, "to_tuple")  # a Hugging Face ModelOutput: its first tensor is its main one
        for key in OUTPUT_KEYS + ((PLAIN_OUTPUT_KEYS) if not model_output else ()):
            value = output.get(key) if hasattr(output, "get") else None
            if isinstance(value, torch.Tensor):
                return value
        tensors = [(key, value) for key, value in output.items() if isinstance(value, torch.Tensor)]
        if len(tensors) > 1 and not model_output and strict:
            raise TorchslimError(
                f"{where}: a dict of {len(tensors)} tensors ({', '.join(repr(key) for key, _ in tensors)}) and none under a key that names "
                f"the prediction ({', '.join(('logits',) + PLAIN_OUTPUT_KEYS)}): return the scored tensor under 'logits', or wrap the model "
                "so that it returns that tensor (task=Task.custom(...) reads the dict as it is)"
            )
        if tensors:
            return tensors[0][1]
    if isinstance(output, (tuple, list)) and output:
        return output_tensor(output[0], where, strict)
    raise TorchslimError(f"{where}: expected a tensor, a tuple or a ModelOutput with tensors, got {type(output).__name__}")


def forward_batches(model: Any, batches: Iterable, limit: int | None = None) -> int:
    """Run ``model`` over up to ``limit`` of ``batches`` (eval mode with every submodule's mode restored, no gradients,
    on the model's device) for the hooks that observe it; returns how many batches ran."""
    device = model_device(model)
    count = 0
    with eval_mode(model), torch.no_grad():
        for batch in batches:
            if limit is not None and count >= limit:
                break
            args, kwargs = model_inputs(move_to(batch, device), model)
            model(*args, **kwargs)
            count += 1
    return count


__all__ = [
    "OUTPUT_KEYS",
    "TARGET_KEYS",
    "KeyedBatch",
    "batch_size_of",
    "batch_targets",
    "call_model",
    "example_of",
    "first_examples",
    "forward_batches",
    "model_inputs",
    "move_to",
    "output_tensor",
    "repeat_example",
    "run_failure",
]
