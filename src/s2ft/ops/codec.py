"""Compact, lossless encodings of an S2FT plan: the spectrum locations and the row/column permutations.

Pure functions on tensors and Python integers (no file I/O). Every blob is a 1-D ``uint8`` tensor, so that
safetensors stores it as it is, and decoding gives back the plan bit for bit.

- **Permutations** (:func:`encode_permutation`): the Lehmer code ``L[i] = #{j > i : perm[j] < perm[i]}``, whose
  digit ``i`` lies in ``[0, size - 1 - i]``, ranked as one mixed-radix integer ``Σ_i L[i] · (size - 1 - i)!`` in
  ``[0, size!)``, written little-endian in exactly ``ceil(log2(size!) / 8)`` bytes: the information content of a
  permutation, rounded up to a byte. A permutation of 384 takes 344 bytes (int16: 768).
- **Locations** (:func:`encode_locations`): the ``n`` distinct flat positions ``rows * d_in + cols`` of the
  ``d_out x d_in`` grid as a set, sorted, and the gaps between neighbours Golomb-coded with the parameter that is
  optimal for a uniformly random set of that density (it depends on ``(d_out * d_in, n)`` only, so nothing but the
  codes is stored). Sets denser than half the grid are coded through their complement. A uniformly random set
  takes within about 1% of ``log2 C(d_out * d_in, n)`` bits, the information content of a set; no set takes more
  than :func:`locations_max_bits`.

Because a set has no order, the coefficients must be stored in the same *canonical order* as the decoded
locations: increasing flat position. :func:`encode_locations` returns the permutation ``order`` that puts them
there (``coeffs[order]``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "decode_locations",
    "decode_permutation",
    "encode_locations",
    "encode_permutation",
    "golomb_parameter",
    "locations_bound_bits",
    "locations_max_bits",
    "permutation_bound_bits",
    "permutation_nbytes",
]


# ---------------------------------------------------------------------------------------------- helpers
def _as_int_array(values: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """``values`` (a 1-D integer tensor or array, any device) as an int64 NumPy array."""
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(array.shape)}")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got {array.dtype}")
    return array.astype(np.int64, copy=False)


def _as_blob(blob: torch.Tensor | bytes | bytearray | np.ndarray, name: str = "blob") -> np.ndarray:
    """A blob (1-D ``uint8`` tensor, array or bytes) as a ``uint8`` NumPy array."""
    if isinstance(blob, bytes | bytearray | memoryview):
        return np.frombuffer(bytes(blob), dtype=np.uint8)
    array = blob.detach().cpu().numpy() if isinstance(blob, torch.Tensor) else np.asarray(blob)
    if array.ndim != 1 or array.dtype != np.uint8:
        raise ValueError(
            f"{name} must be a 1-D uint8 tensor, got {array.dtype} of shape {tuple(array.shape)}"
        )
    return array


def _to_tensor(data: bytes | np.ndarray) -> torch.Tensor:
    """A ``uint8`` tensor that owns a copy of ``data``."""
    return torch.from_numpy(np.frombuffer(bytes(data), dtype=np.uint8).copy())


def _check_size(size: int, name: str) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {size!r}")


# ---------------------------------------------------------------------------------------------- permutations
def permutation_bound_bits(size: int) -> float:
    """``log2(size!)``: the bits that single out one permutation of ``size`` among all of them."""
    _check_size(size, "size")
    return math.lgamma(size + 1) / math.log(2)


def permutation_nbytes(size: int) -> int:
    """Bytes of :func:`encode_permutation`'s blob: ``ceil(log2(size!) / 8)``, exactly (the largest rank,
    ``size! - 1``, needs that many)."""
    _check_size(size, "size")
    return ((math.factorial(size) - 1).bit_length() + 7) // 8


def _lehmer_code(perm: np.ndarray) -> list[int]:
    """``L[i] = #{j > i : perm[j] < perm[i]}`` with a Fenwick tree over values: ``O(size log size)``."""
    size = len(perm)
    tree = [0] * (size + 1)
    code = [0] * size
    values = perm.tolist()
    for i in range(size - 1, -1, -1):
        v = values[i]
        count, j = 0, v  # how many inserted values are < v: the prefix sum over [0, v)
        while j > 0:
            count += tree[j]
            j -= j & -j
        code[i] = count
        j = v + 1
        while j <= size:
            tree[j] += 1
            j += j & -j
    return code


def _from_lehmer_code(code: list[int]) -> list[int]:
    """The permutation whose Lehmer code is ``code``: ``perm[i]`` is the ``code[i]``-th smallest value not yet
    taken, found by descending a Fenwick tree of the free values: ``O(size log size)``."""
    size = len(code)
    tree = [0] * (size + 1)
    for j in range(1, size + 1):  # every value free: build the counts in O(size)
        tree[j] += 1
        parent = j + (j & -j)
        if parent <= size:
            tree[parent] += tree[j]
    top = 1 << max(size.bit_length() - 1, 0)
    perm = [0] * size
    for i, rank in enumerate(code):
        pos, step = 0, top  # the largest pos with (free values < pos) <= rank, found bit by bit
        while step:
            nxt = pos + step
            if nxt <= size and tree[nxt] <= rank:
                pos = nxt
                rank -= tree[nxt]
            step >>= 1
        perm[i] = pos  # the value pos (Fenwick index pos + 1) is free and has `code[i]` free values below it
        j = pos + 1
        while j <= size:
            tree[j] -= 1
            j += j & -j
    return perm


