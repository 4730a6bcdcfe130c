"""Pruning schedules: iterative targets (``schedule_sparsities``, for ``prune``'s list of steps, each followed by
fine-tuning: Han et al. 2015) and gradual polynomial sparsity during training (Zhu & Gupta 2017)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchslim.core.config import check
from torchslim.pruning.unstructured import PruneConfig, prune_in_place
from torchslim.tasks.base import Task
from torchslim.train.fit import Callback, TrainState


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

    ``start_step`` t0, ``steps`` n (pruning events), ``frequency`` dt (optimizer steps between events); ``data`` and
    ``task`` serve gradient criteria.
    """

    def __init__(
        self,
        config: PruneConfig,
        final_sparsity: float,
        initial_sparsity: float = 0.0,
        start_step: int = 0,
        steps: int = 10,
        frequency: int = 100,
        data: Any = None,
        task: str | Task | None = None,
    ) -> None:
        check(0.0 <= initial_sparsity <= final_sparsity < 1.0, f"need 0 <= initial <= final < 1, got {initial_sparsity}, {final_sparsity}")
        self.config, self.data, self.task = config, data, task
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
        prune_in_place(state.model, self.config.replace(sparsity=target), self.data, self.task)
        self.events.append((step, target))


def schedule_sparsities(final: float, steps: int) -> Sequence[float]:
    """Iterative targets that remove the same fraction of the remaining weights at each step.

    Example:
        >>> [round(s, 3) for s in schedule_sparsities(0.9, 2)]
        [0.684, 0.9]
    """
    keep = (1 - final) ** (1 / steps)
    return [1 - keep ** (i + 1) for i in range(steps)]


__all__ = ["GradualPruning", "polynomial_sparsity", "schedule_sparsities"]
