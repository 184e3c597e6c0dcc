"""Row and column orderings that make a matrix smooth, hence spectrally sparse.

The rows of a ``(m, d)`` matrix are ``m`` points in ``R^d``. An ordering is an open path through all of them; a
short path puts similar rows next to each other, which leaves little energy at high frequencies (the sum of squared
neighbour differences is a ``sin²(πu/m)``-weighted sum of the spectral energy). Columns are ordered the same way
on the transpose; the two orders are independent because permuting rows does not change column distances.

Searches, by the name :func:`search_order` takes (``S2FTConfig.permutation``):

- ``"greedy"``: the paper's nearest-neighbour path from a seeded start.
- ``"multistart"``: greedy paths from several seeded starts at once (the first is greedy's); the shortest one.
- ``"2opt"``: greedy, then 2-opt refinement of the open path (never longer than greedy's).
- ``"2opt-cyclic"``: the ``"2opt"`` path, folded into a closed tour, then 2-opt of that tour under *squared*
  distances. The DFT is cyclic, so the last row is the first one's neighbour too, and ``Σ_i ||x_{i+1} - x_i||²``
  around the cycle equals ``(1/m) Σ_u 4 sin²(πu/m) E_u``, ``E_u`` the spectral energy at row frequency ``u``: the
  high-frequency energy itself, not a proxy of it.
- ``"svd"``: sort by the leading left singular vector (a cheap comparison, no path).

On the gradient priors of MiniLM-L6's query and value weights the top 1000 of 384x384 coefficients hold 5% of the
energy unpermuted, 33% after ``"greedy"``, 40% after ``"2opt"`` and 54% after ``"2opt-cyclic"``
(``benchmarks/permutation_search.py``). Every search is deterministic for a generator state, and the 2-opt ones are
bounded by ``max_rounds``: on a random 4096x4096 matrix (2 CPU threads) greedy takes 2.6 s, ``"2opt"`` 3.6 s and
``"2opt-cyclic"`` 6.9 s.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

GREEDY_STARTS = 8  # starts of "multistart"
NEIGHBOURS = 8  # candidate neighbours per point in 2-opt
MAX_ROUNDS = 128  # 2-opt rounds; each applies every improving move it can without overlap
POWER_ITERATIONS = 64  # power iterations of "svd"


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


def greedy_paths(dists: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Greedy nearest-neighbour paths from each of ``starts`` ``(s,)``, run side by side over ``dists`` ``(m, m)``.

    Each path keeps appending the nearest row it has not visited (the first such row on ties). Returns the
    visiting orders, int64 ``(s, m)`` on the device of ``dists``: m steps of O(s·m) each.
    """
    s, m = starts.numel(), dists.shape[0]
    lanes = torch.arange(s, device=dists.device)
    current = starts.to(dists.device, torch.long)
    # 0 or +inf per lane and row, added to the current rows' distances
    visited = torch.zeros(s, m, dtype=dists.dtype, device=dists.device)
    orders = torch.empty(s, m, dtype=torch.long, device=dists.device)
    orders[:, 0] = current
    for step in range(1, m):
        visited[lanes, current] = float("inf")
        current = torch.argmin(dists.index_select(0, current) + visited, dim=1)
        orders[:, step] = current
    return orders


