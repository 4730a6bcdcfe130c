"""Sparse variational dropout (Molchanov, Ashukha & Vetrov 2017): every weight gets its own Gaussian multiplicative
noise, w ~ N(theta, alpha * theta^2), whose variance is learned along with the weight under a log-uniform prior. The
approximate KL term pushes alpha up wherever the data does not need the weight, and a weight with log alpha above a
threshold (3: its noise is 20 times its magnitude) carries no information and is pruned. Each layer's sparsity is set
by training, not by a number a person picked.

Training samples the layer's pre-activations directly (the local reparametrization trick): for a Linear,
y ~ N(x theta^T + b, x^2 sigma2^T); for a Conv2d the same with convolutions. The noise is added by a forward hook
in training mode only, so the model's own forward (lambdas, functional calls, any architecture) is untouched and
evaluation sees the mean weights with the pruned ones zeroed.

As a verb (and the recipe stage ``variational-dropout``), training included:

    result = sparsify_variational(model, data, {"threshold": 3.0}, finetune={"epochs": 20, "optimizer": "adam", "lr": 1e-3})

or as a ``fit`` callback, then ``to_masks``:

    svd = SparseVariationalDropout(model, train_size=len(data.train))
    fit(model, data, {"epochs": 20, "optimizer": "adam", "lr": 1e-3}, callbacks=[svd])
    masks = svd.to_masks()   # masks attached; log sigma^2 and the hooks removed
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from torchslim.core.checks import check_model
from torchslim.core.config import Config, ConfigError, check
from torchslim.core.copying import copy_model
from torchslim.core.errors import TorchslimError
from torchslim.core.modes import eval_mode
from torchslim.core.report import Report, Result, Stage
from torchslim.core.selector import LayerSelector, select_modules, weight_of
from torchslim.data.sources import as_source
from torchslim.measure.counts import count_nonzeros, count_parameters
from torchslim.pruning.apply import set_mask
from torchslim.tasks.base import Task, resolve_task
from torchslim.train.fit import Callback, TrainConfig, TrainState, epoch_steps, fit

# Molchanov et al. 2017, eq. 14: -KL(q || p) ~ k1 sigmoid(k2 + k3 log alpha) - 0.5 log(1 + 1/alpha) - k1
K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_CLAMP = 8.0


def log_alpha(weight: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """log alpha = log sigma^2 - log theta^2, clamped to [-8, 8] (as the authors' code does)."""
    return torch.clamp(log_sigma2 - torch.log(weight * weight + 1e-8), -LOG_ALPHA_CLAMP, LOG_ALPHA_CLAMP)


def kl_approximation(weight: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """The approximate KL divergence of the weights' posterior from the log-uniform prior, summed."""
    alpha = log_alpha(weight, log_sigma2)
    return -(K1 * torch.sigmoid(K2 + K3 * alpha) - 0.5 * F.softplus(-alpha) - K1).sum()


class SparseVariationalDropout(Callback):
    """Sparse variational dropout on the selected Linear / Conv2d layers.

    ``train_size``: examples in one epoch of the training data (the KL term is the whole dataset's, the loss a
    batch's mean: it is divided by this). ``kl_weight``: the KL term's final weight (1 is the variational bound);
    ``warmup_steps``: steps over which it rises linearly from 0 (training from a trained model first adapts the
    variances). ``threshold``: log alpha above which a weight is pruned. ``initial_log_sigma2``: where the learned
    variances start (-10: almost no noise). ``train_clip``: weights past the threshold are left out of the sampled
    pre-activation while training (their mean and their noise), as the authors' LeNet experiments train, so the network
    trains as it will be pruned; False trains with every weight and prunes only at the end.
    """

    def __init__(
        self,
        model: nn.Module,
        train_size: int,
        layers: LayerSelector | dict | None = None,
        kl_weight: float = 1.0,
        warmup_steps: int = 0,
        threshold: float = 3.0,
        initial_log_sigma2: float = -10.0,
        train_clip: bool = False,
    ) -> None:
        if train_size < 1:
            raise TorchslimError(f"train_size must be the number of training examples (>= 1), got {train_size}")
        if kl_weight < 0 or warmup_steps < 0:
            raise TorchslimError(f"kl_weight and warmup_steps must be >= 0, got {kl_weight} and {warmup_steps}")
        self.modules = [(name, module) for name, module in select_modules(model, layers, default_types=("Linear", "Conv2d"))]
        unsupported = [name for name, module in self.modules if not isinstance(module, (nn.Linear, nn.Conv2d))]
        if unsupported:
            raise TorchslimError(f"sparse variational dropout covers Linear and Conv2d layers; not: {', '.join(unsupported)}")
        if not self.modules:
            raise TorchslimError("sparse variational dropout: no Linear or Conv2d layer selected")
        self.train_size, self.kl_weight, self.warmup_steps, self.threshold = train_size, kl_weight, warmup_steps, threshold
        self.step = 0
        self.cutoff = threshold
        self.handles = []
        for _, module in self.modules:
            weight = weight_of(module)
            module.register_parameter("log_sigma2", nn.Parameter(torch.full_like(weight, initial_log_sigma2)))
            self.handles.append(module.register_forward_hook(functools.partial(_noisy_output, clip=threshold if train_clip else None)))

    def kl(self) -> torch.Tensor:
        """The summed approximate KL over every selected weight."""
        return sum(kl_approximation(weight_of(module), _log_sigma2(module)) for _, module in self.modules)  # type: ignore[return-value]

    def extra_loss(self, state: TrainState) -> torch.Tensor:
        ramp = min(1.0, (self.step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return self.kl_weight * ramp * self.kl() / self.train_size

    def after_step(self, state: TrainState) -> None:
        self.step += 1

    @torch.no_grad()
    def sparsity(self) -> dict[str, float]:
        """The fraction of each layer's weights whose log alpha is above the threshold now."""
        return {name: float((log_alpha(weight_of(m), _log_sigma2(m)) > self.threshold).float().mean()) for name, m in self.modules}

    @torch.no_grad()
    def to_masks(self, sparsity: float | None = None) -> dict[str, torch.Tensor]:
        """Masks where log alpha <= threshold, attached to the layers; the variances and the noise hooks removed, so
        the model is a plain (masked) model again. ``sparsity``: at least this fraction of the selected weights
        masked, over all layers together: where the threshold masks fewer, the weights with the highest log alpha
        (the noisiest) are masked next. ``self.cutoff`` is the log alpha the masks were cut at."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        alphas = {name: log_alpha(weight_of(module), _log_sigma2(module)) for name, module in self.modules}
        keeps = {name: alpha <= self.threshold for name, alpha in alphas.items()}
        self.cutoff = self.threshold
        total = sum(alpha.numel() for alpha in alphas.values())
        wanted = min(total - 1, math.ceil(round(sparsity * total, 6))) if sparsity else 0
        if wanted > sum(int((alpha > self.threshold).sum()) for alpha in alphas.values()):
            flat = torch.cat([alpha.flatten().cpu() for alpha in alphas.values()])
            order = torch.argsort(flat, descending=True, stable=True)  # exactly `wanted` masked, ties (the clamp) in order
            kept = torch.ones_like(flat, dtype=torch.bool)
            kept[order[:wanted]] = False
            self.cutoff = float(flat[order[wanted - 1]])
            for (name, alpha), part in zip(alphas.items(), kept.split([alpha.numel() for alpha in alphas.values()])):
                keeps[name] = part.view_as(alpha).to(alpha.device)
        for name, module in self.modules:
            del module.log_sigma2
            set_mask(module, keeps[name])
        return keeps


def _log_sigma2(module: nn.Module) -> torch.Tensor:
    value = module.log_sigma2
    assert isinstance(value, torch.Tensor)
    return value


def _noisy_output(module: nn.Module, inputs: tuple, output: torch.Tensor, clip: float | None = None) -> torch.Tensor | None:
    """Training mode: the pre-activation sampled from its Gaussian given the input (local reparametrization); with
    ``clip`` (train_clip's threshold), the weights whose log alpha passed it taken out of the mean and the noise."""
    if not module.training:
        return None
    x, weight = inputs[0], weight_of(module)
    variance_weight = torch.exp(_log_sigma2(module))
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        raise TorchslimError("sparse variational dropout: Conv2d with padding_mode other than zeros is not covered")

    def product(inputs: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(module, nn.Linear):
            return F.linear(inputs, kernel, bias)
        assert isinstance(module, nn.Conv2d)
        return F.conv2d(inputs, kernel, bias, module.stride, module.padding, module.dilation, module.groups)

    if clip is not None:
        kept = (log_alpha(weight, _log_sigma2(module)) <= clip).detach()
        if type(module).forward in (nn.Linear.forward, nn.Conv2d.forward) and len(module._forward_hooks) == 1:
            bias = module.bias if isinstance(module.bias, torch.Tensor) else None
            output = product(x, weight * kept, bias)  # the mean again from the kept weights: the layer's own output leaves the graph
        else:  # a forward of the user's own, or hooks before this one: their output less what the pruned weights add
            output = output - product(x, weight * ~kept)
        variance_weight = variance_weight * kept
    return output + torch.sqrt(product(x * x, variance_weight) + 1e-8) * torch.randn_like(output)


@dataclasses.dataclass(frozen=True)
class VariationalConfig(Config):
    """``layers`` (Linear and Conv2d by default), ``kl_weight`` (1: the variational bound), ``warmup_epochs`` over
    which the KL term's weight rises from 0, ``threshold`` on log alpha, ``initial_log_sigma2``, ``train_clip`` (weights past the threshold left out while
    training, see ``SparseVariationalDropout``). ``distill_alpha``:
    the data term's share taken from the model as it was given (soft targets at ``distill_temperature``, as in
    ``distill``; the rest is the task's loss on labels): 0, the default, trains on the labels alone."""

    layers: LayerSelector = LayerSelector()
    kl_weight: float = 1.0
    warmup_epochs: float = 1.0
    threshold: float = 3.0
    initial_log_sigma2: float = -10.0
    train_clip: bool = False
    distill_alpha: float = 0.0
    distill_temperature: float = 4.0
    sparsity: float | None = None

    def validate(self) -> None:
        check(self.sparsity is None or 0.0 <= self.sparsity < 1.0, f"sparsity must be in [0, 1), got {self.sparsity}")
        check(self.kl_weight >= 0 and self.warmup_epochs >= 0, "kl_weight and warmup_epochs must be >= 0")
        check(0.0 <= self.distill_alpha <= 1.0, f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        check(self.distill_temperature > 0, f"distill_temperature must be > 0, got {self.distill_temperature}")


DEFAULT_TRAINING = {"epochs": 10, "optimizer": "adam", "lr": 1e-3, "schedule": "constant", "eval_every_epoch": False}


def sparsify_variational(
    model: nn.Module,
    data: Any,
    config: VariationalConfig | dict | None = None,
    finetune: TrainConfig | dict | None = None,
    task: str | Task | None = None,
    inplace: bool = False,
    progress: bool | str | None = None,
) -> Result:
    """Train ``model`` (a copy unless ``inplace``) with sparse variational dropout for ``finetune`` (default: 10
    epochs of Adam at 1e-3), then mask every weight whose log alpha passed the threshold. Each layer's sparsity is what
    training found; the report lists it per layer."""
    config = VariationalConfig.coerce(config or {}, where="variational-dropout")
    check_model(model, "variational-dropout", float32=True, copies=True)
    if data is None:
        raise ConfigError("variational-dropout trains the model: it needs data")
    training = TrainConfig.coerce(finetune if finetune is not None else DEFAULT_TRAINING, where="variational-dropout.finetune")
    target = model if inplace else copy_model(model)
    source = as_source(data, target)
    steps = epoch_steps(source, training)
    train_size = steps * training.batch_size  # examples per epoch (the last batch may be short)
    started = time.perf_counter()
    loss = _soft_targets(target, source, config, task) if config.distill_alpha > 0 else None  # the teacher copied before the noise
    dropout = SparseVariationalDropout(
        target, train_size, config.layers, config.kl_weight, round(config.warmup_epochs * steps), config.threshold, config.initial_log_sigma2, config.train_clip
    )
    try:
        with eval_mode(loss.teacher) if loss is not None else contextlib.nullcontext():
            history = fit(
                target, data, training, task=task, loss=loss, callbacks=[dropout], progress=progress, label="variational dropout", evaluate_at_end=False
            )
    finally:
        masks = dropout.to_masks(config.sparsity)  # the model is left plain (masked), whatever happened
    rows = [{"name": name, "weights": int(mask.numel()), "sparsity": float((~mask).float().mean())} for name, mask in masks.items()]
    pruned = sum(int((~mask).sum()) for mask in masks.values())
    total = sum(int(mask.numel()) for mask in masks.values())
    metrics = {
        "sparsity": pruned / max(1, total),
        "parameters": count_parameters(target),
        "nonzeros": count_nonzeros(target),
        "seconds": time.perf_counter() - started,
    }
    cut = f" (the threshold {config.threshold:g} lowered to reach sparsity {config.sparsity:g})" if dropout.cutoff != config.threshold else ""
    teacher = f" (data term: {config.distill_alpha:g} soft targets of the model as given, T {config.distill_temperature:g})" if loss is not None else ""
    notes = [
        f"{len(history.epochs)} epochs of variational dropout{teacher}; {pruned:,} of {total:,} weights with log alpha above {dropout.cutoff:.3g}{cut} masked "
        f"({100 * metrics['sparsity']:.1f}%): " + ", ".join(f"{row['name']} {100 * row['sparsity']:.1f}%" for row in rows)
    ]
    stage = Stage(
        name="variational dropout",
        kind="variational-dropout",
        metrics=metrics,
        layers=rows,
        notes=notes,
        config=config.to_dict(),
        execution="eager, pruned weights masked to zero",
    )
    return Result(model=target, report=Report.for_model(model, [stage]))


def _soft_targets(model: nn.Module, source: Any, config: VariationalConfig, task: str | Task | None) -> Any:
    """The distillation loss against a frozen copy of ``model`` as it is now (``distill``'s own loss)."""
    from torchslim.distillation.trainer import DistillConfig, _DistillLoss

    teacher = copy_model(model).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    settings = DistillConfig(temperature=config.distill_temperature, alpha=config.distill_alpha)
    return _DistillLoss(teacher, settings, nn.ModuleDict(), None, resolve_task(task, source, teacher), model)


__all__ = ["SparseVariationalDropout", "VariationalConfig", "kl_approximation", "log_alpha", "sparsify_variational"]
