"""Integer CPU kernels behind weight-only quantized layers: results against the decoded weight over a grid of shapes
(the shape rules in quantization/kernels.py came from this check), run-time memory, embeddings decoding only the rows
they read, and a tied embedding / output layer quantized as one table."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torchslim as ts
from tests import zoo
from torchslim.quantization import kernels
from torchslim.quantization.formats import WeightScheme
from torchslim.quantization.modules import CACHE_LIMIT, QuantizedEmbedding, QuantizedLinear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="this PyTorch build has no int8/int4 CPU kernels")

INT8 = WeightScheme(bits=8, symmetric=True, granularity="channel")


def _int4(group: int | None, symmetric: bool = False, bits: int = 4) -> WeightScheme:
    granularity = "group" if group else "channel"
    return WeightScheme(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group or 128)


CASES = [
    # (scheme, out, in, kernel expected)
    (INT8, 64, 576, "int8"),
    (INT8, 10, 784, "int8"),
    (INT8, 64, 100, "int8"),  # input width padded to a multiple of 16 (the kernel reads out of bounds otherwise)
    (_int4(128), 64, 576, "int4"),  # 576 is not a multiple of 128: the ragged last group runs padded
    (_int4(None), 32, 100, "int4"),  # per channel on a width no kernel group divides: groups of 32, padded
    (_int4(64), 64, 576, "int4"),
    (_int4(32, symmetric=True), 48, 256, "int4"),
    (_int4(None), 32, 576, "int4"),  # one scale per channel, expressed as groups of 64
    (_int4(64, bits=3), 32, 256, "int4"),  # 3-bit codes run on the 4-bit kernel
    (_int4(64, bits=2), 32, 256, "int4"),
    (_int4(64), 40, 256, None),  # output width not a multiple of 16
    (WeightScheme(scheme="kmeans", bits=4), 64, 256, None),
    (WeightScheme(bits=8, granularity="group", group_size=64), 64, 256, None),
]


@pytest.mark.parametrize("scheme, out_features, in_features, expected", CASES)
def test_kernel_results_match_the_decoded_weight(scheme, out_features, in_features, expected):
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features)
    quantized = QuantizedLinear.from_float(layer, scheme, "layer")
    with torch.no_grad():
        kernel = quantized.quantized.kernel()
        assert (kernel.name.split()[0] if kernel is not None else None) == expected
        for rows in (1, 3, 9, 64):  # decode-sized and prefill-sized batches take different paths
            x = torch.randn(2, rows, in_features)
            reference = F.linear(x, quantized.quantized._decode(), quantized.bias)
            relative = (quantized(x) - reference).norm() / reference.norm()
            assert relative < 0.02  # bfloat16 activations and scales: about 3 significant digits each


def test_training_decodes_so_gradients_flow():
    layer = QuantizedLinear.from_float(nn.Linear(64, 32), WeightScheme(scheme="kmeans", bits=3), "layer")
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.quantized.codebook.grad is not None


def test_a_4bit_layer_holds_at_most_a_third_of_its_float_bytes_while_running():
    torch.manual_seed(0)
    layer = nn.Linear(1536, 576, bias=False)
    for scheme, ratio in ((_int4(64), 0.35), (INT8, 0.55)):
        quantized = QuantizedLinear.from_float(layer, scheme, "layer")
        with torch.no_grad():
            quantized(torch.randn(1, 1536))
            quantized(torch.randn(32, 1536))
        assert quantized.quantized.runtime_bytes() <= ratio * layer.weight.numel() * 4, scheme


def test_large_layers_without_a_kernel_decode_on_each_call_and_keep_nothing():
    layer = nn.Linear(1024, 512)
    assert layer.weight.numel() > CACHE_LIMIT
    quantized = QuantizedLinear.from_float(layer, WeightScheme(scheme="kmeans", bits=4), "layer")
    with torch.no_grad():
        quantized(torch.randn(2, 1024))
    assert quantized.quantized.runtime_bytes() == quantized.quantized.stored_bytes()


@pytest.mark.parametrize("scheme", [_int4(32), WeightScheme(scheme="kmeans", bits=4), INT8, WeightScheme(bits=3, granularity="channel")])
def test_an_embedding_decodes_only_the_rows_it_reads(scheme):
    torch.manual_seed(0)
    table = nn.Embedding(5000, 64)
    quantized = QuantizedEmbedding.from_float(table, scheme, "embed")
    ids = torch.randint(0, 5000, (3, 17))
    full = quantized.quantized._decode()
    assert torch.equal(quantized(ids), full[ids])
    assert quantized.quantized.runtime_bytes() == quantized.quantized.stored_bytes()
    with pytest.raises(IndexError, match=r"ids must lie in \[0, 4999\]"):
        quantized(torch.tensor([5000]))


def test_a_tied_embedding_and_output_layer_quantize_as_one_table(tmp_path):
    torch.manual_seed(0)
    model = zoo.TiedCharLM(vocab=64, dim=64)
    ids = torch.randint(0, 64, (2, 16))
    config = {"weights": {"bits": 4, "granularity": "group", "group_size": 32, "symmetric": False}}
    alone = ts.quantize(model, config)  # the output layer alone: left in float, still tied
    assert isinstance(alone.model.head, nn.Linear) and alone.model.head.weight is alone.model.tokens.weight
    assert any("head: left in float, its weight is tied to tokens.weight" in note for note in alone.report.stages[0].notes)
    both = ts.quantize(model, {**config, "layers": {"types": ["Linear", "Embedding"]}}).model
    assert both.head.quantized is both.tokens.quantized
    for suffix in (".safetensors", ".tslim"):
        path = tmp_path / f"q{suffix}"
        ts.save(both, path, factory="tests.zoo:TiedCharLM", kwargs={"vocab": 64, "dim": 64})
        loaded = ts.load(path, trust_factory="tests.zoo:TiedCharLM")
        assert loaded.head.quantized is loaded.tokens.quantized
        assert torch.equal(loaded(ids), both(ids))
    stored = ts.save(both, tmp_path / "b.tslim", factory="tests.zoo:TiedCharLM", kwargs={"vocab": 64, "dim": 64})
    untied = zoo.TiedCharLM(vocab=64, dim=64)
    untied.head.weight = nn.Parameter(model.head.weight.detach().clone())
    separate = ts.quantize(untied, {**config, "layers": {"types": ["Linear", "Embedding"]}}).model
    alone_file = ts.save(separate, tmp_path / "s.tslim", factory="tests.zoo:TiedCharLM", kwargs={"vocab": 64, "dim": 64})
    assert stored.stat().st_size < alone_file.stat().st_size - 64 * 64 // 4  # the table is stored once
