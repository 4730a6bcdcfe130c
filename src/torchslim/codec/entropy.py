"""Coding of integer symbol streams: fixed-width bit packing, canonical Huffman (Deep Compression) and
asymmetric numeral systems (ANS, through the constriction library). Each coded stream is self-contained: its
first bytes say how many symbols it holds and carry the code table, so ``decode(coder, encode(coder, x)) == x``.

``encode_best`` tries the coders it is given and keeps the smallest result, tables included.

Example:
    >>> import numpy as np
    >>> symbols = np.array([0, 0, 0, 1, 0, 2, 0, 0], dtype=np.int64)
    >>> coder, data = encode_best(symbols, alphabet=4)
    >>> bool((decode(coder, data) == symbols).all())
    True
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from torchslim.core.errors import ChecksumError, TorchslimError

CODERS = ("packed", "huffman", "ans")
MAX_HUFFMAN_LENGTH = 15  # code lengths fit a nibble; longer codes are avoided by flattening the counts
MAX_ENTROPY_ALPHABET = 4096  # larger alphabets (e.g. 16-bit codes) are only bit-packed
MAX_PACKED_BITS = 16


# -- varints -----------------------------------------------------------------------------------------------------


def write_varint(value: int) -> bytes:
    if value < 0:
        raise TorchslimError(f"varint of a negative value {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data: bytes | memoryview, offset: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if offset >= len(data):
            raise ChecksumError("coded stream ends inside a number (truncated)")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7
        if shift > 63:
            raise ChecksumError("malformed number in a coded stream")


# -- bit helpers -------------------------------------------------------------------------------------------------


def _pack_fixed(values: np.ndarray, bits: int) -> bytes:
    """Big-endian fixed-width codes, MSB first, concatenated."""
    if values.size == 0 or bits == 0:
        return b""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    matrix = ((values.astype(np.uint64)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(matrix.reshape(-1)).tobytes()


def _unpack_fixed(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    if count == 0 or bits == 0:
        return np.zeros(count, dtype=np.int64)
    needed = count * bits
    raw = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if raw.size < needed:
        raise ChecksumError(f"bit-packed stream holds {raw.size} bits, {count} codes of {bits} bits need {needed} (truncated)")
    matrix = raw[:needed].reshape(count, bits).astype(np.int64)
    return (matrix << np.arange(bits - 1, -1, -1, dtype=np.int64)).sum(axis=1)


def _check_symbols(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size and (symbols.min() < 0 or symbols.max() >= alphabet):
        raise TorchslimError(f"symbols must lie in [0, {alphabet - 1}], got [{symbols.min()}, {symbols.max()}]")
    return symbols.astype(np.int64)


def bits_for(alphabet: int) -> int:
    return max(1, math.ceil(math.log2(alphabet))) if alphabet > 1 else 0


def entropy_bytes(symbols: np.ndarray) -> float:
    """The stream's empirical (order-0) entropy bound in bytes: n * H / 8."""
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size == 0:
        return 0.0
    counts = np.bincount(symbols).astype(np.float64)
    probabilities = counts[counts > 0] / symbols.size
    return float(-(probabilities * np.log2(probabilities)).sum() * symbols.size / 8)


# -- packed ------------------------------------------------------------------------------------------------------


def _encode_packed(symbols: np.ndarray, alphabet: int) -> bytes:
    bits = bits_for(alphabet)
    return write_varint(symbols.size) + bytes([bits]) + _pack_fixed(symbols, bits)


def _symbol_count(data: bytes | memoryview, limit: int) -> tuple[int, int]:
    """The symbol count a stream declares, refused above ``limit`` (what its tensor can hold) before anything is
    allocated for it."""
    count, offset = read_varint(data, 0)
    if count > limit:
        raise ChecksumError(f"coded stream declares {count} symbols, more than the {limit} its tensor can hold (corrupt)")
    return count, offset


def _decode_packed(data: bytes | memoryview, limit: int) -> np.ndarray:
    count, offset = _symbol_count(data, limit)
    if offset >= len(data):
        raise ChecksumError("bit-packed stream truncated")
    bits = data[offset]
    if bits > MAX_PACKED_BITS:
        raise ChecksumError(f"bit-packed stream declares {bits} bits per code, more than {MAX_PACKED_BITS} (corrupt)")
    if count * bits > 8 * (len(data) - offset - 1):
        raise ChecksumError(f"bit-packed stream holds {8 * (len(data) - offset - 1)} bits, {count} codes of {bits} bits need {count * bits} (truncated)")
    return _unpack_fixed(data[offset + 1 :], bits, count)


# -- Huffman -----------------------------------------------------------------------------------------------------


