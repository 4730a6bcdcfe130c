"""Shared fixtures: real data from ../shared/data (skipped with the reason where it is absent) and tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data_or_skip(subfolder: str) -> Path:
    folder = SHARED_DATA / subfolder
    if not folder.is_dir():
        pytest.skip(f"real data not available: {folder} is missing (tests use ../shared/data beside the checkout)")
    return folder


@pytest.fixture(scope="session")
def mnist():
    """Full MNIST from ../shared/data/mnist (60,000 / 10,000)."""
    import torchslim as ts

    return ts.data.load("mnist", root=shared_data_or_skip("mnist"), download=False)


@pytest.fixture(scope="session")
def mnist_small(mnist):
    """The first 6,000 training and 2,000 test images of full MNIST, for quick training tests."""
    return mnist.subset(train=6000, test=2000)


@pytest.fixture(scope="session")
def digits():
    import torchslim as ts

    return ts.data.load("digits")


@pytest.fixture(autouse=True)
def _fixed_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


class TinyConvNet(nn.Module):
    """conv + BN + residual + depthwise, a few channels: fast structure tests."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = x + self.conv2(torch.relu(self.depthwise(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def tiny_conv() -> nn.Module:
    torch.manual_seed(0)
    return TinyConvNet()
