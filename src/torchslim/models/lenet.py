"""LeNet-300-100 and the Caffe LeNet-5 used by Deep Compression."""

from __future__ import annotations

import torch
from torch import nn


class LeNet300100(nn.Module):
    """784-300-100-10 fully connected net with ReLU (266,610 parameters for 28x28 inputs).

    Example:
        >>> LeNet300100()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_features: int = 784, hidden: tuple[int, int] = (300, 100), num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)  # (B, 784)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Caffe's LeNet-5: conv 20@5x5, max-pool, conv 50@5x5, max-pool, fc 500, ReLU, fc 10 (431,080 parameters).

    Example:
        >>> LeNet5()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: tuple[int, int] = (20, 50),
        hidden: int = 500,
        num_classes: int = 10,
        input_size: int = 28,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels[0], 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 5)
        self.pool2 = nn.MaxPool2d(2)
        side = ((input_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet-5 needs inputs of at least 16x16, got {input_size}x{input_size}")
        self.fc1 = nn.Linear(channels[1] * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(x))  # (B, 20, 12, 12)
        x = self.pool2(self.conv2(x))  # (B, 50, 4, 4)
        x = torch.flatten(x, 1)  # (B, 800)
        x = torch.relu(self.fc1(x))
        return self.fc2(x)


class MLP(nn.Module):
    """Fully connected net with ReLU and optional dropout: ``hidden`` widths between input and classes.

    Hinton et al. 2015's MNIST teacher is MLP(hidden=(1200, 1200), dropout=0.2) (dropout on inputs and hidden).

    Example:
        >>> MLP(hidden=(32,))(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, in_features: int = 784, hidden: tuple[int, ...] = (800, 800), num_classes: int = 10, dropout: float = 0.0, input_dropout: float = 0.0
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        self.input_dropout = nn.Dropout(input_dropout)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout(torch.flatten(x, 1))
        for layer in self.layers:
            x = self.dropout(torch.relu(layer(x)))
        return self.head(x)
