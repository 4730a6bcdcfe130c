"""Width scaling: a narrower copy of a model, every coupled set of channels (a layer's filters, a residual stream,
attention heads) scaled by one multiplier or per set, keeping the channels of largest norm, so the copy starts from
the original's strongest features: the student for distillation from the original. Built on the structured graph
(``prune_channels``), so it works on registry architectures and on a user's own traced model alike.

Example:
    >>> import torch
    >>> import torchslim as ts
    >>> model = ts.models.create("lenet-5")
    >>> result = narrow(model, 0.5, example_input=torch.zeros(1, 1, 28, 28))
    >>> [row["after"] for row in result.report.stages[0].layers][:2]
    ['1->10', '10->25']
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from torchslim.core.config import Config, ConfigError, check
from torchslim.core.report import Result
from torchslim.pruning.structured import prune_channels


@dataclasses.dataclass(frozen=True)
class NarrowConfig(Config):
    """The options of ``narrow`` as a recipe stage."""

    width: float = 0.5
    per_set: dict[str, float] = dataclasses.field(default_factory=dict)
    round_to: int = 1
    heads: bool = False

    def validate(self) -> None:
        check(0.0 < self.width <= 1.0, f"width must be in (0, 1], got {self.width}")
        check(self.round_to >= 1, f"round_to must be >= 1, got {self.round_to}")


def narrow(
    model: nn.Module,
    width: float,
    data: Any = None,
    example_input: Any = None,
    per_set: dict[str, float] | None = None,
    round_to: int = 1,
    heads: bool = False,
) -> Result:
    """A copy of ``model`` with every coupled set of channels scaled to ``width`` (in (0, 1]) of its channels, the
    largest-norm (L2) ones kept; ``per_set`` ({layer pattern: width}) scales the sets a layer's outputs belong to by
    their own width; ``heads`` scales attention heads too. The model's inputs and outputs keep their size."""
    if not 0.0 < width <= 1.0:
        raise ConfigError(f"narrow: width must be in (0, 1], got {width}")
    overrides = {}
    for pattern, value in (per_set or {}).items():
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"narrow: per_set[{pattern!r}] must be in (0, 1], got {value}")
        overrides[pattern] = 1.0 - value if value < 1.0 else 0.0
    config = {"ratio": 1.0 - width, "importance": "l2", "round_to": round_to, "overrides": overrides, "head_ratio": (1.0 - width) if heads else 0.0}
    result = prune_channels(model, config, data=data, example_input=example_input)
    stage = result.report.stages[0]
    stage.name, stage.kind = "narrow", "narrow"
    stage.notes.insert(0, f"width x{width}: every coupled set keeps its largest-norm channels")
    return result


__all__ = ["NarrowConfig", "narrow"]
