"""In-memory datasets and a fast batch loader over tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass
class Split:
    """One split of a dataset: inputs (float, normalized) and integer targets."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, count: int | None) -> Split:
        if count is None or count >= len(self):
            return self
        return Split(self.inputs[:count], self.targets[:count])


def batch_bounds(count: int, batch_size: int, drop_last: bool = False) -> list[tuple[int, int]]:
    """(start, stop) of each batch of ``count`` examples. A last batch of one example joins the batch before it: a
    model with batch normalization cannot train on one example (its statistics over the batch are undefined)."""
    bounds = [(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    if drop_last and bounds and bounds[-1][1] - bounds[-1][0] < batch_size:
        bounds.pop()
    elif len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], count)]
    return bounds


class TensorLoader:
    """Batches over in-memory tensors, far faster than a per-item DataLoader for small images.

    Reshuffles each epoch from a seeded generator, so runs are reproducible. ``augment`` (optional) maps an input
    batch to an augmented one, drawing randomness from the same generator.

    Example:
        >>> split = Split(torch.zeros(10, 3), torch.zeros(10, dtype=torch.long))
        >>> [len(y) for _, y in TensorLoader(split, batch_size=4)]
        [4, 4, 2]
    """

    def __init__(
        self,
        split: Split,
        batch_size: int = 128,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(batch_bounds(len(self.split), self.batch_size, self.drop_last))

    def __iter__(self) -> Iterator[Batch]:
        count = len(self.split)
        order = torch.randperm(count, generator=self.generator) if self.shuffle else None
        for start, stop in batch_bounds(count, self.batch_size, self.drop_last):
            if order is None:
                inputs, targets = self.split.inputs[start:stop], self.split.targets[start:stop]
            else:
                index = order[start:stop]
                inputs, targets = self.split.inputs[index], self.split.targets[index]
            if self.augment is not None:
                inputs = self.augment(inputs, self.generator)
            yield inputs, targets


def random_crop_flip(padding: int = 4) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Batch augmentation for 32x32 images: random crop after zero padding, and horizontal flip."""

    def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count, _, height, width = images.shape
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        offsets = torch.randint(0, 2 * padding + 1, (count, 2), generator=generator)
        flips = torch.rand(count, generator=generator) < 0.5
        out = torch.empty_like(images)
        for i in range(count):
            top, left = int(offsets[i, 0]), int(offsets[i, 1])
            crop = padded[i, :, top : top + height, left : left + width]
            out[i] = crop.flip(-1) if flips[i] else crop
        return out

    return augment


@dataclasses.dataclass
class Dataset:
    """A classification dataset held in memory: normalized train and test splits and what describes them.

    Example:
        >>> import torchslim as ts
        >>> data = ts.data.load("digits")
        >>> inputs, targets = next(iter(data.loader("train", batch_size=32)))
        >>> tuple(inputs.shape)
        (32, 1, 8, 8)
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    source: str = ""
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    scale: float = 1 / 255
    checks: list[str] = dataclasses.field(default_factory=list)
    classes: tuple[str, ...] | None = None

    def split(self, name: str) -> Split:
        if name not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {name!r}")
        return self.train if name == "train" else self.test

    def loader(
        self,
        split: str = "train",
        batch_size: int = 128,
        shuffle: bool | None = None,
        seed: int = 0,
        limit: int | None = None,
        augment: bool | None = None,
    ) -> TensorLoader:
        """Batches of one split; training batches are shuffled (and augmented, where the set has it) by default."""
        is_train = split == "train"
        use_augment = is_train if augment is None else augment
        return TensorLoader(
            self.split(split).take(limit),
            batch_size=batch_size,
            shuffle=is_train if shuffle is None else shuffle,
            seed=seed,
            augment=self.augment if use_augment else None,
        )

    def subset(self, train: int | None = None, test: int | None = None) -> Dataset:
        """The first ``train`` / ``test`` examples (for quick runs)."""
        return dataclasses.replace(self, train=self.train.take(train), test=self.test.take(test))

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        return self.test.inputs[:batch_size].clone()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "train": len(self.train),
            "test": len(self.test),
            "classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "source": self.source,
            "preprocessing": {"scale": self.scale, "mean": self.mean, "std": self.std},
            "checks": list(self.checks),
        }


def normalize(images: torch.Tensor, mean: tuple[float, ...] | None, std: tuple[float, ...] | None, scale: float = 1 / 255) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float: multiplied by ``scale`` (1/255 gives [0, 1]; Caffe models use 1/256),
    then standardized per channel by ``mean`` / ``std`` unless they are None.

    Example:
        >>> normalize(torch.tensor([[[[255]]]], dtype=torch.uint8), None, None, scale=1 / 256).item()
        0.99609375
    """
    scaled = images.float().mul_(scale)
    if mean is None or std is None:
        return scaled
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (scaled - mean_t) / std_t


@dataclasses.dataclass
class TextDataset:
    """Character-level text: the first 90% trains, the last 10% tests; windows of ``block_size`` characters.

    ``loader`` yields (input ids (B, T), target ids (B, T)) with targets shifted one character ahead.
    """

    name: str
    train_ids: torch.Tensor
    test_ids: torch.Tensor
    vocabulary: str
    source: str = ""

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def encode(self, text: str) -> torch.Tensor:
        index = {ch: i for i, ch in enumerate(self.vocabulary)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"characters outside the vocabulary: {unknown[:10]}")
        return torch.tensor([index[ch] for ch in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.vocabulary[i] for i in ids.tolist())

    def loader(
        self,
        split: str = "train",
        batch_size: int = 32,
        block_size: int = 64,
        batches: int = 100,
        seed: int = 0,
    ) -> Iterator[Batch]:
        """``batches`` random windows for training; for the test split, consecutive windows covering it once."""
        ids = self.train_ids if split == "train" else self.test_ids
        if split == "train":
            generator = torch.Generator().manual_seed(seed)
            for _ in range(batches):
                starts = torch.randint(0, len(ids) - block_size - 1, (batch_size,), generator=generator)
                yield torch.stack([ids[s : s + block_size] for s in starts]), torch.stack([ids[s + 1 : s + block_size + 1] for s in starts])
            return
        windows = list(range(0, len(ids) - block_size - 1, block_size))[: batches * batch_size]
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            yield torch.stack([ids[s : s + block_size] for s in chunk]), torch.stack([ids[s + 1 : s + block_size + 1] for s in chunk])
