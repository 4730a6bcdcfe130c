"""Reading .tslim files, which may come from anywhere: every declared size is checked against hard limits and
against the bytes actually present before anything is allocated for it, and every malformed field is a torchslim
error that names it.

Order of checks: the magic and the fixed header (before the file is read whole); the header length against the
file size; the header's checksum; its decompression, capped; its JSON, depth-limited; every field of every tensor
record (types, dtype, shape, encoding, streams, code widths, element counts against ``max_elements``); the payload
length and checksum; then, for loading, the architecture built on the meta device (no memory) and compared tensor
by tensor with the records; only then are streams decoded, each symbol count bounded by what its tensor holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim.codec import entropy
from torchslim.codec.sparse import relative_decode
from torchslim.codec.tslim import _DTYPES, FORMAT, MAGIC, PREAMBLE, VERSION, save_tslim
from torchslim.core.errors import ChecksumError, TorchslimError
from torchslim.core.files import ModelFormat, register_format
from torchslim.core.memory import release_freed_memory
from torchslim.io.modelfile import build_checked, load_state, with_ties
from torchslim.quantization.packing import pack_codes

MAX_HEADER_BYTES = 64 * 2**20  # the decompressed JSON header
MAX_ELEMENTS = 2**28  # tensor elements in one file (1 GiB of fp32); read larger files with max_elements=
MAX_DIMENSIONS = 8
ROLES = {"raw": ("data",), "symbols": ("codes",), "sparse-symbols": ("index", "codes"), "sparse-float": ("index", "values")}
STREAM_CODERS = (*entropy.CODERS, "raw")


def _fail(where: str, message: str) -> ChecksumError:
    return ChecksumError(f"{where}: {message}")


def _integer(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _read_header(path: Path) -> tuple[dict[str, Any], memoryview, int]:
    """(header, payload, header bytes) of a .tslim file, every size and checksum verified."""
    where = str(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        fixed = handle.read(PREAMBLE.size)
        if fixed[: len(MAGIC)] != MAGIC:
            raise _fail(where, "not a .tslim file (bad magic bytes)")
        if len(fixed) < PREAMBLE.size:
            raise _fail(where, f"truncated .tslim file ({size} bytes, shorter than its fixed header)")
        _, version, header_length, header_crc = PREAMBLE.unpack(fixed)
        if version > VERSION:
            raise TorchslimError(f"{where}: .tslim format version {version} is newer than this torchslim reads ({VERSION})")
        if header_length > size - PREAMBLE.size:
            raise _fail(where, f"header length {header_length} runs past the file's {size} bytes (truncated or corrupt)")
        header_bytes = handle.read(header_length)
        if zlib.crc32(header_bytes) != header_crc:
            raise _fail(where, "header checksum mismatch (corrupt or truncated file)")
        payload = memoryview(handle.read())
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(header_bytes, MAX_HEADER_BYTES)
    except zlib.error as error:
        raise _fail(where, f"header does not decompress ({error})") from None
    if inflater.unconsumed_tail:
        raise _fail(where, f"header inflates past {MAX_HEADER_BYTES:,} bytes (refused)")
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise _fail(where, f"header is not valid JSON ({type(error).__name__})") from None
    return header, payload, PREAMBLE.size + header_length


def check_header(header: Any, where: str, max_elements: int = MAX_ELEMENTS) -> None:
    """Every field the reader uses, checked for type and range; the total element count against ``max_elements``."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _fail(where, "the header is not a torchslim compressed-model header")
    for key, kind in (("spec", dict), ("tensors", list), ("payload_sha256", str)):
        if not isinstance(header.get(key), kind):
            raise _fail(where, f"header field {key!r} must be a {kind.__name__}")
    if not isinstance(header.get("metadata", {}), dict):
        raise _fail(where, "header field 'metadata' must be a mapping")
    names: set[str] = set()
    total = 0
    for index, record in enumerate(header["tensors"]):
        at = f"{where}: tensor {index}"
        if not isinstance(record, dict) or not isinstance(record.get("name"), str):
            raise ChecksumError(f"{at}: a record needs a 'name' string")
        at = f"{where}: tensor {record['name']!r}"
        if record["name"] in names:
            raise ChecksumError(f"{at}: listed twice")
        names.add(record["name"])
        if not isinstance(record.get("dtype"), str) or record["dtype"] not in _DTYPES:
            raise ChecksumError(f"{at}: unknown dtype {record.get('dtype')!r}")
        shape = record.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_DIMENSIONS or not all(_integer(d, 0, max_elements) for d in shape):
            raise ChecksumError(f"{at}: 'shape' must be a list of at most {MAX_DIMENSIONS} non-negative integers, got {shape!r}")
        count = math.prod(shape)
        total += count
        if total > max_elements:
            raise ChecksumError(f"{at}: the file declares more than {max_elements:,} tensor elements (refused; read it with a larger max_elements)")
        encoding = record.get("encoding")
        if not isinstance(encoding, str) or encoding not in ROLES:
            raise ChecksumError(f"{at}: unknown encoding {encoding!r}")
        streams = record.get("streams")
        if not isinstance(streams, list) or [s.get("role") if isinstance(s, dict) else None for s in streams] != list(ROLES[encoding]):
            raise ChecksumError(f"{at}: an {encoding} tensor has the streams {list(ROLES[encoding])}")
        for stream in streams:
            if (
                not isinstance(stream.get("coder"), str)
                or stream["coder"] not in STREAM_CODERS
                or not _integer(stream.get("length"), 0, 2**62)
                or not _integer(stream.get("crc32"), 0, 2**32 - 1)
            ):
                raise ChecksumError(f"{at}: stream {stream['role']!r} needs a known coder, a length and a CRC-32")
        if encoding in ("sparse-symbols", "sparse-float") and not _integer(record.get("index_bits"), 1, 16):
            raise ChecksumError(f"{at}: 'index_bits' must be between 1 and 16, got {record.get('index_bits')!r}")
        if encoding in ("symbols", "sparse-symbols"):
            bits, codes = record.get("packed_bits"), record.get("count")
            if not _integer(bits, 1, 16) or not _integer(codes, 0, max_elements):
                raise ChecksumError(f"{at}: 'packed_bits' must be between 1 and 16 and 'count' a number of codes")
            if record.get("dtype") != "uint8" or count != ((codes * bits + 7) // 8 if bits <= 8 else 2 * codes):
                raise ChecksumError(f"{at}: {codes} codes of {bits} bits do not pack into a uint8 tensor of shape {shape}")
            if encoding == "sparse-symbols" and not _integer(record.get("background"), 0, 2**bits - 1):
                raise ChecksumError(f"{at}: 'background' must be a code of {bits} bits")
    with_ties(dict.fromkeys(names), header.get("ties", []), where)  # each tie led by a stored tensor


def _parse(path: Path, max_elements: int) -> tuple[dict[str, Any], memoryview, int]:
    where = str(path)
    header, payload, header_size = _read_header(path)
    check_header(header, where, max_elements)
    expected = sum(s["length"] for t in header["tensors"] for s in t["streams"])
    if len(payload) != expected:
        raise _fail(where, f"payload holds {len(payload)} bytes, the header lists {expected} (truncated or corrupt)")
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise _fail(where, "payload does not match its SHA-256 checksum (corrupt file)")
    return header, payload, header_size


def _read_streams(record: dict[str, Any], payload: memoryview, offset: int, where: str) -> tuple[dict[str, bytes], int]:
    out = {}
    for stream in record["streams"]:
        data = bytes(payload[offset : offset + stream["length"]])
        offset += stream["length"]
        if zlib.crc32(data) != stream["crc32"]:
            raise _fail(where, f"stream {stream['role']!r} of tensor {record['name']!r} fails its CRC-32 (corrupt)")
        out[stream["role"]] = data
    return out, offset


def _stream_symbols(record: dict[str, Any], role: str, data: dict[str, bytes], limit: int) -> np.ndarray:
    coder = next(s["coder"] for s in record["streams"] if s["role"] == role)
    if coder == "raw":
        raise ChecksumError(f"tensor {record['name']!r}: stream {role!r} must be symbol-coded, not raw")
    return entropy.decode(coder, data[role], limit)


def _from_raw(data: bytes, dtype: torch.dtype, count: int, where: str) -> torch.Tensor:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if len(data) != count * itemsize:
        raise _fail(where, f"raw stream holds {len(data)} bytes, {count} x {dtype} need {count * itemsize} (truncated)")
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).clone()


