import os

import pytest
import torch

import torchslim as ts
from torchslim.codec import encode_model, encoded_size, inspect_tslim, load_tslim, read_tslim, save_tslim
from torchslim.codec.tslim import PREAMBLE
from torchslim.core.errors import ChecksumError, TorchslimError
from torchslim.pruning import prune_in_place
from torchslim.pruning.unstructured import PruneConfig


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def _pruned(name: str, sparsity: float = 0.9, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ts.models.create(name, **kwargs)
    prune_in_place(model, PruneConfig(importance="l1", scope="global", sparsity=sparsity))
    ts.make_permanent(model)
    return model


@pytest.mark.parametrize(
    "scheme",
    [
        {"scheme": "kmeans", "bits": 5},
        {"scheme": "kmeans", "bits": 8},
        {"scheme": "uniform", "bits": 4, "granularity": "group", "group_size": 25},
        {"scheme": "uniform", "bits": 12},
        {"scheme": "pow2", "bits": 4},
        {"scheme": "ternary"},
        {"scheme": "fp16"},
    ],
)
def test_quantized_lenet5_round_trips_exactly(tmp_path, scheme):
    model = ts.quantize(_pruned("lenet-5"), {"weights": scheme}).model
    path = tmp_path / "m.tslim"
    summary = save_tslim(model, path)
    assert summary.bytes == path.stat().st_size
    loaded = ts.load(path)  # dispatches on the .tslim format
    assert _states_equal(model, loaded)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model.eval()(x), loaded(x))


def test_resnet20_with_batchnorm_buffers_round_trips(tmp_path):
    model = _pruned("resnet20", 0.7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.num_batches_tracked += 7
    path = tmp_path / "r.tslim"
    save_tslim(model, path)
    loaded = load_tslim(path)
    assert _states_equal(model, loaded)
    assert loaded.bn1.num_batches_tracked.dtype == torch.int64 and int(loaded.bn1.num_batches_tracked) == 7
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), loaded(x))


def test_masked_model_stores_its_effective_weights(tmp_path):
    torch.manual_seed(0)
    model = ts.models.create("lenet-300-100")
    prune_in_place(model, PruneConfig(importance="l1", scope="global", sparsity=0.9))  # masks still attached
    path = tmp_path / "m.tslim"
    save_tslim(model, path)
    loaded = ts.load(path)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert int(torch.count_nonzero(loaded.fc1.weight)) == int(torch.count_nonzero(model.fc1.weight))


def test_sizes_shrink_with_sparsity_codebooks_and_entropy_coding():
    dense = ts.models.create("lenet-300-100")
    pruned = _pruned("lenet-300-100", 0.92)
    quantized = ts.quantize(pruned, {"weights": {"scheme": "kmeans", "bits": 5}}).model
    dense_bytes = 266_610 * 4
    assert encoded_size(dense) == pytest.approx(dense_bytes, rel=0.01)  # dense floats stay raw, plus a small header
    pruned_bytes = encoded_size(pruned, ("packed",))
    quantized_bytes = encoded_size(quantized, ("packed",))
    coded_bytes = encoded_size(quantized)
    nonzeros = 21_329 + 0  # about 8% of the 266,200 weights, plus biases
    assert pruned_bytes < dense_bytes / 8
    assert quantized_bytes < pruned_bytes / 3
    assert coded_bytes < quantized_bytes
    assert coded_bytes < nonzeros * 11 / 8  # under 11 bits (5-bit code + index) per non-zero weight


def test_inspect_accounts_for_every_byte(tmp_path):
    model = ts.quantize(_pruned("lenet-300-100"), {"weights": {"scheme": "kmeans", "bits": 4}}).model
    path = tmp_path / "m.tslim"
    save_tslim(model, path, metadata={"note": "x"})
    info = inspect_tslim(path)
    assert info["header_bytes"] + sum(row["bytes"] for row in info["tensors"]) == path.stat().st_size
    assert info["metadata"] == {"note": "x"}
    fc1 = next(row for row in info["tensors"] if row["name"] == "fc1.quantized.packed")
    # at 90% zeros an ANS-coded dense stream and sparse streams cost about the same; the smaller one is kept
    assert fc1["encoding"] in ("symbols", "sparse-symbols") and fc1["bits"] == 4
    for stream in fc1["streams"]:
        # a coded stream is never smaller than its order-0 entropy bound, and its tables cost little
        assert stream["entropy_bytes"] <= stream["bytes"] <= stream["entropy_bytes"] * 1.1 + 300


