"""Hand-made hostile files, kept in ``tests/security/corpus/``: each forges one thing in a real torchslim file with
every checksum recomputed, so only the reader's own checks stand between it and the allocation or code it asks
for. ``CASES`` names the error each must give; ``test_hostile_files.py`` reads them all.

Rebuild the folder (after a format change) with ``python -m tests.security.corpus``.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import torchslim as ts
from torchslim.codec.entropy import write_varint
from torchslim.io.modelfile import _digest

from .mutations import fix_stream_checksums, join_safetensors, join_tslim, split_safetensors, split_tslim

FOLDER = Path(__file__).parent / "corpus"

# file name -> (what it forges, the message torchslim must give)
CASES: dict[str, tuple[str, str]] = {
    "huffman-count-2e31.tslim": ("a Huffman stream declaring 2^31 symbols", "coded stream declares 2147483648 symbols"),
    "shape-2e31.tslim": ("a tensor record of shape [2^31]", "'shape' must be a list of at most 8 non-negative integers, got [2147483648]"),
    "header-bomb.tslim": ("a 65 KB header that inflates past 64 MiB", "header inflates past"),
    "ans-alphabet-2e40.tslim": ("an ANS stream declaring an alphabet of 2^40 symbols", "alphabet of 1099511627776 symbols"),
    "packed-0-bits.tslim": ("codes of 0 bits each", "'packed_bits' must be between 1 and 16"),
    "no-tensors-key.tslim": ("a header without its tensor list (a KeyError)", "header field 'tensors' must be a list"),
    "shape-is-a-string.tslim": ("a shape that is a string (a TypeError)", "'shape' must be a list"),
    "nested-json.tslim": ("a header of 100,000 nested lists (a RecursionError)", "header is not valid JSON (RecursionError)"),
    "header-length-2e31.tslim": ("a preamble declaring a 2 GiB header", "header length 2147483648 runs past the file's"),
    "tie-to-nothing.tslim": ("a tie led by a tensor the file does not hold", "which the file does not hold"),
    "not-tslim.tslim": ("a file that is not a .tslim at all", "not a .tslim file (bad magic bytes)"),
    "hidden-40000.safetensors": ("an MLP spec with hidden [40000, 40000] over small tensors", "the stored tensors do not fit the architecture"),
    "in-features-1e9.safetensors": ("an MLP spec with in_features 10^9", "the architecture holds torch.uint8 (9000000000,)"),
    "attribute-forward.safetensors": ("a channel-pruning record that sets a layer's forward", "sets only the sizes"),
    "import-path-os-system.safetensors": ("an architecture naming os:system", "importing it runs its code"),
    "float64-weights.safetensors": ("float64 tensors where the architecture holds float32", "is stored as torch.float64"),
    "spec-not-json.safetensors": ("an architecture spec of 100,000 nested lists", "not valid JSON"),
    "tie-to-nothing.safetensors": ("a tie led by a tensor the file does not hold", "which the file does not hold"),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = ts.models.create("mlp", in_features=16, hidden=(24,), num_classes=4)
    model = ts.make_permanent(ts.prune(model, {"sparsity": 0.7}).model)
    return ts.quantize(model, {"weights": {"scheme": "kmeans", "bits": 3}}).model


def _tslim(prefix: bytes, header: dict[str, Any], payload: bytes) -> bytes:
    fix_stream_checksums(header, payload)
    return join_tslim(prefix, header, payload)


def _record(header: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in header["tensors"] if r["name"] == name)


def _with_stream(header: dict[str, Any], payload: bytes, name: str, data: bytes, coder: str) -> bytes:
    """The payload with tensor ``name``'s single stream replaced by ``data`` (lengths updated)."""
    offset = 0
    for record in header["tensors"]:
        for stream in record["streams"]:
            if record["name"] == name:
                payload = payload[:offset] + data + payload[offset + stream["length"] :]
                stream["length"], stream["coder"] = len(data), coder
            offset += stream["length"]
    return payload


def _model_file(data: bytes, spec: Any = None, ties: Any = None, tensors: dict[str, torch.Tensor] | None = None, raw_spec: str | None = None) -> bytes:
    header, body = split_safetensors(data)
    metadata = dict(header["__metadata__"])
    if tensors is not None:
        metadata["torchslim.sha256"] = _digest(tensors)
        return save_safetensors(tensors, metadata=metadata)
    if spec is not None:
        metadata["torchslim.spec"] = json.dumps(spec)
    if raw_spec is not None:
        metadata["torchslim.spec"] = raw_spec
    if ties is not None:
        metadata["torchslim.ties"] = json.dumps(ties)
    header["__metadata__"] = metadata
    return join_safetensors(header, body)


