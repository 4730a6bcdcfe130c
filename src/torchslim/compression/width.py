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
from torchslim.pruning.structured import check_round_to, prune_channels


@dataclasses.dataclass(frozen=True)
class NarrowConfig(Config):
    """The options of ``narrow`` (and of its recipe stage): ``width`` in (0, 1], ``per_set`` widths by layer pattern,
    ``round_to`` (a channel multiple, or an engine's name as in ``prune_channels``), ``heads``."""

    width: float = 0.5
    per_set: dict[str, float] = dataclasses.field(default_factory=dict)
    round_to: int | str = 1
    heads: bool = False

    def validate(self) -> None:
        check(0.0 < self.width <= 1.0, f"width must be in (0, 1], got {self.width}")
        for pattern, value in self.per_set.items():
            check(0.0 < value <= 1.0, f"per_set[{pattern!r}] must be in (0, 1], got {value}")
        check_round_to(self.round_to)


def narrow(
    model: nn.Module,
    width: float | NarrowConfig | dict,
    data: Any = None,
    example_input: Any = None,
    per_set: dict[str, float] | None = None,
    round_to: int | str = 1,
    heads: bool = False,
) -> Result:
    """A copy of ``model`` with every coupled set of channels scaled to ``width`` (in (0, 1]) of its channels, the
    largest-norm (L2) ones kept; ``per_set`` ({layer pattern: width}) scales the sets a layer's outputs belong to by
    their own width; ``heads`` scales attention heads too. The model's inputs and outputs keep their size.

    ``width`` may also be the whole config, as every verb takes it: ``narrow(model, {"width": 0.5, "round_to":
    "onnxruntime"}, example_input=x)`` (then ``per_set``, ``round_to`` and ``heads`` come from it)."""
    if isinstance(width, (NarrowConfig, dict)):
        given = [name for name, value in (("per_set", per_set), ("round_to", round_to != 1), ("heads", heads)) if value]
        if given:
            raise ConfigError(f"narrow: with the config given as a whole, {', '.join(given)} go in it, not as keyword arguments beside it")
        config = NarrowConfig.coerce(width, where="narrow")
    else:
        if not 0.0 < width <= 1.0:
            raise ConfigError(f"narrow: width must be in (0, 1], got {width}")
        config = NarrowConfig.coerce({"width": width, "per_set": dict(per_set or {}), "round_to": round_to, "heads": heads}, where="narrow")
    overrides = {pattern: 1.0 - value if value < 1.0 else 0.0 for pattern, value in config.per_set.items()}
    ratio = 1.0 - config.width
    settings = {"ratio": ratio, "importance": "l2", "round_to": config.round_to, "overrides": overrides, "head_ratio": ratio if config.heads else 0.0}
    result = prune_channels(model, settings, data=data, example_input=example_input)
    stage = result.report.stages[0]
    stage.name, stage.kind = "narrow", "narrow"
    stage.notes.insert(0, f"width x{config.width}: every coupled set keeps its largest-norm channels")
    return result


__all__ = ["NarrowConfig", "narrow"]
