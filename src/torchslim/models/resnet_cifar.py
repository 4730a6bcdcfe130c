"""ResNet-20/32/44/56 for CIFAR-10 (He et al. 2016, option-A identity shortcuts) and a ResNet-18-style net
with projection shortcuts."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad channels from ``in_channels`` to ``out_channels``."""

    order: torch.Tensor

    def __init__(self, in_channels: int, out_channels: int, stride: int, positions: list[int] | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.index = positions  # set when channels were pruned

    @property
    def index(self) -> list[int] | None:
        return self._index

    @index.setter
    def index(self, positions: list[int] | None) -> None:
        self._index = None if positions is None else [int(p) for p in positions]
        self._block_start: int | None = None
        if self._index is None:
            return
        if len(self._index) != self.in_channels or max(self._index, default=-1) >= self.out_channels:
            raise ValueError(f"positions {self._index} do not fit {self.in_channels} -> {self.out_channels} channels")
        order = [self.in_channels] * self.out_channels  # every output channel reads an input channel or the zero channel
        for channel, position in enumerate(self._index):
            order[position] = channel
        self.register_buffer("order", torch.tensor(order, dtype=torch.long), persistent=False)
        first = self._index[0] if self._index else 0
        if self._index == list(range(first, first + self.in_channels)):  # one contiguous block: a pad, no gather
            self._block_start = first

    def positions(self) -> list[int]:
        """Where each input channel lands among the output channels (the rest are zeros)."""
        if self.index is not None:
            return list(self.index)
        extra = self.out_channels - self.in_channels
        return [extra // 2 + i for i in range(self.in_channels)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.index is not None:  # after channel pruning the zero channels need not sit symmetrically
            first = self._block_start
            if first is not None:
                return F.pad(x, (0, 0, 0, 0, first, self.out_channels - first - self.in_channels))
            return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1).index_select(1, self.order)
        extra = self.out_channels - self.in_channels
        if extra > 0:
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, stride={self.stride}"

    def channel_rule(self, graph, name: str, inputs: list, output: torch.Tensor) -> None:  # a ChannelGraph
        """Structured pruning: each input channel joins the output channel it lands on; the padded (zero) channels own
        no parameters, and the kept channels' new positions are recorded so the shortcut's index can be rebuilt."""
        info = graph.get_info(inputs[0])
        if info is None or info.axis != 1:
            return
        out_slots = graph.new_slots(self.out_channels)
        for slot, position in zip(info.slots, self.positions()):
            graph.uf.union(slot, out_slots[position])
        graph.leaf_records[name] = [(list(info.slots), out_slots)]
        graph.set_info(output, out_slots, 1)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, then ReLU."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Residual net of three or four stages of BasicBlocks.

    ``stage_widths`` are the channels each stage carries; ``inner_widths`` (optional, one per block) the channels
    inside each block, which structured pruning may shrink independently.

    Example:
        >>> resnet = CifarResNet(blocks=(3, 3, 3))
        >>> resnet(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        blocks: tuple[int, ...] = (3, 3, 3),
        stage_widths: tuple[int, ...] = (16, 32, 64),
        inner_widths: tuple[int, ...] | None = None,
        stem_width: int | None = None,
        shortcut: str = "A",
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(blocks) != len(stage_widths):
            raise ValueError(f"blocks {blocks} and stage_widths {stage_widths} differ in length")
        total = sum(blocks)
        inner = tuple(inner_widths) if inner_widths is not None else tuple(w for count, w in zip(blocks, stage_widths) for _ in range(count))
        if len(inner) != total:
            raise ValueError(f"inner_widths needs {total} entries, got {len(inner)}")
        stem = stem_width or stage_widths[0]
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        layers = []
        channels, block_index = stem, 0
        for stage, (count, width) in enumerate(zip(blocks, stage_widths)):
            stage_blocks = []
            for i in range(count):
                stride = 2 if (stage > 0 and i == 0) else 1
                stage_blocks.append(BasicBlock(channels, inner[block_index], width, stride, shortcut))
                channels, block_index = width, block_index + 1
            layers.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3 = layers[0], layers[1], layers[2]
        if len(layers) > 3:
            self.layer4 = layers[3]
        self.linear = nn.Linear(channels, num_classes)
        self._stages = len(layers)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, 16, 32, 32)
        out = self.layer3(self.layer2(self.layer1(out)))  # (B, 64, 8, 8)
        if self._stages > 3:
            out = self.layer4(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, 64)
        return self.linear(out)


def resnet_cifar(depth: int = 20, **kwargs) -> CifarResNet:
    """ResNet-(6n+2) for CIFAR-10 with option-A shortcuts: depth 20, 32, 44, 56, 110."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    return CifarResNet(blocks=(n, n, n), **kwargs)


def resnet18_style(num_classes: int = 10, in_channels: int = 3, **kwargs) -> CifarResNet:
    """A ResNet-18-style net for 32x32 inputs: four stages of two blocks, 64-512 channels, projection shortcuts."""
    kwargs.setdefault("stage_widths", (64, 128, 256, 512))
    return CifarResNet(blocks=(2, 2, 2, 2), shortcut="B", num_classes=num_classes, in_channels=in_channels, **kwargs)
