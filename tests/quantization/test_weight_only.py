import pytest
import torch

import torchslim as ts
from torchslim.core.config import ConfigError
from torchslim.quantization import QuantizedLinear, WeightScheme
from torchslim.train import fit

SCHEMES = [
    {"scheme": "uniform", "bits": 8},
    {"scheme": "uniform", "bits": 4, "granularity": "group", "group_size": 25, "symmetric": False},
    {"scheme": "uniform", "bits": 12},
    {"scheme": "kmeans", "bits": 4},
    {"scheme": "pow2", "bits": 4},
    {"scheme": "binary"},
    {"scheme": "ternary"},
    {"scheme": "fp16"},
    {"scheme": "bf16"},
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s['scheme']}{s.get('bits', '')}")
def test_quantized_model_saves_and_reloads_identically(scheme, tmp_path):
    torch.manual_seed(0)
    model = ts.models.create("lenet-5")
    result = ts.quantize(model, {"weights": scheme})
    x = torch.randn(3, 1, 28, 28)
    path = ts.save(result.model, tmp_path / "q.safetensors")
    again = ts.load(path)
    assert torch.equal(again(x), result.model(x))
    rows = result.report.stages[0].layers
    bits = WeightScheme.from_dict(scheme).stored_bits
    bits = bits if bits <= 8 else 16  # codes of 9 to 16 bits take two bytes; below 8 bits they are bit-packed
    fc1 = next(r for r in rows if r["name"] == "fc1")
    if scheme.get("granularity") == "group":  # 4-bit codes, then a float scale and an int32 zero point per 25 weights
        assert fc1["stored_bytes"] == 400_000 // 2 + 400_000 // 25 * 8 + 500 * 4
        return
    assert fc1["stored_bytes"] <= 400_000 * bits / 8 * 1.05 + 500 * 4 + 2_000
    assert path.stat().st_size < 431_080 * 4 * bits / 32 * 1.1 + 30_000


def test_trained_accuracy_holds_at_8_bits(mnist_small):
    torch.manual_seed(0)
    model = ts.models.create("lenet-300-100")
    fit(model, mnist_small, {"epochs": 1, "eval_every_epoch": False}, progress=False)
    dense = ts.evaluate(model, mnist_small)["accuracy"]
    for scheme in ({"scheme": "uniform", "bits": 8}, {"scheme": "kmeans", "bits": 5}):
        quantized = ts.quantize(model, {"weights": scheme}).model
        assert abs(ts.evaluate(quantized, mnist_small)["accuracy"] - dense) < 0.005


def test_centroid_gradients_sum_over_clusters():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    quantized = QuantizedLinear.from_float(linear, WeightScheme(scheme="kmeans", bits=2), "fc")
    x = torch.randn(5, 16)
    quantized(x).sum().backward()
    weight = quantized.quantized.codebook[quantized.quantized.codes().long().reshape(8, 16)].detach().requires_grad_()
    torch.nn.functional.linear(x, weight, quantized.bias).sum().backward()
    expected = torch.zeros(4).index_add_(0, quantized.quantized.codes().long(), weight.grad.reshape(-1))
    torch.testing.assert_close(quantized.quantized.codebook.grad, expected)


def test_centroid_finetuning_recovers_accuracy(mnist_small):
    torch.manual_seed(0)
    model = ts.models.create("lenet-300-100")
    fit(model, mnist_small, {"epochs": 1, "eval_every_epoch": False}, progress=False)
    quantized = ts.quantize(model, {"weights": {"scheme": "kmeans", "bits": 2}}).model
    before = ts.evaluate(quantized, mnist_small)["accuracy"]
    codes = {n: m.quantized.codes().clone() for n, m in quantized.named_modules() if isinstance(m, QuantizedLinear)}
    fit(quantized, mnist_small, {"epochs": 1, "lr": 1e-3, "max_batches_per_epoch": 60, "eval_every_epoch": False}, progress=False)
    assert ts.evaluate(quantized, mnist_small)["accuracy"] > before
    for name, module in quantized.named_modules():
        if name in codes:  # only the shared values moved; every weight kept its cluster
            assert torch.equal(module.quantized.codes(), codes[name])


def test_mixed_precision_and_errors():
    model = ts.models.create("lenet-300-100")
    result = ts.quantize(model, {"weights": {"scheme": "kmeans", "bits": 2}, "overrides": {"fc3": {"scheme": "uniform", "bits": 8}}})
    assert [(r["name"], r["scheme"], r["bits"]) for r in result.report.stages[0].layers] == [("fc1", "kmeans", 2), ("fc2", "kmeans", 2), ("fc3", "uniform", 8)]
    assert type(model.fc1) is torch.nn.Linear  # the caller's model is untouched
    partial = ts.quantize(model, {"weights": {"scheme": "kmeans", "bits": 2}, "overrides": {"type:Linear": {"bits": 4}, "fc2": {"bits": 6}}})
    assert [(r["scheme"], r["bits"]) for r in partial.report.stages[0].layers] == [("kmeans", 4), ("kmeans", 6), ("kmeans", 4)]
    with pytest.raises(ts.TorchslimError, match="layer pattern 'fc9' picks none of the selected layers"):
        ts.quantize(model, {"overrides": {"fc9": {"bits": 4}}})
    with pytest.raises(ConfigError, match="bits must be between 1 and 16"):
        ts.quantize(model, {"weights": {"bits": 20}})
    ragged = ts.quantize(model, {"weights": {"granularity": "group"}, "layers": {"include": ["fc3"]}}).model  # width 100 < 128: one ragged group
    assert ragged.fc3.quantized.scale.shape == (10, 1, 1)
    bad = ts.models.create("lenet-300-100")
    with torch.no_grad():
        bad.fc2.weight[0, 0] = float("inf")
    with pytest.raises(ts.TorchslimError, match=r"quantize: the model holds 1 non-finite value \(NaN or Inf\): fc2.weight \(1\)"):
        ts.quantize(bad, {})


def test_inference_caches_the_decoded_weight_and_notices_changes():
    import torchslim as ts

    model = ts.quantize(ts.models.create("lenet-300-100"), {"weights": {"scheme": "kmeans", "bits": 4}}).model.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        first = model(x)
        weight = model.fc1.quantized.weight()
        assert model.fc1.quantized.weight() is weight  # decoded once, reused
        model.fc1.quantized.codebook.mul_(2)  # an in-place change of what is stored
        assert not torch.equal(model.fc1.quantized.weight(), weight)
        assert not torch.equal(model(x), first)
    # with gradients on, the codebook is trained through a fresh gather every time
    loss = model.fc1.quantized.weight().sum()
    loss.backward()
    assert model.fc1.quantized.codebook.grad is not None
