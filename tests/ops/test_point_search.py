"""Searches from points (s2ft.ops.point_search): the dense searches' orders, in float64, without an (m, m) matrix;
and the spectrum sampled by blocks of rows: the whole spectrum's locations."""

from __future__ import annotations

import pytest
import torch

import s2ft.ops.point_search as point_search
from s2ft.ops import permutation
from s2ft.ops.locations import FactoredPower, mirror_of, sample_locations, sample_locations_in_blocks
from s2ft.ops.permutation import is_permutation, search_order
from s2ft.ops.point_search import Points, nearest_neighbours, search_order_points

SEARCHES = ("greedy", "multistart", "2opt", "2opt-cyclic", "svd")


def random_points(seed: int) -> torch.Tensor:
    """Random float64 points of random size and width; every third case with a run of exactly equal points."""
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(2, 260, (1,), generator=g))
    k = int(torch.randint(1, 40, (1,), generator=g))
    x = torch.randn(m, k, generator=g, dtype=torch.float64) * torch.rand(k, generator=g, dtype=torch.float64)
    if seed % 3 == 0 and m > 20:
        x[m // 2 : m // 2 + 8] = x[3]  # equal points: equal distances in both, the lowest index first in both
    return x


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so that every search runs over many of them."""
    monkeypatch.setattr(point_search, "BLOCK_ENTRIES", 700)
    monkeypatch.setattr(point_search, "PAIR_CHUNK", 50)


@pytest.mark.parametrize("search", SEARCHES)
def test_searches_from_points_equal_the_dense_searches_float64(search, small_blocks):
    for seed in range(8):
        x = random_points(seed)
        dense = search_order(x, search, torch.Generator().manual_seed(seed))
        low = search_order_points(x, search, torch.Generator().manual_seed(seed))
        assert is_permutation(low, x.shape[0])
        assert torch.equal(low, dense), (search, seed, tuple(x.shape))


def test_greedy_from_points_reads_whole_rows_only_when_its_lists_run_out(small_blocks, monkeypatch):
    """Few listed neighbours: the steps fall back on the nearest of all unvisited points often, and the path is
    still the dense one (the lists decide the other steps exactly)."""
    monkeypatch.setattr(point_search, "CANDIDATES", 2)
    x = random_points(1)
    calls = []
    original = point_search._Unvisited.nearest
    monkeypatch.setattr(
        point_search._Unvisited, "nearest", lambda self, p: calls.append(p) or original(self, p)
    )
    low = search_order_points(x, "greedy", torch.Generator().manual_seed(0))
    assert torch.equal(low, search_order(x, "greedy", torch.Generator().manual_seed(0)))
    assert 0 < len(calls) < x.shape[0] - 1


@pytest.mark.parametrize("search", SEARCHES)
def test_searches_from_points_hold_no_distance_matrix(search, small_blocks, monkeypatch):
    """No (m, m) distances: the dense builder is never called, and every block of distances computed holds at
    most BLOCK_ENTRIES entries (one row where a row is longer)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the dense distance matrix was built")

    monkeypatch.setattr(permutation, "pairwise_sq_dists", refuse)
    sizes = []
    for method in ("rows", "symmetric_rows"):
        original = getattr(Points, method)

        def recording(self, index, original=original):
            out = original(self, index)
            sizes.append(out.numel())
            return out

        monkeypatch.setattr(Points, method, recording)
    x = torch.randn(300, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    order = search_order_points(x, search, torch.Generator().manual_seed(0))
    assert is_permutation(order, 300)
    assert max(sizes, default=0) <= 700


def test_nearest_neighbours_are_the_nearest_sorted_by_distance_then_index_float64():
    """The k nearest other points, in order of (distance, index); of points as far as the last listed, any."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    x[10:15] = x[2]  # ties
    points = Points(x, block_entries=90)
    index, value = nearest_neighbours(points, 6)
    dense = permutation.pairwise_sq_dists(x)
    dense.fill_diagonal_(float("inf"))
    for a in range(40):
        listed = index[a].tolist()
        got = [(float(value[a, i]), b) for i, b in enumerate(listed)]
        assert got == sorted(got)
        last = got[-1][0]
        nearer = {b for b in range(40) if float(dense[a, b]) < last - 1e-12}
        assert nearer <= set(listed)
        torch.testing.assert_close(torch.from_numpy(value[a]), dense[a, listed], rtol=1e-12, atol=1e-12)


def test_unknown_search_is_refused():
    with pytest.raises(ValueError, match="unknown permutation search"):
        search_order_points(torch.randn(5, 2), "nope")


# ---------------------------------------------------------------------------------------------- sampling by blocks
@pytest.mark.parametrize("half", [False, True])
def test_sampling_by_blocks_of_rows_equals_sampling_the_whole_spectrum_float64(half):
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        d_out, d_in = (int(v) for v in torch.randint(2, 50, (2,), generator=g))
        power = torch.rand(d_out, d_in, generator=g, dtype=torch.float64) ** 3
        if seed % 4 == 0:
            power[: d_out // 3] = 0.0  # zero power: drawn after all others, fewer than n of them here
        n = int(torch.randint(1, min(d_out * d_in, 200) + 1, (1,), generator=g))
        n = min(n, int((power > 0).sum()))
        block = int(torch.randint(1, 300, (1,), generator=g))
        asked = []

        def rows(start: int, stop: int, asked=asked, power=power) -> torch.Tensor:
            asked.append(stop - start)
            return power[start:stop]

        whole = sample_locations(power, n, 1.5, torch.Generator().manual_seed(seed), half=half)
        blocks = sample_locations_in_blocks(
            rows, d_out, d_in, n, 1.5, torch.Generator().manual_seed(seed), half=half, block_entries=block
        )
        assert torch.equal(whole[0], blocks[0]) and torch.equal(whole[1], blocks[1]), seed
        assert sum(asked) == d_out and max(asked) <= max(1, block // d_in)


def test_sampling_by_blocks_refuses_bad_power():
    with pytest.raises(ValueError, match="finite and non-negative"):
        sample_locations_in_blocks(lambda a, b: -torch.ones(b - a, 4), 4, 4, 2, 1.5)
    with pytest.raises(ValueError, match="gamma"):
        sample_locations_in_blocks(lambda a, b: torch.ones(b - a, 4), 4, 4, 2, 0.0)


def test_float32_points_take_the_nearest_unvisited_point_to_rounding(small_blocks):
    """Float32 points (a float32 sketch's factors) are searched in float32: each greedy step takes a point whose
    float64 distance is the nearest unvisited one's, to float32 rounding of the squared norms; from the same start."""
    for seed in range(4):
        x64 = random_points(seed)
        x = x64.float()
        order = search_order_points(x, "greedy", torch.Generator().manual_seed(seed))
        assert is_permutation(order, x.shape[0])
        assert order[0] == search_order(x64, "greedy", torch.Generator().manual_seed(seed))[0]
        centred = x.double() - x.double().mean(dim=0)
        scale = float(centred.square().sum(dim=1).max())
        dists = permutation.pairwise_sq_dists(centred)
        unvisited = torch.ones(x.shape[0], dtype=torch.bool)
        for a, b in zip(order[:-1].tolist(), order[1:].tolist()):
            unvisited[a] = False
            assert dists[a, b] <= dists[a][unvisited].min() + 1e-5 * scale, (seed, a, b)


# ---------------------------------------------------------------------------------------------- factored spectrum
def factored(d_out: int, d_in: int, k: int, seed: int) -> FactoredPower:
    """The transformed factors of a random rank-``k`` float64 matrix, as LowRank.permuted_power_rows makes them."""
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(d_out, k, generator=g, dtype=torch.float64) * torch.rand(d_out, 1, generator=g)
    right = torch.randn(d_in, k, generator=g, dtype=torch.float64)
    return FactoredPower(torch.fft.fft(left, dim=0), torch.fft.fft(right, dim=0))


class CountingPower(FactoredPower):
    """A FactoredPower that counts the entries of the power it computes."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor) -> None:
        super().__init__(left, right)
        self.computed: list[int] = []

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        self.computed.append((stop - start) * self.right.shape[0])
        return super().__call__(start, stop)

    def at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        self.computed.append(rows.numel())
        return super().at(rows, cols)


@pytest.mark.parametrize("half", [False, True])
def test_factored_sampling_equals_sampling_the_whole_spectrum_float64(half):
    """The power computed only where a draw may win: the whole spectrum's locations, at a small share of the
    products (counted)."""
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        d_out, d_in = (int(v) for v in torch.randint(40, 160, (2,), generator=g))
        n = int(torch.randint(1, 40, (1,), generator=g))
        power = factored(d_out, d_in, 1 + seed % 4, seed)
        whole = sample_locations(
            (power.left @ power.right.T).abs(), n, 1.5, torch.Generator().manual_seed(seed), half=half
        )
        counting = CountingPower(power.left, power.right)
        blocks = sample_locations_in_blocks(
            counting,
            d_out,
            d_in,
            n,
            1.5,
            torch.Generator().manual_seed(seed),
            half=half,
            block_entries=4 * d_in,
        )
        assert torch.equal(whole[0], blocks[0]) and torch.equal(whole[1], blocks[1]), seed
        assert sum(counting.computed) < d_out * d_in / 2, (seed, sum(counting.computed))


def test_factored_sampling_of_a_zero_matrix_and_of_more_than_half_the_spectrum():
    """A zero product (all power 0) still gives n distinct locations; prior-half with n above the canonical
    locations takes the rows of the product, as sampling the whole spectrum does."""
    zero = FactoredPower(torch.zeros(8, 2, dtype=torch.complex128), torch.zeros(6, 2, dtype=torch.complex128))
    rows, cols = sample_locations_in_blocks(zero, 8, 6, 20, 1.5, torch.Generator().manual_seed(0))
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 20
    power = factored(5, 6, 2, 1)
    n = 25  # of 30 locations, 16 canonical
    whole = sample_locations(
        (power.left @ power.right.T).abs(), n, 1.5, torch.Generator().manual_seed(1), half=True
    )
    blocks = sample_locations_in_blocks(power, 5, 6, n, 1.5, torch.Generator().manual_seed(1), half=True)
    assert torch.equal(whole[0], blocks[0]) and torch.equal(whole[1], blocks[1])


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 4), (5, 7), (8, 6)])
def test_canonical_count_is_the_locations_not_after_their_mirror(shape):
    from s2ft.ops.locations import _canonical_count

    index = torch.arange(shape[0] * shape[1])
    assert _canonical_count(*shape) == int((mirror_of(*shape) >= index).sum())


def test_factored_sampling_refuses_factors_that_are_not_finite():
    left = torch.ones(6, 2, dtype=torch.complex128)
    left[2, 1] = float("nan")
    power = FactoredPower(left, torch.ones(5, 2, dtype=torch.complex128))
    with pytest.raises(ValueError, match="finite and non-negative"):
        sample_locations_in_blocks(power, 6, 5, 3, 1.5)
    with pytest.raises(ValueError, match=r"\(d_out, k\) and \(d_in, k\)"):
        FactoredPower(torch.ones(6, 2), torch.ones(5, 3))