def huffman_lengths(counts: np.ndarray, max_length: int = MAX_HUFFMAN_LENGTH) -> np.ndarray:
    """Code lengths of an optimal prefix code for ``counts`` (zero counts get length 0), limited to ``max_length``
    bits by flattening the counts until the longest code fits."""
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.size, dtype=np.int64)
    used = np.flatnonzero(counts)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used[0]] = 1
        return lengths
    if used.size > 2**max_length:
        raise TorchslimError(f"{used.size} symbols cannot take Huffman codes of at most {max_length} bits")
    weights = counts[used].copy()
    while True:
        heap: list[tuple[int, int, tuple[int, ...]]] = [(int(w), i, (int(s),)) for i, (w, s) in enumerate(zip(weights, used))]
        heapq.heapify(heap)
        depth = dict.fromkeys((int(s) for s in used), 0)
        tie = len(heap)
        while len(heap) > 1:
            w1, _, a = heapq.heappop(heap)
            w2, _, b = heapq.heappop(heap)
            for symbol in a + b:
                depth[symbol] += 1
            heapq.heappush(heap, (w1 + w2, tie, a + b))
            tie += 1
        if max(depth.values()) <= max_length:
            for symbol, value in depth.items():
                lengths[symbol] = value
            return lengths
        weights = (weights + 1) // 2  # flatten the distribution and try again


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values for the given lengths (shorter codes first, then by symbol)."""
    codes = np.zeros(lengths.size, dtype=np.int64)
    order = sorted((int(length), symbol) for symbol, length in enumerate(lengths) if length > 0)
    code, previous = 0, 0
    for length, symbol in order:
        code <<= length - previous
        codes[symbol] = code
        code += 1
        previous = length
    return codes


def _encode_huffman(symbols: np.ndarray, alphabet: int) -> bytes:
    counts = np.bincount(symbols, minlength=alphabet)
    lengths = huffman_lengths(counts)
    codes = canonical_codes(lengths)
    table = np.zeros(alphabet + (alphabet % 2), dtype=np.uint8)
    table[:alphabet] = lengths
    header = write_varint(symbols.size) + write_varint(alphabet) + (table[0::2] << 4 | table[1::2]).astype(np.uint8).tobytes()
    if symbols.size == 0:
        return header
    symbol_lengths, symbol_codes = lengths[symbols], codes[symbols]
    total = int(symbol_lengths.sum())
    starts = np.concatenate([[0], np.cumsum(symbol_lengths)[:-1]])
    owner = np.repeat(np.arange(symbols.size), symbol_lengths)
    within = np.arange(total) - starts[owner]
    bits = ((symbol_codes[owner] >> (symbol_lengths[owner] - 1 - within)) & 1).astype(np.uint8)
    return header + np.packbits(bits).tobytes()


def _alphabet(data: bytes | memoryview, offset: int) -> tuple[int, int]:
    alphabet, offset = read_varint(data, offset)
    if not 1 <= alphabet <= MAX_ENTROPY_ALPHABET:
        raise ChecksumError(f"coded stream declares an alphabet of {alphabet} symbols; entropy-coded alphabets hold 1 to {MAX_ENTROPY_ALPHABET}")
    return alphabet, offset


def _decode_huffman(data: bytes | memoryview, limit: int) -> np.ndarray:
    count, offset = _symbol_count(data, limit)
    alphabet, offset = _alphabet(data, offset)
    table_bytes = (alphabet + 1) // 2
    if offset + table_bytes > len(data):
        raise ChecksumError("Huffman stream truncated inside its code table")
    packed = np.frombuffer(data[offset : offset + table_bytes], dtype=np.uint8)
    lengths = np.stack([packed >> 4, packed & 0x0F], axis=1).reshape(-1)[:alphabet].astype(np.int64)
    offset += table_bytes
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if not lengths.any():
        raise ChecksumError("Huffman stream has symbols but an empty code table")
    if count > 8 * (len(data) - offset):  # every code takes at least one bit
        raise ChecksumError(f"Huffman stream of {len(data) - offset} bytes cannot hold {count} symbols (corrupt)")
    if float(np.sum(2.0 ** -lengths[lengths > 0])) > 1.0:
        raise ChecksumError("Huffman code table is not a prefix code (corrupt)")
    codes = canonical_codes(lengths)
    width = int(lengths.max())
    # lookup table: every width-bit window -> (symbol, length)
    lookup_symbol = np.zeros(2**width, dtype=np.int64)
    lookup_length = np.zeros(2**width, dtype=np.int64)
    for symbol in np.flatnonzero(lengths):
        length = int(lengths[symbol])
        first = int(codes[symbol]) << (width - length)
        lookup_symbol[first : first + (1 << (width - length))] = symbol
        lookup_length[first : first + (1 << (width - length))] = length
    bits = np.unpackbits(np.frombuffer(data[offset:], dtype=np.uint8)).astype(np.int64)
    padded = np.concatenate([bits, np.zeros(width, dtype=np.int64)])
    windows = np.zeros(bits.size, dtype=np.int64)
    for j in range(width):
        windows = (windows << 1) | padded[j : j + bits.size]
    symbol_at, length_at = lookup_symbol[windows].tolist(), lookup_length[windows].tolist()
    out = [0] * count
    position, limit = 0, bits.size
    for index in range(count):
        if position >= limit:
            raise ChecksumError(f"Huffman stream ends after {index} of {count} symbols (truncated)")
        if length_at[position] == 0:  # an incomplete code table leaves bit patterns that are no code
            raise ChecksumError(f"Huffman stream holds a bit pattern that is no code at symbol {index} (corrupt)")
        out[index] = symbol_at[position]
        position += length_at[position]
    if position > limit:
        raise ChecksumError("Huffman stream truncated inside its last code")
    return np.asarray(out, dtype=np.int64)


def huffman_bits(symbols: np.ndarray, alphabet: int) -> int:
    """Payload bits of the Huffman code of ``symbols`` (no table), for reporting."""
    counts = np.bincount(np.asarray(symbols).reshape(-1), minlength=alphabet)
    return int((huffman_lengths(counts) * counts).sum())


# -- ANS (constriction) ------------------------------------------------------------------------------------------


def _ans_model(counts: np.ndarray):
    import constriction

    probabilities = counts.astype(np.float64) / max(int(counts.sum()), 1)
    return constriction.stream.model.Categorical(probabilities, perfect=False)


def _encode_ans(symbols: np.ndarray, alphabet: int) -> bytes:
    import constriction

    counts = np.bincount(symbols, minlength=alphabet)
    header = write_varint(symbols.size) + write_varint(alphabet) + b"".join(write_varint(int(c)) for c in counts)
    if np.count_nonzero(counts) <= 1:  # one symbol repeated: the counts say it all
        return header
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols.astype(np.int32), _ans_model(counts))
    return header + coder.get_compressed().astype("<u4").tobytes()


def _decode_ans(data: bytes | memoryview, limit: int) -> np.ndarray:
    import constriction

    count, offset = _symbol_count(data, limit)
    alphabet, offset = _alphabet(data, offset)
    counts = np.zeros(alphabet, dtype=np.int64)
    for index in range(alphabet):
        counts[index], offset = read_varint(data, offset)
        if counts[index] > count:
            raise ChecksumError("ANS stream's symbol counts do not add up (corrupt)")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if int(counts.sum()) != count:
        raise ChecksumError("ANS stream's symbol counts do not add up (corrupt)")
    if np.count_nonzero(counts) == 1:
        return np.full(count, int(np.flatnonzero(counts)[0]), dtype=np.int64)
    payload = bytes(data[offset:])
    if len(payload) % 4:
        raise ChecksumError("ANS stream is not a whole number of 32-bit words (truncated)")
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
    try:
        decoded = np.asarray(coder.decode(_ans_model(counts), count), dtype=np.int64)
    except Exception as error:  # constriction raises its own types for invalid data
        raise ChecksumError(f"ANS stream does not decode ({error})") from None
    return decoded


# -- dispatch ----------------------------------------------------------------------------------------------------

_ENCODERS = {"packed": _encode_packed, "huffman": _encode_huffman, "ans": _encode_ans}
_DECODERS = {"packed": _decode_packed, "huffman": _decode_huffman, "ans": _decode_ans}


def encode(coder: str, symbols: np.ndarray, alphabet: int) -> bytes:
    """Code ``symbols`` (integers in [0, alphabet)) with one coder."""
    if coder not in _ENCODERS:
        raise TorchslimError(f"unknown coder {coder!r}; valid: {', '.join(CODERS)}")
    symbols = _check_symbols(symbols, alphabet)
    if coder != "packed" and alphabet > MAX_ENTROPY_ALPHABET:
        raise TorchslimError(f"{coder} coding takes alphabets up to {MAX_ENTROPY_ALPHABET} symbols, got {alphabet}")
    return _ENCODERS[coder](symbols, alphabet)


def decode(coder: str, data: bytes | memoryview, limit: int = 2**31) -> np.ndarray:
    """The symbols of a coded stream; a stream that declares more than ``limit`` symbols (what its tensor can hold)
    or more than its bytes can carry is refused before anything is allocated for it."""
    if coder not in _DECODERS:
        raise ChecksumError(f"unknown coder {coder!r} in a coded stream; valid: {', '.join(CODERS)}")
    return _DECODERS[coder](data, limit)


def encode_best(symbols: np.ndarray, alphabet: int, coders: tuple[str, ...] = CODERS) -> tuple[str, bytes]:
    """The smallest coding of ``symbols`` among ``coders`` (tables included): (coder name, bytes)."""
    symbols = _check_symbols(symbols, alphabet)
    best: tuple[str, bytes] | None = None
    for coder in coders:
        if coder != "packed" and alphabet > MAX_ENTROPY_ALPHABET:
            continue
        data = encode(coder, symbols, alphabet)
        if best is None or len(data) < len(best[1]):
            best = (coder, data)
    if best is None:
        best = ("packed", encode("packed", symbols, alphabet))
    return best
