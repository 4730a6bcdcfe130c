"""Data as users have it: DataLoaders, lists, generator factories, tensors and arrays, dict batches, Hugging Face
datasets, image folders, unlabeled data; the built-in sets with the user's preprocessing and their own files."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import torchslim as ts
from tests.conftest import shared_data_or_skip
from torchslim.data.sources import CombinedSource, DatasetSource, LoaderSource, TensorSource, as_source


def _loader(split, batch_size=64, shuffle=False):
    return DataLoader(TensorDataset(split.inputs, split.targets), batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def test_a_dataloader_trains_as_the_in_memory_set_does(digits):
    """A user's DataLoaders over the same real digits: training and evaluation go through the same task."""
    data = ts.Data(train=_loader(digits.train, shuffle=True), eval=_loader(digits.test, 256))
    torch.manual_seed(0)
    from_loader = ts.train(ts.models.create_for("lenet-300-100", digits), data, {"epochs": 4, "batch_size": 64}, progress=False)
    torch.manual_seed(0)
    from_memory = ts.train(ts.models.create_for("lenet-300-100", digits), digits, {"epochs": 4, "batch_size": 64}, progress=False)
    a, b = from_loader.report.stages[0].metrics, from_memory.report.stages[0].metrics
    assert a["examples"] == b["examples"] == len(digits.test)
    assert a["accuracy"] > 0.85 and abs(a["accuracy"] - b["accuracy"]) < 0.05


def test_a_shuffling_dataloader_gives_one_order_per_seed_and_leaves_the_callers_generator_alone(digits):
    """Every evaluation of a sensitivity sweep reads the same examples from a user's shuffling DataLoader (one seed,
    one order); another seed, another order; the caller's global generator is where it was."""
    loader = DataLoader(TensorDataset(digits.train.inputs[:512], digits.train.targets[:512]), batch_size=64, shuffle=True)
    source = as_source(loader)

    def first_targets(seed):
        return torch.cat([targets for _, targets in source.batches("train", seed=seed, limit=2)])

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    once, again, other = first_targets(5), first_targets(5), first_targets(6)
    assert torch.equal(once, again) and not torch.equal(once, other)
    assert torch.equal(torch.rand(3), expected_next)
    assert sum(len(targets) for _, targets in source.batches("train", seed=5)) == 512  # the whole pass, nothing lost


def test_forms_of_data_become_sources(digits):
    x, y = digits.train.inputs[:100], digits.train.targets[:100]
    assert isinstance(as_source(digits), DatasetSource)
    assert isinstance(as_source((x, y)), TensorSource) and as_source((x, y)).has_targets()
    assert isinstance(as_source((x.numpy().astype(np.float64), y.numpy())), TensorSource)
    unlabeled = as_source(x)
    assert not unlabeled.has_targets() and tuple(unlabeled.example(3).shape) == (3, 1, 8, 8)
    listed = as_source([(x[:50], y[:50]), (x[50:], y[50:])])
    assert isinstance(listed, LoaderSource) and sum(1 for _ in listed.batches("train")) == 2 and listed.notes
    factory = as_source(lambda: ((x[i : i + 25], y[i : i + 25]) for i in range(0, 100, 25)))
    assert [len(b[1]) for b in factory.batches("train")] == [25] * 4 == [len(b[1]) for b in factory.batches("train")]
    combined = as_source(ts.Data(train=(x, y), eval=[(x[:10], y[:10])]))
    assert isinstance(combined, CombinedSource) and sum(len(b[1]) for b in combined.batches("eval")) == 10
    with pytest.raises(ts.TorchslimError, match="a generator can be read only once"):
        as_source(batch for batch in [(x, y)])
    with pytest.raises(ts.TorchslimError, match="a generator can be read only once"):
        ts.train(ts.models.create("lenet-300-100", in_features=64), (b for b in [(x, y)]), {"epochs": 1})
    model = ts.models.create("lenet-300-100", in_features=64)
    once = ts.evaluate(model, ((x[i : i + 25], y[i : i + 25]) for i in range(0, 100, 25)))  # evaluation reads it once
    whole = ts.evaluate(model, (x[:100], y[:100]))
    assert once["examples"] == 100 and once["accuracy"] == whole["accuracy"] and once["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    with pytest.raises(ts.TorchslimError, match="3 inputs but 2 targets"):
        as_source((x[:3], y[:2]))
    with pytest.raises(ts.TorchslimError, match="this step needs data"):
        as_source(None)


def test_dict_batches_reach_the_model_as_keywords():
    class Keywords(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(10, 8), torch.nn.Linear(8, 3)

        def forward(self, input_ids, attention_mask):
            hidden = self.embed(input_ids) * attention_mask.unsqueeze(-1)
            return self.head(hidden.sum(1) / attention_mask.sum(1, keepdim=True))

    torch.manual_seed(0)
    ids = torch.randint(0, 10, (64, 7))
    labels = (ids[:, 0] % 3).long()
    batches = [{"input_ids": ids[i : i + 16], "attention_mask": torch.ones(16, 7, dtype=torch.long), "labels": labels[i : i + 16]} for i in range(0, 64, 16)]
    result = ts.train(Keywords(), batches, {"epochs": 20, "lr": 0.1}, progress=False)
    assert result.report.stages[0].metrics["accuracy"] > 0.6


def test_hugging_face_datasets_split():
    datasets = pytest.importorskip("datasets")
    digits = ts.data.load("digits")
    table = datasets.Dataset.from_dict(
        {"pixels": digits.train.inputs.reshape(-1, 64).tolist(), "label": digits.train.targets.tolist(), "name": ["digit"] * len(digits.train)}
    )
    source = as_source(table, batch_size=128)
    inputs, labels = next(iter(source.batches("train")))
    assert inputs.shape == (128, 64) and labels.dtype == torch.long
    assert any("name" in note for note in source.notes)  # the text column is named, not silently dropped
    model = ts.train(ts.models.create("mlp", in_features=64, hidden=(32,)), table, {"epochs": 5}, progress=False).model
    assert ts.evaluate(model, digits)["accuracy"] > 0.8
    tokenized = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]] * 4, "attention_mask": [[1, 1, 0]] * 4, "label": [0, 1, 0, 1]})
    batch = next(iter(as_source(tokenized, batch_size=2).batches("train")))
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]