def greedy_path(
    points: torch.Tensor, start: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Greedy nearest-neighbour path through the rows of ``points`` ``(m, d)``.

    Starts at row ``start`` (drawn with ``generator`` when None) and keeps appending the nearest unvisited row.
    Returns the visiting order, an int64 permutation of ``range(m)`` on the device of ``points``.
    O(m² d) for the distances, then m vectorized O(m) steps.
    """
    m = points.shape[0]
    start = _draw_start(m, generator) if start is None else start
    if not 0 <= start < m:
        raise ValueError(f"start={start} is not a row of a {m}-row matrix")
    return greedy_paths(pairwise_sq_dists(points), torch.tensor([start]))[0]


def multistart_path(
    points: torch.Tensor, starts: int = GREEDY_STARTS, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The shortest of greedy paths from ``starts`` seeded rows of ``points`` ``(m, d)``, run side by side.

    The first start is the one :func:`greedy_path` draws from the same generator state, so the result is never
    longer than greedy's. Returns an int64 ``(m,)`` permutation on the device of ``points``.
    """
    m = points.shape[0]
    first = _draw_start(m, generator)
    others = torch.randperm(m, generator=generator)
    chosen = torch.cat([torch.tensor([first]), others[others != first][: starts - 1]])
    dists = pairwise_sq_dists(points)
    orders = greedy_paths(dists, chosen)  # (s, m)
    steps = _pair_values(dists, orders[:, :-1], orders[:, 1:]).sqrt_()  # (s, m - 1)
    return orders[int(torch.argmin(steps.sum(dim=1, dtype=torch.float64)))]


def two_opt_path(
    points: torch.Tensor, generator: torch.Generator | None = None, max_rounds: int = MAX_ROUNDS
) -> torch.Tensor:
    """The greedy path through the rows of ``points`` ``(m, d)``, shortened by :func:`two_opt` as an open path.

    Never longer than the greedy path from the same generator state. Returns an int64 ``(m,)`` permutation on the
    device of ``points``.
    """
    sq_dists = pairwise_sq_dists(points)
    path = greedy_paths(sq_dists, torch.tensor([_draw_start(points.shape[0], generator)]))[0]
    return _shortened_path(sq_dists, path, max_rounds)


def cyclic_tour(
    points: torch.Tensor, generator: torch.Generator | None = None, max_rounds: int = MAX_ROUNDS
) -> torch.Tensor:
    """A closed tour through the rows of ``points`` ``(m, d)`` of low :func:`cyclic_energy`.

    :func:`two_opt_path`, :func:`folded` into a closed tour, then :func:`two_opt` of that tour under squared
    distances, which is the high-frequency spectral energy along the permuted axis (see the module docstring).
    Returns an int64 ``(m,)`` permutation on the device of ``points``.
    """
    sq_dists = pairwise_sq_dists(points)
    path = greedy_paths(sq_dists, torch.tensor([_draw_start(points.shape[0], generator)]))[0]
    path = _shortened_path(sq_dists, path, max_rounds)
    return two_opt(_symmetrized(sq_dists), folded(path), max_rounds=max_rounds)


def folded(path: torch.Tensor) -> torch.Tensor:
    """The closed tour ``path[0], path[2], path[4], ..., then back through the odd positions``, ``(m,)``.

    Read cyclically, a path's last and first points are neighbours: a jump the DFT sees as a discontinuity. The
    fold replaces it by steps of two along the path (for points on a curve, the optimal closed tour; it is what the
    DCT's even extension does to a signal).
    """
    return torch.cat([path[0::2], path[1::2].flip(0)])


def two_opt(
    dists: torch.Tensor, tour: torch.Tensor, neighbours: int = NEIGHBOURS, max_rounds: int = MAX_ROUNDS
) -> torch.Tensor:
    """Shorten the closed ``tour`` ``(N,)`` over symmetric ``dists`` ``(N, N)`` by 2-opt moves.

    A move removes the edges at positions ``p < q`` (edge ``p`` joins ``tour[p]`` and ``tour[p+1]``, cyclically)
    and reverses ``tour[p+1 : q+1]``. Each round scores, in one vectorized pass, the moves that join a point to one
    of its ``neighbours`` nearest points (O(N·neighbours)), then applies the best ones whose spans do not overlap,
    which is exact: their gains add. Stops when no move shortens the tour or after ``max_rounds`` rounds, so the
    result is deterministic and never longer than ``tour``. The rounds run in NumPy on the CPU: they are many small
    serial steps, which thread pools only slow down. ``dists`` is float32 or float64; memory: ``dists`` (shared,
    not copied, on the CPU) and O(N·neighbours).
    """
    n = tour.numel()
    if n < 4:
        return tour.clone()
    nearest = _nearest(dists, min(neighbours, n - 1)).cpu().numpy()  # (N, k)
    flat = dists.detach().cpu().contiguous().view(-1).numpy()  # (N*N,): dists[a, b] is flat[a*N + b]

    def pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return flat[a * n + b]

    order = two_opt_rounds(pair, tour.cpu().numpy(), nearest, max_rounds)
    return torch.from_numpy(order).to(tour.device)


def two_opt_rounds(
    pair: Callable[[np.ndarray, np.ndarray], np.ndarray],
    tour: np.ndarray,
    nearest: np.ndarray,
    max_rounds: int = MAX_ROUNDS,
) -> np.ndarray:
    """The rounds of :func:`two_opt` on the closed ``tour`` ``(N,)``, with ``pair(a, b)`` the distances between
    the points of index arrays ``a`` and ``b`` (symmetric) and ``nearest`` ``(N, k)`` each point's candidate
    neighbours: what the dense search and the one from points (:mod:`s2ft.ops.point_search`) share."""
    n = tour.size
    join = pair(np.broadcast_to(np.arange(n)[:, None], nearest.shape), nearest)  # (N, k): d(a, nearest[a])
    order = tour.copy()
    for _ in range(max_rounds):
        gain, p, q = _move_gains(pair, order, nearest, join)
        if gain.size == 0:
            break
        order = _reverse_spans(order, *_disjoint_moves(gain, p, q))
    return order


def singular_vector_order(
    points: torch.Tensor, generator: torch.Generator | None = None, iterations: int = POWER_ITERATIONS
) -> torch.Tensor:
    """Rows of ``points`` ``(m, d)`` sorted by their entry in the leading left singular vector.

    Power iteration from a seeded start vector (O(iterations · m · d), no full SVD). Returns an int64 ``(m,)``
    permutation on the device of ``points``.
    """
    x = points.to(torch.float64 if points.numel() <= 2**22 else torch.float32)
    v = torch.randn(x.shape[1], generator=generator, dtype=x.dtype).to(x.device)
    u = x @ v
    for _ in range(iterations):
        u = x @ (x.T @ u)
        u = u / torch.linalg.vector_norm(u).clamp_min(torch.finfo(x.dtype).tiny)
    return torch.argsort(u, stable=True)


def path_length(points: torch.Tensor, order: torch.Tensor | None = None) -> float:
    """Length of the open path visiting the rows of ``points`` in ``order`` (identity when None)."""
    x = points if points.dtype == torch.float64 else points.float()
    if order is not None:
        x = x[order]
    return float(torch.linalg.vector_norm(x[1:] - x[:-1], dim=1).sum(dtype=torch.float64))


def cyclic_energy(points: torch.Tensor, order: torch.Tensor | None = None) -> float:
    """``Σ_i ||x_{i+1} - x_i||²`` around the closed cycle of the rows of ``points`` in ``order``: the objective of
    ``"2opt-cyclic"``, equal to ``(1/m) Σ_u 4 sin²(πu/m)`` times the energy at row frequency ``u``."""
    x = points if points.dtype == torch.float64 else points.float()
    if order is not None:
        x = x[order]
    return float((x.roll(-1, dims=0) - x).pow(2).sum(dtype=torch.float64))


_SEARCH_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = {
    "greedy": lambda points, generator: greedy_path(points, generator=generator),
    "multistart": lambda points, generator: multistart_path(points, generator=generator),
    "2opt": two_opt_path,
    "2opt-cyclic": cyclic_tour,
    "svd": singular_vector_order,
}
SEARCHES = tuple(_SEARCH_FUNCTIONS)


def search_order(
    points: torch.Tensor, search: str = "greedy", generator: torch.Generator | None = None
) -> torch.Tensor:
    """An ordering of the rows of ``points`` by the named search (one of :data:`SEARCHES`)."""
    if search not in _SEARCH_FUNCTIONS:
        raise ValueError(f"unknown permutation search {search!r}; choose one of {SEARCHES}")
    return _SEARCH_FUNCTIONS[search](points, generator)


def is_permutation(order: torch.Tensor, size: int) -> bool:
    """True if ``order`` holds every integer of ``range(size)`` exactly once."""
    if order.dim() != 1 or order.numel() != size:
        return False
    return bool(torch.equal(torch.sort(order.long().cpu()).values, torch.arange(size)))


# ---------------------------------------------------------------------------------------------- helpers
def _draw_start(m: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(m, (1,), generator=generator))


def _pair_values(dists: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``dists[a, b]`` elementwise for index tensors of one shape (a flat gather: faster than 2-D indexing)."""
    flat = (a * dists.shape[1] + b).reshape(-1)
    return dists.reshape(-1).index_select(0, flat).view(a.shape)


def _shortened_path(sq_dists: torch.Tensor, path: torch.Tensor, max_rounds: int) -> torch.Tensor:
    """``path`` shortened by 2-opt under the Euclidean distances ``sq_dists.sqrt()`` ``(m, m)``.

    An open path is a closed tour through one more, dummy, point at distance 0 from all the others; the tour is cut
    open there again. Memory: ``sq_dists`` and one ``(m+1, m+1)`` matrix.
    """
    m = sq_dists.shape[0]
    padded = torch.nn.functional.pad(sq_dists, (0, 1, 0, 1))  # (m+1, m+1)
    padded[:m, :m].add_(sq_dists.T).mul_(0.5).sqrt_()  # symmetric Euclidean distances
    tour = two_opt(padded, torch.cat([path, path.new_tensor([m])]), max_rounds=max_rounds)
    cut = int((tour == m).nonzero())
    return torch.cat([tour[cut + 1 :], tour[:cut]])


def _symmetrized(dists: torch.Tensor) -> torch.Tensor:
    """``(dists + dists.T) / 2``: the Gram identity's rounding leaves ``dists`` slightly asymmetric, and 2-opt,
    which reverses spans, must see the same length both ways or it can cycle."""
    return dists.add(dists.T).mul_(0.5)


def _nearest(dists: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` nearest other points of every point, int64 ``(N, k)``."""
    diagonal = dists.diagonal().clone()
    dists.diagonal().fill_(float("inf"))
    nearest = torch.topk(dists, k, dim=1, largest=False).indices
    dists.diagonal().copy_(diagonal)
    return nearest


def _move_gains(
    pair: Callable[[np.ndarray, np.ndarray], np.ndarray],
    order: np.ndarray,
    nearest: np.ndarray,
    join: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The improving 2-opt moves of the tour ``order`` ``(N,)`` that join a point ``a`` to a near point ``c``.

    Either ``a``'s and ``c``'s successors are joined too (the edges at their positions ``i``, ``j`` go) or their
    predecessors (the edges at ``i-1``, ``j-1``). ``pair(a, b)`` gives the distances of point pairs, ``join``
    ``(N, k)`` holds ``d(a, nearest[a])``. Returns ``(gain, p, q)``, each ``(M,)``, with ``p < q`` the edge positions.
    """
    n = order.size
    position = np.empty_like(order)
    position[order] = np.arange(n)
    edge = pair(order, np.roll(order, -1))  # (N,): edge p joins order[p] and order[p+1]
    i = np.broadcast_to(position[:, None], nearest.shape)  # (N, k): position of a
    j = position[nearest]  # (N, k): position of c
    tolerance = 16 * np.finfo(edge.dtype).eps * edge.mean()  # gains below it may be rounding
    gains, ps, qs = [], [], []
    for shift in (0, -1):  # successors: edges i, j; predecessors: edges i-1, j-1
        ei, ej = (i + shift) % n, (j + shift) % n
        ni, nj = (i + 2 * shift + 1) % n, (j + 2 * shift + 1) % n  # the other ends of those edges
        p, q = np.minimum(ei, ej), np.maximum(ei, ej)
        # the gain less the new edge's length (>= 0): only where it could improve is that length asked for
        bound = edge[ei] + edge[ej] - join
        open_ = (bound > tolerance) & (q > p + 1)
        gain = bound[open_] - pair(order[ni[open_]], order[nj[open_]])
        keep = gain > tolerance
        gains.append(gain[keep])
        ps.append(p[open_][keep])
        qs.append(q[open_][keep])
    return np.concatenate(gains), np.concatenate(ps), np.concatenate(qs)


def _disjoint_moves(gain: np.ndarray, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best-first among the ``len(taken)`` best, the moves whose edge-position spans ``[p, q]`` overlap none taken
    before. Returns the spans of the tour to reverse, ``lo = p + 1`` and ``hi = q`` (int64 arrays).
    """
    taken = np.zeros(int(q.max()) + 1, dtype=bool)
    ranking = np.argsort(-gain, kind="stable")[: taken.size]
    lo, hi = [], []
    for start, stop in zip(p[ranking].tolist(), q[ranking].tolist()):
        if not taken[start : stop + 1].any():
            taken[start : stop + 1] = True
            lo.append(start + 1)
            hi.append(stop)
    return np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)


def _reverse_spans(order: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``order`` with each disjoint span ``order[lo:hi+1]`` reversed, in one gather: inside a span, position ``x``
    takes position ``lo + hi - x``."""
    n = order.size
    inside = np.zeros(n + 1, dtype=np.int64)
    mirror = np.zeros(n + 1, dtype=np.int64)
    inside[lo] += 1  # spans are disjoint and never touch, so no index repeats within one update
    inside[hi + 1] -= 1
    mirror[lo] += lo + hi
    mirror[hi + 1] -= lo + hi
    positions = np.arange(n)
    return order[np.where(np.cumsum(inside[:n]) > 0, np.cumsum(mirror[:n]) - positions, positions)]
