import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchslim.codec import entropy
from torchslim.codec.sparse import relative_decode, relative_encode
from torchslim.core.errors import ChecksumError, TorchslimError


@st.composite
def symbol_streams(draw):
    alphabet = draw(st.integers(1, 300))
    values = draw(st.lists(st.integers(0, alphabet - 1), max_size=400))
    return np.array(values, dtype=np.int64), alphabet


@settings(max_examples=60, deadline=None)
@given(symbol_streams())
def test_every_coder_round_trips(stream):
    symbols, alphabet = stream
    for coder in entropy.CODERS:
        decoded = entropy.decode(coder, entropy.encode(coder, symbols, alphabet))
        assert decoded.dtype == np.int64 and np.array_equal(decoded, symbols), coder


def test_huffman_is_optimal_prefix_code_on_skewed_data():
    rng = np.random.default_rng(0)
    probabilities = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
    symbols = rng.choice(5, size=20000, p=probabilities)
    counts = np.bincount(symbols, minlength=5)
    lengths = entropy.huffman_lengths(counts)
    assert sum(2.0**-length for length in lengths if length) <= 1.0  # Kraft
    assert lengths.tolist() == [1, 2, 3, 4, 4]  # dyadic probabilities: code lengths are -log2 p
    bound = entropy.entropy_bytes(symbols) * 8
    assert bound <= entropy.huffman_bits(symbols, 5) < bound + symbols.size  # within one bit per symbol
    # ANS gets closer to the entropy than fixed-width codes on a skewed stream
    coder, data = entropy.encode_best(symbols, 8)
    assert coder in ("huffman", "ans") and len(data) < len(entropy.encode("packed", symbols, 8)) / 1.5


def test_huffman_lengths_are_limited():
    counts = np.array([2**i for i in range(30)])  # Fibonacci-like skew would need 29-bit codes
    lengths = entropy.huffman_lengths(counts)
    assert lengths.max() <= entropy.MAX_HUFFMAN_LENGTH and sum(2.0**-length for length in lengths) <= 1.0
    symbols = np.repeat(np.arange(30), [min(c, 50) for c in counts])
    assert np.array_equal(entropy.decode("huffman", entropy.encode("huffman", symbols, 30)), symbols)


def test_encode_best_picks_the_smallest():
    rng = np.random.default_rng(1)
    uniform = rng.integers(0, 256, size=5000)
    coder, data = entropy.encode_best(uniform, 256)
    sizes = {c: len(entropy.encode(c, uniform, 256)) for c in entropy.CODERS}
    assert len(data) == min(sizes.values()) and sizes[coder] == len(data)


@pytest.mark.parametrize("coder", entropy.CODERS)
def test_truncated_streams_fail_clearly(coder):
    rng = np.random.default_rng(2)
    symbols = rng.choice(16, size=3000, p=np.linspace(1, 16, 16) / 136)
    data = entropy.encode(coder, symbols, 16)
    with pytest.raises(ChecksumError):
        entropy.decode(coder, data[: len(data) // 2])


def test_bad_symbols_are_refused():
    with pytest.raises(TorchslimError, match=r"symbols must lie in \[0, 3\]"):
        entropy.encode("huffman", np.array([0, 4]), 4)
    with pytest.raises(TorchslimError, match="unknown coder"):
        entropy.encode("lzma", np.array([0]), 4)


def test_entropy_bound():
    symbols = np.array([0, 1] * 500)
    assert entropy.entropy_bytes(symbols) == pytest.approx(1000 / 8)
    assert entropy.entropy_bytes(np.zeros(10, dtype=np.int64)) == 0


def test_deep_compression_relative_index_example():
    """Han et al. 2016, Fig. 2: 3-bit indices; a gap longer than 8 positions inserts a filler zero."""
    values = np.zeros(16)
    values[[1, 4, 15]] = [3.4, 0.9, 1.7]
    gaps, entries = relative_encode(values, 0.0, 3)
    assert gaps.tolist() == [1, 2, 7, 2]
    assert entries.tolist() == [3.4, 0.9, 0.0, 1.7]  # the filler stands at position 12
    assert np.array_equal(relative_decode(gaps, entries, 16, 0.0), values)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=300), st.integers(1, 8), st.integers(0, 5))
def test_relative_indices_round_trip(values, bits, background):
    array = np.array(values, dtype=np.int64)
    gaps, entries = relative_encode(array, background, bits)
    assert gaps.size == 0 or gaps.max() < 2**bits
    positions = np.flatnonzero(array != background)
    gap_sizes = np.diff(np.concatenate([[-1], positions])) - 1
    assert entries.size == positions.size + int((gap_sizes // 2**bits).sum())  # one filler per full span
    assert np.array_equal(relative_decode(gaps, entries, array.size, background), array)


def test_relative_decode_rejects_indices_past_the_end():
    with pytest.raises(ChecksumError, match="past the tensor"):
        relative_decode(np.array([5]), np.array([1]), 3, 0)
    assert math.isclose(relative_decode(np.zeros(0, dtype=np.int64), np.zeros(0), 4, 0.0).sum(), 0)


def test_a_huffman_bit_pattern_that_is_no_code_is_refused():
    from torchslim.codec import entropy
    from torchslim.core.errors import ChecksumError

    # 3 symbols, alphabet 4, one code of length 1 for symbol 3 ('0'); the payload's bits are all '1': no code
    with pytest.raises(ChecksumError, match="no code"):
        entropy._decode_huffman(bytes([3, 4, 0, 1, 0xFF]), 100)
    assert entropy._decode_huffman(bytes([3, 4, 0, 1, 0x00]), 100).tolist() == [3, 3, 3]
