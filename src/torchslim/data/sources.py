"""Data as users have it, made into batches for training, evaluation and calibration.

``as_source(data)`` accepts:

- a torchslim ``Dataset`` / ``TextDataset`` (``torchslim.data.load``);
- any iterable of batches: a ``torch.utils.data.DataLoader``, a list, or a function returning a fresh iterable for
  each pass (a generator factory); batches may be tensors, ``(inputs, targets)`` tuples or mappings
  (``input_ids``, ``attention_mask``, ``labels``);
- a pair ``(inputs, targets)`` of tensors or NumPy arrays, or a single tensor / array of unlabeled inputs;
- a Hugging Face ``datasets.Dataset`` split (numeric columns; tokenize text first): one input column gives
  ``(inputs, labels)`` batches, several (``input_ids``, ``attention_mask``, ...) give mappings;
- a folder of images in class subfolders (see ``torchslim.data.folder``);
- ``Data(train=..., eval=...)`` to give separate training and evaluation data in any of these forms.

Labels are needed only where a task needs them: calibration, activation criteria, fidelity evaluation and
distillation without hard targets run on unlabeled batches.

Example:
    >>> import torch
    >>> source = as_source([(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))] * 3)
    >>> sum(1 for _ in source.batches("train")), tuple(source.example(2).shape)
    (3, (2, 3))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from torchslim.core.errors import TorchslimError
from torchslim.data.datasets import Dataset, Split, TensorLoader, TextDataset, batch_bounds
from torchslim.tasks.batches import TARGET_KEYS, KeyedBatch, batch_targets, example_of

SPLITS = ("train", "eval")


class DataSource:
    """Batches of a training split and an evaluation split, whatever the data was given as.

    ``batches(split, batch_size=, shuffle=, seed=, limit=)``: one pass over a split (``limit`` batches at most).
    Sources over in-memory data honour ``batch_size`` and ``shuffle``; a user's own loader yields its batches as
    they come (its batch size and shuffling are its own; ``fixed_batches`` says so). ``notes`` says what the source
    decided for the user (e.g. that evaluation reuses the training data).
    """

    kind = "batches"
    fixed_batches = False

    def __init__(self, description: str) -> None:
        self.description = description
        self.notes: list[str] = []
        self.separate_eval = True  # False: the evaluation split is the training data (none was given apart)

    def batches(
        self, split: str = "train", batch_size: int | None = None, shuffle: bool | None = None, seed: int = 0, limit: int | None = None
    ) -> Iterator[Any]:
        if split not in SPLITS:
            raise TorchslimError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        for count, batch in enumerate(self._batches(split, batch_size, shuffle, seed)):
            if limit is not None and count >= limit:
                return
            yield batch

    def _batches(self, split: str, batch_size: int | None, shuffle: bool | None, seed: int) -> Iterable[Any]:
        raise TorchslimError(f"{type(self).__name__} gives no batches")

    def first_batch(self, split: str = "eval") -> Any:
        for batch in self.batches(split, batch_size=8, shuffle=False, limit=1):
            return batch
        which = f"the {split} data" if getattr(self, "separate_eval", True) else "the data (no separate evaluation data was given)"
        raise TorchslimError(f"{self.description}: {which} gives no batches (an empty loader, list or split)")

    def example(self, count: int | None = 1) -> Any:
        """Model inputs of the first ``count`` examples of the evaluation data (for tracing, MACs, export)."""
        return example_of(self.first_batch("eval"), count)

    def has_targets(self) -> bool:
        return batch_targets(self.first_batch("train")) is not None

    def batches_per_epoch(self, batch_size: int | None) -> int | None:
        """Batches in one training pass, where known without iterating."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"data": self.description, "kind": self.kind, "notes": list(self.notes)}


class DatasetSource(DataSource):
    """A torchslim classification ``Dataset`` (in-memory tensors)."""

    kind = "classification"

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(f"{dataset.name} ({len(dataset.train):,} train / {len(dataset.test):,} test)")
        self.dataset = dataset

    def _batches(self, split: str, batch_size: int | None, shuffle: bool | None, seed: int) -> Iterable[Any]:
        name = "train" if split == "train" else "test"
        return self.dataset.loader(name, batch_size=batch_size or (128 if name == "train" else 1000), shuffle=shuffle, seed=seed)

    def example(self, count: int | None = 1) -> Any:
        return self.dataset.example_input(count or 1)

    def has_targets(self) -> bool:
        return True

    def batches_per_epoch(self, batch_size: int | None) -> int | None:
        return len(self.dataset.loader("train", batch_size=batch_size or 128))