def encode_permutation(perm: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Encode a permutation ``perm`` ``(size,)`` of ``0..size-1`` as its Lehmer code's mixed-radix rank.

    Returns a ``uint8`` tensor of exactly :func:`permutation_nbytes` ``(size)`` bytes (little-endian). Raises
    ``ValueError`` unless ``perm`` is a 1-D integer permutation.
    """
    values = _as_int_array(perm, "perm")
    size = len(values)
    if size and (values.min() < 0 or values.max() >= size or len(np.unique(values)) != size):
        raise ValueError(f"perm is not a permutation of 0..{size - 1}")
    rank = 0
    for i, digit in enumerate(_lehmer_code(values)):  # Horner: digit i has radix size - i
        rank = rank * (size - i) + digit
    return _to_tensor(rank.to_bytes(permutation_nbytes(size), "little"))


def decode_permutation(blob: torch.Tensor | bytes, size: int) -> torch.Tensor:
    """Invert :func:`encode_permutation`: the int64 permutation ``(size,)`` that ``blob`` encodes.

    Raises ``ValueError`` for a blob of the wrong length or one whose rank is not below ``size!``.
    """
    _check_size(size, "size")
    data = _as_blob(blob)
    expected = permutation_nbytes(size)
    if len(data) != expected:
        raise ValueError(f"a permutation of {size} takes {expected} bytes, the blob has {len(data)}")
    rank = int.from_bytes(data.tobytes(), "little")
    code = [0] * size
    for i in range(size - 1, -1, -1):  # the least significant digit is the last, of radix size - i
        rank, code[i] = divmod(rank, size - i)
    if rank:
        raise ValueError(f"the blob's rank is not below {size}!: not a permutation of {size}")
    return torch.tensor(_from_lehmer_code(code), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------- locations
def locations_bound_bits(n: int, d_out: int, d_in: int) -> float:
    """``log2 C(d_out * d_in, n)``: the bits that single out one set of ``n`` locations of the grid."""
    total = _grid(n, d_out, d_in)
    return (math.lgamma(total + 1) - math.lgamma(n + 1) - math.lgamma(total - n + 1)) / math.log(2)


def locations_max_bits(n: int, d_out: int, d_in: int) -> int:
    """The most bits :func:`encode_locations` spends on any set of ``n`` locations: ``m`` codes (``m = n`` or
    ``d_out * d_in - n``, whichever is coded) of ``q + 1`` unary bits and at most ``c = ceil(log2 b)`` remainder
    bits, with ``Σ q <= (d_out * d_in - m) / b``."""
    total = _grid(n, d_out, d_in)
    m = min(n, total - n)
    b = golomb_parameter(total, m)
    return m * (1 + (b - 1).bit_length()) + (total - m) // b


def golomb_parameter(total: int, m: int) -> int:
    """The Golomb parameter ``b`` for the gaps of ``m`` positions out of ``total`` (``m <= total / 2``).

    The gaps of a uniformly random set are close to geometric, ``P(g) = (1 - θ) θ^g`` with mean
    ``(total - m) / (m + 1)``; the optimal Golomb code for it has ``b = ceil(log(1 + θ) / -log θ)``
    (Gallager and van Voorhis).
    """
    if m <= 0:
        return 1
    mean = (total - m) / (m + 1)
    theta = mean / (mean + 1)
    return max(1, math.ceil(math.log1p(theta) / -math.log(theta)))


def _grid(n: int, d_out: int, d_in: int) -> int:
    for value, name in ((n, "n"), (d_out, "d_out"), (d_in, "d_in")):
        _check_size(value, name)
    if n > d_out * d_in:
        raise ValueError(f"{n} locations do not fit a {d_out}x{d_in} grid")
    return d_out * d_in


def _complement(flat: np.ndarray, total: int) -> np.ndarray:
    """The sorted positions of ``0..total-1`` missing from ``flat``."""
    keep = np.ones(total, dtype=bool)
    keep[flat] = False
    return np.flatnonzero(keep)


def _golomb_bits(gaps: np.ndarray, b: int) -> np.ndarray:
    """Bits (one ``uint8`` 0/1 each) of the Golomb codes of ``gaps`` in three runs: the quotients in unary
    (``q`` zeros, then a one), the ``c - 1`` leading bits of each truncated-binary remainder, and the last bit of
    the remainders that take ``c`` bits (``c = ceil(log2 b)``). The runs decode without a sequential parse."""
    quotient, rest = np.divmod(gaps, b)
    unary = np.zeros(int(quotient.sum()) + len(gaps), dtype=np.uint8)
    unary[np.cumsum(quotient + 1) - 1] = 1
    if b == 1:
        return unary
    c = (b - 1).bit_length()
    short = (1 << c) - b  # remainders below `short` take c - 1 bits, the others c bits (as rest + short)
    long = rest >= short
    lead = np.where(long, (rest + short) >> 1, rest)
    lead_bits = ((lead[:, None] >> np.arange(c - 1)) & 1).astype(np.uint8).ravel()
    last_bits = ((rest[long] + short) & 1).astype(np.uint8)
    return np.concatenate([unary, lead_bits, last_bits])


def encode_locations(
    rows: torch.Tensor | np.ndarray, cols: torch.Tensor | np.ndarray, d_out: int, d_in: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``n`` distinct locations ``(rows[k], cols[k])`` of a ``d_out x d_in`` grid as a set.

    Returns ``(blob, order)``: ``blob`` a ``uint8`` tensor (the Golomb-coded gaps of the sorted flat positions
    ``rows * d_in + cols``, or of their complement when ``n > d_out * d_in / 2``), and ``order`` int64 ``(n,)``
    such that ``rows[order], cols[order]`` is the canonical order :func:`decode_locations` returns (increasing
    flat position); store the coefficients as ``coeffs[order]``. Raises ``ValueError`` for rows and columns of
    different lengths, out of range or repeated.
    """
    r, c = _as_int_array(rows, "rows"), _as_int_array(cols, "cols")
    if len(r) != len(c):
        raise ValueError(f"rows and cols differ in length: {len(r)} and {len(c)}")
    total = _grid(len(r), d_out, d_in)
    if len(r) and (r.min() < 0 or r.max() >= d_out or c.min() < 0 or c.max() >= d_in):
        raise ValueError(f"a location lies outside the {d_out}x{d_in} grid")
    flat = r * d_in + c
    order = np.argsort(flat, kind="stable")
    flat_sorted = flat[order]
    if len(flat_sorted) > 1 and (np.diff(flat_sorted) == 0).any():
        raise ValueError("the locations are not distinct")
    coded = _complement(flat_sorted, total) if 2 * len(flat_sorted) > total else flat_sorted
    gaps = np.diff(coded, prepend=-1) - 1
    bits = _golomb_bits(gaps, golomb_parameter(total, len(coded)))
    return _to_tensor(np.packbits(bits, bitorder="little")), torch.from_numpy(order)


def _read_golomb(bits: np.ndarray, m: int, b: int) -> tuple[np.ndarray, int]:
    """The ``m`` gaps that :func:`_golomb_bits` wrote at the start of ``bits``, and how many bits they took."""
    ones = np.flatnonzero(bits)[:m]
    if len(ones) < m:
        raise ValueError("the blob ends before its last location")
    quotient = np.diff(ones, prepend=-1) - 1
    end = int(ones[-1]) + 1 if m else 0
    if b == 1:
        return quotient, end
    c = (b - 1).bit_length()
    short = (1 << c) - b
    lead_bits = bits[end : end + m * (c - 1)]
    if len(lead_bits) < m * (c - 1):
        raise ValueError("the blob ends before its last location")
    lead = (lead_bits.reshape(m, c - 1).astype(np.int64) << np.arange(c - 1)).sum(axis=1)
    end += m * (c - 1)
    long = lead >= short
    last_bits = bits[end : end + int(long.sum())].astype(np.int64)
    if len(last_bits) < long.sum():
        raise ValueError("the blob ends before its last location")
    rest = lead.copy()
    rest[long] = ((lead[long] << 1) | last_bits) - short
    return quotient * b + rest, end + len(last_bits)


def decode_locations(
    blob: torch.Tensor | bytes, n: int, d_out: int, d_in: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert :func:`encode_locations`: int64 ``(rows, cols)`` ``(n,)`` in increasing flat position.

    Raises ``ValueError`` unless ``blob`` is exactly the encoding of a set of ``n`` locations of the grid (a
    truncated blob, trailing bytes, non-zero padding bits or a position past the grid are all refused).
    """
    total = _grid(n, d_out, d_in)
    data = _as_blob(blob)
    complement = 2 * n > total
    m = total - n if complement else n
    bits = np.unpackbits(data, bitorder="little")
    gaps, used = _read_golomb(bits, m, golomb_parameter(total, m))
    if len(data) != (used + 7) // 8 or bits[used:].any():
        raise ValueError(
            f"the blob has {len(data)} bytes; its {m} codes take {(used + 7) // 8} (or bad padding)"
        )
    coded = np.cumsum(gaps + 1) - 1
    if m and coded[-1] >= total:
        raise ValueError(f"a location lies past the end of the {d_out}x{d_in} grid")
    flat = _complement(coded, total) if complement else coded
    locations = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.int64))
    return locations // d_in, locations % d_in
