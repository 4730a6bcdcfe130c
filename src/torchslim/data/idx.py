"""MNIST and Fashion-MNIST in their original IDX format."""

from __future__ import annotations

import struct

import numpy as np
import torch

from torchslim.core.errors import TorchslimError
from torchslim.data.download import RemoteFile

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist",
    "https://yann.lecun.com/exdb/mnist",
)
FASHION_MIRRORS = ("https://fashion-mnist.s3-website.eu-central-1.amazonaws.com",)

# (file, MD5 of the canonical .gz, MD5 of the decompressed bytes)
MNIST_FILES = [
    RemoteFile("train-images-idx3-ubyte.gz", MNIST_MIRRORS, "f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
    RemoteFile("train-labels-idx1-ubyte.gz", MNIST_MIRRORS, "d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
    RemoteFile("t10k-images-idx3-ubyte.gz", MNIST_MIRRORS, "9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
    RemoteFile("t10k-labels-idx1-ubyte.gz", MNIST_MIRRORS, "ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
]
# Decompressed-content MD5s of Fashion-MNIST: the label files' were checked against the upstream .gz files; all four
# match Debian's dataset-fashion-mnist package, whose .gz files are re-compressed (so their own MD5s differ).
FASHION_FILES = [
    RemoteFile("train-images-idx3-ubyte.gz", FASHION_MIRRORS, "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    RemoteFile("train-labels-idx1-ubyte.gz", FASHION_MIRRORS, "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    RemoteFile("t10k-images-idx3-ubyte.gz", FASHION_MIRRORS, "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
    RemoteFile("t10k-labels-idx1-ubyte.gz", FASHION_MIRRORS, "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
]

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Parse an IDX file (magic 0x0000TTDD, big-endian dimension sizes, then the values)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise TorchslimError(f"{name}: not an IDX file (bad magic number)")
    type_code, dims = data[2], data[3]
    if type_code not in _DTYPES:
        raise TorchslimError(f"{name}: unknown IDX value type 0x{type_code:02x}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise TorchslimError(f"{name}: truncated IDX header")
    shape = struct.unpack(">" + "I" * dims, data[4:header])
    dtype: np.dtype = np.dtype(_DTYPES[type_code])  # type: ignore[call-overload]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise TorchslimError(f"{name}: IDX body holds {len(data) - header} bytes, shape {shape} needs {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def idx_splits(contents: dict[str, bytes]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images (N, 1, 28, 28), int64 labels (N,)) for the train and test splits."""
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = parse_idx(contents[f"{prefix}-images-idx3-ubyte.gz"], f"{prefix}-images")
        labels = parse_idx(contents[f"{prefix}-labels-idx1-ubyte.gz"], f"{prefix}-labels")
        if len(images) != len(labels):
            raise TorchslimError(f"{prefix}: {len(images)} images but {len(labels)} labels")
        splits[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return splits
