import io
import os
import pickle
import tarfile

import numpy as np
import pytest

import torchslim as ts
from torchslim.core.errors import TorchslimError
from torchslim.data.cifar import RECORD_BYTES, restricted_load


def _python_batch(images: np.ndarray, labels: list[int]) -> bytes:
    return pickle.dumps({b"batch_label": b"x", b"labels": labels, b"data": images.reshape(len(labels), -1)}, protocol=2)


def _binary_batch(images: np.ndarray, labels: list[int]) -> bytes:
    records = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], images.reshape(len(labels), -1)], axis=1)
    return records.astype(np.uint8).tobytes()


def _names():
    return [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8), [3, 1, 4, 1]


def test_binary_version_from_folder(tmp_path, images):
    pixels, labels = images
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name in _names():
        (folder / f"{name}.bin").write_bytes(_binary_batch(pixels, labels))
    data = ts.data.load("cifar10", root=tmp_path, download=False)
    assert len(data.train) == 20 and len(data.test) == 4
    assert data.input_shape == (3, 32, 32)
    assert data.test.targets.tolist() == labels
    # the first pixel of the first image, normalized with CIFAR's red-channel statistics
    expected = (pixels[0, 0, 0, 0] / 255 - 0.4914) / 0.2470
    assert abs(data.test.inputs[0, 0, 0, 0].item() - expected) < 1e-5


def test_python_version_from_archive(tmp_path, images):
    pixels, labels = images
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in _names():
            payload = _python_batch(pixels, labels)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    # the archive's checksum is the canonical one's: ours differs, so it must be refused
    with pytest.raises(TorchslimError, match="checksum mismatch"):
        ts.data.load("cifar10", root=tmp_path, download=False)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    os.remove(archive)
    for name in _names():
        (folder / name).write_bytes(_python_batch(pixels, labels))
    data = ts.data.load("cifar10", root=tmp_path, download=False)
    assert data.train.targets.tolist() == labels * 5


def test_restricted_unpickler_refuses_code():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    with pytest.raises(TorchslimError, match="refused to load .*system"):
        restricted_load(pickle.dumps({b"data": Evil()}), "data_batch_1")


def test_truncated_binary_batch(tmp_path, images):
    pixels, labels = images
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name in _names():
        (folder / f"{name}.bin").write_bytes(_binary_batch(pixels, labels)[: RECORD_BYTES * 2 + 7])
    with pytest.raises(TorchslimError, match="data_batch_1.bin: .*truncated"):
        ts.data.load("cifar10", root=tmp_path, download=False)


def test_embedded_sets_offline():
    digits = ts.data.load("digits")
    assert (len(digits.train), len(digits.test)) == (1438, 359) and digits.input_shape == (1, 8, 8)
    sample = ts.data.load("mnist-sample")
    assert (len(sample.train), len(sample.test)) == (4000, 1000) and sample.input_shape == (1, 28, 28)
    assert sorted(sample.train.targets.unique().tolist()) == list(range(10))
