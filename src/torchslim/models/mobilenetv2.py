"""A MobileNetV2-style net for small images: depthwise convs in inverted residual blocks."""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), as in Sandler et al. 2018 with the CIFAR strides.
DEFAULT_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _round(channels: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 project (linear), with a residual when shapes match."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, stride: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if hidden != in_channels:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 (or 28x28) inputs; ``width_multiplier`` scales every layer.

    Example:
        >>> MobileNetV2(width_multiplier=0.25)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_multiplier: float = 1.0,
        settings: tuple[tuple[int, int, int, int], ...] = DEFAULT_SETTINGS,
        last_channels: int = 1280,
        hidden_widths: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        stem = _round(32 * width_multiplier)
        features: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6(inplace=True))]
        channels, block = stem, 0
        blocks = sum(n for _, _, n, _ in settings)
        if hidden_widths is not None and len(hidden_widths) != blocks:
            raise ValueError(f"hidden_widths needs {blocks} entries, got {len(hidden_widths)}")
        for t, c, n, s in settings:
            out = _round(c * width_multiplier)
            for i in range(n):
                hidden = hidden_widths[block] if hidden_widths is not None else channels * t
                features.append(InvertedResidual(channels, hidden, out, s if i == 0 else 1))
                channels, block = out, block + 1
        last = _round(last_channels * max(1.0, width_multiplier))
        features.append(nn.Sequential(nn.Conv2d(channels, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 1280, H/8, W/8)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)
