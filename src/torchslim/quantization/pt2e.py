"""Real int8 execution through torchao's PT2E flow: torch.export, X86InductorQuantizer, calibration, convert, then
torch.compile (inductor) with freezing on, which lowers the quantized patterns to int8 kernels (oneDNN)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from torchslim.core.copying import copy_model
from torchslim.core.errors import TorchslimError
from torchslim.core.modes import eval_mode
from torchslim.core.selector import set_module


class CompiledModule(nn.Module):
    """A compiled callable behind an nn.Module interface; runs under no_grad (inference only)."""

    def __init__(self, compiled, reference: str) -> None:
        super().__init__()
        # held outside the module tree: exported graphs refuse .train() / .eval(), which callers may apply to us
        self._compiled = (compiled,)
        self.reference = reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every call in the same settings as the first: inference mode, freezing on, static shapes. A call in other
        settings would compile again without freezing, and since the newest graph is tried first, later calls of a
        shape compiled earlier could run that slow graph."""
        import torch._dynamo.config as dynamo_config

        with _freezing(), dynamo_config.patch(automatic_dynamic_shapes=False), torch.inference_mode():
            return self._compiled[0](x)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Compile (frozen, for this shape) before any timed run."""
        return self(x)


def _freezing():
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


ONE_INPUT = (
    "PT2E int8 takes a model called with one tensor, model(x), and batches of that tensor (or (x, target) pairs); "
    "for a model with several positional or named inputs, quantize with method 'onnxruntime' or 'native-int8'"
)


def _sole_tensor(value: object, what: str) -> torch.Tensor:
    """The one input tensor of ``value`` (a tensor, or a tuple / list holding only it); otherwise a clear error."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        shown = f"a {type(value).__name__} of {len(value)} inputs"
    elif isinstance(value, dict):
        shown = f"a mapping of inputs {', '.join(map(str, list(value)[:6]))}"
    else:
        shown = type(value).__name__
    raise TorchslimError(f"{what} is {shown}: {ONE_INPUT}")


class _PerCall(nn.Module):
    """A parameterless module a forward calls several times (one ``self.relu`` after each convolution), as one copy
    per call: PT2E's quantizer annotates the calls of one module as one partition and refuses one with several
    outputs. The calls of one forward go to the copies in order (``_Calls`` starts each forward at the first)."""

    def __init__(self, module: nn.Module, count: int) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(module) for _ in range(count))
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        module = self.copies[self.calls % len(self.copies)]
        self.calls += 1
        return module(*args, **kwargs)


class _Calls(nn.Module):
    """The model, with each ``_PerCall`` counted from its first copy at every forward."""

    def __init__(self, model: nn.Module, shared: list[_PerCall]) -> None:
        super().__init__()
        self.model, self.shared = model, shared

    def forward(self, x: torch.Tensor) -> Any:
        for module in self.shared:
            module.calls = 0
        return self.model(x)


def one_module_per_call(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``model`` as it is where no parameterless module runs twice in one forward; else a copy in which each such
    module is a ``_PerCall`` (the caller's model is not changed)."""
    counts: dict[str, int] = {}
    leaves = {
        name: module
        for name, module in model.named_modules()
        if name
        and not any(True for _ in module.children())
        and not any(True for _ in module.parameters(recurse=False))
        and not list(module.buffers(recurse=False))
    }
    handles = [module.register_forward_hook(lambda *_, name=name: counts.__setitem__(name, counts.get(name, 0) + 1)) for name, module in leaves.items()]
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    repeated = {name: count for name, count in counts.items() if count > 1}
    if not repeated:
        return model
    copied = copy_model(model)
    shared = []
    for name, count in repeated.items():
        wrapper = _PerCall(copied.get_submodule(name), count)
        set_module(copied, name, wrapper)
        shared.append(wrapper)
    return _Calls(copied, shared).eval()


def pt2e_int8(model: nn.Module, example_input: torch.Tensor, calibration: Iterable, batches: int = 16) -> CompiledModule:
    """Quantize ``model`` (static int8, X86InductorQuantizer defaults) and compile it; calibration batches are inputs
    (or (inputs, targets) pairs). One tensor input only (``ONE_INPUT``)."""
    example_input = _sole_tensor(example_input, "PT2E int8: the example input")
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError:
        raise TorchslimError("the PT2E int8 path needs torchao: pip install torchao (with torch pinned)") from None
    model = one_module_per_call(model, example_input)
    with eval_mode(model), torch.no_grad():
        batch = torch.export.Dim("batch", min=1, max=4096)
        traced_input = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()  # batch 1 would specialize
        exported = torch.export.export(model, (traced_input,), dynamic_shapes=({0: batch},)).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        seen = 0
        for inputs in calibration:
            if seen >= batches:
                break
            given = inputs[0] if isinstance(inputs, (tuple, list)) and inputs else inputs  # (inputs, targets) or inputs
            prepared(_sole_tensor(given, f"PT2E int8: the inputs of calibration batch {seen}"))
            seen += 1
        if seen == 0:
            raise TorchslimError("PT2E calibration got no batches: the calibration data is empty")
        converted = convert_pt2e(prepared)
        compiled = torch.compile(converted)
    module = CompiledModule(compiled, "pt2e-int8")
    module.prepare(example_input)  # compile now, frozen, not inside a timed run
    return module


def compiled_fp32(model: nn.Module, example_input: torch.Tensor) -> CompiledModule:
    """The same model compiled in fp32 with freezing, for side-by-side timing in the same engine."""
    with eval_mode(model):
        compiled = CompiledModule(torch.compile(model.eval()), "compiled-fp32")
        compiled.prepare(example_input)
    return compiled
