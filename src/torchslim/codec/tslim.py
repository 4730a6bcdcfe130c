"""The .tslim compressed model file.

Layout::

    b"TSLIM\\0"  version (1 byte)  header length (uint32 LE)  header CRC-32 (uint32 LE)
    header: zlib-compressed JSON {format, version, spec (architecture), payload_sha256, metadata,
                                  tensors: [{name, dtype, shape, encoding, ..., streams: [{role, coder, length, crc32}]}]}
    payload: the streams, one after another, in header order

Each tensor is stored the smallest way found among:

- ``raw``: its bytes as they are (any dtype);
- ``symbols``: integer codes (codebook indices of k-means / power-of-two weights, uniform codes) coded as one
  symbol stream;
- ``sparse-symbols``: codes that differ from the most frequent code (the pruned weights' code), with relative
  indices of 1..8 bits and filler entries (Deep Compression), as an index stream and a code stream;
- ``sparse-float``: the non-zero values of a float tensor kept exactly, with relative indices.

Every symbol stream is bit-packed, Huffman- or ANS-coded, whichever is smallest (see ``codec.entropy``).
Weights quantized by ``torchslim.quantize`` are stored as their codes and rebuilt into the same packed buffers,
so a loaded model's state equals the compressed model's state exactly. Writes are atomic; a corrupt or truncated
file raises ``ChecksumError``.

Example:
    >>> import torchslim as ts, tempfile, os
    >>> model = ts.models.create("lenet-300-100")
    >>> path = os.path.join(tempfile.mkdtemp(), "m.tslim")
    >>> summary = save_tslim(model, path)
    >>> from torchslim.codec import load_tslim
    >>> loaded = load_tslim(path)
    >>> all(bool((a == b).all()) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim.codec import entropy
from torchslim.codec.sparse import relative_encode
from torchslim.core.checks import check_model
from torchslim.core.errors import TorchslimError
from torchslim.core.files import refuse_overwrite, write_atomic
from torchslim.core.ties import tied_groups
from torchslim.io.modelfile import file_spec, state_for_saving

MAGIC = b"TSLIM\x00"
VERSION = 1
FORMAT = "torchslim-compressed"
PREAMBLE = struct.Struct("<6sBII")
INDEX_BITS = tuple(range(1, 9))

_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
}
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class Encoded:
    """One tensor's chosen encoding: its header record and its stream bytes."""

    record: dict[str, Any]
    streams: list[bytes]

    @property
    def size(self) -> int:
        return sum(len(s) for s in self.streams)


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _stream(role: str, coder: str, data: bytes) -> dict[str, Any]:
    return {"role": role, "coder": coder, "length": len(data), "crc32": zlib.crc32(data)}


def _encode_codes(codes: np.ndarray, alphabet: int, coders: tuple[str, ...], index_bits: tuple[int, ...]) -> Encoded:
    """The smallest of a dense symbol stream and sparse (relative index) streams for each index width."""
    coder, data = entropy.encode_best(codes, alphabet, coders)
    best = Encoded({"encoding": "symbols", "alphabet": alphabet, "streams": [_stream("codes", coder, data)]}, [data])
    if codes.size == 0:
        return best
    background = int(np.bincount(codes, minlength=alphabet).argmax())
    if np.count_nonzero(codes != background) > codes.size // 2:
        return best
    for bits in index_bits:
        gaps, entries = relative_encode(codes, background, bits)
        index_coder, index_data = entropy.encode_best(gaps, 2**bits, coders)
        value_coder, value_data = entropy.encode_best(entries, alphabet, coders)
        if len(index_data) + len(value_data) < best.size:
            best = Encoded(
                {
                    "encoding": "sparse-symbols",
                    "alphabet": alphabet,
                    "background": background,
                    "index_bits": bits,
                    "streams": [_stream("index", index_coder, index_data), _stream("codes", value_coder, value_data)],
                },
                [index_data, value_data],
            )
    return best