class TextSource(DataSource):
    """Character text (``TextDataset``): random windows for training, consecutive windows for evaluation, as long
    as the model's context (``block_size``)."""

    kind = "text"

    def __init__(self, dataset: TextDataset, block_size: int = 64, train_batches: int = 200) -> None:
        super().__init__(f"{dataset.name} ({len(dataset.train_ids):,} / {len(dataset.test_ids):,} characters)")
        self.dataset, self.block_size, self.train_batches = dataset, block_size, train_batches

    def _batches(self, split: str, batch_size: int | None, shuffle: bool | None, seed: int) -> Iterable[Any]:
        if split == "train":
            return self.dataset.loader("train", batch_size=batch_size or 32, block_size=self.block_size, batches=self.train_batches, seed=seed)
        return self.dataset.loader("test", batch_size=batch_size or 64, block_size=self.block_size, batches=10**9)

    def example(self, count: int | None = 1) -> Any:
        return self.dataset.test_ids[: self.block_size].unsqueeze(0).expand(count or 1, -1).clone()

    def has_targets(self) -> bool:
        return True

    def batches_per_epoch(self, batch_size: int | None) -> int | None:
        return self.train_batches


class TensorSource(DataSource):
    """In-memory tensors or arrays: ``(inputs, targets)`` or unlabeled inputs; the evaluation split is given
    separately or, without one, the same tensors."""

    kind = "tensors"

    def __init__(self, train: Split | torch.Tensor, evaluation: Split | torch.Tensor | None = None) -> None:
        count = len(train) if isinstance(train, Split) else int(train.shape[0])
        super().__init__(f"tensors ({count:,} examples{'' if isinstance(train, Split) else ', unlabeled'})")
        self.train, self.evaluation = train, evaluation
        if evaluation is None:
            self.notes.append("no separate evaluation data: metrics are measured on the training tensors")
            self.separate_eval = False

    def _batches(self, split: str, batch_size: int | None, shuffle: bool | None, seed: int) -> Iterable[Any]:
        data = self.train if split == "train" or self.evaluation is None else self.evaluation
        is_train = split == "train"
        size = batch_size or (128 if is_train else 1000)
        if isinstance(data, Split):
            return TensorLoader(data, batch_size=size, shuffle=is_train if shuffle is None else shuffle, seed=seed)
        return _unlabeled(data, size, is_train if shuffle is None else shuffle, seed)

    def batches_per_epoch(self, batch_size: int | None) -> int | None:
        count = len(self.train) if isinstance(self.train, Split) else int(self.train.shape[0])
        return len(batch_bounds(count, batch_size or 128))


def _unlabeled(inputs: torch.Tensor, batch_size: int, shuffle: bool, seed: int) -> Iterator[torch.Tensor]:
    order = torch.randperm(inputs.shape[0], generator=torch.Generator().manual_seed(seed)) if shuffle else None
    for start, stop in batch_bounds(inputs.shape[0], batch_size):
        yield inputs[start:stop] if order is None else inputs[order[start:stop]]


class LoaderSource(DataSource):
    """A user's iterables of batches (DataLoader, list, generator factory), one for training and optionally one for
    evaluation. Each pass calls a factory anew or iterates the iterable again; a one-shot generator is refused,
    since fine-tuning and evaluation need more than one pass."""

    kind = "batches"
    fixed_batches = True

    def __init__(self, train: Any, evaluation: Any = None, description: str | None = None) -> None:
        super().__init__(description or _describe(train))
        self.kind = "text" if getattr(train, "kind", None) == "text" else "batches"  # token windows are text
        self.loader = train  # the user's own object (a DataLoader whose DistributedSampler shards it already)
        self.train, self.evaluation = _reiterable(train, "data"), (_reiterable(evaluation, "eval data") if evaluation is not None else None)
        if evaluation is None:
            self.notes.append("no separate evaluation data: metrics are measured on the training batches")
            self.separate_eval = False

    def _batches(self, split: str, batch_size: int | None, shuffle: bool | None, seed: int) -> Iterable[Any]:
        source = self.train if split == "train" or self.evaluation is None else self.evaluation
        return _seeded(source, seed)

    def batches_per_epoch(self, batch_size: int | None) -> int | None:
        try:
            return len(self.train())  # type: ignore[arg-type]
        except TypeError:
            return None


