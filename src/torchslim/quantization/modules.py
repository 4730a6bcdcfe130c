"""Weight-only quantized Linear and Conv modules: they store integer codes (bit-packed below 8 bits) with their
scales or codebook, and dequantize in forward. ``stored_bytes`` counts what they really hold.

Schemes: ``uniform`` (affine or symmetric; per tensor, channel or group), ``kmeans`` (a codebook of 2^bits shared
weights whose centroids can be fine-tuned: the gather's backward sums the gradients of each cluster, Deep Compression
section 3.3), ``pow2`` (log / power-of-two levels held as a codebook), ``binary``, ``ternary``, and ``fp16`` /
``bf16`` casts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from torchslim.core.memory import release_freed_memory
from torchslim.core.selector import is_conv1d
from torchslim.measure.counts import register_mac_counter
from torchslim.quantization import kernels
from torchslim.quantization.formats import ENCODE_CHUNK, FORMATS, WeightScheme
from torchslim.quantization.packing import pack_codes, unpack_codes, unpack_small
from torchslim.quantization.primitives import UniformSpec, check_finite, group_count

_DECODING = [False]


@contextlib.contextmanager
def decoded_weights() -> Iterator[None]:
    """Inside the block, weight-only layers multiply by their decoded float weight instead of an integer kernel (whose
    activations are bfloat16): the exact math of the quantized weights, which an ONNX export reproduces."""
    previous = _DECODING[0]
    _DECODING[0] = True
    try:
        yield
    finally:
        _DECODING[0] = previous


def kernels_off() -> bool:
    """Whether integer kernels are off: inside ``decoded_weights`` or while exporting to ONNX (which has none)."""
    return _DECODING[0] or torch.onnx.is_in_onnx_export()


# decoded weights (and unpacked codes) of layers up to this many weights are kept between calls, so small networks
# run at full speed in eager mode; larger layers run on an integer kernel or decode on each call (bounded memory)
CACHE_LIMIT = 2**18


RELEASE_AFTER = 1 << 24  # weights this large return the transients of building their kernel to the system


class QuantizedWeight(nn.Module):
    """Holds one weight in a compressed form (its scheme's ``StorageFormat``): codes bit-packed in ``packed`` (two
    bytes each above 8 bits) with the format's scales or codebook. ``weight()`` gives it back decoded, ``rows(index)``
    decodes only some rows (an embedding lookup), ``kernel()`` the integer kernel that runs it, where there is one."""

    # what the formats store (each registers the ones it uses)
    packed: torch.Tensor
    value16: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    codebook: nn.Parameter

    def __init__(self, shape: tuple[int, ...], scheme: WeightScheme) -> None:
        super().__init__()
        self.shape, self.scheme = tuple(shape), scheme
        self.format = FORMATS[scheme.scheme]
        self.bits = self.format.code_bits(scheme)
        if self.bits is not None:
            count = math.prod(shape)
            self.register_buffer("packed", torch.zeros((count * self.bits + 7) // 8 if self.bits <= 8 else 2 * count, dtype=torch.uint8))
        self.format.register(self)
        self._codes: tuple[Any, torch.Tensor] | None = None
        self._cache: tuple[Any, torch.Tensor] | None = None
        self._kernel: tuple[Any, Any] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def scale_shape(self, spec: UniformSpec) -> tuple[int, ...]:
        if spec.granularity == "tensor":
            return (1,)
        if spec.granularity == "channel":
            return (self.shape[0],) + (1,) * (len(self.shape) - 1)
        return (self.shape[0], group_count(math.prod(self.shape[1:]), spec.group_size), 1)

    def pack(self, codes: torch.Tensor) -> None:
        """Store integer codes (non-negative, below 2^bits), bit-packed."""
        assert self.bits is not None
        self.packed = pack_codes(codes.reshape(-1), self.bits)

    def codes(self) -> torch.Tensor:
        """The integer codes (flat; uint8 up to 8 bits), unpacked from what is stored."""
        assert self.bits is not None
        key = (id(self.packed), self.packed._version)
        if self._codes is not None and self._codes[0] == key:
            return self._codes[1]
        codes = unpack_small(self.packed, self.bits, self.numel) if self.bits <= 8 else unpack_codes(self.packed, self.bits, self.numel)
        if self.numel <= CACHE_LIMIT:
            self._codes = (key, codes)
        return codes

    def code_tensor(self) -> tuple[torch.Tensor, int] | None:
        """(integer codes from what is stored, bits per code), or None for a float cast: what the codec entropy-codes."""
        if self.bits is None:
            return None
        return self.codes().to(torch.int64), self.bits

    @torch.no_grad()
    def encode(self, weight: torch.Tensor, where: str) -> None:
        """Quantize ``weight`` into this holder."""
        check_finite(weight, where)
        self.format.encode(self, weight, where)

    def _key(self) -> tuple:
        names = ("packed", "value16", "codebook", "scale", "zero_point")
        return tuple((id(t), t._version, t.device) for t in (getattr(self, n, None) for n in names) if isinstance(t, torch.Tensor))

    def _training(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters(recurse=False))

    def weight(self) -> torch.Tensor:
        """The decoded weight. Outside autograd a small layer's is kept until a stored tensor changes (in place or
        replaced), so eager inference does not decode on every call; a large layer's is decoded on each call."""
        if self._training() or self.numel > CACHE_LIMIT:
            return self._decode()
        key = self._key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._decode())
        return self._cache[1]

    def _decode(self) -> torch.Tensor:
        codes = self.codes().reshape(self.shape) if self.bits is not None else torch.empty(0)
        return self.format.decode(self, codes)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of the decoded weight, decoding only those rows where the rows are whole bytes apart."""
        width = math.prod(self.shape[1:])
        if self.bits is None or self.numel <= CACHE_LIMIT or (width * self.bits) % 8 or self.bits > 8:
            return self.weight().index_select(0, index)
        packed_rows = self.packed.reshape(self.shape[0], -1).index_select(0, index)
        codes = unpack_small(packed_rows, self.bits, index.numel() * width).reshape(index.numel(), *self.shape[1:])
        return self.format.decode(self, codes, index)

    def row_chunks(self, max_elements: int = ENCODE_CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, decoded rows) a slice at a time: the whole weight, in bounded memory."""
        width = math.prod(self.shape[1:])
        step = max(1, max_elements // max(1, width))
        if self.numel <= max_elements:
            yield 0, self.weight()
            return
        for start in range(0, self.shape[0], step):
            yield start, self.rows(torch.arange(start, min(start + step, self.shape[0]), device=self.packed.device))

    def kernel(self) -> Any:
        """The integer kernel running this weight (built once per stored state), or None: none for the format, or
        training (gradients need the decoded weight)."""
        if self._training():
            return None
        key = self._key()
        if self._kernel is None or self._kernel[0] != key:
            with torch.no_grad():
                self._kernel = (key, self.format.kernel(self))
            if math.prod(self.shape) >= RELEASE_AFTER:  # the unpacked codes it took were tens of MB, now freed
                release_freed_memory()
        return self._kernel[1]

    def stored_bytes(self) -> int:
        """Bytes of what is stored: codes (packed), scales / zero points / codebook."""
        return sum(t.numel() * t.element_size() for name, t in self.state_dict().items())

    def runtime_bytes(self) -> int:
        """Bytes this weight holds in memory to run: what is stored, plus its kernel's tensors or its kept decoded
        weight and codes."""
        extra = 0
        if self._kernel is not None and self._kernel[1] is not None:
            extra += self._kernel[1].nbytes()
        for kept in (self._cache, self._codes):
            if kept is not None:
                extra += kept[1].numel() * kept[1].element_size()
        return self.stored_bytes() + extra

    def extra_repr(self) -> str:
        return f"shape={self.shape}, scheme={self.scheme.scheme}, bits={self.scheme.stored_bits}"


class _QuantizedLayer(nn.Module):
    """What quantized layers share: ``.weight`` reads the decoded weight (read-only) as the layer it replaced did,
    ``logical_parameters`` counts it as the weights it encodes, and ``stored_bytes`` what it holds."""

    quantized: QuantizedWeight
    bias: nn.Parameter | None

    @property
    def weight(self) -> torch.Tensor:
        """The weight the layer applies: decoded (and, with an input scale, scaled by it); read-only (assign through
        ``quantized.encode``)."""
        weight = self.quantized.weight()
        input_scale = getattr(self, "input_scale", None)
        return weight * input_scale if input_scale is not None else weight

    def logical_parameters(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.weight}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def stored_bytes(self) -> int:
        return self.quantized.stored_bytes() + (self.bias.numel() * 4 if self.bias is not None else 0)


class QuantizedLinear(_QuantizedLayer):
    """Linear with a weight-only quantized weight, dequantized in forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: WeightScheme) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quantized = QuantizedWeight((out_features, in_features), scheme)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if scheme.input_scale:
            self.register_buffer("input_scale", torch.ones(in_features))

    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: WeightScheme, where: str) -> QuantizedLinear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme)
        module.quantized.encode(linear.weight.detach().float(), where)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized.scheme.input_scale:
            x = x * self.input_scale.to(x.dtype)
        # integer kernels have no backward: training through the layer (to the layers before it) decodes instead
        inference = x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad) and not kernels_off()
        kernel = self.quantized.kernel() if inference else None
        if kernel is not None:
            return kernel(x, self.bias)
        if self.quantized.scheme.activation_bits is not None:
            x = kernels.per_token_fake_quant(x, self.quantized.scheme.activation_bits)
        return F.linear(x, self.quantized.weight().to(x.dtype), self.bias)


class QuantizedConv2d(_QuantizedLayer):
    """Conv2d with a weight-only quantized weight, dequantized in forward."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, ...],
        stride: Any,
        padding: Any,
        dilation: Any,
        groups: int,
        bias: bool,
        scheme: WeightScheme,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, tuple(kernel_size)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.quantized = QuantizedWeight((out_channels, in_channels // groups, *self.kernel_size), scheme)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def from_float(cls, conv: nn.Conv2d, scheme: WeightScheme, where: str) -> QuantizedConv2d:
        if conv.padding_mode != "zeros":
            raise ValueError(f"{where}: padding_mode {conv.padding_mode!r} is not supported by weight-only quantization")
        module = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.bias is not None, scheme
        )
        module.quantized.encode(conv.weight.detach().float(), where)
        if conv.bias is not None:
            module.bias.data.copy_(conv.bias.detach())
        return module.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.quantized.weight().to(x.dtype), self.bias, self.stride, self.padding, self.dilation, self.groups)


class QuantizedEmbedding(nn.Module):
    """Embedding with a weight-only quantized table: a lookup decodes only the rows it reads (where rows are whole
    bytes apart), so the table stays packed in memory. ``.weight`` reads the decoded table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, scheme: WeightScheme) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.quantized = QuantizedWeight((num_embeddings, embedding_dim), scheme)

    @classmethod
    def from_float(cls, embedding: nn.Embedding, scheme: WeightScheme, where: str) -> QuantizedEmbedding:
        if embedding.max_norm is not None or embedding.sparse:
            raise ValueError(f"{where}: embeddings with max_norm or sparse gradients are not quantized")
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, scheme)
        module.quantized.encode(embedding.weight.detach().float(), where)
        return module.to(embedding.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded table (read-only: assign through ``quantized.encode``)."""
        return self.quantized.weight()

    def logical_parameters(self) -> dict[str, torch.Tensor]:
        return {"weight": self.quantized.weight()}

    def stored_bytes(self) -> int:
        return self.quantized.stored_bytes()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"index out of range: ids must lie in [0, {self.num_embeddings - 1}]")
        return self.quantized.rows(flat).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.quantized.scheme.scheme}, bits={self.quantized.scheme.stored_bits}"