def build(folder: Path = FOLDER) -> dict[str, int]:
    """Write every corpus file; returns {name: bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    model = _model()
    with tempfile.TemporaryDirectory() as scratch:
        ts.save(model, Path(scratch) / "m.tslim")
        ts.save(model, Path(scratch) / "m.safetensors")
        tslim = (Path(scratch) / "m.tslim").read_bytes()
        modelfile = (Path(scratch) / "m.safetensors").read_bytes()
    prefix, base, payload = split_tslim(tslim)

    def forged(edit) -> bytes:
        header = json.loads(json.dumps(base))
        new_payload = edit(header) or payload
        return _tslim(prefix, header, new_payload)

    files: dict[str, bytes] = {}
    files["huffman-count-2e31.tslim"] = forged(
        lambda h: _with_stream(h, payload, "head.quantized.packed", write_varint(2**31) + write_varint(8) + bytes(4) + bytes(20), "huffman")
    )
    files["shape-2e31.tslim"] = forged(lambda h: _record(h, "head.bias").update(shape=[2**31]))
    header = json.dumps(base, separators=(",", ":"))
    bomb = zlib.compress((header[:-1] + "," + '"pad":"' + " " * (65 * 2**20) + '"}').encode(), 9)
    files["header-bomb.tslim"] = prefix + struct.pack("<II", len(bomb), zlib.crc32(bomb)) + bomb + payload
    files["ans-alphabet-2e40.tslim"] = forged(lambda h: _with_stream(h, payload, "head.quantized.packed", write_varint(96) + write_varint(2**40), "ans"))
    files["packed-0-bits.tslim"] = forged(lambda h: _record(h, "head.quantized.packed").update(packed_bits=0))
    files["no-tensors-key.tslim"] = forged(lambda h: h.pop("tensors") and None)
    files["shape-is-a-string.tslim"] = forged(lambda h: _record(h, "head.bias").update(shape="x"))
    nested = zlib.compress(b"[" * 100_000, 9)
    files["nested-json.tslim"] = prefix + struct.pack("<II", len(nested), zlib.crc32(nested)) + nested
    files["header-length-2e31.tslim"] = tslim[: len(prefix)] + struct.pack("<II", 2**31, 0) + tslim[len(prefix) + 8 :]
    files["tie-to-nothing.tslim"] = forged(lambda h: h.update(ties=[["missing.weight", "head.bias"]]))
    files["not-tslim.tslim"] = b"PK\x03\x04" + bytes(200)

    spec = json.loads(split_safetensors(modelfile)[0]["__metadata__"]["torchslim.spec"])
    files["hidden-40000.safetensors"] = _model_file(modelfile, spec={**spec, "kwargs": {**spec["kwargs"], "hidden": [40000, 40000]}})
    files["in-features-1e9.safetensors"] = _model_file(modelfile, spec={**spec, "kwargs": {**spec["kwargs"], "in_features": 10**9}})
    transform = {"kind": "channel-pruning", "shapes": {}, "attributes": {"layers.0": {"forward": 0}}}
    files["attribute-forward.safetensors"] = _model_file(modelfile, spec={**spec, "transforms": spec.get("transforms", []) + [transform]})
    files["import-path-os-system.safetensors"] = _model_file(modelfile, spec={"factory": "os:system", "kwargs": {"command": "echo planted"}})
    plain = ts.models.create("mlp", in_features=16, hidden=(24,), num_classes=4)
    with tempfile.TemporaryDirectory() as scratch:
        ts.save(plain, Path(scratch) / "p.safetensors")
        plain_file = (Path(scratch) / "p.safetensors").read_bytes()
    doubled = {name: tensor.double() for name, tensor in load_safetensors(plain_file).items()}
    files["float64-weights.safetensors"] = _model_file(plain_file, tensors=doubled)
    files["spec-not-json.safetensors"] = _model_file(modelfile, raw_spec="[" * 100_000)
    files["tie-to-nothing.safetensors"] = _model_file(modelfile, ties=[["missing.weight", "head.bias"]])
    assert set(files) == set(CASES), sorted(set(files) ^ set(CASES))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "SHA256SUMS").write_text("".join(f"{hashlib.sha256(files[n]).hexdigest()}  {n}\n" for n in sorted(files)))
    return {name: len(data) for name, data in files.items()}


if __name__ == "__main__":
    sizes = build()
    json.dump(sizes, sys.stdout, indent=1)
    print()