def decode_record(record: dict[str, Any], data: dict[str, bytes], where: str) -> torch.Tensor:
    """The tensor a checked record and its streams hold."""
    name, dtype = record["name"], _DTYPES[record["dtype"]]
    shape = tuple(record["shape"])
    count = math.prod(shape)
    encoding = record["encoding"]
    if encoding == "raw":
        return _from_raw(data["data"], dtype, count, f"{where}: {name}").reshape(shape)
    if encoding == "sparse-float":
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if not dtype.is_floating_point or len(data["values"]) % itemsize:
            raise _fail(where, f"tensor {name!r}: sparse values must be whole {dtype} numbers")
        gaps = _stream_symbols(record, "index", data, 2 * count + 1)
        words = np.frombuffer(data["values"], dtype={2: np.int16, 4: np.int32, 8: np.int64}[itemsize])
        flat = relative_decode(gaps, words.copy(), count, 0)
        return torch.from_numpy(flat).view(dtype).reshape(shape).clone()
    codes_count = record["count"]
    if encoding == "symbols":
        codes = _stream_symbols(record, "codes", data, codes_count)
    else:
        gaps = _stream_symbols(record, "index", data, 2 * codes_count + 1)
        codes = relative_decode(gaps, _stream_symbols(record, "codes", data, 2 * codes_count + 1), codes_count, record["background"])
    if codes.size != codes_count:
        raise _fail(where, f"tensor {name!r} decodes to {codes.size} codes, expected {codes_count}")
    if codes.size and int(codes.max()) >= 2 ** record["packed_bits"]:
        raise _fail(where, f"tensor {name!r} holds codes wider than its {record['packed_bits']} bits")
    return pack_codes(torch.from_numpy(codes), record["packed_bits"]).reshape(shape)


