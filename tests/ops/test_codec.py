"""The plan codec (s2ft.ops.codec): exact round trips, sizes against the information bound, validation."""

from __future__ import annotations

import math

import pytest
import torch

from s2ft.ops.codec import (
    decode_locations,
    decode_permutation,
    encode_locations,
    encode_permutation,
    locations_bound_bits,
    locations_max_bits,
    permutation_bound_bits,
    permutation_nbytes,
)


def naive_rank(perm: list[int]) -> int:
    """The mixed-radix rank of the Lehmer code, the O(size²) way: ``Σ_i L[i] · (size - 1 - i)!``."""
    size = len(perm)
    return sum(
        sum(perm[j] < perm[i] for j in range(i + 1, size)) * math.factorial(size - 1 - i) for i in range(size)
    )


# ---------------------------------------------------------------------------------------------- permutations
@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 9, 255, 256, 257, 384, 1000, 4096])
def test_permutation_round_trip_and_size(size: int) -> None:
    generator = torch.Generator().manual_seed(size)
    for perm in (torch.randperm(size, generator=generator), torch.arange(size), torch.arange(size).flip(0)):
        blob = encode_permutation(perm)
        assert blob.dtype == torch.uint8 and blob.dim() == 1
        # exactly ceil(log2(size!) / 8) bytes: the bits of the largest rank, size! - 1, rounded up to bytes
        assert blob.numel() == permutation_nbytes(size) == ((math.factorial(size) - 1).bit_length() + 7) // 8
        assert blob.numel() * 8 < permutation_bound_bits(size) + 8
        decoded = decode_permutation(blob, size)
        assert decoded.dtype == torch.int64 and torch.equal(decoded, perm)


def test_permutation_rank_is_the_lehmer_rank() -> None:
    generator = torch.Generator().manual_seed(0)
    for size in (1, 2, 5, 12, 40):
        perm = torch.randperm(size, generator=generator)
        rank = int.from_bytes(encode_permutation(perm).numpy().tobytes(), "little")
        assert rank == naive_rank(perm.tolist())
    size = 300  # identity is the smallest rank, reversed the largest (size! - 1)
    assert not encode_permutation(torch.arange(size)).any()
    reversed_rank = int.from_bytes(encode_permutation(torch.arange(size).flip(0)).numpy().tobytes(), "little")
    assert reversed_rank == math.factorial(size) - 1


def test_every_permutation_of_five_has_its_own_code() -> None:
    import itertools

    codes = set()
    for perm in itertools.permutations(range(5)):
        blob = encode_permutation(torch.tensor(perm))
        assert decode_permutation(blob, 5).tolist() == list(perm)
        codes.add(bytes(blob.numpy()))
    assert len(codes) == 120


def test_permutation_large_and_deterministic() -> None:
    perm = torch.randperm(8192, generator=torch.Generator().manual_seed(1))
    first, second = encode_permutation(perm), encode_permutation(perm.to(torch.int16).numpy())
    assert torch.equal(first, second)
    assert torch.equal(decode_permutation(first, 8192), perm)
    assert torch.equal(decode_permutation(bytes(first.numpy()), 8192), perm)


