"""Depth reduction: the least important residual blocks removed.

Candidates are the blocks of a model's repeated stacks: children of an ``nn.Sequential`` or ``nn.ModuleList`` whose
output has the shape of their input (so the block can be bypassed; a downsampling block cannot), or the modules a
``layers`` selector names. A block's importance is how much the task's loss on calibration batches rises when it is
bypassed (replaced by the identity); the least important go, one at a time with the rest re-scored after each
removal (``iterative``), then the model is fine-tuned. The model's spec records the removed blocks, so saved files
load back. Layers of a Hugging Face decoder stack are deleted from it, and the model's config shortened to match
(``num_hidden_layers``, per-layer lists, each layer's cache index), so ``save_pretrained`` round-trips.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Residual(nn.Module):
    ...     def __init__(self, width, scale):
    ...         super().__init__()
    ...         self.linear, self.scale = nn.Linear(width, width), scale
    ...     def forward(self, x):
    ...         return x + self.scale * self.linear(x)
    >>> model = nn.Sequential(nn.Linear(4, 8), Residual(8, 1.0), Residual(8, 0.001), nn.Linear(8, 2))
    >>> batches = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(2)]
    >>> result = remove_blocks(model, {"count": 1}, data=batches)
    >>> result.report.stages[0].metrics["removed"]
    ['2']
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from torchslim.core.checks import check_model
from torchslim.core.config import Config, ConfigError, check
from torchslim.core.copying import copy_model
from torchslim.core.errors import TorchslimError
from torchslim.core.modes import eval_mode
from torchslim.core.report import Report, Result, Stage
from torchslim.core.selector import LayerSelector, matches, set_module
from torchslim.core.spec import append_transform, recorded_module, register_transform
from torchslim.data.sources import as_source
from torchslim.tasks.base import Task, resolve_task
from torchslim.tasks.batches import call_model
from torchslim.train.evaluate import evaluate_source
from torchslim.train.fit import TrainConfig, fit

TRANSFORM_KIND = "depth"


@dataclasses.dataclass(frozen=True)
class DepthConfig(Config):
    """``count`` blocks to remove (1 when neither is given), or ``ratio`` of the candidates; ``layers``: which modules are candidates (default:
    every bypassable block of a Sequential / ModuleList); ``calibration_batches`` of training data score each block;
    ``iterative``: re-score the remaining blocks after each removal."""

    count: int | None = None
    ratio: float | None = None
    layers: LayerSelector | None = None
    calibration_batches: int = 8
    batch_size: int = 64
    iterative: bool = True

    def validate(self) -> None:
        check(self.count is None or self.ratio is None, "give count or ratio, not both")
        check(self.count is None or self.count >= 1, f"count must be >= 1, got {self.count}")
        check(self.ratio is None or 0.0 < self.ratio < 1.0, f"ratio must be in (0, 1), got {self.ratio}")
        check(self.calibration_batches >= 1, f"calibration_batches must be >= 1, got {self.calibration_batches}")


ADDS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__isub__"})


def _broadcasts(tensor: torch.Tensor, result: Any) -> bool:
    """Whether ``tensor`` is a factor that reaches ``result`` by broadcasting alone (a scale, a padding mask, a
    per-channel buffer), not a tensor that makes it larger."""
    if not isinstance(result, torch.Tensor) or tensor.dim() > result.dim():
        return False
    return all(size in (1, full) for size, full in zip(reversed(tensor.shape), reversed(result.shape)))


class _ResidualWatch(TorchFunctionMode):
    """Sees, during one forward, whether a block's output (or a tensor computed from it alone: scaled, dropped out) is
    added to the tensor the block was given or one it was computed from without an addition (``x + block(norm(x))``):
    then the block is a residual branch written in its parent's forward, and bypassing it means adding nothing, not
    handing its input on. A tensor added before the block (a conditioning or position term re-added around every
    block) is not the stream the block continues. Tensors are told apart by a tag set on them (not their ``id``, which
    a freed tensor's successor may take), so nothing is kept alive beyond the forward's own tensors."""

    TAG = "_torchslim_watch_tag"

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.tagged: list[weakref.ref] = []  # the tags are taken off again when the forward is over
        self.parents: dict[int, set[int]] = {}  # tag -> tags of the tensors it was computed from (not through an addition)
        self.owner: dict[int, tuple[str, torch.Size]] = {}  # tag of a tensor computed from a block's output -> (block, its shape)
        self.given: dict[str, int] = {}  # block -> tag of the tensor it was given
        self.branches: set[str] = set()

    def tag(self, tensor: torch.Tensor) -> int:
        found = getattr(tensor, self.TAG, None)
        if found is None:
            self.count += 1
            found = self.count
            setattr(tensor, self.TAG, found)
            self.tagged.append(weakref.ref(tensor))
        return found

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for ref in self.tagged:
            tensor = ref()
            if tensor is not None and hasattr(tensor, self.TAG):
                delattr(tensor, self.TAG)
        self.tagged.clear()

    def block_ran(self, name: str, given: Any, output: Any) -> None:
        if isinstance(given, torch.Tensor) and isinstance(output, torch.Tensor) and not isinstance(given, nn.Parameter):
            self.given[name] = self.tag(given)
            self.owner[self.tag(output)] = (name, output.shape)

    def _ancestors(self, start: int, depth: int = 8) -> set[int]:
        found, frontier = {start}, {start}
        for _ in range(depth):
            frontier = {parent for item in frontier for parent in self.parents.get(item, ())} - found
            found |= frontier
        return found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter)]
        tags = [self.tag(t) for t in tensors]
        owners = {self.owner[tag] for tag in tags if tag in self.owner}
        adds = getattr(func, "__name__", "") in ADDS
        if owners and adds:
            for owner in owners:
                stream = self._ancestors(self.given[owner[0]])
                # the block's output as it reaches the sum (masked, scaled, transposed back) has the stream's shape
                mine = [t.shape for t, tag in zip(tensors, tags) if self.owner.get(tag) == owner]
                if any(tag not in self.owner and tag in stream and t.shape in mine for t, tag in zip(tensors, tags)):
                    self.branches.add(owner[0])
        if isinstance(result, torch.Tensor) and not isinstance(result, nn.Parameter):
            mine = self.tag(result)
            if not adds:  # the stream a block continues is followed back through other operations, not through sums
                self.parents.setdefault(mine, set()).update(tag for tag in tags if tag != mine)
            if len(owners) == 1 and not adds and all(tag in self.owner or _broadcasts(t, result) for t, tag in zip(tensors, tags)):
                self.owner.setdefault(mine, next(iter(owners)))  # scaled, masked, dropped out or transposed: still the block's output
        return result


def _shapes(model: nn.Module, example: Any, names: list[str], calls: dict[str, int] | None = None, branches: set[str] | None = None) -> dict[str, bool]:
    """{name: whether the module's first input and its output are tensors of one shape} from one forward; ``calls``
    gets how often each module ran, ``branches`` the blocks whose output the parent adds to their input."""
    modules = dict(model.named_modules())
    same: dict[str, bool] = {}
    calls = {} if calls is None else calls
    handles = []
    watch = _ResidualWatch()

    def hook(name: str):
        def record(module, inputs, output):
            first = inputs[0] if inputs else None
            same[name] = isinstance(first, torch.Tensor) and isinstance(output, torch.Tensor) and first.shape == output.shape
            calls[name] = calls.get(name, 0) + 1
            watch.block_ran(name, first, output)

        return record

    for name in names:
        handles.append(modules[name].register_forward_hook(hook(name)))
    try:
        with torch.no_grad(), eval_mode(model), watch:  # the caller's model keeps its mode
            call_model(model, example)  # an example: a tuple is several positional inputs
    finally:
        for handle in handles:
            handle.remove()
    if branches is not None:
        branches |= watch.branches
    return same


def candidate_blocks(model: nn.Module, example: Any, selector: LayerSelector | None = None, notes: list[str] | None = None) -> list[str]:
    """Names of the blocks that can be bypassed: children of a Sequential / ModuleList (or the modules ``selector``
    names) that hold parameters, run once per forward and whose output has their input's shape; without a
    ``selector``, the innermost of nested ones (the blocks of a stage, not the stage). A block applied several times
    (one layer shared across depth, as ALBERT's) is left out, and ``notes`` says so."""
    if selector is not None:
        chosen = LayerSelector.coerce(selector)
        names = [
            n for n, m in model.named_modules() if n and any(matches(p, n, m) for p in chosen.include) and not any(matches(p, n, m) for p in chosen.exclude)
        ]
        if not names:
            raise TorchslimError(f"remove_blocks: the selection {chosen.include} names no module")
    else:
        names = [
            f"{parent}.{child}" if parent else child
            for parent, container in model.named_modules()
            if isinstance(container, (nn.Sequential, nn.ModuleList))
            for child, module in container.named_children()
            if any(True for _ in module.parameters()) and len(list(module.children())) > 0
        ]
    calls: dict[str, int] = {}
    branches: set[str] = set()
    same = _shapes(model, example, names, calls, branches)
    modules = dict(model.named_modules())
    for name in names:  # the block carries how it is bypassed, into every copy of the model
        if name in branches:
            setattr(modules[name], BRANCH, True)
        elif getattr(modules[name], BRANCH, False):
            delattr(modules[name], BRANCH)
    shared = [name for name in names if same.get(name) and calls.get(name, 0) > 1]
    if shared and notes is not None:
        notes.append(f"not candidates: {', '.join(shared)} (each runs several times per forward: bypassing it would remove every application)")
    found = [name for name in names if same.get(name) and name not in shared]
    if selector is None:  # stages of blocks (a Sequential of Sequentials): the blocks, the finest units, are the candidates
        found = [name for name in found if not any(other.startswith(f"{name}.") for other in found)]
    return found


class Skip(nn.Identity):
    """A removed block: hands back the hidden states it is given (its first positional argument, or the keyword
    ``hidden_states``), whatever else the caller passes (a decoder layer gets masks, positions and a cache)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            return args[0]
        if "hidden_states" in kwargs:
            return kwargs["hidden_states"]
        return next(iter(kwargs.values()))


class Zero(Skip):
    """A removed residual branch (``x = x + block(x)`` written in the parent): adds nothing to the stream."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.zeros_like(super().forward(*args, **kwargs))


BRANCH = "_torchslim_residual_branch"  # set on a block found to be a branch its parent adds to its input


def leaves_no_marks(function: Callable[..., Any]) -> Callable[..., Any]:
    """A function of a caller's model (its first argument) that finds blocks on it: the marks ``candidate_blocks``
    sets for copies to carry are taken off the caller's blocks when it returns."""

    @functools.wraps(function)
    def wrapped(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(model, *args, **kwargs)
        finally:
            for module in model.modules():
                if getattr(module, BRANCH, False):
                    delattr(module, BRANCH)

    return wrapped


def bypass_for(block: nn.Module) -> Skip:
    """What takes a block's place when it is bypassed: nothing added for a residual branch, else its input handed on."""
    return Zero() if getattr(block, BRANCH, False) else Skip()


def _decoder_stack(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList, Any] | None:
    """(name, layers, config) when ``names`` are layers of a Hugging Face model's decoder stack (a ModuleList as long
    as its config's ``num_hidden_layers``), whose removal must shorten the list and the config; else None."""
    config = getattr(model, "config", None)
    parents = {name.rpartition(".")[0] for name in names}
    if len(parents) != 1 or not isinstance(getattr(config, "num_hidden_layers", None), int):
        return None
    parent = parents.pop()
    container = model.get_submodule(parent) if parent else model
    if not isinstance(container, nn.ModuleList) or len(container) != config.num_hidden_layers:
        return None
    if not all(name.rpartition(".")[2].isdigit() for name in names):
        return None
    return parent, container, config


def _delete_decoder_layers(model: nn.Module, names: list[str]) -> list[str]:
    """Delete the named layers of a Hugging Face decoder stack: the list shortened, each remaining layer's
    ``layer_idx`` (its key/value cache slot) renumbered, and ``num_hidden_layers`` and every per-layer list of the
    config (``layer_types`` ...) cut to match, so ``save_pretrained`` / ``from_pretrained`` and generation with a
    cache work. Returns notes (none when the names are no such stack)."""
    stack = _decoder_stack(model, names)
    if stack is None:
        return []
    parent, container, config = stack
    gone = {int(name.rpartition(".")[2]) for name in names}
    before = len(container)
    kept = nn.ModuleList(layer for index, layer in enumerate(container) if index not in gone)
    for index, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", index)  # noqa: B010 (an attribute torch does not type)
    if parent:
        set_module(model, parent, kept)
    cut = []
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == before:
            setattr(config, key, [v for index, v in enumerate(value) if index not in gone])
            cut.append(key)
    config.num_hidden_layers = len(kept)
    return [f"decoder layers deleted: {parent} has {len(kept)} of {before}; config num_hidden_layers={len(kept)}" + (f", {', '.join(cut)} cut" if cut else "")]


@contextlib.contextmanager
def bypassed(model: nn.Module, name: str) -> Iterator[None]:
    """``name`` bypassed while inside (the identity, or zero for a residual branch)."""
    block = set_module(model, name, bypass_for(model.get_submodule(name)))
    try:
        yield
    finally:
        set_module(model, name, block)


def _loss(model: nn.Module, batches: list[Any], task: Task) -> float:
    with torch.no_grad(), eval_mode(model):
        return sum(float(task.loss(model, batch)) for batch in batches) / len(batches)


def remove_blocks(
    model: nn.Module,
    config: DepthConfig | dict,
    data: Any,
    task: str | Task | None = None,
    finetune: TrainConfig | dict | None = None,
    inplace: bool = False,
    progress: bool | str | None = None,
) -> Result:
    """Remove the least important bypassable blocks of a copy of ``model`` (importance: the rise of the task's loss on
    calibration batches when the block is bypassed), then fine-tune when ``finetune`` is given. The report lists every
    candidate's score, what was removed, and the task's metrics before, after removal and after fine-tuning."""
    config = DepthConfig.coerce(config, where="remove_blocks")
    check_model(model, "remove_blocks", float32=True, copies=True)
    if data is None:
        raise ConfigError("remove_blocks: scoring blocks needs data")
    tuning = TrainConfig.coerce(finetune, where="remove_blocks.finetune") if finetune is not None else None
    source = as_source(data, model)
    resolved = resolve_task(task, source, model)
    target = model if inplace else copy_model(model)
    notes: list[str] = []
    candidates = candidate_blocks(target, source.example(1), config.layers, notes)
    count = config.count if config.count is not None else math.floor(config.ratio * len(candidates)) if config.ratio is not None else 1
    if not candidates:
        raise TorchslimError(
            "remove_blocks: the model has no block that can be bypassed (a child of a Sequential / ModuleList whose output has its input's shape)"
        )
    if count < 1 or count >= len(candidates) + (config.layers is not None):
        keep = " (at least one must stay)" if count >= len(candidates) and config.layers is None else ""
        raise ConfigError(f"remove_blocks: {count} block(s) to remove out of {len(candidates)} candidates{keep} ({', '.join(candidates)})")
    batches = list(source.batches("train", batch_size=config.batch_size, seed=0, limit=config.calibration_batches))
    metrics: dict[str, Any] = {f"{k}_before": v for k, v in evaluate_source(target, source, resolved).items() if isinstance(v, float)}
    base = _loss(target, batches, resolved)
    scores: dict[str, float] = {}
    removed: list[str] = []
    remaining = list(candidates)
    blocks: dict[str, nn.Module] = {}  # each removed block, to put back if the count cannot be reached
    for step in range(count):
        if not remaining:  # nested candidates: a removed block took those inside and around it out of the running
            for name in reversed(removed):
                set_module(target, name, blocks[name])
            raise ConfigError(
                f"remove_blocks: only {len(removed)} of {count} blocks could be removed ({', '.join(removed)}): the other candidates lie inside or "
                "around removed ones; ask for fewer (the model is unchanged)"
            )
        if step == 0 or config.iterative:
            current = _loss(target, batches, resolved)
            for name in remaining:
                with bypassed(target, name):
                    scores[name] = _loss(target, batches, resolved) - current
        name = min(remaining, key=lambda n: scores[n])
        remaining = [other for other in remaining if other != name and not other.startswith(f"{name}.") and not name.startswith(f"{other}.")]
        blocks[name] = set_module(target, name, bypass_for(target.get_submodule(name)))
        removed.append(name)
    zeroed = [name for name in removed if getattr(blocks[name], BRANCH, False)]
    if zeroed:
        notes.append(f"{', '.join(zeroed)}: residual branches their parent adds to its stream (x + block(x)): removed as adding nothing")
    # the spec keeps the config from before
    append_transform(target, {"kind": TRANSFORM_KIND, "removed": removed, **({"zeroed": zeroed} if zeroed else {})})
    deleted = _delete_decoder_layers(target, removed)
    rows = [{"name": n, "loss_rise_when_bypassed": round(scores[n], 5), "removed": n in removed} for n in candidates]
    metrics.update(removed=removed, candidates=len(candidates), calibration_loss_before=base, calibration_loss=_loss(target, batches, resolved))
    metrics.update({f"{k}_removed": v for k, v in evaluate_source(target, source, resolved).items() if isinstance(v, float)})
    notes += deleted
    if tuning is not None:
        history = fit(target, data, tuning, task=task, progress=progress, label="depth fine-tune", evaluate_at_end=False, reference=model)
        notes.append(f"fine-tuned {len(history.epochs)} epochs ({history.seconds:.1f} s)")
    metrics.update(evaluate_source(target, source, resolved))
    stage = Stage(name="remove blocks", kind="depth", metrics=metrics, layers=rows, notes=notes, config=config.to_dict(), execution="eager, blocks removed")
    return Result(model=target, report=Report.for_model(model, [stage]))


@register_transform(TRANSFORM_KIND)
def apply_depth(model: nn.Module, transform: dict[str, Any]) -> nn.Module:
    """Remove again the blocks a saved file lists."""
    removed = transform.get("removed")
    if not isinstance(removed, list) or not all(isinstance(n, str) for n in removed):
        raise TorchslimError("the file's depth record needs a 'removed' list of block names")
    zeroed = set(transform.get("zeroed") or [])
    for name in removed:
        recorded_module(model, name, "removes")
        set_module(model, name, Zero() if name in zeroed else Skip())
    _delete_decoder_layers(model, removed)
    return model


__all__ = ["DepthConfig", "Skip", "Zero", "apply_depth", "bypass_for", "bypassed", "candidate_blocks", "remove_blocks"]
