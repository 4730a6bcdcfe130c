import gzip
import shutil
import struct

import numpy as np
import pytest

import torchslim as ts
from tests.conftest import shared_data_or_skip
from torchslim.core.errors import ChecksumError, TorchslimError
from torchslim.data.idx import parse_idx


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_parse_idx_round_trip_and_errors():
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(_idx(array)), array)
    with pytest.raises(TorchslimError, match="bad magic"):
        parse_idx(b"\x01\x00\x08\x01")
    with pytest.raises(TorchslimError, match="IDX body holds"):
        parse_idx(_idx(array)[:-1], "x")


def test_full_mnist_loads_with_checksums(mnist):
    assert (len(mnist.train), len(mnist.test)) == (60000, 10000)
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10
    assert mnist.train.targets.bincount().tolist()[1] == 6742  # the canonical count of ones in MNIST's train set
    # normalized with MNIST's mean and std
    assert abs(mnist.train.inputs.mean().item()) < 0.01
    assert abs(mnist.train.inputs.std().item() - 1) < 0.01


def test_corrupt_file_fails_its_checksum_naming_it(tmp_path):
    source = shared_data_or_skip("mnist")
    for path in source.glob("*.gz"):
        shutil.copy(path, tmp_path / path.name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[100] ^= 1
    labels.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        ts.data.load("mnist", root=tmp_path, download=False)


def test_truncated_file_is_reported(tmp_path):
    source = shared_data_or_skip("mnist")
    for path in source.glob("*.gz"):
        shutil.copy(path, tmp_path / path.name)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:5000])
    with pytest.raises(ChecksumError, match="t10k-images-idx3-ubyte.gz: corrupt or truncated"):
        ts.data.load("mnist", root=tmp_path, download=False)


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(TorchslimError, match=rf"not found; looked in {tmp_path}.*TORCHSLIM_DATA"):
        ts.data.load("mnist", root=tmp_path, download=False)


def test_environment_variable_root(monkeypatch):
    folder = shared_data_or_skip("mnist")
    monkeypatch.setenv("TORCHSLIM_DATA", str(folder.parent))
    data = ts.data.load("mnist", download=False)
    assert len(data.test) == 10000


def test_unknown_dataset_lists_valid_ones():
    with pytest.raises(TorchslimError, match=r"unknown dataset 'imagenet'; valid datasets: .*mnist"):
        ts.data.load("imagenet")


def test_loader_shuffles_reproducibly(mnist_small):
    first = next(iter(mnist_small.loader("train", batch_size=32, seed=3)))[1]
    again = next(iter(mnist_small.loader("train", batch_size=32, seed=3)))[1]
    other = next(iter(mnist_small.loader("train", batch_size=32, seed=4)))[1]
    assert first.tolist() == again.tolist()
    assert first.tolist() != other.tolist()
    batches = list(mnist_small.loader("test", batch_size=300))
    assert sum(len(t) for _, t in batches) == 2000 and len(batches) == 7


def test_shakespeare_text():
    folder = shared_data_or_skip("text")
    text = ts.data.load("shakespeare", root=folder, download=False)
    assert len(text.train_ids) + len(text.test_ids) == 1115394
    assert text.vocab_size == 65
    inputs, targets = next(iter(text.loader("train", batch_size=4, block_size=16, batches=1)))
    assert inputs.shape == (4, 16) and (inputs[:, 1:] == targets[:, :-1]).all()
    assert text.decode(text.encode("ROMEO:")) == "ROMEO:"