def _seeded(source: Callable[[], Iterable[Any]], seed: int) -> Iterator[Any]:
    """One pass over a user's batches with torch's CPU generator at ``seed`` while the pass starts (the factory
    called and the first batch drawn): a shuffling DataLoader (one without its own ``generator``) draws its order
    from it then, so two passes with one seed (every evaluation; a training epoch run again) see the same examples in
    the same order. The caller's generator is left as it was, and no device generator is touched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        iterator = iter(source())
        first = next(iterator, _END)
    if first is _END:
        return
    yield first
    yield from iterator


_END = object()


def _describe(data: Any) -> str:
    name = type(data).__name__
    try:
        return f"{name} of {len(data):,} batches"
    except TypeError:
        return name


def _reiterable(data: Any, where: str) -> Callable[[], Iterable[Any]]:
    if callable(data) and not isinstance(data, (torch.Tensor, Iterable)):

        def fresh() -> Iterable[Any]:
            produced = data()
            if not isinstance(produced, Iterable):
                raise TorchslimError(f"{where}: the batch factory returned {type(produced).__name__}, not an iterable of batches")
            return produced

        return fresh
    if isinstance(data, Iterator):
        raise TorchslimError(
            f"{where}: a generator can be read only once; pass a list, a DataLoader, or a function that returns a fresh generator for each pass"
        )
    if not isinstance(data, Iterable):
        raise TorchslimError(f"{where}: expected batches (a DataLoader, a list, a generator factory), got {type(data).__name__}")
    return lambda: data


class TorchDatasetSource(DataSource):
    """A map-style torch ``Dataset`` of single examples, batched by a DataLoader at the batch size a step asks for
    (``batch_size`` where it asks for none), shuffled for training with the pass's seed, in order for evaluation."""

    kind = "batches"

    def __init__(self, dataset: Any, batch_size: int = 64) -> None:
        super().__init__(f"{type(dataset).__name__} ({len(dataset):,} examples)")
        self.dataset, self.batch_size = dataset, batch_size
        self.notes.append("no separate evaluation data: metrics are measured on the training examples")
        self.separate_eval = False

    def _batches(self, split: str, batch_size: int | None, shuffle: bool | None, seed: int) -> Iterable[Any]:
        shuffled = split == "train" if shuffle is None else shuffle
        generator = torch.Generator().manual_seed(seed)
        size = batch_size or self.batch_size
        lone = split == "train" and len(self.dataset) % size == 1 and len(self.dataset) > 1  # batch normalization cannot train on one example
        return torch.utils.data.DataLoader(self.dataset, batch_size=size, shuffle=shuffled, generator=generator, drop_last=lone)

    def batches_per_epoch(self, batch_size: int | None) -> int | None:
        return len(batch_bounds(len(self.dataset), batch_size or self.batch_size))


class CombinedSource(DataSource):
    """Training batches from one source, evaluation batches from another."""

    def __init__(self, train: DataSource, evaluation: DataSource) -> None:
        super().__init__(f"train: {train.description}; eval: {evaluation.description}")
        self.train, self.evaluation = train, evaluation
        self.kind = train.kind
        self.fixed_batches = train.fixed_batches
        self.notes = [n for n in train.notes + evaluation.notes if not n.startswith("no separate evaluation data")]

    def _batches(self, split: str, batch_size: int | None, shuffle: bool | None, seed: int) -> Iterable[Any]:
        return (self.train if split == "train" else self.evaluation).batches("train", batch_size, shuffle, seed)

    def example(self, count: int | None = 1) -> Any:
        return self.evaluation.example(count)

    def batches_per_epoch(self, batch_size: int | None) -> int | None:
        return self.train.batches_per_epoch(batch_size)


class KeyedTargets(DataSource):
    """Mapping batches whose targets are under the user's own key (``{"image": x, "mask": y}``): each batch is read
    as a ``KeyedBatch``, whose entry under that key is the targets and never passed to the model (a task of the
    user's still finds it under its own key)."""

    def __init__(self, inner: DataSource, key: str) -> None:
        super().__init__(f"{inner.description}; targets under {key!r}")
        self.inner, self.key = inner, key
        self.kind, self.fixed_batches, self.notes, self.separate_eval = inner.kind, inner.fixed_batches, list(inner.notes), inner.separate_eval

    def _batches(self, split: str, batch_size: int | None, shuffle: bool | None, seed: int) -> Iterable[Any]:
        return (self._renamed(batch) for batch in self.inner.batches(split, batch_size, shuffle, seed))

    def _renamed(self, batch: Any) -> Any:
        where = f"Data(targets={self.key!r})"
        if not isinstance(batch, Mapping):
            raise TorchslimError(f"{where} names a key of mapping batches, but a batch is a {type(batch).__name__}")
        if self.key not in batch:
            raise TorchslimError(f"{where}: a batch has no {self.key!r} (its keys: {', '.join(map(repr, batch))})")
        others = [key for key in TARGET_KEYS if key in batch and key != self.key]
        if others:
            raise TorchslimError(f"{where}: a batch has targets under {others[0]!r} as well; name one key for the targets")
        return KeyedBatch(batch, self.key)

    def batches_per_epoch(self, batch_size: int | None) -> int | None:
        return self.inner.batches_per_epoch(batch_size)


