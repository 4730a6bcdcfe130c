"""CIFAR-10: the binary version, and the python version read through a restricted unpickler."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from torchslim.core.errors import TorchslimError
from torchslim.data.download import RemoteFile, default_root, fetch, verify

CIFAR_MIRRORS = ("https://www.cs.toronto.edu/~kriz",)
BINARY_ARCHIVE = RemoteFile("cifar-10-binary.tar.gz", CIFAR_MIRRORS, "c32a1d4ab5d03f1284b67883e8d87530")
PYTHON_ARCHIVE = RemoteFile("cifar-10-python.tar.gz", CIFAR_MIRRORS, "c58f30108f718f92721af3b95e74349a")
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
RECORD_BYTES = 1 + 3 * 32 * 32


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR python batch holds: plain containers and numpy array reconstruction."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # pickle's signature
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: not a type a CIFAR batch contains")


def restricted_load(data: bytes, name: str) -> dict:
    """Unpickle ``data`` admitting only CIFAR's types; anything else is an error naming the file."""
    try:
        batch = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as error:
        raise TorchslimError(f"{name}: {error}") from None
    except Exception as error:  # any malformed pickle
        raise TorchslimError(f"{name}: not a readable CIFAR python batch ({error})") from None
    if not isinstance(batch, dict):
        raise TorchslimError(f"{name}: expected a dict in a CIFAR python batch, found {type(batch).__name__}")
    return batch


def parse_python_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    batch = restricted_load(data, name)
    images = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(images, np.ndarray) or labels is None:
        raise TorchslimError(f"{name}: a CIFAR python batch needs 'data' (array) and 'labels'")
    images = images.reshape(-1, 3, 32, 32)
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels):
        raise TorchslimError(f"{name}: {len(images)} images but {len(labels)} labels")
    return images, labels


def parse_binary_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    if len(data) % RECORD_BYTES:
        raise TorchslimError(f"{name}: {len(data)} bytes is not a whole number of {RECORD_BYTES}-byte records (truncated?)")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def _read_members(folder_or_archive: Path, names: list[str]) -> dict[str, bytes]:
    if folder_or_archive.is_dir():
        out = {}
        for name in names:
            path = folder_or_archive / name
            if not path.is_file():
                raise TorchslimError(f"CIFAR-10: {path} is missing")
            out[name] = path.read_bytes()
        return out
    out = {}
    with tarfile.open(folder_or_archive, "r:gz") as archive:
        for member in archive.getmembers():
            base = os.path.basename(member.name)
            if member.isfile() and base in names:
                handle = archive.extractfile(member)
                if handle is not None:
                    out[base] = handle.read()
    missing = [n for n in names if n not in out]
    if missing:
        raise TorchslimError(f"CIFAR-10: {folder_or_archive} lacks {', '.join(missing)}")
    return out


def load_cifar10(root: str | os.PathLike[str] | None, download: bool, check: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read CIFAR-10 from an extracted folder or archive (binary or python version); download if allowed.
    ``check=False`` skips the archive's checksum."""
    base = Path(root).expanduser() if root is not None else default_root()
    searched = [base, base / "cifar10"]
    for folder in searched:
        for kind, extracted, archive in (
            ("binary", "cifar-10-batches-bin", BINARY_ARCHIVE),
            ("python", "cifar-10-batches-py", PYTHON_ARCHIVE),
        ):
            suffix = ".bin" if kind == "binary" else ""
            names = [n + suffix for n in TRAIN_BATCHES + TEST_BATCHES]
            source: Path | None = None
            if (folder / extracted).is_dir():
                source = folder / extracted
            elif (folder / archive.name).is_file():
                verify(folder / archive.name, archive, check=check)
                source = folder / archive.name
            if source is not None:
                return _cifar_splits(_read_members(source, names), kind, suffix)
    if not download:
        raise TorchslimError(
            f"CIFAR-10 not found; looked for cifar-10-batches-bin/, cifar-10-batches-py/ or their .tar.gz in "
            f"{', '.join(str(f) for f in searched)}. Put the files there, pass root=<folder> or set TORCHSLIM_DATA"
        )
    try:
        archive_path = fetch(BINARY_ARCHIVE, base / "cifar10")
    except TorchslimError as error:
        raise TorchslimError(
            f"CIFAR-10 not found in {', '.join(str(f) for f in searched)} and the download failed ({error}). "
            f"Put the files there, pass root=<folder> or set TORCHSLIM_DATA"
        ) from None
    names = [n + ".bin" for n in TRAIN_BATCHES + TEST_BATCHES]
    return _cifar_splits(_read_members(archive_path, names), "binary", ".bin")


def _cifar_splits(contents: dict[str, bytes], kind: str, suffix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    parse = parse_binary_batch if kind == "binary" else parse_python_batch
    splits = {}
    for split, names in (("train", TRAIN_BATCHES), ("test", TEST_BATCHES)):
        parts = [parse(contents[n + suffix], n + suffix) for n in names]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        splits[split] = (torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))
    return splits
