"""The searches of :mod:`s2ft.ops.permutation` on points, without their ``(m, m)`` distance matrix.

The dense searches build every squared distance between the ``m`` rows of ``points`` ``(m, k)`` at once: 8·m² bytes
(970 MB for the 11,008 rows of a Llama-2-7B MLP layer's rank-64 prior). Here the distances come from the points'
``k`` coordinates when needed, in blocks of rows, so a search holds ``O(m·(k + K))`` numbers (``K`` candidate
neighbours per point) and one block of ``O(BLOCK_ENTRIES)`` distances:

- **greedy** (and ``"multistart"``): each point's ``K`` nearest others, sorted by (distance, index), are found once
  block by block (:func:`nearest_neighbours`). A step takes the first unvisited point of the current point's list:
  the nearest unvisited point of all, unless every listed point is visited or the one found is as far as the last
  listed (a tie might then hide an unlisted point of lower index); only then are the distances to all unvisited
  points computed, as the dense search reads its row (from a compacted copy of the unvisited points, so late steps,
  where the lists run out most, cost little). The path is the dense search's: the same start drawn from the
  generator, the same nearest unvisited point at each step, the first (lowest index) of equal distances.
- **2-opt** (``"2opt"``, ``"2opt-cyclic"``): the same rounds as :func:`s2ft.ops.permutation.two_opt` (shared code),
  with the candidate lists found block by block and every distance a move's gain needs computed from the two
  points' coordinates.
- **svd** needs no distances: it is :func:`s2ft.ops.permutation.singular_vector_order` itself.

Distances are computed as the dense ones (centred points, the Gram identity ``|a|² + |b|² - 2 a·b``), in float64
for float64 points (up to 4M coordinates, as the dense ones) and in float32 for float32 points (a sketched prior of
a float32 or bfloat16 model: its factors are float32; the products then take a third less time), but a block's
matrix product may round differently from the whole matrix's, so the two agree to rounding, not bit for bit: two
distances within rounding of each other may then be ordered differently (random points never are, in the tests;
exactly equal points give exactly equal distances in both and the lowest index wins in both). In float32 that
rounding is float32's: a step then takes a point whose distance is the nearest one's to about 1e-6 of the points'
squared norms, which is what stays guaranteed (tested against float64 distances), not the float64 path.
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
BLOCK_ENTRIES = (
    2**21
)  # distances computed at once (16 MiB in float64; 256 rows of 8,192 points: fast on one core)
PAIR_CHUNK = 2**15  # point pairs whose distances are computed at once


class Points:
    """The rows of ``points`` ``(m, k)`` centred, with their squared norms; distances between them on demand. In
    the dtype of :func:`s2ft.ops.permutation.pairwise_sq_dists` for float64 points, float32 for others (see the
    module docstring)."""

    def __init__(self, points: torch.Tensor, block_entries: int | None = None) -> None:
        dtype = torch.float64 if points.numel() <= 2**22 and points.dtype == torch.float64 else torch.float32
        x = points.detach().to(dtype)
        self.x = x - x.mean(dim=0, keepdim=True)
        self.sq = (self.x * self.x).sum(dim=1)
        self.m = self.x.shape[0]
        self._numpy: tuple[np.ndarray, np.ndarray] | None = None
        self._buffer: torch.Tensor | None = None
        entries = BLOCK_ENTRIES if block_entries is None else block_entries
        self.block = max(1, entries // max(1, self.m))  # rows per block

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Squared distances from the points ``index`` ``(b,)`` to all, ``(b, m)``: rows of the dense matrix, in a
        buffer the next call reuses."""
        x = self.x.index_select(0, index)
        sq = self.sq.index_select(0, index)
        if self._buffer is None or self._buffer.shape[0] < index.numel():
            self._buffer = torch.empty(max(index.numel(), self.block), self.m, dtype=self.x.dtype)
        out = self._buffer[: index.numel()]
        torch.add(sq[:, None], self.sq[None, :], out=out)  # the dense matrix's sum, then its product added
        return out.addmm_(x, self.x.T, alpha=-2.0).clamp_min_(0.0)

    def numpy_rows(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The coordinates ``(b, k)`` and squared norms ``(b,)`` of the points ``index``, as NumPy arrays."""
        x, sq = self._numpy_copy()
        return x[index], sq[index]

    def _numpy_copy(self) -> tuple[np.ndarray, np.ndarray]:
        if self._numpy is None:  # a CPU copy, (m, k): NumPy's gathers of small rows are the faster here
            self._numpy = (self.x.cpu().numpy(), self.sq.cpu().numpy())
        return self._numpy

    def symmetric_rows(self, index: torch.Tensor) -> torch.Tensor:
        """``(D + Dᵀ) / 2`` at the rows ``index``, as :func:`s2ft.ops.permutation._symmetrized` makes them."""
        x = self.x.index_select(0, index)
        sq = self.sq.index_select(0, index)
        transposed = torch.addmm(self.sq[:, None] + sq[None, :], self.x, x.T, alpha=-2.0).clamp_min_(0.0)
        return self.rows(index).add_(transposed.T).mul_(0.5)  # (in the rows' buffer)

    def pairs(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Squared distances between the points ``a[i]`` and ``b[i]`` (index arrays of one shape), symmetric in
        ``a`` and ``b`` to the last bit, in NumPy."""
        x, sq = self._numpy_copy()
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
    ``starts`` ``(s,)``, one after the other on the same neighbour lists, int64 ``(s, m)`` on the CPU (see the
    module docstring)."""
    m, s = points.m, starts.numel()
    orders = np.empty((s, m), dtype=np.int64)
    orders[:, 0] = starts.cpu().numpy()
    if m == 1:
        return torch.from_numpy(orders)
    k = min(candidates, m - 1)
    listed, listed_d = nearest_neighbours(points, k)
    # Python lists: a step reads a few entries of one point's list, where NumPy's per-call cost would dominate
    lists, last = listed.tolist(), listed_d[:, k - 1].tolist()
    first_d = listed_d.tolist()
    for lane in range(s):
        orders[lane] = _greedy_walk(points, int(orders[lane, 0]), lists, first_d, last)
    return torch.from_numpy(orders)


def _greedy_walk(
    points: Points, start: int, lists: list[list[int]], dists: list[list[float]], last: list[float]
) -> np.ndarray:
    """One greedy path from ``start``: each step takes the first unvisited point of the current point's list
    ``lists[current]`` (distances ``dists[current]``, the last ``last[current]``), or, when none is left or the one
    found is as far as the last listed, the nearest unvisited point of all (:class:`_Unvisited`)."""
    m = points.m
    visited = bytearray(m)
    order = np.empty(m, dtype=np.int64)
    unvisited = _Unvisited(points, visited)
    current = start
    order[0] = current
    visited[current] = 1
    for step in range(1, m):
        chosen = -1
        for position, point in enumerate(lists[current]):
            if not visited[point]:
                if dists[current][position] != last[current]:
                    chosen = point
                break
        if chosen < 0:
            chosen = unvisited.nearest(current)
        visited[chosen] = 1
        order[step] = chosen
        current = chosen
    return order


class _Unvisited:
    """The points a greedy walk has not visited, for its steps that need the nearest of all of them: their
    coordinates copied in index order, compacted again (the visited ones dropped) once they are at most half of
    the copy, so a step costs ``O(unvisited · k)``, not ``O(m · k)``."""

    def __init__(self, points: Points, visited: bytearray) -> None:
        self.points = points
        self.visited = np.frombuffer(visited, dtype=np.uint8)  # the walk's flags, shared
        self.index: np.ndarray | None = None

    def nearest(self, point: int) -> int:
        """The nearest unvisited point to ``point`` (the lowest index of equal distances), as in its row of the dense
        matrix."""
        if self.index is None or 2 * int(self.visited[self.index].sum()) >= self.index.size:
            self.index = np.flatnonzero(self.visited == 0)
            self.x, self.sq = self.points.numpy_rows(self.index)
        x, sq = self.points.numpy_rows(np.array([point]))
        row = np.maximum((sq[0] + self.sq) - 2.0 * (self.x @ x[0]), 0.0)
        row[self.visited[self.index] != 0] = np.inf
        return int(self.index[int(row.argmin())])


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
