"""Sparse storage with relative indices (Deep Compression, Fig. 2).

A flat array is stored as the entries that differ from a background value (zero for float weights, the
pruned-weight code for codebook indices). Each entry keeps the distance from the previous entry in
``index_bits`` bits; when a gap is larger than 2^index_bits - 1, filler entries holding the background value are
inserted, each standing for the longest gap the bits can say.

Example:
    >>> import numpy as np
    >>> values = np.array([0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7])
    >>> gaps, entries = relative_encode(values, background=0, index_bits=3)
    >>> gaps.tolist(), entries.tolist()          # the gap of 9 needs one filler (a gap of 7 and a 0)
    ([2, 7, 1], [5, 0, 7])
    >>> relative_decode(gaps, entries, 13, background=0).tolist() == values.tolist()
    True
"""

from __future__ import annotations

import numpy as np

from torchslim.core.errors import ChecksumError, TorchslimError


def relative_encode(values: np.ndarray, background, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(gaps, entries): gaps in [0, 2^index_bits - 1]; entries are the values, with fillers of ``background``."""
    if not 1 <= index_bits <= 16:
        raise TorchslimError(f"index_bits must be between 1 and 16, got {index_bits}")
    flat = np.asarray(values).reshape(-1)
    positions = np.flatnonzero(flat != background)
    if positions.size == 0:
        return np.zeros(0, dtype=np.int64), flat[:0]
    span = 2**index_bits  # a filler stands for 'span' positions (gap of span - 1, then itself)
    gaps = np.diff(np.concatenate([[-1], positions])) - 1
    fillers = gaps // span
    remainders = gaps - fillers * span
    total = positions.size + int(fillers.sum())
    out_gaps = np.full(total, span - 1, dtype=np.int64)
    out_entries = np.full(total, background, dtype=flat.dtype)
    real_slots = np.cumsum(fillers + 1) - 1  # where each real entry lands after its fillers
    out_gaps[real_slots] = remainders
    out_entries[real_slots] = flat[positions]
    return out_gaps, out_entries


def relative_decode(gaps: np.ndarray, entries: np.ndarray, size: int, background) -> np.ndarray:
    """Inverse of ``relative_encode`` for an array of ``size`` elements."""
    if gaps.size != entries.size:
        raise ChecksumError(f"sparse tensor has {gaps.size} indices but {entries.size} values (corrupt)")
    out = np.full(size, background, dtype=entries.dtype)
    if gaps.size == 0:
        return out
    positions = np.cumsum(np.asarray(gaps, dtype=np.int64) + 1) - 1
    if positions[-1] >= size:
        raise ChecksumError(f"sparse indices run past the tensor's {size} elements (corrupt)")
    out[positions] = entries
    return out
