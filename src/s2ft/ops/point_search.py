"""The searches of :mod:`s2ft.ops.permutation` on points, without their ``(m, m)`` distance matrix.

The dense searches build every squared distance between the ``m`` rows of ``points`` ``(m, k)`` at once: 8·m² bytes
(970 MB for the 11,008 rows of a Llama-2-7B MLP layer's rank-64 prior). Here the distances come from the points'
``k`` coordinates when needed, in blocks of rows, so a search holds ``O(m·(k + K))`` numbers (``K`` candidate
neighbours per point) and one block of ``O(BLOCK_ENTRIES)`` distances:

- **greedy** (and ``"multistart"``): each point's ``K`` nearest others, sorted by (distance, index), are found once
  block by block (:func:`nearest_neighbours`). A step takes the first unvisited point of the current point's list:
  the nearest unvisited point of all, unless every listed point is visited or the one found is as far as the last
  listed (a tie might then hide an unlisted point of lower index); only then is the current point's whole row of
  distances computed, as the dense search reads it. The path is the dense search's: the same start drawn from the
  generator, the same nearest unvisited point at each step, the first (lowest index) of equal distances.
- **2-opt** (``"2opt"``, ``"2opt-cyclic"``): the same rounds as :func:`s2ft.ops.permutation.two_opt` (shared code),
  with the candidate lists found block by block and every distance a move's gain needs computed from the two
  points' coordinates.
- **svd** needs no distances: it is :func:`s2ft.ops.permutation.singular_vector_order` itself.

Distances are computed as the dense ones (centred points, float64 up to 4M coordinates, the Gram identity
``|a|² + |b|² - 2 a·b``), but a block's matrix product may round differently from the whole matrix's, so the two
agree to rounding, not bit for bit: two distances within rounding of each other may then be ordered differently
(random points never are, in the tests; exactly equal points give exactly equal distances in both and the lowest
index wins in both).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from s2ft.ops.permutation import (
    GREEDY_STARTS,
    MAX_ROUNDS,
    NEIGHBOURS,
    _draw_start,
    folded,
    singular_vector_order,
    two_opt_rounds,
)

CANDIDATES = 16  # listed nearest neighbours per point for the greedy steps
BLOCK_ENTRIES = 2**20  # distances computed at once (8 MiB in float64)
PAIR_CHUNK = 2**15  # point pairs whose distances are computed at once


class Points:
    """The rows of ``points`` ``(m, k)`` centred, in the dtype of :func:`s2ft.ops.permutation.pairwise_sq_dists`,
    with their squared norms; distances between them on demand."""

    def __init__(self, points: torch.Tensor, block_entries: int | None = None) -> None:
        dtype = torch.float64 if points.numel() <= 2**22 else torch.float32
        x = points.detach().to(dtype)
        self.x = x - x.mean(dim=0, keepdim=True)
        self.sq = (self.x * self.x).sum(dim=1)
        self.m = self.x.shape[0]
        self._numpy: tuple[np.ndarray, np.ndarray] | None = None
        entries = BLOCK_ENTRIES if block_entries is None else block_entries
        self.block = max(1, entries // max(1, self.m))  # rows per block

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Squared distances from the points ``index`` ``(b,)`` to all, ``(b, m)``: rows of the dense matrix."""
        x = self.x.index_select(0, index)
        sq = self.sq.index_select(0, index)
        return torch.addmm(sq[:, None] + self.sq[None, :], x, self.x.T, alpha=-2.0).clamp_min_(0.0)

    def distances_to(self, point: int, others: np.ndarray) -> np.ndarray:
        """Squared distances from ``point`` to the points ``others`` (an index array), as in its row."""
        index = torch.from_numpy(others).to(self.x.device)
        x = self.x[point : point + 1]
        base = self.sq[point : point + 1, None] + self.sq.index_select(0, index)[None, :]
        row = torch.addmm(base, x, self.x.index_select(0, index).T, alpha=-2.0).clamp_min_(0.0)
        return row[0].cpu().numpy()

    def symmetric_rows(self, index: torch.Tensor) -> torch.Tensor:
        """``(D + Dᵀ) / 2`` at the rows ``index``, as :func:`s2ft.ops.permutation._symmetrized` makes them."""
        x = self.x.index_select(0, index)
        sq = self.sq.index_select(0, index)
        transposed = torch.addmm(self.sq[:, None] + sq[None, :], self.x, x.T, alpha=-2.0).clamp_min_(0.0)
        return self.rows(index).add_(transposed.T).mul_(0.5)

    def pairs(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Squared distances between the points ``a[i]`` and ``b[i]`` (index arrays of one shape), symmetric in
        ``a`` and ``b`` to the last bit, in NumPy."""
        if self._numpy is None:  # a CPU copy, (m, k): NumPy's gathers of small rows are the faster here
            self._numpy = (self.x.cpu().numpy(), self.sq.cpu().numpy())
        x, sq = self._numpy
        a_flat, b_flat = a.reshape(-1), b.reshape(-1)
        out = np.empty(a_flat.size, dtype=x.dtype)
        for start in range(0, a_flat.size, PAIR_CHUNK):
            ia, ib = a_flat[start : start + PAIR_CHUNK], b_flat[start : start + PAIR_CHUNK]
            dot = np.einsum("ij,ij->i", x[ia], x[ib])
            out[start : start + PAIR_CHUNK] = np.maximum((sq[ia] + sq[ib]) - 2.0 * dot, 0.0)
        return out.reshape(a.shape)

    def blocks(self):
        for start in range(0, self.m, self.block):
            yield start, torch.arange(start, min(start + self.block, self.m), device=self.x.device)


def nearest_neighbours(
    points: Points,
    k: int,
    rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
    pad: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Each point's ``k`` nearest other points by the distances ``rows(index)`` (``points.rows`` if None), in
    order of (distance, index) (of points as far as the last listed, which are listed is left to ``topk``: the
    greedy steps read the whole row when they meet that distance), and those distances: int64 and float ``(m, k)`` NumPy arrays, built one block of
    rows at a time. ``pad``: one more, dummy, point ``m`` at distance 0 from all (an open path as a closed tour,
    :func:`s2ft.ops.permutation._shortened_path`), with its own list; the arrays are then ``(m + 1, k)``."""
    rows = points.rows if rows is None else rows
    m = points.m
    total = m + 1 if pad else m
    index = np.empty((total, k), dtype=np.int64)
    value = np.empty((total, k), dtype=np.float64 if points.x.dtype == torch.float64 else np.float32)
    for start, block in points.blocks():
        d = rows(block)
        if pad:
            d = torch.nn.functional.pad(d, (0, 1))
        d[torch.arange(block.numel()), block] = float("inf")  # not its own neighbour
        vals, idx = _sorted_smallest(d, k)
        index[start : start + block.numel()] = idx.cpu().numpy()
        value[start : start + block.numel()] = vals.cpu().numpy()
    if pad:  # the dummy's row: 0 to every point, itself excluded, as the dense matrix's last row
        d = torch.zeros(1, total, dtype=points.x.dtype)
        d[0, m] = float("inf")
        vals, idx = _sorted_smallest(d, k)
        index[m], value[m] = idx[0].numpy(), vals[0].numpy()
    return index, value


def _sorted_smallest(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest entries of each row of ``d``, in order of (value, index) within them."""
    vals, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
    by_index = torch.argsort(idx, dim=1)
    vals, idx = vals.gather(1, by_index), idx.gather(1, by_index)
    by_value = torch.argsort(vals, dim=1, stable=True)
    return vals.gather(1, by_value), idx.gather(1, by_value)


def greedy_paths_from_points(
    points: Points, starts: torch.Tensor, candidates: int = CANDIDATES
) -> torch.Tensor:
    """:func:`s2ft.ops.permutation.greedy_paths` without the distance matrix: the greedy paths from each of
    ``starts`` ``(s,)``, side by side, int64 ``(s, m)`` on the CPU (see the module docstring)."""
    m, s = points.m, starts.numel()
    orders = np.empty((s, m), dtype=np.int64)
    current = starts.cpu().numpy().astype(np.int64)
    orders[:, 0] = current
    if m == 1:
        return torch.from_numpy(orders)
    k = min(candidates, m - 1)
    listed, listed_d = nearest_neighbours(points, k)
    visited = np.zeros((s, m), dtype=bool)
    lanes = np.arange(s)
    for step in range(1, m):
        visited[lanes, current] = True
        cands = listed[current]  # (s, k)
        free = ~visited[lanes[:, None], cands]
        first = free.argmax(axis=1)
        found = free[lanes, first]
        chosen = cands[lanes, first]
        dist = listed_d[current, first]
        # no listed point free, or the one found is as far as the last listed: read the whole row
        unsure = ~found | (dist == listed_d[current, k - 1])
        for lane in lanes[unsure]:  # the distances to the unvisited points only, the first nearest
            free_points = np.flatnonzero(~visited[lane])
            row = points.distances_to(int(current[lane]), free_points)
            chosen[lane] = free_points[int(row.argmin())]
        current = chosen
        orders[:, step] = current
    return torch.from_numpy(orders)


def greedy_path_points(points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`s2ft.ops.permutation.greedy_path` from a drawn start, in ``O(m·(k + K))`` memory."""
    start = _draw_start(points.shape[0], generator)
    return greedy_paths_from_points(Points(points), torch.tensor([start]))[0].to(points.device)


def multistart_path_points(
    points: torch.Tensor, starts: int = GREEDY_STARTS, generator: torch.Generator | None = None
) -> torch.Tensor:
    """:func:`s2ft.ops.permutation.multistart_path` in ``O(m·(k + K·starts))`` memory."""
    m = points.shape[0]
    first = _draw_start(m, generator)
    others = torch.randperm(m, generator=generator)
    chosen = torch.cat([torch.tensor([first]), others[others != first][: starts - 1]])
    p = Points(points)
    orders = greedy_paths_from_points(p, chosen)
    o = orders.numpy()
    steps = np.sqrt(p.pairs(o[:, :-1], o[:, 1:]))  # (s, m - 1)
    lengths = torch.from_numpy(steps).sum(dim=1, dtype=torch.float64)
    return orders[int(torch.argmin(lengths))].to(points.device)


def two_opt_path_points(
    points: torch.Tensor, generator: torch.Generator | None = None, max_rounds: int = MAX_ROUNDS
) -> torch.Tensor:
    """:func:`s2ft.ops.permutation.two_opt_path` in ``O(m·(k + K))`` memory."""
    p = Points(points)
    path = greedy_paths_from_points(p, torch.tensor([_draw_start(p.m, generator)]))[0]
    return _shortened_path_points(p, path, max_rounds).to(points.device)


def cyclic_tour_points(
    points: torch.Tensor, generator: torch.Generator | None = None, max_rounds: int = MAX_ROUNDS
) -> torch.Tensor:
    """:func:`s2ft.ops.permutation.cyclic_tour` in ``O(m·(k + K))`` memory."""
    p = Points(points)
    path = greedy_paths_from_points(p, torch.tensor([_draw_start(p.m, generator)]))[0]
    path = _shortened_path_points(p, path, max_rounds)
    tour = folded(path).numpy()
    if p.m < 4:
        return torch.from_numpy(tour.copy()).to(points.device)
    nearest, _ = nearest_neighbours(p, min(NEIGHBOURS, p.m - 1), rows=p.symmetric_rows)
    return torch.from_numpy(two_opt_rounds(p.pairs, tour, nearest, max_rounds)).to(points.device)


def _shortened_path_points(p: Points, path: torch.Tensor, max_rounds: int) -> torch.Tensor:
    """:func:`s2ft.ops.permutation._shortened_path`: 2-opt of the path closed through a dummy point ``m`` at
    distance 0 from all, under Euclidean distances, cut open at the dummy. int64 ``(m,)`` on the CPU."""
    m = p.m
    tour = torch.cat([path.cpu(), torch.tensor([m])])
    if m + 1 < 4:
        return path.cpu().clone()

    def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        inside = (a < m) & (b < m)
        out = np.zeros(a.shape, dtype=np.float64 if p.x.dtype == torch.float64 else np.float32)
        out[inside] = np.sqrt(p.pairs(a[inside], b[inside]))
        return out

    nearest, _ = nearest_neighbours(
        p, min(NEIGHBOURS, m), rows=lambda index: p.symmetric_rows(index).sqrt_(), pad=True
    )
    order = two_opt_rounds(distances, tour.numpy(), nearest, max_rounds)
    cut = int(np.flatnonzero(order == m)[0])
    return torch.from_numpy(np.concatenate([order[cut + 1 :], order[:cut]]))


_SEARCH_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = {
    "greedy": greedy_path_points,
    "multistart": lambda points, generator: multistart_path_points(points, generator=generator),
    "2opt": two_opt_path_points,
    "2opt-cyclic": cyclic_tour_points,
    "svd": singular_vector_order,
}


def search_order_points(
    points: torch.Tensor, search: str = "greedy", generator: torch.Generator | None = None
) -> torch.Tensor:
    """:func:`s2ft.ops.permutation.search_order` in ``O(m·(k + K))`` memory: the same order, to rounding."""
    if search not in _SEARCH_FUNCTIONS:
        raise ValueError(f"unknown permutation search {search!r}; choose one of {tuple(_SEARCH_FUNCTIONS)}")
    return _SEARCH_FUNCTIONS[search](points, generator)
