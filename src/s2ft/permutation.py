"""Row and column orderings that make a matrix smooth, hence spectrally sparse.

The rows of a ``(m, d)`` matrix are ``m`` points in ``R^d``. An ordering is an open path through all of them; a
short path puts similar rows next to each other, which leaves little energy at high frequencies (the sum of squared
neighbour differences is a ``sin²(πu/m)``-weighted sum of the spectral energy). Columns are ordered the same way
on the transpose; the two orders are independent because permuting rows does not change column distances.
"""

from __future__ import annotations

import torch

SEARCHES = ("greedy",)


def pairwise_sq_dists(points: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(m, m)`` between the rows of ``points`` ``(m, d)``.

    Uses the Gram identity on centred points, in float64 up to 4M entries and float32 above (a 4096x4096 prior).
    """
    dtype = torch.float64 if points.numel() <= 2**22 else torch.float32
    x = points.to(dtype)
    x = x - x.mean(dim=0, keepdim=True)
    sq = (x * x).sum(dim=1)
    dists = torch.addmm(sq[:, None] + sq[None, :], x, x.T, alpha=-2.0)  # (m, m), one pass over the output
    return dists.clamp_min_(0.0)


def greedy_path(
    points: torch.Tensor, start: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Greedy nearest-neighbour path through the rows of ``points`` ``(m, d)``.

    Starts at row ``start`` (drawn with ``generator`` when None) and keeps appending the nearest unvisited row.
    Returns the visiting order, an int64 permutation of ``range(m)`` on the device of ``points``.
    O(m² d) for the distances, then m vectorized O(m) steps.
    """
    m = points.shape[0]
    if start is None:
        start = int(torch.randint(m, (1,), generator=generator))
    if not 0 <= start < m:
        raise ValueError(f"start={start} is not a row of a {m}-row matrix")
    dists = pairwise_sq_dists(points)
    visited = torch.zeros(m, dtype=dists.dtype, device=dists.device)  # 0 or +inf, added to a row of distances
    order = [start]
    current = start
    for _ in range(m - 1):
        visited[current] = float("inf")
        current = int(torch.argmin(dists[current] + visited))
        order.append(current)
    return torch.tensor(order, dtype=torch.long, device=points.device)


def path_length(points: torch.Tensor, order: torch.Tensor | None = None) -> float:
    """Length of the open path visiting the rows of ``points`` in ``order`` (identity when None)."""
    x = points if points.dtype == torch.float64 else points.float()
    if order is not None:
        x = x[order]
    return float(torch.linalg.vector_norm(x[1:] - x[:-1], dim=1).sum(dtype=torch.float64))


def search_order(
    points: torch.Tensor, search: str = "greedy", generator: torch.Generator | None = None
) -> torch.Tensor:
    """An ordering of the rows of ``points`` by the named search (one of :data:`SEARCHES`)."""
    if search == "greedy":
        return greedy_path(points, generator=generator)
    raise ValueError(f"unknown permutation search {search!r}; choose one of {SEARCHES}")


def is_permutation(order: torch.Tensor, size: int) -> bool:
    """True if ``order`` holds every integer of ``range(size)`` exactly once."""
    if order.dim() != 1 or order.numel() != size:
        return False
    return bool(torch.equal(torch.sort(order.long().cpu()).values, torch.arange(size)))
