"""What block-by-block calibration and the layer methods cover: each block is calibrated with its own arguments (a
layer of sliding-window attention gets its own mask, as in the model's forward pass), and weights held by modules
that are no covered layer (a mixture of experts' fused expert weights) are named in the notes as left in float /
dense, next to what the stage's metric counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim as ts
from tests import zoo
from tests.test_zoo import _text_batches
from torchslim.llm.blocks import capture_inputs, sequential


class _Shifted(nn.Module):
    """Blocks that each get an argument of their own: ``shift`` (positional), and one that the forward skips."""

    def __init__(self, skip: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(_Block() for _ in range(4))
        self.skip = skip

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for index, layer in enumerate(self.layers):
            if index != self.skip:
                x = layer(x, torch.full((1,), float(index + 1)), scale=torch.full((1,), 0.5 * (index + 1)))
        return x


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x) * scale + shift)


def _inputs_seen(model: nn.Module, batches: list) -> dict[str, list[tuple]]:
    seen: dict[str, list[tuple]] = {}
    sequential(model, batches, lambda name, block, inputs: seen.__setitem__(name, [(args[0].clone(), args[1:], dict(kwargs)) for args, kwargs in inputs]))
    return seen


def test_each_block_is_run_with_its_own_positional_and_keyword_arguments():
    torch.manual_seed(0)
    model = _Shifted().eval()
    batches = [torch.randint(0, 16, (2, 5)) for _ in range(3)]
    seen = _inputs_seen(model, batches)
    for batch, ids in enumerate(batches):
        x = model.embed(ids)
        for index, layer in enumerate(model.layers):
            hidden, rest, kwargs = seen[f"layers.{index}"][batch]
            torch.testing.assert_close(hidden, x, rtol=0, atol=0)
            assert float(rest[0]) == index + 1 and float(kwargs["scale"]) == 0.5 * (index + 1)
            x = layer(x, *rest, **kwargs)
    assert len(capture_inputs(model, model.layers[0], batches)) == 3  # the first block alone, as before


def test_a_block_the_forward_pass_skips_gets_the_arguments_of_the_block_before_it():
    model = _Shifted(skip=2).eval()
    seen = _inputs_seen(model, [torch.randint(0, 16, (2, 5))])
    assert float(seen["layers.2"][0][1][0]) == 2.0 and float(seen["layers.3"][0][1][0]) == 4.0


def _gemma2(layers: int = 3):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return zoo.decoder("Gemma2", num_hidden_layers=layers, head_dim=16, sliding_window=8).eval()


def test_calibration_inputs_of_every_block_of_a_sliding_window_model_are_its_real_hidden_states():
    """Gemma2 alternates sliding-window and full attention: each layer gets its own mask. With the first layer's
    arguments reused, the third layer was calibrated on hidden states 0.6 x their scale away from the real ones."""
    model = _gemma2()
    assert len(set(model.config.layer_types)) == 2
    batches = _text_batches(length=24)[:2]
    seen = _inputs_seen(model, batches)
    for number, batch in enumerate(batches):
        with torch.no_grad():
            real = model(**batch, output_hidden_states=True, use_cache=False).hidden_states
        for index in range(3):
            torch.testing.assert_close(seen[f"model.layers.{index}"][number][0], real[index], rtol=1e-5, atol=1e-5)


def _mixtral():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = zoo.decoder("Mixtral", num_local_experts=4, num_experts_per_tok=2).eval()
    if not any(p.dim() == 3 for p in model.parameters()):
        pytest.skip("this transformers keeps Mixtral's experts as Linear layers")
    return model


def _expert_weights(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if ".experts." in name or name.endswith("mlp.gate.weight"))


def test_gptq_and_sparsegpt_name_the_fused_expert_weights_they_leave_as_they_are():
    model = _mixtral()
    experts, total = _expert_weights(model), sum(p.numel() for p in model.parameters())
    data = _text_batches()
    stage = ts.quantize(model, {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "calibration_batches": 2}, data=data).report.stages[0]
    note = next(n for n in stage.notes if n.startswith("left in float:"))
    assert f"{experts:,} weights ({experts / total:.1%} of the parameters)" in note and "model.layers.*.mlp.experts.gate_up_proj" in note
    assert "compression counts the quantized layers only" in note and "MixtralExperts" in note
    pruned = ts.prune(model, {"solver": "sparsegpt", "sparsity": 0.5, "calibration_batches": 2}, data=data)
    stage = pruned.report.stages[0]
    note = next(n for n in stage.notes if n.startswith("left dense:"))
    assert f"{experts:,} weights" in note and "model.layers.*.mlp.experts.down_proj" in note and "weight_sparsity counts the selected layers only" in note
    assert stage.metrics["nonzeros"] >= experts and int(torch.count_nonzero(pruned.model.model.layers[0].mlp.experts.gate_up_proj)) > 0


class _Stacked(nn.Module):
    """A hand-written mixture: experts as one 3-D parameter, a class token (a vector), a Linear output."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.Parameter(torch.randn(4, 16, 16))
        self.token = nn.Parameter(torch.randn(1, 1, 16))
        self.head = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.einsum("bi,eoi->bo", x + self.token[0, 0], self.experts))


def test_weight_only_quantization_and_pruning_name_a_3d_parameter_and_not_a_token_vector():
    model = _Stacked()
    share = f"1,024 weights ({1024 / (1024 + 16 + 16 * 16 + 16):.1%} of the parameters)"
    notes = ts.quantize(model, {"weights": {"bits": 4}}).report.stages[0].notes
    assert [n for n in notes if "weights (" in n] == [
        f"left in float: {share} in modules that are no quantizable layer (_Stacked): experts; compression counts the quantized layers only"
    ]
    stage = ts.prune(model, {"importance": "l1", "sparsity": 0.5}).report.stages[0]
    assert f"left dense: {share} in modules that are no prunable layer (_Stacked): experts; weight_sparsity counts the selected layers only" in stage.notes
    assert stage.metrics["weight_sparsity"] == pytest.approx(0.5) and stage.metrics["nonzeros"] > 1024
    again = ts.prune(ts.prune(nn.Sequential(nn.Linear(8, 8)), {"sparsity": 0.5}).model, {"sparsity": 0.7}).report.stages[0]  # masked weights: covered
    assert not any(n.startswith("left dense:") for n in again.notes)
