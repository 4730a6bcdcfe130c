"""docs/tslim-format.md checked by an independent reader.

The reader below is written from the specification alone: it uses only the standard library, numpy and (for the
``ans`` coder) constriction, and nothing of ``torchslim``. The tests write real files with torchslim (plain, pruned,
k-means / uniform quantized, half precision, tied weights) and check that every tensor the reader decodes equals, bit
for bit, what torchslim's own reader and loader give, and that corruption is detected where the specification says.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# used only to write files and for the reference reading, never by the independent reader below
import torchslim as ts
from torchslim.codec import read_tslim, save_tslim
from torchslim.core.errors import TorchslimError
from torchslim.pruning import prune_in_place
from torchslim.pruning.unstructured import PruneConfig

constriction = pytest.importorskip("constriction")

# ---------------------------------------------------------------------------------------------------------------------
# The independent reader, from docs/tslim-format.md: nothing in this section uses torchslim
# ---------------------------------------------------------------------------------------------------------------------

MAGIC = b"TSLIM\x00"
PREAMBLE = struct.Struct("<6sBII")  # section 3
MAX_HEADER = 64 * 2**20
MAX_ELEMENTS = 2**28
# dtype: (numpy dtype holding the element's bytes, bytes per element); bfloat16 is kept as its 16 bits
DTYPES = {
    "float32": ("<f4", 4),
    "float64": ("<f8", 8),
    "float16": ("<f2", 2),
    "bfloat16": ("<u2", 2),
    "int64": ("<i8", 8),
    "int32": ("<i4", 4),
    "int16": ("<i2", 2),
    "int8": ("i1", 1),
    "uint8": ("u1", 1),
    "bool": ("?", 1),
}
FLOAT_WORDS = {"float16": "<i2", "bfloat16": "<i2", "float32": "<i4", "float64": "<i8"}  # section 7.3
ROLES = {"raw": ["data"], "symbols": ["codes"], "sparse-symbols": ["index", "codes"], "sparse-float": ["index", "values"]}
SYMBOL_CODERS = ("packed", "huffman", "ans")


class FormatError(ValueError):
    """A file that does not follow the specification (corrupt, truncated or malformed)."""


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for index in range(10):
        if pos >= len(data):
            raise FormatError("varint runs past the end of its stream")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, pos
    raise FormatError("varint longer than 10 bytes")


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def decode_packed(data: bytes, limit: int) -> np.ndarray:
    """Section 6.1."""
    n, pos = read_varint(data, 0)
    if n > limit:
        raise FormatError(f"stream declares {n} symbols, more than {limit}")
    if pos >= len(data):
        raise FormatError("packed stream has no width byte")
    width = data[pos]
    pos += 1
    if width > 16:
        raise FormatError(f"packed width {width} > 16")
    if n * width > 8 * (len(data) - pos):
        raise FormatError("packed stream truncated")
    if n == 0 or width == 0:
        return np.zeros(n, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=pos))[: n * width].reshape(n, width).astype(np.int64)
    return bits @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))  # MSB first


def decode_huffman(data: bytes, limit: int) -> np.ndarray:
    """Section 6.2: nibble table, canonical codes, MSB-first bits."""
    n, pos = read_varint(data, 0)
    if n > limit:
        raise FormatError(f"stream declares {n} symbols, more than {limit}")
    alphabet, pos = read_varint(data, pos)
    if not 1 <= alphabet <= 4096:
        raise FormatError(f"alphabet {alphabet} outside 1..4096")
    table = data[pos : pos + (alphabet + 1) // 2]
    if len(table) != (alphabet + 1) // 2:
        raise FormatError("Huffman table truncated")
    pos += len(table)
    lengths = [nibble for byte in table for nibble in (byte >> 4, byte & 0x0F)][:alphabet]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if not any(lengths):
        raise FormatError("empty Huffman table")
    if sum(2.0**-length for length in lengths if length) > 1.0:
        raise FormatError("Huffman table violates the Kraft inequality")
    if n > 8 * (len(data) - pos):
        raise FormatError("Huffman stream too short for its symbol count")
    codes: dict[tuple[int, int], int] = {}
    code, previous = 0, 0
    for length, symbol in sorted((length, symbol) for symbol, length in enumerate(lengths) if length):
        code <<= length - previous
        codes[(length, code)] = symbol
        code, previous = code + 1, length
    longest = max(lengths)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=pos)).tolist()
    out, at = [], 0
    for _ in range(n):
        value, length = 0, 0
        while True:
            if at >= len(bits):
                raise FormatError("Huffman stream ends inside a code")
            value, length, at = (value << 1) | bits[at], length + 1, at + 1
            if (length, value) in codes:
                out.append(codes[(length, value)])
                break
            if length >= longest:
                raise FormatError("bits that match no Huffman code")
    return np.asarray(out, dtype=np.int64)


def decode_ans(data: bytes, limit: int) -> np.ndarray:
    """Section 6.3: counts as varints, then constriction's default ANS coder on uint32 LE words."""
    n, pos = read_varint(data, 0)
    if n > limit:
        raise FormatError(f"stream declares {n} symbols, more than {limit}")
    alphabet, pos = read_varint(data, pos)
    if not 1 <= alphabet <= 4096:
        raise FormatError(f"alphabet {alphabet} outside 1..4096")
    counts = []
    for _ in range(alphabet):
        count, pos = read_varint(data, pos)
        if count > n:
            raise FormatError("ANS count larger than the symbol count")
        counts.append(count)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if sum(counts) != n:
        raise FormatError("ANS counts do not add up")
    used = [symbol for symbol, count in enumerate(counts) if count]
    if len(used) == 1:
        return np.full(n, used[0], dtype=np.int64)
    words = data[pos:]
    if len(words) % 4:
        raise FormatError("ANS data is not whole 32-bit words")
    table = np.asarray(counts, dtype=np.int64)
    model = constriction.stream.model.Categorical(table.astype(np.float64) / table.sum(), perfect=False)
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(words, dtype="<u4").astype(np.uint32))
    return np.asarray(coder.decode(model, n), dtype=np.int64)