@torch.no_grad()
def float_equivalent(module: nn.Module) -> nn.Module | None:
    """The plain float layer that computes what a weight-only quantized layer computes (decoded weight; an input
    scale folded into it), or None for a module that is not one or has no such layer (per-token activation
    quantization). What an exporter without bit operations or integer kernels can follow."""
    if isinstance(module, QuantizedLinear) and module.quantized.scheme.activation_bits is None:
        plain: nn.Module = nn.Linear(module.in_features, module.out_features, module.bias is not None)
    elif isinstance(module, QuantizedConv2d):
        plain = nn.Conv2d(
            module.in_channels,
            module.out_channels,
            (module.kernel_size[0], module.kernel_size[1]),
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
        )
    elif isinstance(module, QuantizedEmbedding):
        plain = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx)
    else:
        return None
    plain = plain.to(module.quantized.packed.device if hasattr(module.quantized, "packed") else module.weight.device)
    plain.weight.copy_(module.weight)
    bias = getattr(module, "bias", None)
    if bias is not None:
        plain.bias.copy_(bias)
    return plain


@register_mac_counter(QuantizedLinear)
def _quantized_linear_macs(module: QuantizedLinear, inputs: tuple, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


@register_mac_counter(QuantizedConv2d)
def _quantized_conv_macs(module: QuantizedConv2d, inputs: tuple, output: torch.Tensor) -> int:
    return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def is_transposed_linear(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a Linear whose weight is stored (in, out); it quantizes as a Linear."""
    return is_conv1d(module) and isinstance(getattr(module, "nf", None), int)


def empty_like(module: Any, scheme: WeightScheme) -> nn.Module:
    """A quantized module with the layer's structure and empty codes (filled by load_state_dict)."""
    if is_transposed_linear(module):
        return QuantizedLinear(module.nx, module.nf, module.bias is not None, scheme)
    if isinstance(module, nn.Linear):
        return QuantizedLinear(module.in_features, module.out_features, module.bias is not None, scheme)
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding(module.num_embeddings, module.embedding_dim, module.padding_idx, scheme)
    if isinstance(module, nn.Conv2d):
        return QuantizedConv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            scheme,
        )
    raise TypeError(f"weight-only quantization supports Linear, Conv2d and Embedding, not {type(module).__name__}")


@torch.no_grad()
def from_codes(module: Any, scheme: WeightScheme, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> nn.Module:
    """The quantized module replacing Linear (or Conv1D) ``module`` with codes and per-channel / per-group scales a
    method chose itself (GPTQ), laid out as ``quantization.primitives`` does for the scheme's uniform grid."""
    if scheme.scheme != "uniform":
        raise ValueError(f"codes chosen by a method need a uniform scheme, got {scheme.scheme!r}")
    quantized: Any = empty_like(module, scheme)
    holder, spec = quantized.quantized, scheme.uniform_spec()
    holder.scale = scale.reshape(holder.scale_shape(spec)).float().clone()
    holder.zero_point = zero_point.reshape(holder.scale_shape(spec)).to(torch.int32).clone()
    holder.pack(codes.reshape(holder.shape).to(torch.int64) - spec.code_range[0])
    if getattr(module, "bias", None) is not None:
        quantized.bias.data.copy_(module.bias.detach())
    return quantized.to(module.weight.device)


def quantize_module(module: Any, scheme: WeightScheme, where: str) -> nn.Module:
    """The quantized module replacing ``module`` (Linear, Conv2d, Embedding, or GPT-2's transposed Conv1D)."""
    if is_transposed_linear(module):
        quantized = QuantizedLinear(module.nx, module.nf, module.bias is not None, scheme)
        quantized.quantized.encode(module.weight.detach().float().t(), where)
        if module.bias is not None:
            quantized.bias.data.copy_(module.bias.detach())
        return quantized.to(module.weight.device)
    if isinstance(module, nn.Linear):
        return QuantizedLinear.from_float(module, scheme, where)
    if isinstance(module, nn.Conv2d):
        return QuantizedConv2d.from_float(module, scheme, where)
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding.from_float(module, scheme, where)
    raise TypeError(f"{where}: weight-only quantization supports Linear, Conv2d and Embedding, not {type(module).__name__}")


def own_forward(module: nn.Module) -> str | None:
    """The method a subclass of Linear / Conv2d / Embedding overrides to compute its output (a scaled, weight-
    standardized or position-offset layer), or None for the plain layer: a replacement that computes the plain
    layer's output from the weight would drop what the subclass adds."""
    if is_transposed_linear(module):
        return None  # computes x @ W + b, as its replacements do
    base = next((kind for kind in (nn.Linear, nn.Conv2d, nn.Embedding) if isinstance(module, kind)), None)
    if base is None:
        return None
    for method in ("forward", "_conv_forward"):
        if getattr(type(module), method, None) is not getattr(base, method, None):
            return None if base is nn.Linear and method == "forward" and _computes_linear(module) else method
    return None


@torch.no_grad()
def _computes_linear(module: nn.Module) -> bool:
    """Whether a Linear subclass's own forward computes exactly F.linear(x, weight, bias) (Falcon's FalconLinear
    writes x @ W.T + b out), in training and in eval mode, on probe inputs of two shapes: then it is the plain layer.
    Its hooks do not run; a forward that fails on the probe, or differs, keeps the subclass."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point() or weight.is_meta:
        return False
    generator = torch.Generator().manual_seed(0)
    mode = module.training
    try:
        for training in (False, True):
            module.train(training)
            for shape in ((3, weight.shape[1]), (2, 5, weight.shape[1])):
                x = torch.randn(shape, generator=generator).to(device=weight.device, dtype=weight.dtype)
                out = type(module).forward(module, x)
                if not isinstance(out, torch.Tensor) or not torch.allclose(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-6):
                    return False
    except Exception:  # a forward that takes other inputs is the subclass's own
        return False
    finally:
        module.train(mode)
    return True