def _check_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise TorchslimError(f"{path}: no such .tslim file")
    return path


def read_tslim(path: str | os.PathLike[str], max_elements: int = MAX_ELEMENTS) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The header and decoded state of a .tslim file, every checksum and declared size verified."""
    path = _check_file(path)
    header, payload, _ = _parse(path, max_elements)
    return header, with_ties(_decode_all(header, payload, str(path)), header.get("ties", []), str(path))


def _decode_all(header: dict[str, Any], payload: memoryview, where: str) -> dict[str, torch.Tensor]:
    tensors, offset = {}, 0
    for record in header["tensors"]:
        data, offset = _read_streams(record, payload, offset, where)
        tensors[record["name"]] = decode_record(record, data, where)
    return tensors


def load_tslim(
    path: str | os.PathLike[str], trust_factory: bool | str = False, device: str | torch.device | None = None, max_elements: int = MAX_ELEMENTS
) -> nn.Module:
    """A runnable model from a .tslim file: the architecture from its spec (checked against the tensor records on the
    meta device before anything is decoded or built), then the exact stored state."""
    path = _check_file(path)
    header, payload, _ = _parse(path, max_elements)
    ties = header.get("ties", [])
    stored = with_ties({r["name"]: (tuple(r["shape"]), _DTYPES[r["dtype"]]) for r in header["tensors"]}, ties, str(path))
    model = build_checked(header["spec"], stored, trust_factory, str(path))
    load_state(model, with_ties(_decode_all(header, payload, str(path)), ties, str(path)), str(path))
    release_freed_memory()  # the float layers the architecture was built with, and the decoded streams, are gone
    model.eval()
    return model.to(device) if device is not None else model


def inspect_tslim(path: str | os.PathLike[str], max_elements: int = MAX_ELEMENTS) -> dict[str, Any]:
    """Each tensor's encoding and bytes, with each symbol stream's order-0 entropy bound next to its coded size."""
    path = _check_file(path)
    header, payload, header_size = _parse(path, max_elements)
    rows, offset = [], 0
    for record in header["tensors"]:
        streams, offset = _read_streams(record, payload, offset, str(path))
        count = record.get("count", math.prod(record["shape"]))
        row = {
            "name": record["name"],
            "shape": record["shape"],
            "elements": count,
            "encoding": record["encoding"],
            "index_bits": record.get("index_bits"),
            "bits": record.get("packed_bits"),
            "bytes": sum(s["length"] for s in record["streams"]),
            "streams": [],
        }
        for stream in record["streams"]:
            entry = {"role": stream["role"], "coder": stream["coder"], "bytes": stream["length"]}
            if stream["coder"] != "raw":
                symbols = _stream_symbols(record, stream["role"], streams, 2 * count + 1)
                entry.update(symbols=int(symbols.size), entropy_bytes=round(entropy.entropy_bytes(symbols), 1))
            row["streams"].append(entry)
        rows.append(row)
    return {
        "path": str(path),
        "bytes": header_size + len(payload),
        "header_bytes": header_size,
        "spec": header["spec"],
        "metadata": header.get("metadata", {}),
        "tensors": rows,
    }


def is_tslim(path: str | os.PathLike[str]) -> bool:
    path = Path(path)
    if path.suffix == ".tslim":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _save_format(model: nn.Module, path: Path, overwrite: bool = True) -> Path:
    return save_tslim(model, path, overwrite=overwrite).path


register_format(ModelFormat(".tslim", save=_save_format, load=load_tslim, sniff=lambda head: head.startswith(MAGIC)))

__all__ = ["MAX_ELEMENTS", "MAX_HEADER_BYTES", "check_header", "decode_record", "inspect_tslim", "is_tslim", "load_tslim", "read_tslim"]
