"""Row/column orderings: validity, exact inverse, determinism, and each search on planted smooth orders."""

from __future__ import annotations

import math

import pytest
import torch

from s2ft.ops.permutation import (
    SEARCHES,
    cyclic_energy,
    cyclic_tour,
    folded,
    greedy_path,
    greedy_paths,
    is_permutation,
    multistart_path,
    pairwise_sq_dists,
    path_length,
    search_order,
    singular_vector_order,
    two_opt,
    two_opt_path,
)


def smooth_rows(m: int = 64, d: int = 16) -> torch.Tensor:
    """Rows on a smooth closed-free curve: row i = (cos(t_i k), sin(t_i k))_k, t_i increasing."""
    t = torch.linspace(0, 1.5, m, dtype=torch.float64)[:, None]
    k = torch.arange(1, d // 2 + 1, dtype=torch.float64)[None, :] / 2
    return torch.cat([torch.cos(t * k), torch.sin(t * k)], dim=1)


def test_greedy_path_is_a_permutation_and_deterministic():
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    order = greedy_path(x, generator=torch.Generator().manual_seed(3))
    assert is_permutation(order, 50)
    assert torch.equal(order, greedy_path(x, generator=torch.Generator().manual_seed(3)))
    assert int(greedy_path(x, start=7)[0]) == 7


def test_greedy_recovers_a_shuffled_smooth_order():
    smooth = smooth_rows()
    shuffle = torch.randperm(smooth.shape[0], generator=torch.Generator().manual_seed(0))
    shuffled = smooth[shuffle]
    best = path_length(smooth)
    assert path_length(shuffled) > 5 * best  # the shuffle destroyed the smoothness
    lengths = [path_length(shuffled, greedy_path(shuffled, start=s)) for s in (0, 17, 40)]
    assert max(lengths) <= 2.0 * best  # from any start: one extra jump back at most
    end = int((shuffle == 0).nonzero())  # the shuffled position of the curve's first row
    order = greedy_path(shuffled, start=end)
    assert torch.equal(shuffle[order], torch.arange(smooth.shape[0]))  # from an end it finds the smooth order


def test_greedy_steps_to_the_nearest_unvisited_row():
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    order = greedy_path(x, start=0).tolist()
    for i in range(len(order) - 1):
        rest = order[i + 1 :]
        dists = [float(torch.dist(x[order[i]], x[j])) for j in rest]
        assert math.isclose(dists[0], min(dists), rel_tol=1e-9)


def test_permutation_inverse_is_exact():
    m = torch.randn(9, 13)
    g = torch.Generator().manual_seed(0)
    pr, pc = torch.randperm(9, generator=g), torch.randperm(13, generator=g)
    permuted = m[pr][:, pc]
    assert torch.equal(permuted[torch.argsort(pr)][:, torch.argsort(pc)], m)
    assert not is_permutation(torch.tensor([0, 0, 2]), 3)
    assert not is_permutation(torch.arange(4), 3)


def test_pairwise_sq_dists_matches_cdist():
    x = torch.randn(20, 6, dtype=torch.float64)
    torch.testing.assert_close(pairwise_sq_dists(x), torch.cdist(x, x) ** 2, atol=1e-10, rtol=1e-9)


# ---------------------------------------------------------------------------------------------- the searches
def tour_sq_length(dists: torch.Tensor, tour: torch.Tensor) -> float:
    return float(dists[tour, tour.roll(-1)].sum())


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("shape", [(50, 7), (3, 5), (1, 4), (40, 40)])
def test_every_search_gives_a_deterministic_permutation(search, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    order = search_order(x, search, torch.Generator().manual_seed(5))
    assert order.dtype == torch.long
    assert is_permutation(order, shape[0])
    assert torch.equal(order, search_order(x, search, torch.Generator().manual_seed(5)))


def test_unknown_search_is_refused():
    with pytest.raises(ValueError, match="unknown permutation search 'tsp'"):
        search_order(torch.randn(4, 3), "tsp")


def test_greedy_paths_side_by_side_equal_single_greedy_paths():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    starts = torch.tensor([0, 13, 39])
    orders = greedy_paths(pairwise_sq_dists(x), starts)
    for start, order in zip(starts.tolist(), orders):
        assert torch.equal(order, greedy_path(x, start=start))


@pytest.mark.parametrize("seed", range(5))
def test_refined_searches_are_never_worse_than_greedy_from_the_same_start(seed):
    x = torch.randn(80, 10, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    greedy = search_order(x, "greedy", torch.Generator().manual_seed(seed))
    for search in ("multistart", "2opt"):
        order = search_order(x, search, torch.Generator().manual_seed(seed))
        assert path_length(x, order) <= path_length(x, greedy) * (1 + 1e-12)
    assert path_length(x, search_order(x, "2opt", torch.Generator().manual_seed(seed))) < 0.97 * path_length(
        x, greedy
    )  # random points: greedy leaves long edges that 2-opt removes
    two_opt_order = search_order(x, "2opt", torch.Generator().manual_seed(seed))
    cyclic = search_order(x, "2opt-cyclic", torch.Generator().manual_seed(seed))
    assert cyclic_energy(x, cyclic) <= cyclic_energy(x, folded(two_opt_order)) * (1 + 1e-12)


def test_two_opt_stops_at_a_local_optimum_of_all_moves():
    points = torch.randn(30, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    dists = pairwise_sq_dists(points)
    dists = (dists + dists.T) / 2
    start = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    tour = two_opt(dists, start, neighbours=29, max_rounds=10_000)
    assert is_permutation(tour, 30)
    assert tour_sq_length(dists, tour) < tour_sq_length(dists, start)
    n = tour.numel()
    for p in range(n):
        for q in range(p + 2, n):
            moved = torch.cat([tour[: p + 1], tour[p + 1 : q + 1].flip(0), tour[q + 1 :]])
            assert tour_sq_length(dists, moved) >= tour_sq_length(dists, tour) - 1e-9


def test_two_opt_respects_its_round_budget():
    points = torch.randn(200, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dists = pairwise_sq_dists(points)
    dists = (dists + dists.T) / 2
    start = torch.arange(200)
    one = two_opt(dists, start, max_rounds=1)
    full = two_opt(dists, start)
    assert tour_sq_length(dists, full) < tour_sq_length(dists, one) < tour_sq_length(dists, start)
    assert torch.equal(two_opt(dists, start, max_rounds=0), start)


@pytest.mark.parametrize("seed", range(4))
def test_two_opt_recovers_a_shuffled_smooth_order_from_any_start(seed):
    smooth = smooth_rows()
    shuffle = torch.randperm(smooth.shape[0], generator=torch.Generator().manual_seed(0))
    order = shuffle[two_opt_path(smooth[shuffle], torch.Generator().manual_seed(seed))]
    assert torch.equal(order, torch.arange(64)) or torch.equal(order, torch.arange(63, -1, -1))
    multistart = multistart_path(smooth[shuffle], starts=16, generator=torch.Generator().manual_seed(seed))
    assert path_length(smooth[shuffle], multistart) <= 1.2 * path_length(smooth)


@pytest.mark.parametrize("seed", range(4))
def test_cyclic_tour_finds_the_folded_order_of_a_shuffled_curve(seed):
    """On a curve the best closed tour goes out over every other point and back over the rest (no long jump)."""
    smooth = smooth_rows()
    shuffle = torch.randperm(smooth.shape[0], generator=torch.Generator().manual_seed(0))
    order = shuffle[cyclic_tour(smooth[shuffle], torch.Generator().manual_seed(seed))]
    fold = folded(torch.arange(64))
    assert cyclic_energy(smooth, order) <= cyclic_energy(smooth, fold) * (1 + 1e-9)
    assert cyclic_energy(smooth, fold) < 0.5 * cyclic_energy(
        smooth
    )  # the straight order's closing jump costs
    assert torch.equal(folded(torch.arange(6)), torch.tensor([0, 2, 4, 5, 3, 1]))


def test_svd_order_recovers_a_shuffled_rank_one_order():
    t = torch.linspace(-1, 2, 48, dtype=torch.float64)
    matrix = torch.outer(t**3 + t, torch.cos(torch.linspace(0, 3, 20, dtype=torch.float64)))
    shuffle = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    order = shuffle[singular_vector_order(matrix[shuffle], torch.Generator().manual_seed(1))]
    assert torch.equal(order, torch.arange(48)) or torch.equal(order, torch.arange(47, -1, -1))


def test_cyclic_energy_is_the_sin2_weighted_spectral_energy():
    x = torch.randn(24, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = x.shape[0]
    energy = torch.fft.fft(x, dim=0).abs().pow(2).sum(dim=1)  # (m,): energy at row frequency u
    weights = 4 * torch.sin(torch.pi * torch.arange(m, dtype=torch.float64) / m) ** 2
    assert math.isclose(cyclic_energy(x), float((weights * energy).sum() / m), rel_tol=1e-12)