@dataclasses.dataclass
class Data:
    """Separate training and evaluation data, each in any form ``as_source`` takes; ``targets`` names the key of
    mapping batches that holds the targets, where it is not one of ``labels``, ``label``, ``targets``, ``target``.

    Example:
        >>> import torch
        >>> source = as_source(Data(train=(torch.randn(8, 2), torch.zeros(8, dtype=torch.long)), eval=torch.randn(4, 2)))
        >>> tuple(source.example(4).shape)
        (4, 2)
    """

    train: Any
    eval: Any = None
    targets: str | None = None


def _tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return None
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return None


def _as_tensors(value: Any) -> Split | torch.Tensor | None:
    single = _tensor(value)
    if single is not None:
        return single.float() if single.dtype == torch.float64 else single
    if isinstance(value, tuple) and len(value) == 2:
        inputs, targets = _tensor(value[0]), _tensor(value[1])
        if inputs is not None and targets is not None:
            if inputs.shape[0] != targets.shape[0]:
                raise TorchslimError(f"data: {inputs.shape[0]} inputs but {targets.shape[0]} targets")
            return Split(inputs.float() if inputs.dtype == torch.float64 else inputs, targets)
    return None


def _hf_dataset(value: Any) -> bool:
    return type(value).__module__.startswith("datasets.") and hasattr(value, "with_format") and hasattr(value, "column_names")


def _hf_batches(dataset: Any, batch_size: int) -> Callable[[], Iterator[Any]]:
    first = dataset[0] if len(dataset) else {}

    def textual(value: Any) -> bool:
        while isinstance(value, (list, tuple)) and value:
            value = value[0]
        return isinstance(value, str)

    columns = [c for c in dataset.column_names if not textual(first.get(c))]
    skipped = sorted(set(dataset.column_names) - set(columns))
    if not columns:
        raise TorchslimError(f"Hugging Face dataset: no numeric columns (found {dataset.column_names}); tokenize the text first")
    formatted = dataset.with_format("torch", columns=columns)

    inputs = [c for c in columns if c not in TARGET_KEYS]
    target = next((c for c in columns if c in TARGET_KEYS), None)

    def batches() -> Iterator[Any]:
        for start in range(0, len(formatted), batch_size):
            batch = formatted[start : start + batch_size]
            if len(inputs) == 1:  # one input column: (inputs, labels) as a plain model's forward(x) takes it
                yield (batch[inputs[0]], batch[target]) if target is not None else batch[inputs[0]]
            else:  # several (input_ids, attention_mask, ...): keyword arguments of forward, labels apart
                yield {("labels" if key == "label" else key): value for key, value in batch.items()}

    batches.skipped = skipped  # type: ignore[attr-defined]
    return batches


def as_source(data: Any, model: Any = None, batch_size: int = 64) -> DataSource:
    """A ``DataSource`` over ``data`` in any of the forms listed in this module's docstring. ``model`` sets the
    window length of text data (its ``block_size``); ``batch_size`` the batches of a Hugging Face dataset."""
    if isinstance(data, DataSource):
        return data
    if data is None:
        raise TorchslimError("this step needs data: pass data=... (a DataLoader, a list of batches, tensors, a dataset)")
    if isinstance(data, Data):
        if data.targets is not None:
            return KeyedTargets(as_source(dataclasses.replace(data, targets=None), model, batch_size), data.targets)
        if data.eval is None:
            return as_source(data.train, model, batch_size)
        return CombinedSource(as_source(data.train, model, batch_size), as_source(data.eval, model, batch_size))
    if isinstance(data, Dataset):
        return DatasetSource(data)
    if isinstance(data, TextDataset):
        return TextSource(data, block_size=int(getattr(model, "block_size", 64) or 64))
    if isinstance(data, (str, os.PathLike)):
        from torchslim.data.folder import image_folder

        return DatasetSource(image_folder(Path(data)))
    tensors = _as_tensors(data)
    if tensors is not None:
        return TensorSource(tensors)
    if _hf_dataset(data):
        factory = _hf_batches(data, batch_size)
        source = LoaderSource(factory, description=f"Hugging Face dataset ({len(data):,} rows, batches of {batch_size})")
        if factory.skipped:  # type: ignore[attr-defined]
            source.notes.append(f"text columns left out of the batches: {', '.join(factory.skipped)}")  # type: ignore[attr-defined]
        return source
    if isinstance(data, Mapping):
        raise TorchslimError("data: a single mapping is one batch; pass a list of batches or a DataLoader")
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset) and hasattr(data, "__len__"):
        return TorchDatasetSource(data, batch_size)  # a torch Dataset of single examples (a TensorDataset, the user's own)
    return LoaderSource(data)


__all__ = [
    "CombinedSource",
    "Data",
    "DataSource",
    "DatasetSource",
    "KeyedTargets",
    "LoaderSource",
    "TensorSource",
    "TextSource",
    "TorchDatasetSource",
    "as_source",
]
