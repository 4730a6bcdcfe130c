"""Bounded mutations of real torchslim files for fuzzing: byte flips left as they are (checksums then fail) and
structured edits of the header's fields and the payload's bytes with every checksum recomputed, so the readers
meet forged values, not only corruption."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import zlib
from typing import Any

PREAMBLE = struct.Struct("<6sBII")
HOSTILE_NUMBERS = (0, -1, 1, 2, 7, 8, 9, 15, 16, 17, 255, 256, 65535, 2**16, 2**31, 2**31 - 1, 2**32, 2**40, 2**62, 10**18, -(2**31), 1.5, float("nan"))
HOSTILE_VALUES = (None, True, "", "x", "raw", "huffman", "ans", "packed", "float32", "uint8", [], [1], [2**31], {}, {"kind": "x"}, "[" * 50)


def split_tslim(data: bytes) -> tuple[bytes, dict[str, Any], bytes]:
    magic, _, length, _ = PREAMBLE.unpack_from(data)
    header = json.loads(zlib.decompress(data[PREAMBLE.size : PREAMBLE.size + length]))
    return data[: len(magic) + 1], header, data[PREAMBLE.size + length :]


def join_tslim(prefix: bytes, header: dict[str, Any], payload: bytes, fix_payload: bool = True) -> bytes:
    if fix_payload:
        header = dict(header, payload_sha256=hashlib.sha256(payload).hexdigest())
    compressed = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return prefix + struct.pack("<II", len(compressed), zlib.crc32(compressed)) + compressed + payload


def _leaves(value: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(value, dict):
        return [path] + [leaf for key, item in value.items() for leaf in _leaves(item, path + (key,))]
    if isinstance(value, list):
        return [path] + [leaf for index, item in enumerate(value) for leaf in _leaves(item, path + (index,))]
    return [path]


def _set(root: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    target = root
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return root


def mutate_header(header: dict[str, Any], generator: random.Random) -> dict[str, Any]:
    """One forged field: a number, string, list or mapping swapped for a hostile value, or a key dropped."""
    header = json.loads(json.dumps(header))
    path = generator.choice(_leaves(header)[1:])
    if generator.random() < 0.15 and path:
        parent = header
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict):
            del parent[path[-1]]
            return header
    value = generator.choice(HOSTILE_NUMBERS + HOSTILE_VALUES)
    return _set(header, path, value)


def fix_stream_checksums(header: dict[str, Any], payload: bytes) -> None:
    """Recompute every stream's CRC-32 from the payload as the (possibly forged) lengths cut it."""
    offset = 0
    records = header.get("tensors")
    for record in records if isinstance(records, list) else []:
        streams = record.get("streams") if isinstance(record, dict) else None
        for stream in streams if isinstance(streams, list) else []:
            length = stream.get("length") if isinstance(stream, dict) else None
            if isinstance(length, int) and 0 <= length <= len(payload):
                stream["crc32"] = zlib.crc32(payload[offset : offset + length])
                offset += length


def mutate_tslim(data: bytes, generator: random.Random) -> bytes:
    """A mutated .tslim file: raw flips (40%), a forged header field (30%), or forged payload bytes (30%), the
    latter two re-checksummed."""
    choice = generator.random()
    if choice < 0.4:
        buffer = bytearray(data)
        for _ in range(generator.randint(1, 4)):
            position = generator.randrange(len(buffer))
            buffer[position] = generator.randrange(256)
        if generator.random() < 0.2:
            buffer = buffer[: generator.randrange(len(buffer))]
        return bytes(buffer)
    prefix, header, payload = split_tslim(data)
    if choice < 0.7:
        header = mutate_header(header, generator)
    else:
        buffer = bytearray(payload)
        for _ in range(generator.randint(1, 8)):
            buffer[generator.randrange(len(buffer))] = generator.randrange(256)
        payload = bytes(buffer)
    if isinstance(header, dict):
        fix_stream_checksums(header, payload)
    return join_tslim(prefix, header, payload)


def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header JSON, tensor bytes) of a safetensors file."""
    (length,) = struct.unpack_from("<Q", data)
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_safetensors(header: dict[str, Any], body: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _forge(value: Any, generator: random.Random) -> Any:
    """``value`` (JSON) with one forged field, or wholly replaced where it has no fields."""
    if isinstance(value, (dict, list)) and len(_leaves(value)) > 1:
        return mutate_header(value, generator) if isinstance(value, dict) else mutate_header({"v": value}, generator).get("v")
    return generator.choice(HOSTILE_NUMBERS + HOSTILE_VALUES)


def mutate_model_file(data: bytes, generator: random.Random, digest: Any = None) -> bytes:
    """A mutated torchslim model file: raw flips (35%); a forged architecture spec or tie record (35%); a forged
    tensor entry (dtype, shape, offsets) or forged tensor bytes with the file's SHA-256 recomputed by ``digest``
    (a function of the tensors) (30%)."""
    choice = generator.random()
    if choice < 0.35:
        buffer = bytearray(data)
        for _ in range(generator.randint(1, 4)):
            buffer[generator.randrange(len(buffer))] = generator.randrange(256)
        if generator.random() < 0.2:
            buffer = buffer[: generator.randrange(len(buffer))]
        return bytes(buffer)
    header, body = split_safetensors(data)
    metadata = header["__metadata__"]
    if choice < 0.7:
        key = generator.choice(["torchslim.spec", "torchslim.spec", "torchslim.ties"])
        forged = _forge(json.loads(metadata.get(key, "[]")), generator)
        metadata[key] = json.dumps(forged) if generator.random() < 0.95 else "[" * 100_000
        return join_safetensors(header, body)
    if generator.random() < 0.5:
        names = [name for name in header if name != "__metadata__"]
        name = generator.choice(names)
        header[name] = _forge(header[name], generator)
        return join_safetensors(header, body)
    buffer = bytearray(body)
    for _ in range(generator.randint(1, 8)):
        buffer[generator.randrange(len(buffer))] = generator.randrange(256)
    forged = join_safetensors(header, bytes(buffer))
    if digest is not None:
        from safetensors.torch import load

        metadata["torchslim.sha256"] = digest(load(forged))
        forged = join_safetensors(header, bytes(buffer))
    return forged
