"""The settings of a MACs or latency budget (see ``torchslim.compression.speed_budget`` for how they are used)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from torchslim.core.config import Config, check
from torchslim.core.selector import LayerSelector
from torchslim.pruning.structured import check_round_to


@dataclasses.dataclass(frozen=True)
class SpeedBudgetConfig(Config):
    """``target_macs``: the pruned model's MACs as a fraction of the dense model's (0.25: 4x fewer); or
    ``target_latency``: its latency on ``backend`` (eager or onnxruntime) at ``batch_size`` as a fraction of the
    dense model's there. ``ratios``: the shares of a set's channels it may lose (0 is always allowed); ``importance``,
    ``round_to``, ``layers`` and ``prune_residual`` as in ``prune_channels``; ``uniform``: one ratio for every set (of equal loss rises, the mildest that fits);
    ``ranks``: the ranks (integers, or fractions of a layer's full rank; empty: none) each Linear / ungrouped Conv2d
    layer among ``layers`` may be factorized to by SVD instead of, or as well as, losing channels (a rank whose
    factors cost as much as the layer, or whose loss rise passes the harshest channel ratio's, is not offered; ignored
    by ``uniform``; the model's output layers are never factorized); ``depth``: whether bypassable blocks (residual
    blocks; see ``remove_blocks``) may be removed as well (ignored by ``uniform``; by default (None) on for a latency
    budget and off for MACs: at batch 1, where a residual net's time is in running its operators, blocks met eager
    latency budgets channels could not reach, or at less error (ResNet-20 at 0.6 of eager batch-1 latency: 1.2%
    against 2.7%); on MACs budgets blocks bought little for the time their ordering and trials take (ResNet-20 at
    0.3 of the MACs: the trials chose no block, 1.8% either way; at 0.5: 1.3% against 1.5%));
    ``trials``: whether a round carries out several plans before choosing one: the depths of least predicted loss
    rise (``depth_trials`` of them, the plan that removes no block first), the knapsack's with channels alone where
    ranks are offered, and the plan of one ratio for every set; each trained for ``trial_batches`` batches of
    ``finetune`` (0, or no ``finetune``: none), its loss and its cost measured (latency timed side by side with the
    dense model), and of those that meet the budget the round picks the one of least loss (the plan of one ratio only
    where no other has less loss) and corrects the next round's budget by it; no round fine-tunes in full: at the end
    the plan of least loss that met the budget in any round's trials is carried out (summed loss rises judge a plan
    of many pruned sets far worse than it does after a few batches of training and rank depths apart from how
    fine-tuning recovers them; a product of factors misjudges the latency of a layer both narrowed and factorized);
    ``finetune``: training after the channels go (``None``: none); ``rounds``: allocations tried while the budget is
    missed or far under (with ``trials``, rounds of trials); ``eval_limit``: evaluation examples per sensitivity
    measurement, on ``sensitivity_split`` ("train", the default, so that the allocation never sees the data the result
    is tested on; or "eval"); ``timing_rounds`` x ``timing_runs``: the interleaved timing of each latency measurement,
    each model timed for at least ``timing_min_seconds`` a round (LeNet-300-100 at batch 64 in ONNX Runtime, 0.25 ms a
    call: one pruned model measured 0.76 to 0.91 of the dense time in six comparisons of 20 calls a round, 0.757 to
    0.763 with 50 ms a round)."""

    target_macs: float = 0.0
    target_latency: float = 0.0
    backend: Literal["eager", "onnxruntime"] = "eager"
    batch_size: int = 1
    ratios: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
    ranks: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    depth: bool | None = None
    importance: str = "l1"
    round_to: int | str = 1
    layers: LayerSelector = LayerSelector()
    prune_residual: bool = True
    uniform: bool = False
    finetune: dict[str, Any] | None = dataclasses.field(default_factory=lambda: {"epochs": 2, "lr": 0.01, "eval_every_epoch": False})
    rounds: int = 3
    eval_limit: int | None = 512
    sensitivity_split: str = "train"
    trials: bool = True
    depth_trials: int = 4
    trial_batches: int = 50
    timing_rounds: int = 5
    timing_runs: int = 20
    timing_min_seconds: float = 0.05
    threads: int | None = 2

    def validate(self) -> None:
        check(self.sensitivity_split in ("eval", "train"), f"sensitivity_split must be eval or train, got {self.sensitivity_split!r}")
        check(
            (self.target_macs > 0) != (self.target_latency > 0),
            f"give exactly one of target_macs and target_latency (a fraction of the dense model's), got {self.target_macs} and {self.target_latency}",
        )
        for name, value in (("target_macs", self.target_macs), ("target_latency", self.target_latency)):
            check(0.0 <= value < 1.0, f"{name} is a fraction of the dense model's in (0, 1), got {value}")
        check(bool(self.ratios) and all(0.0 < r < 1.0 for r in self.ratios), f"ratios must be in (0, 1), got {self.ratios}")
        for value in self.ranks:
            check(value > 0 and (value < 1 or float(value).is_integer()), f"ranks: each must be an integer rank or a fraction in (0, 1), got {value}")
        check(self.batch_size >= 1 and self.rounds >= 1, "batch_size and rounds must be >= 1")
        check(self.timing_rounds >= 1 and self.timing_runs >= 1, "timing_rounds and timing_runs must be >= 1")
        check(self.timing_min_seconds >= 0, f"timing_min_seconds must be >= 0, got {self.timing_min_seconds}")
        check(self.depth_trials >= 1, f"depth_trials must be >= 1, got {self.depth_trials}")
        check(self.trial_batches >= 0, f"trial_batches must be >= 0, got {self.trial_batches}")
        check_round_to(self.round_to)
        if self.finetune is not None:  # before the sensitivity sweep, not when the recipe reaches it
            from torchslim.train.fit import TrainConfig

            TrainConfig.coerce(self.finetune, where="auto_narrow.finetune")

    @property
    def removes_blocks(self) -> bool:
        return (self.measure == "latency") if self.depth is None else self.depth

    @property
    def measure(self) -> str:
        return "macs" if self.target_macs > 0 else "latency"

    @property
    def target(self) -> float:
        return self.target_macs if self.target_macs > 0 else self.target_latency

    def structured(self) -> dict[str, Any]:
        """The ``prune_channels`` settings every candidate and the final plan share."""
        return {
            "ratio": 0.0,
            "importance": self.importance,
            "round_to": self.round_to,
            "layers": self.layers.to_dict(),
            "prune_residual": self.prune_residual,
        }


__all__ = ["SpeedBudgetConfig"]
