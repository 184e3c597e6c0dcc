"""Row/column orderings: validity, exact inverse, and the greedy path on a planted smooth order."""

from __future__ import annotations

import math

import torch

from s2ft.permutation import greedy_path, is_permutation, pairwise_sq_dists, path_length


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
