import pytest
import torch

from torchslim.core.errors import TorchslimError
from torchslim.quantization import binarize, kmeans_quantize, make_observer, power_of_two_quantize, ternarize
from torchslim.quantization.observers import OBSERVERS, calibrate
from torchslim.quantization.primitives import UniformSpec, sqnr_db


def test_kmeans_codebook_size_and_zeros_kept():
    torch.manual_seed(0)
    weight = torch.randn(50, 40)
    weight[weight.abs() < 0.5] = 0
    for init in ("linear", "density", "random"):
        codebook, index = kmeans_quantize(weight, 3, init)
        assert codebook.numel() <= 8 and index.shape == weight.shape
        assert torch.all(codebook[index][weight == 0] == 0)
        assert sqnr_db(weight, codebook[index]) > 10
    with pytest.raises(TorchslimError, match="bits must be between 1 and 8"):
        kmeans_quantize(weight, 9)


def test_kmeans_more_bits_less_error():
    weight = torch.randn(100, 100)
    errors = []
    for bits in (2, 3, 4, 5):
        codebook, index = kmeans_quantize(weight, bits)
        errors.append(sqnr_db(weight, codebook[index]))
    assert errors == sorted(errors)


def test_power_of_two_levels():
    weight = torch.tensor([0.3, -0.7, 0.05, 1.2, -0.001])
    quantized = power_of_two_quantize(weight, 3)
    nonzero = quantized[quantized != 0].abs()
    assert torch.all(torch.log2(nonzero) == torch.round(torch.log2(nonzero)))
    assert len(set(quantized.abs().tolist()) - {0.0}) <= 3
    assert quantized[-1] == 0 and quantized[3] == 1.0


def test_binary_and_ternary():
    weight = torch.tensor([[0.5, -1.5, 1.0, -0.1], [2.0, 2.0, -2.0, 0.0]])
    signs, scale = binarize(weight)
    assert signs.tolist() == [[1, -1, 1, -1], [1, 1, -1, 1]]
    torch.testing.assert_close(scale.reshape(-1), torch.tensor([0.775, 1.5]))
    codes, scale = ternarize(torch.tensor([0.1, -1.0, 0.9, 0.05, -0.6]))
    threshold = 0.7 * torch.tensor([0.1, 1.0, 0.9, 0.05, 0.6]).mean()
    assert codes.tolist() == [0, -1, 1, 0, -1] and threshold < 0.6
    torch.testing.assert_close(scale, torch.tensor([(1.0 + 0.9 + 0.6) / 3]))


@pytest.mark.parametrize("name", OBSERVERS.names())
def test_every_observer_covers_the_bulk(name):
    torch.manual_seed(0)
    observer = make_observer(name)
    for _ in range(5):
        observer.observe(torch.randn(10_000))
    low, high = observer.range()
    assert -6 < low.item() < -2 and 2 < high.item() < 6


def test_clipping_observers_ignore_outliers():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    x[:10] = 80.0
    ranges = {}
    for name in ("minmax", "percentile", "mse", "entropy"):
        observer = make_observer(name)
        observer.observe(x)
        ranges[name] = observer.range()[1].item()
    assert ranges["minmax"] == 80.0
    assert ranges["percentile"] < 10 and ranges["entropy"] < 20
    spec = UniformSpec(bits=8)
    bulk = torch.randn(100_000)
    from torchslim.quantization.observers import observed_sqnr

    minmax, percentile = make_observer("minmax"), make_observer("percentile")
    minmax.observe(x)
    percentile.observe(x)
    assert sqnr_db(bulk, observed_sqnr(bulk, percentile, spec)) > sqnr_db(bulk, observed_sqnr(bulk, minmax, spec)) + 10


def test_observer_errors():
    with pytest.raises(TorchslimError, match="calibration saw no batches"):
        make_observer("minmax", where="input of fc1").range()
    with pytest.raises(TorchslimError, match="input of fc1: 1 value\\(s\\) are NaN or Inf"):
        make_observer("mse", where="input of fc1").observe(torch.tensor([1.0, float("inf")]))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(TorchslimError, match="calibration got no batches"):
        calibrate(model, [], [("0", model[0])])
