"""Pruning schedules: one-shot, iterative prune -> fine-tune -> prune (Han et al. 2015), and gradual polynomial
sparsity during training (Zhu & Gupta 2017)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence

from torch import nn

from torchslim.core.config import Config, check
from torchslim.core.report import Report, Result, Stage
from torchslim.measure.counts import count_nonzeros, count_parameters
from torchslim.pruning.unstructured import PruneConfig, prune_in_place, sparsity_rows
from torchslim.train.evaluate import evaluate
from torchslim.train.fit import Callback, TrainConfig, TrainState, fit


def polynomial_sparsity(step: int, initial: float, final: float, start_step: int, steps: int, frequency: int) -> float:
    """Zhu & Gupta 2017: s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3, held at s_i before t0, s_f after.

    Example:
        >>> polynomial_sparsity(0, 0.0, 0.9, 0, 10, 10), round(polynomial_sparsity(50, 0.0, 0.9, 0, 10, 10), 4)
        (0.0, 0.7875)
    """
    if step < start_step:
        return initial
    progress = min(1.0, (step - start_step) / max(1, steps * frequency))
    return final + (initial - final) * (1.0 - progress) ** 3


class GradualPruning(Callback):
    """Raise sparsity during training along the polynomial schedule, re-pruning every ``frequency`` steps.

    ``start_step`` t0, ``steps`` n (pruning events), ``frequency`` dt (optimizer steps between events).
    """

    def __init__(self, config: PruneConfig, final_sparsity: float, initial_sparsity: float = 0.0,
                 start_step: int = 0, steps: int = 10, frequency: int = 100, data: Any = None) -> None:
        check(0.0 <= initial_sparsity <= final_sparsity < 1.0, f"need 0 <= initial <= final < 1, got {initial_sparsity}, {final_sparsity}")
        self.config, self.data = config, data
        self.initial, self.final = initial_sparsity, final_sparsity
        self.start_step, self.steps, self.frequency = start_step, steps, frequency
        self.events: list[tuple[int, float]] = []

    def on_batch_start(self, state: TrainState) -> None:
        step = state.step
        if step < self.start_step or (step - self.start_step) % self.frequency or (step - self.start_step) > self.steps * self.frequency:
            return
        target = polynomial_sparsity(step, self.initial, self.final, self.start_step, self.steps, self.frequency)
        if target <= 0.0 or (self.events and abs(self.events[-1][1] - target) < 1e-9):
            return
        prune_in_place(state.model, self.config.replace(sparsity=target), self.data)
        self.events.append((step, target))


@dataclasses.dataclass(frozen=True)
class IterativeConfig(Config):
    """Iterative pruning: reach each sparsity in turn, fine-tuning after each step (Han et al. 2015)."""

    sparsities: tuple[float, ...] = (0.5, 0.75, 0.875, 0.92)
    prune: PruneConfig = PruneConfig(sparsity=0.5)
    finetune: TrainConfig = TrainConfig(epochs=2, lr=0.01)

    def validate(self) -> None:
        check(len(self.sparsities) > 0, "sparsities must name at least one step")
        check(all(0 <= s < 1 for s in self.sparsities), f"every sparsity must be in [0, 1), got {self.sparsities}")
        check(list(self.sparsities) == sorted(self.sparsities), f"sparsities must not decrease, got {self.sparsities}")


def iterative_prune(model: nn.Module, data: Any, config: IterativeConfig | dict, inplace: bool = False, progress: bool | None = None) -> Result:
    """Prune to each sparsity in turn and fine-tune after each step; one report stage per step."""
    config = IterativeConfig.coerce(config, where="iterative")
    target = model if inplace else copy.deepcopy(model)
    report = Report.for_model(model)
    for index, sparsity in enumerate(config.sparsities):
        names = prune_in_place(target, config.prune.replace(sparsity=sparsity), data)
        pruned = evaluate(target, data)
        history = fit(target, data, config.finetune.replace(seed=config.finetune.seed + index, eval_every_epoch=False), progress=progress)
        metrics = {
            "sparsity_target": sparsity,
            "accuracy_after_prune": pruned["accuracy"],
            "accuracy": history.final["accuracy"],
            "error": history.final["error"],
            "parameters": count_parameters(target),
            "nonzeros": count_nonzeros(target),
        }
        report.add_stage(f"prune {sparsity:.3f} + fine-tune", kind="prune", metrics=metrics, layers=sparsity_rows(target, names),
                         execution="simulated (masks)")
    return Result(model=target, report=report)


def schedule_sparsities(final: float, steps: int) -> Sequence[float]:
    """Iterative targets that remove the same fraction of the remaining weights at each step.

    Example:
        >>> [round(s, 3) for s in schedule_sparsities(0.9, 2)]
        [0.684, 0.9]
    """
    keep = (1 - final) ** (1 / steps)
    return [1 - keep ** (i + 1) for i in range(steps)]


__all__ = ["GradualPruning", "IterativeConfig", "iterative_prune", "polynomial_sparsity", "schedule_sparsities", "Stage"]