def test_permutation_validation() -> None:
    with pytest.raises(ValueError, match="not a permutation"):
        encode_permutation(torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="not a permutation"):
        encode_permutation(torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="not a permutation"):
        encode_permutation(torch.tensor([-1, 0, 1]))
    with pytest.raises(ValueError, match="integers"):
        encode_permutation(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        encode_permutation(torch.zeros(2, 2, dtype=torch.int64))
    blob = encode_permutation(torch.randperm(100))
    with pytest.raises(ValueError, match="bytes"):
        decode_permutation(blob[:-1], 100)
    with pytest.raises(ValueError, match="bytes"):
        decode_permutation(torch.cat([blob, blob[:1]]), 100)
    with pytest.raises(ValueError, match="below 5!"):
        decode_permutation(torch.tensor([255], dtype=torch.uint8), 5)  # 255 >= 5! = 120
    with pytest.raises(ValueError, match="uint8"):
        decode_permutation(blob.to(torch.int16), 100)


# ---------------------------------------------------------------------------------------------- locations
def check_round_trip(rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """Encode, check the canonical order and the size bound, decode, check exact equality; returns the blob."""
    blob, order = encode_locations(rows, cols, d_out, d_in)
    assert blob.dtype == torch.uint8 and blob.dim() == 1 and order.dtype == torch.int64
    flat = rows[order] * d_in + cols[order]
    assert (flat[1:] > flat[:-1]).all()  # canonical order: increasing flat position
    assert torch.equal(torch.sort(order).values, torch.arange(len(rows)))
    assert blob.numel() * 8 <= locations_max_bits(len(rows), d_out, d_in) + 7
    decoded_rows, decoded_cols = decode_locations(blob, len(rows), d_out, d_in)
    assert decoded_rows.dtype == decoded_cols.dtype == torch.int64
    assert torch.equal(decoded_rows, rows[order]) and torch.equal(decoded_cols, cols[order])
    return blob


def random_locations(d_out: int, d_in: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
    return flat // d_in, flat % d_in


@pytest.mark.parametrize(
    ("d_out", "d_in", "n"),
    [(384, 384, 1000), (384, 384, 100), (576, 576, 300), (192, 576, 1000), (1280, 320, 1000), (80, 480, 100)],
)
def test_random_locations_near_the_bound(d_out: int, d_in: int, n: int) -> None:
    for seed in range(3):
        blob = check_round_trip(*random_locations(d_out, d_in, n, seed), d_out, d_in)
        bound = locations_bound_bits(n, d_out, d_in)
        assert blob.numel() * 8 <= 1.015 * bound + 8  # Golomb on a random set: within ~1% of log2 C(N, n)
        assert (
            blob.numel() * 8 >= 0.97 * bound
        )  # a random set cannot be coded much below its information content


@pytest.mark.parametrize(("d_out", "d_in"), [(1, 1), (1, 7), (7, 1), (6, 10), (16, 16), (33, 5)])
def test_every_density(d_out: int, d_in: int) -> None:
    total = d_out * d_in
    densities = {0, 1, 2, total // 2, (total + 1) // 2, total // 2 + 1, total - 1, total}
    for n in sorted(densities & set(range(total + 1))):
        blob = check_round_trip(*random_locations(d_out, d_in, n, n), d_out, d_in)
        if n in (0, total):
            assert blob.numel() == 0  # nothing to say: the empty set and the whole grid are the only sets


def test_adversarial_locations() -> None:
    d_out, d_in = 384, 384
    full_row = (torch.full((d_in,), 5), torch.arange(d_in))
    full_col = (torch.arange(d_out), torch.full((d_out,), 7))
    last_row = (torch.full((100,), d_out - 1), torch.arange(d_in - 100, d_in))
    corners = (torch.tensor([0, 0, d_out - 1, d_out - 1]), torch.tensor([0, d_in - 1, 0, d_in - 1]))
    low = torch.cartesian_prod(torch.arange(20), torch.arange(50))  # a low-frequency block, 1000 locations
    stride = torch.arange(0, d_out * d_in, 147)  # evenly spread, the widest gaps possible
    for rows, cols in (full_row, full_col, last_row, corners, (low[:, 0], low[:, 1])):
        check_round_trip(rows, cols, d_out, d_in)
    check_round_trip(stride // d_in, stride % d_in, d_out, d_in)
    check_round_trip(
        torch.tensor([d_out - 1]), torch.tensor([d_in - 1]), d_out, d_in
    )  # n = 1, the last position
    check_round_trip(torch.tensor([0]), torch.tensor([0]), d_out, d_in)
    one_row = check_round_trip(*full_row, d_out, d_in)
    assert one_row.numel() * 8 < locations_bound_bits(d_in, d_out, d_in)  # clustered sets come out smaller


def test_dense_grid_through_its_complement() -> None:
    d_out, d_in = 64, 96
    total = d_out * d_in
    rows, cols = random_locations(d_out, d_in, total - 50, 3)
    blob = check_round_trip(rows, cols, d_out, d_in)
    assert blob.numel() * 8 <= 1.05 * locations_bound_bits(50, d_out, d_in) + 8  # C(N, N-50) = C(N, 50)
    rows, cols = random_locations(d_out, d_in, total, 4)  # the whole grid in a shuffled order
    blob, order = encode_locations(rows, cols, d_out, d_in)
    assert blob.numel() == 0 and torch.equal(rows[order] * d_in + cols[order], torch.arange(total))


def test_coefficients_follow_the_canonical_order() -> None:
    rows, cols = random_locations(48, 40, 300, 0)
    coeffs = torch.randn(300, dtype=torch.float64)
    blob, order = encode_locations(rows, cols, 48, 40)
    stored = coeffs[order]
    decoded_rows, decoded_cols = decode_locations(blob, 300, 48, 40)
    dense, again = torch.zeros(48, 40, dtype=torch.float64), torch.zeros(48, 40, dtype=torch.float64)
    dense[rows, cols] = coeffs
    again[decoded_rows, decoded_cols] = stored
    assert torch.equal(dense, again)


def test_locations_deterministic_and_input_types() -> None:
    rows, cols = random_locations(384, 384, 1000, 9)
    blob, order = encode_locations(rows, cols, 384, 384)
    blob16, order16 = encode_locations(rows.to(torch.int16), cols.to(torch.int16).numpy(), 384, 384)
    assert torch.equal(blob, blob16) and torch.equal(order, order16)
    decoded = decode_locations(bytes(blob.numpy()), 1000, 384, 384)
    assert torch.equal(decoded[0], rows[order]) and torch.equal(decoded[1], cols[order])
    sorted_rows, sorted_cols = rows[order], cols[order]
    blob_sorted, order_sorted = encode_locations(sorted_rows, sorted_cols, 384, 384)
    assert torch.equal(blob_sorted, blob) and torch.equal(order_sorted, torch.arange(1000))


def test_location_validation() -> None:
    with pytest.raises(ValueError, match="distinct"):
        encode_locations(torch.tensor([1, 1]), torch.tensor([2, 2]), 4, 4)
    with pytest.raises(ValueError, match="outside"):
        encode_locations(torch.tensor([4]), torch.tensor([0]), 4, 4)
    with pytest.raises(ValueError, match="outside"):
        encode_locations(torch.tensor([0]), torch.tensor([-1]), 4, 4)
    with pytest.raises(ValueError, match="differ in length"):
        encode_locations(torch.tensor([0, 1]), torch.tensor([0]), 4, 4)
    with pytest.raises(ValueError, match="do not fit"):
        decode_locations(torch.zeros(0, dtype=torch.uint8), 17, 4, 4)
    rows, cols = random_locations(64, 64, 200, 1)
    blob, _ = encode_locations(rows, cols, 64, 64)
    with pytest.raises(ValueError, match="ends before|bytes"):
        decode_locations(blob[:-3], 200, 64, 64)
    with pytest.raises(ValueError, match="bytes"):
        decode_locations(torch.cat([blob, torch.zeros(1, dtype=torch.uint8)]), 200, 64, 64)
    # one location at 0 of 4096: b = 1420, so the code is "1" and 10 zero bits: 11 bits, 5 of padding
    one = encode_locations(torch.tensor([0]), torch.tensor([0]), 64, 64)[0]
    assert one.tolist() == [1, 0]
    with pytest.raises(ValueError, match="padding"):
        decode_locations(torch.tensor([1, 0x80], dtype=torch.uint8), 1, 64, 64)
    past_end = torch.cat([torch.zeros(10, dtype=torch.uint8), one])  # a unary quotient of 80: past the grid
    with pytest.raises(ValueError, match="past the end"):
        decode_locations(past_end, 1, 64, 64)