def test_image_folder_with_the_users_normalization(tmp_path):
    """Real digits written as PNG files in class folders, read back with pixels / 255 and no mean subtraction."""
    from PIL import Image

    digits = ts.data.load("digits", normalize=None)
    for split, part in (("train", digits.train), ("test", digits.test)):
        for index, (image, label) in enumerate(zip(part.inputs[:200], part.targets[:200])):
            folder = tmp_path / split / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image[0] * 255).round().byte().numpy()).save(folder / f"{index}.png")
    data = ts.data.load(tmp_path, normalize=None)
    assert data.classes == tuple(str(i) for i in range(10)) and len(data.train) == 200 and data.input_shape == (1, 8, 8)
    assert float(data.train.inputs.min()) >= 0.0 and float(data.train.inputs.max()) <= 1.0
    assert torch.allclose(data.train.inputs.sort(0).values.mean(), digits.train.inputs[:200].sort(0).values.mean(), atol=1e-3)
    # the default, as for a named set, is the folder's own statistics (it did no standardization at all)
    own = ts.data.load(tmp_path)
    raw = data.train.inputs
    assert own.mean == (round(float(raw.mean()), 4),) and own.std == (round(float(raw.std()), 4),)
    assert abs(float(own.train.inputs.mean())) < 1e-3 and float(own.train.inputs.std()) == pytest.approx(1.0, abs=1e-3)
    (tmp_path / "test" / "3" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ts.TorchslimError, match="broken.png: not a readable image"):
        ts.data.load(tmp_path)


def test_builtin_sets_take_the_users_preprocessing():
    caffe = ts.data.load("mnist-sample", normalize=None, scale=1 / 256)  # a Caffe LeNet's inputs
    assert float(caffe.train.inputs.max()) == 255 / 256 and float(caffe.train.inputs.min()) == 0.0
    own = ts.data.load("mnist-sample", normalize=((0.5,), (0.5,)))
    assert float(own.train.inputs.min()) == -1.0
    assert caffe.describe()["preprocessing"] == {"scale": 1 / 256, "mean": None, "std": None}
    with pytest.raises(ts.TorchslimError, match="normalize must be"):
        ts.data.load("mnist-sample", normalize="imagenet")


def test_recompressed_files_pass_and_own_copies_load_unverified(tmp_path):
    """Re-compressed .gz files (as Debian ships Fashion-MNIST) pass on their decompressed content; a user's own
    altered copy is refused, then accepted with verify=False, and the report says it was not verified."""
    source = shared_data_or_skip("mnist")
    for path in source.glob("*.gz"):
        with gzip.open(tmp_path / path.name, "wb", compresslevel=1) as handle:
            handle.write(gzip.decompress(path.read_bytes()))
        assert (tmp_path / path.name).read_bytes() != path.read_bytes()
    data = ts.data.load("mnist", root=tmp_path, download=False)
    assert len(data.train) == 60000 and all("MD5 verified" in check for check in data.checks)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10  # the user relabelled one image
    labels.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ts.TorchslimError, match="checksum mismatch.*verify=False"):
        ts.data.load("mnist", root=tmp_path, download=False)
    own = ts.data.load("mnist", root=tmp_path, download=False, verify=False)
    assert any("NOT verified" in check for check in own.checks)
    shutil.rmtree(tmp_path)


def _batch_norm_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def test_no_training_batch_of_one_example_from_torchslims_batching():
    """257 examples in batches of 128 left one example over: batch normalization failed with torch's bare error."""
    from torchslim.data.datasets import batch_bounds

    assert batch_bounds(257, 128) == [(0, 128), (128, 257)] and batch_bounds(256, 128) == [(0, 128), (128, 256)]
    assert batch_bounds(1, 128) == [(0, 1)] and batch_bounds(257, 128, drop_last=True) == [(0, 128), (128, 256)]
    x, y = torch.randn(257, 8), torch.randint(0, 3, (257,))
    config = {"epochs": 1, "batch_size": 128, "eval_every_epoch": False}
    for data in ((x, y), TensorDataset(x, y), x):
        sizes = [len(b[0]) if isinstance(b, (tuple, list)) else len(b) for b in as_source(data).batches("train", batch_size=128)]
        assert 1 not in sizes and sum(sizes) >= 256, (type(data).__name__, sizes)
    ts.train(_batch_norm_net(), (x, y), config, progress=False)
    ts.train(_batch_norm_net(), TensorDataset(x, y), config, progress=False)


def test_a_users_loader_with_a_lone_last_example_is_told_what_to_change():
    x, y = torch.randn(257, 8), torch.randint(0, 3, (257,))
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    with pytest.raises(ts.TorchslimError, match=r"train: a training batch of one example at epoch 1, step 2.*drop_last=True"):
        ts.train(_batch_norm_net(), loader, {"epochs": 1, "eval_every_epoch": False}, progress=False)