def test_sparse_storage_is_chosen_when_codes_are_fixed_width(tmp_path):
    model = ts.quantize(_pruned("lenet-300-100"), {"weights": {"scheme": "kmeans", "bits": 4}}).model
    path = tmp_path / "m.tslim"
    save_tslim(model, path, coders=("packed",))
    fc1 = next(row for row in inspect_tslim(path)["tensors"] if row["name"] == "fc1.quantized.packed")
    assert fc1["encoding"] == "sparse-symbols" and 1 <= fc1["index_bits"] <= 8
    assert fc1["bytes"] < 235_200 * 4 / 8 / 2  # less than half of the dense 4-bit codes
    assert _states_equal(model, ts.load(path))


def test_corrupt_and_truncated_files_fail_with_checksum_errors(tmp_path):
    model = ts.quantize(_pruned("lenet-300-100"), {"weights": {"scheme": "kmeans", "bits": 5}}).model
    path = tmp_path / "m.tslim"
    save_tslim(model, path)
    data = path.read_bytes()
    header_length = PREAMBLE.unpack_from(data)[2]
    for position in (PREAMBLE.size + 3, PREAMBLE.size + header_length + 10, len(data) - 1):
        corrupt = bytearray(data)
        corrupt[position] ^= 0x40
        (tmp_path / "bad.tslim").write_bytes(bytes(corrupt))
        with pytest.raises(ChecksumError):
            ts.load(tmp_path / "bad.tslim")
    for length in (3, PREAMBLE.size + 5, len(data) - 100):
        (tmp_path / "short.tslim").write_bytes(data[:length])
        with pytest.raises(ChecksumError):
            read_tslim(tmp_path / "short.tslim")
    (tmp_path / "other.tslim").write_bytes(b"PK\x03\x04 not a tslim file at all")
    with pytest.raises(ChecksumError, match="not a .tslim file"):
        ts.load(tmp_path / "other.tslim")


def test_writes_are_atomic_and_never_overwrite_unasked(tmp_path, monkeypatch):
    model = _pruned("lenet-300-100")
    path = tmp_path / "m.tslim"
    save_tslim(model, path)
    before = path.read_bytes()
    with pytest.raises(TorchslimError, match="refusing to overwrite"):
        save_tslim(model, path, overwrite=False)
    # a failure in the middle of writing leaves the old file and no temporary behind
    import torchslim.core.report as report_module

    def broken_fsync(descriptor):
        raise OSError("disk full")

    monkeypatch.setattr(report_module.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_tslim(ts.models.create("lenet-300-100"), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.tslim"]


class Resized(torch.nn.Module):
    """Its width is not kept as an attribute: rebuilt from its class, it has the default width."""

    def __init__(self, width: int = 2):
        super().__init__()
        self.fc = torch.nn.Linear(4, width)


def test_a_model_without_spec_needs_one(tmp_path):
    with pytest.raises(TorchslimError, match="does not give this model.*save with factory="):
        encode_model(Resized(3))  # Resized() rebuilt from its class is not this model
    data = encode_model(Resized(3), spec={"factory": "torch.nn:Identity", "kwargs": {}})
    assert data[:5] == b"TSLIM"
    bare = torch.nn.Sequential(torch.nn.Linear(4, 2))  # a plain Sequential is rebuilt from its layers
    save_tslim(bare, tmp_path / "bare.tslim")
    x = torch.randn(3, 4)
    assert torch.equal(load_tslim(tmp_path / "bare.tslim")(x), bare(x))


def test_unknown_coder_is_refused():
    with pytest.raises(TorchslimError, match="coders must be"):
        encode_model(ts.models.create("lenet-300-100"), coders=("zip",))