def _encode_float(tensor: torch.Tensor, coders: tuple[str, ...], index_bits: tuple[int, ...]) -> Encoded:
    data = _raw_bytes(tensor)
    best = Encoded({"encoding": "raw", "streams": [_stream("data", "raw", data)]}, [data])
    flat = tensor.detach().cpu().reshape(-1)
    nonzero = int(torch.count_nonzero(flat))
    if flat.numel() == 0 or nonzero * flat.element_size() >= len(data):
        return best
    # -0.0 (what masking a negative weight gives) is stored as 0.0: equal in value and in every computation
    flat = torch.where(flat == 0, torch.zeros_like(flat), flat)
    words = flat.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]).numpy()
    for bits in index_bits:
        gaps, entries = relative_encode(words, 0, bits)
        index_coder, index_data = entropy.encode_best(gaps, 2**bits, coders)
        value_data = entries.tobytes()
        if len(index_data) + len(value_data) < best.size:
            best = Encoded(
                {"encoding": "sparse-float", "index_bits": bits, "streams": [_stream("index", index_coder, index_data), _stream("values", "raw", value_data)]},
                [index_data, value_data],
            )
    return best


def quantized_code_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """{state key of a packed buffer: (its integer codes, bits per code)} for every module that stores integer codes
    (it declares ``code_tensor() -> (codes, bits) | None``, as weight-only quantized weights do)."""
    out = {}
    for name, module in model.named_modules():
        declared = getattr(module, "code_tensor", None)
        codes = declared() if callable(declared) else None
        if codes is not None:
            out[f"{name}.packed" if name else "packed"] = (codes[0].detach().cpu(), codes[1])
    return out


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a .tslim file holds for ``model``: its state with pruning masks resolved (as the model file does)."""
    return state_for_saving(model)


def encode_model(
    model: nn.Module,
    coders: tuple[str, ...] = entropy.CODERS,
    index_bits: tuple[int, ...] = INDEX_BITS,
    spec: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """The .tslim bytes of ``model``. ``coders`` limits the symbol coders (("packed",) measures the size before
    entropy coding); ``spec`` defaults to the architecture spec the model carries."""
    return _encode(model, coders, index_bits, spec, metadata)[0]


def _encode(
    model: nn.Module, coders: tuple[str, ...], index_bits: tuple[int, ...], spec: dict[str, Any] | None, metadata: dict[str, Any] | None
) -> tuple[bytes, dict[str, Any]]:
    unknown = [c for c in coders if c not in entropy.CODERS]
    if unknown or not coders:
        raise TorchslimError(f"coders must be a non-empty list of {', '.join(entropy.CODERS)}, got {list(coders)}")
    spec = file_spec(model, "encode", spec)
    state = model_state(model)
    codes = quantized_code_tensors(model)
    records, streams = [], []
    for name in sorted(state):
        tensor = state[name]
        if name in codes:
            code_tensor, bits = codes[name]
            encoded = _encode_codes(code_tensor.numpy().astype(np.int64), 2**bits, tuple(coders), tuple(index_bits))
            encoded.record["packed_bits"] = bits
            encoded.record["count"] = int(code_tensor.numel())
        elif tensor.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            encoded = _encode_float(tensor, tuple(coders), tuple(index_bits))
        else:
            data = _raw_bytes(tensor)
            encoded = Encoded({"encoding": "raw", "streams": [_stream("data", "raw", data)]}, [data])
        if str(tensor.dtype).removeprefix("torch.") not in _DTYPES:
            raise TorchslimError(f"tensor {name!r} has dtype {tensor.dtype}, which the .tslim format does not store")
        records.append({"name": name, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape), **encoded.record})
        streams.extend(encoded.streams)
    payload = b"".join(streams)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "spec": spec,
        "metadata": metadata or {},
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "tensors": records,
        "ties": tied_groups(model),  # tied followers are not stored: the reader fills them from their leader
    }
    header_bytes = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return PREAMBLE.pack(MAGIC, VERSION, len(header_bytes), zlib.crc32(header_bytes)) + header_bytes + payload, header


def encoded_size(model: nn.Module, coders: tuple[str, ...] = entropy.CODERS) -> int:
    """Bytes the model's .tslim file would take with these coders (nothing written)."""
    return len(encode_model(model, coders=coders))


@dataclasses.dataclass
class TslimSummary:
    path: Path
    bytes: int
    tensors: list[dict[str, Any]]


def save_tslim(
    model: nn.Module,
    path: str | os.PathLike[str],
    coders: tuple[str, ...] = entropy.CODERS,
    spec: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = True,
    index_bits: tuple[int, ...] = INDEX_BITS,
) -> TslimSummary:
    """Write the model as a .tslim file (temporary file, then rename)."""
    path = Path(path)
    refuse_overwrite(path, overwrite)
    check_model(model, str(path))
    data, header = _encode(model, coders, index_bits, spec, metadata)
    write_atomic(path, data)
    return TslimSummary(path=path, bytes=len(data), tensors=header["tensors"])