DECODERS = {"packed": decode_packed, "huffman": decode_huffman, "ans": decode_ans}


def relative_decode(gaps: np.ndarray, entries: np.ndarray, size: int, background: Any) -> np.ndarray:
    """Section 7.2."""
    if gaps.size != entries.size:
        raise FormatError("sparse tensor with different numbers of indices and values")
    out = np.full(size, background, dtype=entries.dtype)
    position = -1
    for gap, entry in zip(gaps.tolist(), entries.tolist()):
        position += gap + 1
        if position >= size:
            raise FormatError("sparse index past the end of the tensor")
        out[position] = entry
    return out


def pack_code_buffer(codes: np.ndarray, bits: int) -> np.ndarray:
    """Section 7.5: LSB-first bit stream up to 8 bits, uint16 LE above."""
    if bits > 8:
        return np.frombuffer(codes.astype("<u2").tobytes(), dtype=np.uint8).copy()
    stream = ((codes.astype(np.int64)[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


def check_header(header: Any, max_elements: int = MAX_ELEMENTS) -> None:
    """Section 9, step 2."""
    if not isinstance(header, dict) or header.get("format") != "torchslim-compressed":
        raise FormatError("not a torchslim-compressed header")
    if not isinstance(header.get("spec"), dict) or not isinstance(header.get("tensors"), list) or not isinstance(header.get("payload_sha256"), str):
        raise FormatError("header lacks spec, tensors or payload_sha256")
    if not isinstance(header.get("metadata", {}), dict):
        raise FormatError("metadata is not an object")
    names, total = set(), 0
    for record in header["tensors"]:
        if not isinstance(record, dict) or not isinstance(record.get("name"), str) or record["name"] in names:
            raise FormatError("record without a unique name")
        names.add(record["name"])
        if record.get("dtype") not in DTYPES:
            raise FormatError(f"unknown dtype {record.get('dtype')!r}")
        shape = record.get("shape")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d, 0, max_elements) for d in shape):
            raise FormatError(f"bad shape {shape!r}")
        elements = math.prod(shape)
        total += elements
        if total > max_elements:
            raise FormatError("too many elements")
        encoding = record.get("encoding")
        if encoding not in ROLES:
            raise FormatError(f"unknown encoding {encoding!r}")
        streams = record.get("streams")
        if not isinstance(streams, list) or [s.get("role") if isinstance(s, dict) else None for s in streams] != ROLES[encoding]:
            raise FormatError("streams do not have the encoding's roles")
        for stream in streams:
            symbol_role = stream["role"] in ("index", "codes")
            allowed = SYMBOL_CODERS if symbol_role else ("raw",)
            if stream.get("coder") not in allowed or not _is_int(stream.get("length"), 0, 2**62) or not _is_int(stream.get("crc32"), 0, 2**32 - 1):
                raise FormatError(f"bad stream record {stream!r}")
        if encoding.startswith("sparse") and not _is_int(record.get("index_bits"), 1, 16):
            raise FormatError("bad index_bits")
        if encoding in ("symbols", "sparse-symbols"):
            bits, count = record.get("packed_bits"), record.get("count")
            if not _is_int(bits, 1, 16) or not _is_int(count, 0, max_elements):
                raise FormatError("bad packed_bits or count")
            packed_bytes = (count * bits + 7) // 8 if bits <= 8 else 2 * count
            if record["dtype"] != "uint8" or elements != packed_bytes:
                raise FormatError("code buffer shape does not match count and packed_bits")
            if encoding == "sparse-symbols" and not _is_int(record.get("background"), 0, 2**bits - 1):
                raise FormatError("bad background")
    ties = header.get("ties", [])
    if not isinstance(ties, list) or not all(isinstance(g, list) and len(g) > 1 and all(isinstance(n, str) for n in g) and g[0] in names for g in ties):
        raise FormatError("bad ties")


def parse(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Sections 3-5: (checked header, verified payload)."""
    if data[:6] != MAGIC:
        raise FormatError("bad magic")
    if len(data) < PREAMBLE.size:
        raise FormatError("truncated preamble")
    _, version, header_length, header_crc = PREAMBLE.unpack_from(data)
    if version != 1:
        raise FormatError(f"unknown version {version}")
    if header_length > len(data) - PREAMBLE.size:
        raise FormatError("header length past the end of the file")
    compressed = data[PREAMBLE.size : PREAMBLE.size + header_length]
    if zlib.crc32(compressed) != header_crc:
        raise FormatError("header CRC-32 mismatch")
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(compressed, MAX_HEADER)
    except zlib.error as error:
        raise FormatError(f"header does not inflate: {error}") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise FormatError("header inflates too far or is incomplete")
    header = json.loads(text)
    check_header(header)
    payload = data[PREAMBLE.size + header_length :]
    if len(payload) != sum(s["length"] for r in header["tensors"] for s in r["streams"]):
        raise FormatError("payload length differs from the stream lengths")
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise FormatError("payload SHA-256 mismatch")
    return header, payload


def decode_record(record: dict[str, Any], streams: dict[str, bytes]) -> np.ndarray:
    """Section 7: the tensor's elements as a numpy array of ``DTYPES[dtype]`` in ``shape``."""
    dtype, itemsize = DTYPES[record["dtype"]]
    shape = tuple(record["shape"])
    elements = math.prod(shape)
    coders = {s["role"]: s["coder"] for s in record["streams"]}

    def symbols(role: str, limit: int) -> np.ndarray:
        return DECODERS[coders[role]](streams[role], limit)

    encoding = record["encoding"]
    if encoding == "raw":
        if len(streams["data"]) != elements * itemsize:
            raise FormatError("raw stream of the wrong length")
        return np.frombuffer(streams["data"], dtype=dtype).reshape(shape).copy()
    if encoding == "sparse-float":
        word = FLOAT_WORDS.get(record["dtype"])
        if word is None or len(streams["values"]) % itemsize:
            raise FormatError("sparse-float values are not whole float words")
        gaps = symbols("index", 2 * elements + 1)
        flat = relative_decode(gaps, np.frombuffer(streams["values"], dtype=word), elements, 0)
        return flat.view(dtype).reshape(shape)
    count, bits = record["count"], record["packed_bits"]
    if encoding == "symbols":
        codes = symbols("codes", count)
    else:
        gaps = symbols("index", 2 * count + 1)
        codes = relative_decode(gaps, symbols("codes", 2 * count + 1), count, record["background"])
    if codes.size != count or (codes.size and int(codes.max()) >= 2**bits):
        raise FormatError("codes do not fit count or packed_bits")
    return pack_code_buffer(codes, bits).reshape(shape)


def read_file(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(header, {name: tensor} with tie followers filled in, {name of a code buffer: its codes})."""
    header, payload = parse(Path(path).read_bytes())
    tensors, codes, offset = {}, {}, 0
    for record in header["tensors"]:
        streams = {}
        for stream in record["streams"]:
            data = payload[offset : offset + stream["length"]]
            offset += stream["length"]
            if zlib.crc32(data) != stream["crc32"]:
                raise FormatError(f"stream {stream['role']} of {record['name']} fails its CRC-32")
            streams[stream["role"]] = data
        tensors[record["name"]] = decode_record(record, streams)
        if "packed_bits" in record:
            codes[record["name"]] = unpack_code_buffer(tensors[record["name"]].reshape(-1), record["packed_bits"], record["count"])
    for group in header.get("ties", []):
        for follower in group[1:]:
            tensors[follower] = tensors[group[0]]
    return header, tensors, codes


def unpack_code_buffer(buffer: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of section 7.5."""
    if bits > 8:
        return np.frombuffer(buffer.tobytes(), dtype="<u2")[:count].astype(np.int64)
    stream = np.unpackbits(buffer, bitorder="little")[: count * bits].reshape(count, bits).astype(np.int64)
    return stream @ (1 << np.arange(bits, dtype=np.int64))


def dequantize(header: dict[str, Any], tensors: dict[str, np.ndarray], codes: dict[str, np.ndarray], layer: str, shape: tuple[int, ...]) -> np.ndarray:
    """Section 8: the float32 weight of a quantized layer (kmeans, pow2 and uniform schemes)."""
    transform = next(t for t in header["spec"]["transforms"] if t["kind"] == "weight-quantization")
    scheme = transform["layers"][layer]
    c = codes[f"{layer}.quantized.packed"].reshape(shape)
    if scheme["scheme"] in ("kmeans", "pow2"):
        codebook = tensors[f"{layer}.quantized.codebook"].copy()
        codebook[codebook == 0] = 0.0  # -0.0 reads as +0.0
        return codebook[c]
    assert scheme["scheme"] == "uniform"
    bits = scheme["bits"]
    qmin = (-1 if bits == 1 else -(2 ** (bits - 1))) if scheme["symmetric"] else 0
    scale, zero_point = tensors[f"{layer}.quantized.scale"], tensors[f"{layer}.quantized.zero_point"]
    signed = (c + qmin).astype(np.float32)
    if scheme["granularity"] != "group":
        return (signed - zero_point.astype(np.float32)) * scale
    rows = signed.reshape(shape[0], -1)
    group_of = np.arange(rows.shape[1]) // scheme["group_size"]  # element j of a row is in group j // group_size
    zero_point, scale = (t.reshape(shape[0], -1)[:, group_of] for t in (zero_point, scale))
    return ((rows - zero_point.astype(np.float32)) * scale).reshape(shape)


# ---------------------------------------------------------------------------------------------------------------------
# Files written by torchslim, and the comparisons
# ---------------------------------------------------------------------------------------------------------------------


def _bits(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _same(array: np.ndarray, tensor: torch.Tensor, dtype: str) -> bool:
    return str(tensor.dtype).removeprefix("torch.") == dtype and tuple(array.shape) == tuple(tensor.shape) and array.tobytes() == _bits(tensor)


def _pruned(name: str, sparsity: float, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ts.models.create(name, **kwargs)
    prune_in_place(model, PruneConfig(importance="l1", scope="global", sparsity=sparsity))
    ts.make_permanent(model)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """name: (file, the model written to it)."""
    folder = tmp_path_factory.mktemp("tslim-spec")
    out: dict[str, tuple[Path, torch.nn.Module]] = {}

    torch.manual_seed(0)
    plain = ts.models.create("lenet-300-100")
    save_tslim(plain, folder / "plain.tslim")
    out["plain"] = (folder / "plain.tslim", plain)

    data = ts.data.load("digits")
    torch.manual_seed(0)
    model = ts.models.create_for("lenet-300-100", data)
    recipe = {"name": "t", "stages": [{"prune": {"sparsity": [0.95]}}, {"quantize": {"weights": {"scheme": "kmeans", "bits": 4}}}, {"encode": {}}]}
    result = ts.compress(model, recipe, data, latency=False, progress=False)
    result.save(folder / "deep.tslim")
    out["deep"] = (folder / "deep.tslim", result.model)
    for coders in (("huffman",), ("packed",)):
        save_tslim(result.model, folder / f"deep-{coders[0]}.tslim", coders=coders)
        out[f"deep-{coders[0]}"] = (folder / f"deep-{coders[0]}.tslim", result.model)

    overrides = {"fc2": {"scheme": "uniform", "bits": 12}, "fc3": {"scheme": "uniform", "bits": 16, "granularity": "group", "group_size": 32}}
    mixed = ts.quantize(_pruned("lenet-300-100", 0.9), {"weights": {"scheme": "kmeans", "bits": 3}, "overrides": overrides}).model
    save_tslim(mixed, folder / "mixed.tslim")
    save_tslim(mixed, folder / "mixed-huffman.tslim", coders=("huffman",))
    out["mixed"] = (folder / "mixed.tslim", mixed)
    out["mixed-huffman"] = (folder / "mixed-huffman.tslim", mixed)

    tied = _pruned("char-transformer", 0.9, layers=1, embed_dim=32, heads=2, block_size=16)
    tied.head.weight = tied.token_embedding.weight
    save_tslim(tied, folder / "tied.tslim")
    out["tied"] = (folder / "tied.tslim", tied)
    half = _pruned("char-transformer", 0.9, layers=1, embed_dim=32, heads=2, block_size=16).to(torch.bfloat16)
    save_tslim(half, folder / "bf16.tslim")
    out["bf16"] = (folder / "bf16.tslim", half)
    return out


def test_independent_reader_matches_torchslim_bit_for_bit(files):
    exercised: set[tuple[str, str, str]] = set()
    packed_bits, dtypes, ties = set(), set(), []
    for name, (path, model) in files.items():
        header, tensors, _ = read_file(path)
        reference_header, reference = read_tslim(path)
        assert header == reference_header, name
        assert tensors.keys() == reference.keys(), name
        for key, array in tensors.items():
            assert _same(array, reference[key], str(reference[key].dtype).removeprefix("torch.")), f"{name}: {key}"
        loaded = ts.load(path).state_dict()
        assert loaded.keys() == tensors.keys(), name
        for key, tensor in loaded.items():
            assert _same(tensors[key], tensor, str(tensor.dtype).removeprefix("torch.")), f"{name}: {key} differs from the loaded model"
        # the file holds the model's own state (code buffers included); -0.0 may come back as +0.0 from sparse-float
        original = model.state_dict()
        for record in header["tensors"]:
            key = record["name"]
            assert torch.equal(original[key], torch.from_numpy(tensors[key].copy()).view(original[key].dtype)), f"{name}: {key}"
            exercised.update((record["encoding"], s["role"], s["coder"]) for s in record["streams"])
            packed_bits.add(record.get("packed_bits"))
            dtypes.add(record["dtype"])
        ties += header["ties"]
    required = {
        ("raw", "data", "raw"),
        ("symbols", "codes", "packed"),
        ("symbols", "codes", "huffman"),
        ("symbols", "codes", "ans"),
        ("sparse-symbols", "index", "packed"),
        ("sparse-symbols", "index", "huffman"),
        ("sparse-symbols", "index", "ans"),
        ("sparse-symbols", "codes", "packed"),
        ("sparse-symbols", "codes", "huffman"),
        ("sparse-float", "index", "packed"),
        ("sparse-float", "index", "huffman"),
        ("sparse-float", "index", "ans"),
        ("sparse-float", "values", "raw"),
    }
    assert required <= exercised, sorted(required - exercised)
    assert {3, 4, 12, 16} <= packed_bits
    assert {"float32", "bfloat16", "uint8", "int32"} <= dtypes
    assert ["token_embedding.weight", "head.weight"] in ties


def test_compress_file_holds_sparse_entropy_coded_codes(files):
    """The pipeline's own file: codebook codes stored sparse or entropy-coded, never as raw bytes."""
    header, _, _ = read_file(files["deep"][0])
    assert header["metadata"] == {"recipe": "t", "stages": ["baseline", "1 prune", "2 quantize", "3 encode"]}
    records = {r["name"]: r for r in header["tensors"]}
    for layer in ("fc1", "fc2", "fc3"):
        record = records[f"{layer}.quantized.packed"]
        assert record["encoding"] in ("symbols", "sparse-symbols") and record["packed_bits"] == 4
        assert any(s["coder"] in ("huffman", "ans") for s in record["streams"])
    assert any(r["encoding"] == "sparse-symbols" for r in records.values())


def test_codebooks_and_scales_give_the_loaded_weights(files):
    """Section 8: dequantized from the file alone, the weights equal what the loaded layers compute."""
    for name in ("deep", "mixed"):
        path = files[name][0]
        header, tensors, codes = read_file(path)
        loaded = ts.load(path)
        for layer in ("fc1", "fc2", "fc3"):
            module = loaded.get_submodule(layer)
            shape = (module.out_features, module.in_features)
            with torch.no_grad():
                expected = module.quantized.weight()
            weight = dequantize(header, tensors, codes, layer, shape)
            assert weight.dtype == np.float32 and np.array_equal(weight, expected.numpy()), f"{name}: {layer}"


@pytest.mark.parametrize(
    ("coder", "stream", "symbols"),
    [
        ("packed", "05 02 1B 40", [0, 1, 2, 3, 1]),
        ("packed", "08 02 01 20", [0, 0, 0, 1, 0, 2, 0, 0]),
        ("huffman", "08 04 12 20 13 00", [0, 0, 0, 1, 0, 2, 0, 0]),
        ("huffman", "03 04 00 01 00", [3, 3, 3]),
        ("ans", "08 04 06 01 01 00 68 00 00 17", [0, 0, 0, 1, 0, 2, 0, 0]),
        ("ans", "03 04 00 00 00 03", [3, 3, 3]),
    ],
)
def test_worked_examples_of_the_specification(coder, stream, symbols):
    assert DECODERS[coder](bytes.fromhex(stream), 100).tolist() == symbols


def test_worked_examples_of_indices_packing_and_checksums():
    assert read_varint(bytes.fromhex("AC 02"), 0) == (300, 2) and read_varint(bytes.fromhex("80 96 01"), 0) == (19200, 3)
    assert zlib.crc32(b"123456789") == 0xCBF43926
    decoded = relative_decode(np.array([2, 7, 1]), np.array([5, 0, 7]), 13, 0)
    assert decoded.tolist() == [0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]
    assert pack_code_buffer(np.array([1, 2, 3, 0]), 2).tolist() == [0x39]
    assert pack_code_buffer(np.array([5, 3, 7]), 3).tolist() == [0xDD, 0x01]
    assert pack_code_buffer(np.array([0x123, 7]), 12).tolist() == [0x23, 0x01, 0x07, 0x00]
    with pytest.raises(FormatError, match="past the end"):
        relative_decode(np.array([2, 7, 3]), np.array([5, 0, 7]), 13, 0)


def _rewrite_header(data: bytes, edit) -> bytes:
    """The file with its header JSON edited (header CRC recomputed, so only later checks can catch the edit)."""
    _, version, length, _ = PREAMBLE.unpack_from(data)
    header = json.loads(zlib.decompress(data[15 : 15 + length]))
    edit(header)
    compressed = zlib.compress(json.dumps(header).encode(), 9)
    return PREAMBLE.pack(MAGIC, version, len(compressed), zlib.crc32(compressed)) + compressed + data[15 + length :]


def test_corruption_is_detected_as_specified(files, tmp_path):
    data = files["deep"][0].read_bytes()
    header_length = PREAMBLE.unpack_from(data)[2]
    payload_start = 15 + header_length
    header, _ = parse(data)
    sparse = next(r for r in header["tensors"] if r["encoding"] == "sparse-symbols")
    offset = 0
    for record in header["tensors"]:
        if record is sparse:
            break
        offset += sum(s["length"] for s in record["streams"])

    def flipped(position: int, source: bytes = data) -> bytes:
        return source[:position] + bytes([source[position] ^ 0x01]) + source[position + 1 :]

    payload_flip = flipped(payload_start + offset + 3)
    stream_flip = _rewrite_header(payload_flip, lambda h: h.update(payload_sha256=hashlib.sha256(payload_flip[payload_start:]).hexdigest()))
    cases = {
        "bad magic": flipped(0),
        "unknown version": data[:6] + bytes([2]) + data[7:],
        "header CRC-32": flipped(20),
        "payload SHA-256": payload_flip,
        "payload length": data[:-1],
        "fails its CRC-32": stream_flip,  # payload checksum made to match: the stream's own CRC-32 catches it
        "truncated preamble": data[:10],
        "header length past the end": data[: payload_start - 1],
    }
    for message, corrupt in cases.items():
        with pytest.raises(FormatError, match=message):
            read_file(_write(tmp_path / "bad.tslim", corrupt))
        with pytest.raises(TorchslimError):  # torchslim's reader refuses the same file (ChecksumError is one)
            read_tslim(tmp_path / "bad.tslim")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
