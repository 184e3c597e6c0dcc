"""The orthonormal multi-level 2-D Haar (``db1``) wavelet basis: WaveFT's basis, for FourierFT's and S2FT's recipes.

Notation: ``M = d_out``, ``N = d_in``, ``J`` the number of levels. ``H_L`` ``(L, L)`` is the orthonormal ``J``-level
Haar analysis matrix of length ``L`` (:func:`dwt` is ``x ↦ H_L x`` along the last dimension, :func:`idwt` its
inverse ``y ↦ H_Lᵀ y``). One level acts on the first ``m`` entries (``m = L`` at the first level, then the previous
level's approximation part) and leaves the rest as they are:

    a_i = (x_{2i} + x_{2i+1}) / sqrt(2),   d_i = (x_{2i} - x_{2i+1}) / sqrt(2),   i < floor(m/2),
    x[:m] ↦ [a, (x_{m-1} if m is odd), d]

so an **odd length passes its last entry through unchanged** into the approximation part (which has
``ceil(m/2)`` entries and is the next level's input); every level is a product of 2x2 rotations and a
permutation, so ``H_L`` is orthonormal (``H_L H_Lᵀ = I``) for every length and level. ``J > 1`` levels need
``ceil(L / 2^(J-1)) >= 2``: each further level must have a pair to transform (:func:`check_levels`; a side of
length 1, a Conv2d with one input channel and a 1x1 kernel, takes one level, the identity).

``n`` real coefficients ``c[k]`` sit at distinct locations ``(u_k, v_k) = (rows[k], cols[k])`` of an otherwise
zero ``M x N`` matrix ``F`` (rows in ``H_M``'s coefficient order, columns in ``H_N``'s), and

    ΔW̄ = σ H_Mᵀ F H_N,   σ = scaling / sqrt(2MN),
    ΔW[perm_rows[i], perm_cols[j]] = ΔW̄[i, j]    (S2FT's permutations; none for WaveFT's recipe).

``scaling`` is in FourierFT's units, as the DCT basis' (:mod:`s2ft.ops.dct`): one coefficient's basis function
has Frobenius norm ``σ`` here and in both other bases, so a scaling and a learning rate move ``ΔW`` equally fast in
all three. PEFT's ``WaveFTConfig`` writes ``ΔW = scaling_peft * waverec2d(F_peft)`` instead, so a coefficient here
is ``scaling_peft / σ`` times PEFT's (:func:`to_peft_layout` says how the locations map).

Paths of :func:`apply`, both differentiable wrt ``x`` and ``coeffs`` by autograd:

- ``"dense"``: build ``ΔW`` (:func:`delta_weight`, two inverse transforms of ``F``) and ``F.linear``;
- ``"fft"`` (the name the layers use for the path that never forms ``ΔW``): ``ΔW̄ x̄ = σ H_Mᵀ z`` with
  ``z[u_k] += c_k (H_N x̄)[v_k]``: one DWT of the input, a sparse map of the ``n`` coefficients and one inverse DWT,
  ``O(M + N + n)`` per token (about ``2 (M + N)`` additions and multiplications a level pair) and no weight
  gradient.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from s2ft.ops import apply as _fourier  # noqa: F401  (spends torch's one warning on compressed sparse tensors)
from s2ft.ops.locations import fourierft_locations, widen

PATHS = ("dense", "fft")
SPARSE_LIMIT = 4  # the "fft" path's sparse maps while their nonzeros <= this times (J + 1) (M + N)
FAMILIES = ("db1", "haar")  # the same wavelet: Haar is Daubechies-1
MAX_LEVELS = 8  # bases registered in s2ft.ops.bases.BASES: one per level count
_ROOT_HALF = math.sqrt(0.5)


def basis_name(levels: int) -> str:
    """The key of the ``levels``-level Haar basis in :data:`s2ft.ops.bases.BASES` (``"haar"`` for one level)."""
    return "haar" if levels == 1 else f"haar{levels}"


def check_family(family: str) -> None:
    """Raise ``ValueError`` unless ``family`` is a wavelet this module implements."""
    if family not in FAMILIES:
        raise ValueError(
            f"wavelet_family={family!r} is not supported: s2ft implements the Haar wavelet only "
            f"(wavelet_family='db1', also called 'haar'); for other families use PEFT's WaveFTConfig"
        )


def level_lengths(length: int, levels: int) -> list[int]:
    """The input length of each level: ``[L, ceil(L/2), ceil(L/4), ...]`` (``levels`` entries)."""
    sizes = [length]
    for _ in range(levels - 1):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def max_levels(length: int) -> int:
    """The most levels a length takes, capped at :data:`MAX_LEVELS`: one always (a length of 1 passes through
    unchanged), a further level only while the approximation part it splits has at least two entries."""
    levels = 1
    while levels < MAX_LEVELS and level_lengths(length, levels + 1)[-1] >= 2:
        levels += 1
    return levels


def check_levels(levels: int, d_out: int, d_in: int, where: str = "the layer") -> None:
    """Raise ``ValueError`` unless a ``(d_out, d_in)`` matrix takes ``levels`` levels along both sides."""
    if not isinstance(levels, int) or isinstance(levels, bool) or not 1 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels must be an integer from 1 to {MAX_LEVELS}, got {levels!r}")
    most = min(max_levels(d_out), max_levels(d_in))
    if levels > most:
        raise ValueError(
            f"levels={levels} is more than {where} of shape ({d_out}, {d_in}) can take: each level halves the "
            f"approximation part and needs at least two entries in it; use levels <= {most}"
        )


def _level(x: torch.Tensor, m: int) -> torch.Tensor:
    pairs = x[..., : 2 * (m // 2)].unflatten(-1, (m // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    parts = [(even + odd) * _ROOT_HALF, x[..., 2 * (m // 2) : m], (even - odd) * _ROOT_HALF, x[..., m:]]
    return torch.cat(parts, dim=-1)


def _inverse_level(y: torch.Tensor, m: int) -> torch.Tensor:
    half, approx = m // 2, (m + 1) // 2
    a, d = y[..., :half], y[..., approx:m]
    pairs = torch.stack([(a + d) * _ROOT_HALF, (a - d) * _ROOT_HALF], dim=-1).flatten(-2)
    return torch.cat([pairs, y[..., half:approx], y[..., m:]], dim=-1)


def dwt(x: torch.Tensor, levels: int) -> torch.Tensor:
    """``levels``-level orthonormal Haar analysis of ``x`` ``(..., L)`` along its last dimension: ``x @ H_Lᵀ``.
    ``O(L)``."""
    for m in level_lengths(x.shape[-1], levels):
        x = _level(x, m)
    return x


def idwt(y: torch.Tensor, levels: int) -> torch.Tensor:
    """Inverse of :func:`dwt` (its transpose) along the last dimension: ``y @ H_L``. ``O(L)``."""
    for m in reversed(level_lengths(y.shape[-1], levels)):
        y = _inverse_level(y, m)
    return y


def haar_matrix(length: int, levels: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``H_L`` ``(L, L)`` written out entry by entry from the definition (a reference for tests; ``O(L^2)``)."""
    matrix = torch.eye(length, dtype=torch.float64)
    for m in level_lengths(length, levels):
        step = torch.eye(length, dtype=torch.float64)
        step[:m, :m] = 0
        half = m // 2
        for i in range(half):
            step[i, 2 * i] = step[i, 2 * i + 1] = _ROOT_HALF
            step[(m + 1) // 2 + i, 2 * i] = _ROOT_HALF
            step[(m + 1) // 2 + i, 2 * i + 1] = -_ROOT_HALF
        if m % 2:
            step[half, m - 1] = 1.0
        matrix = step @ matrix
    return matrix.to(dtype)


def _real_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _sigma(scaling: float, d_out: int, d_in: int) -> float:
    return float(scaling) / math.sqrt(2 * d_out * d_in)


def dwt2(matrix: torch.Tensor, levels: int) -> torch.Tensor:
    """``H_M A H_Nᵀ`` of ``A`` ``(M, N)``: its wavelet coefficients in this basis' layout."""
    return dwt(dwt(matrix, levels).T, levels).T


def energy(matrix: torch.Tensor, levels: int) -> torch.Tensor:
    """``|H_M A H_Nᵀ|`` ``(M, N)`` float32: what S2FT's planner samples locations from in this basis."""
    return dwt2(matrix.float(), levels).abs()


def delta_weight(
    coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None, levels: int = 1
) -> torch.Tensor:
    """Dense ``ΔW`` ``(d_out, d_in)``: ``σ H_Mᵀ F H_N``, then rows and columns permuted (as FourierFT's).

    Float32, or float64 for float64 ``coeffs``. Differentiable wrt ``coeffs``.
    """
    rows, cols, perm_rows, perm_cols = widen(rows, cols, perm_rows, perm_cols)
    dtype = _real_dtype(coeffs)
    spectrum = torch.zeros(d_out, d_in, dtype=dtype, device=coeffs.device)
    spectrum = spectrum.index_put((rows, cols), coeffs.to(dtype), accumulate=True)  # a repeated location: sum
    delta = idwt(idwt(spectrum, levels).T, levels).T * _sigma(scaling, d_out, d_in)  # H_Mᵀ (F H_N)
    if perm_rows is not None:
        delta = delta[torch.argsort(perm_rows)]
    if perm_cols is not None:
        delta = delta[:, torch.argsort(perm_cols)]
    return delta


def project(delta, rows, cols, scaling, perm_rows=None, perm_cols=None, levels: int = 1) -> torch.Tensor:
    """The coefficients at ``(rows, cols)`` whose :func:`delta_weight` is nearest ``delta`` ``(d_out, d_in)`` in
    Frobenius norm: ``c_k = (H_M D H_Nᵀ)[u_k, v_k] / σ`` for the permuted ``D = delta[perm_rows][:, perm_cols]``
    (the basis is orthonormal), shared equally by repeated locations. Float64 for float64 input, else float32."""
    d_out, d_in = delta.shape
    rows, cols, perm_rows, perm_cols = widen(rows, cols, perm_rows, perm_cols)
    permuted = delta.to(_real_dtype(delta))
    if perm_rows is not None:
        permuted = permuted[perm_rows]
    if perm_cols is not None:
        permuted = permuted[:, perm_cols]
    inner = dwt2(permuted, levels)[rows, cols]
    _, inverse, counts = torch.unique(rows * d_in + cols, return_inverse=True, return_counts=True)
    return inner / counts[inverse].to(inner.dtype) / _sigma(scaling, d_out, d_in)


def to_peft_layout(rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int) -> tuple:
    """This basis' one-level locations as PEFT WaveFT's (and back: the map is its own inverse).

    PEFT (``peft.tuners.waveft``) splits its ``M x N`` spectrum into quadrants ``[[cA, cH], [cV, cD]]`` and
    reconstructs with ``waverec2d``, where ``cH`` (top right) is the row-detail, column-approximation band and
    ``cV`` (bottom left) the row-approximation, column-detail one: the image layout of wavelet coefficients. Here
    rows and columns are each in ``H``'s order (``F`` separable), which puts those two bands the other way round.
    So with even ``M`` and ``N`` (every default model's shapes) a location in the top-right quadrant moves
    ``M/2`` rows down and ``N/2`` columns left, one in the bottom-left the reverse, and the others stay. With an
    odd side PEFT pads to even and crops (not an orthonormal basis), so there is nothing to map: refused.
    """
    if d_out % 2 or d_in % 2:
        raise ValueError(
            f"PEFT's WaveFT layout is an orthonormal Haar basis only for even shapes; ({d_out}, {d_in}) is not"
        )
    rows, cols = rows.long(), cols.long()
    half_r, half_c = d_out // 2, d_in // 2
    top_right = (rows < half_r) & (cols >= half_c)
    bottom_left = (rows >= half_r) & (cols < half_c)
    shift_r = torch.where(top_right, half_r, torch.where(bottom_left, -half_r, 0))
    shift_c = torch.where(top_right, -half_c, torch.where(bottom_left, half_c, 0))
    return rows + shift_r, cols + shift_c


def seeded_locations(d_out: int, d_in: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """WaveFT's ``n`` distinct uniformly random locations for a seed: PEFT's draw
    (``randperm(d_out * d_in)[:n]``, the same as :func:`s2ft.ops.locations.fourierft_locations`), moved into this
    basis' layout (:func:`to_peft_layout`) when both sides are even, so that one level reproduces PEFT's ``ΔW``;
    as drawn otherwise (uniform either way). Int64 ``(n,)`` tensors on the CPU."""
    rows, cols = fourierft_locations(d_out, d_in, n, seed)
    if d_out % 2 == 0 and d_in % 2 == 0:
        rows, cols = to_peft_layout(rows, cols, d_out, d_in)
    return rows, cols


def choose_path(d_out: int, d_in: int, n: int, num_tokens: int, device, fused: bool = False) -> str:
    """The path ``"auto"`` takes: ``"fft"`` (the fast path) when ``d_out * d_in > 64 (d_out + d_in) + 16 n``,
    else ``"dense"``; ``fused`` is accepted and not used. The fast path costs ``O(n J)`` (its sparse maps) or
    ``O(J (M + N))`` (whole transforms) per token, the dense one ``M N`` multiply-adds per token plus building
    ``ΔW``. The rule was measured with the whole transforms, on the shared 2-core CPU, one thread (commit f3939e7,
    n = 1000): they were 1.04-19x faster than the dense path at widths 1,024 to 4,096 (512 and 4,096 tokens); at
    384 x 384 with 1,024 tokens the two were within 1.3x of each other in either order over two runs. The sparse
    maps are 2.4-6.2x faster than the whole transforms at those widths (``benchmarks/results/cpu/
    wavelet_speed.md``), so the rule now errs towards the dense path near its boundary."""
    return "fft" if d_out * d_in > 64 * (d_out + d_in) + 16 * n else "dense"


@functools.lru_cache(maxsize=32)
def haar_rows(length: int, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``H_L`` as CSR arrays on the CPU: ``crow`` ``(L + 1,)``, ``col`` and float64 ``value`` ``(nnz,)``. Row ``v``
    (the analysis function of coefficient ``v``) has ``2^j`` nonzeros for a detail of level ``j`` and ``2^J`` for
    an approximation (other counts where an odd length passed an entry through), ``nnz <= L (J + 1)`` in all.
    Built level by level from the approximation functions of the level before (padded with zero weights),
    ``O(L J)``, once per length and level count."""
    index = torch.arange(length)[:, None]  # the current approximation functions: (m, support) entries
    weight = torch.ones(length, 1, dtype=torch.float64)
    found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for m in level_lengths(length, levels):
        half, approx = m // 2, (m + 1) // 2
        pair = torch.cat([index[0 : 2 * half : 2], index[1 : 2 * half : 2]], dim=1)
        even, odd = weight[0 : 2 * half : 2], weight[1 : 2 * half : 2]
        found.append((torch.arange(approx, approx + half), pair, torch.cat([even, -odd], dim=1) * _ROOT_HALF))
        summed = torch.cat([even, odd], dim=1) * _ROOT_HALF
        if m % 2:  # the odd entry passes through into the approximation part
            pad = (0, pair.shape[1] - index.shape[1])
            index, weight = (
                torch.cat([pair, F.pad(index[m - 1 : m], pad)]),
                torch.cat([summed, F.pad(weight[m - 1 : m], pad)]),
            )
        else:
            index, weight = pair, summed
    found.append((torch.arange(index.shape[0]), index, weight))
    row = torch.cat([r[:, None].expand_as(i).flatten() for r, i, _ in found])
    col = torch.cat([i.flatten() for _, i, _ in found])
    value = torch.cat([v.flatten() for _, _, v in found])
    keep = value != 0  # the padding
    row, col, value = row[keep], col[keep], value[keep]
    order = torch.argsort(row * length + col)
    crow = torch.zeros(length + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(row, minlength=length).cumsum(0)
    return crow, col[order].contiguous(), value[order].contiguous()


def support_sizes(indices: torch.Tensor, length: int, levels: int) -> torch.Tensor:
    """The number of nonzeros of ``H_L``'s rows ``indices`` (int64, on ``indices``' device)."""
    crow = haar_rows(length, levels)[0].to(indices.device)
    return crow[indices + 1] - crow[indices]


def _gathered(indices: torch.Tensor, length: int, levels: int, perm, dtype, device):
    """The rows ``indices`` ``(n,)`` of ``H_L`` as COO triplets ``(k, j, value)``: the entries of row ``indices[k]``,
    its column ``j`` relabelled ``perm[j]`` when a permutation is given."""
    crow, col, value = (t.to(device) for t in haar_rows(length, levels))
    start, counts = crow[indices], crow[indices + 1] - crow[indices]
    k = torch.repeat_interleave(torch.arange(indices.numel(), device=device), counts)
    offsets = torch.cumsum(counts, 0) - counts
    position = start[k] + torch.arange(k.numel(), device=device) - offsets[k]
    j = col[position]
    return k, (perm[j] if perm is not None else j), value[position].to(dtype)


@dataclass(frozen=True)
class _Compressed:
    """A sparse ``(size[0], size[1])`` map compressed by columns (CSC, for ``dense @ map`` on row-major operands),
    int32 indices; ``value`` ``(nnz,)`` its entries' Haar weights and ``owner`` the location each entry belongs to
    (so that the entries can be scaled by a per-location factor)."""

    compressed: torch.Tensor
    plain: torch.Tensor
    value: torch.Tensor
    owner: torch.Tensor
    size: tuple[int, int]

    @staticmethod
    def build(major, minor, value, owner, size) -> _Compressed:
        """From COO triplets: column ``major``, row ``minor``, ``value``, and ``owner``."""
        order = torch.argsort(major * size[0] + minor)
        compressed = torch.zeros(size[1] + 1, dtype=torch.int32, device=major.device)
        compressed[1:] = torch.bincount(major, minlength=size[1]).cumsum(0)
        return _Compressed(compressed, minor[order].int(), value[order], owner[order], size)

    def matrix(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The map, its entries times ``scale[owner]`` when given."""
        value = self.value if scale is None else self.value * scale[self.owner]
        return torch.sparse_csc_tensor(self.compressed, self.plain, value, self.size, check_invariants=False)


@dataclass(frozen=True)
class _SparsePlan:
    """The four maps of :func:`apply_sparse` for one layer's locations and permutations (cached by
    :func:`_sparse_plan`): analysis ``A`` ``(n, N)`` (row ``k``: ``H_N[v_k]``, columns through ``perm_cols``) and
    synthesis ``B`` ``(M, n)`` (column ``k``: ``H_M[u_k]``, rows through ``perm_rows``), each as the CSC of
    itself and of its transpose."""

    analysis: _Compressed  # Aᵀ (N, n): x @ Aᵀ
    analysis_t: _Compressed  # A (n, N): g @ A
    synthesis: _Compressed  # Bᵀ (n, M): z @ Bᵀ
    synthesis_t: _Compressed  # B (M, n): g @ B

    @staticmethod
    def build(rows, cols, d_out, d_in, perm_rows, perm_cols, levels, dtype) -> _SparsePlan | None:
        """The plan, or None where its maps would cost more than the whole transforms (:func:`sparse_cost`)."""
        rows, cols, perm_rows, perm_cols = widen(rows, cols, perm_rows, perm_cols)
        if sparse_cost(rows, cols, d_out, d_in, levels) > SPARSE_LIMIT * (levels + 1) * (d_out + d_in):
            return None
        n = rows.numel()
        k_a, j_a, v_a = _gathered(cols, d_in, levels, perm_cols, dtype, rows.device)
        k_b, i_b, v_b = _gathered(rows, d_out, levels, perm_rows, dtype, rows.device)
        return _SparsePlan(
            _Compressed.build(k_a, j_a, v_a, k_a, (d_in, n)),
            _Compressed.build(j_a, k_a, v_a, k_a, (n, d_in)),
            _Compressed.build(i_b, k_b, v_b, k_b, (n, d_out)),
            _Compressed.build(k_b, i_b, v_b, k_b, (d_out, n)),
        )


_SPARSE_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _sparse_plan(rows, cols, d_out, d_in, perm_rows, perm_cols, levels, dtype) -> _SparsePlan | None:
    """The :class:`_SparsePlan` of these index tensors, cached per ``rows`` tensor as the Fourier path's plans
    (:func:`s2ft.ops.apply._plan`): reused only for the same ``cols`` and permutation objects, shapes, levels,
    dtype and unchanged version counters; inference-mode tensors are not cached."""
    tensors = (cols, perm_rows, perm_cols)
    if torch.compiler.is_compiling() or any(t is not None and t.is_inference() for t in (rows, *tensors)):
        return _SparsePlan.build(rows, cols, d_out, d_in, perm_rows, perm_cols, levels, dtype)
    key = (d_out, d_in, levels, dtype, tuple(None if t is None else t._version for t in (rows, *tensors)))
    cached = _SPARSE_PLANS.get(rows)
    if cached is not None and all(a is b for a, b in zip(cached[0], tensors)) and cached[1] == key:
        return cached[2]
    plan = _SparsePlan.build(rows, cols, d_out, d_in, perm_rows, perm_cols, levels, dtype)
    _SPARSE_PLANS[rows] = (tensors, key, plan)
    return plan


def _product(dense: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``dense @ matrix`` for a CSC ``matrix``, written straight into a new row-major result (no zero fill)."""
    out = dense.new_empty(dense.shape[0], matrix.shape[1])
    return torch.addmm(out, dense, matrix, beta=0.0, out=out)


class _SparseApply(torch.autograd.Function):
    """``y = x Aᵀ diag(σ c) Bᵀ`` (row-major ``x`` ``(T, N)``), the scale folded into ``Bᵀ``'s entries; backward
    ``g_x = (g B) diag(σ c) A`` and ``g_{σc} = Σ_t (g B) ⊙ (x Aᵀ)``. Four sparse products, each reading only the
    input columns its entries name, no transposes."""

    @staticmethod
    def forward(ctx, x, scaled, plan):  # scaled = σ c (n,)
        analysed = _product(x, plan.analysis.matrix())  # (T, n): x̄'s coefficients at the locations' columns
        ctx.save_for_backward(analysed, scaled)
        ctx.plan = plan
        return _product(analysed, plan.synthesis.matrix(scaled))  # (T, M)

    @staticmethod
    def backward(ctx, grad):
        analysed, scaled = ctx.saved_tensors
        plan = ctx.plan
        projected = _product(grad.contiguous(), plan.synthesis_t.matrix())  # (T, n)
        grad_x = _product(projected, plan.analysis_t.matrix(scaled)) if ctx.needs_input_grad[0] else None
        grad_scaled = (projected * analysed).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_scaled, None


def sparse_cost(rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int, levels: int) -> int:
    """The nonzeros of the sparse path's analysis and synthesis matrices: its multiply-adds per token, forward."""
    return int(support_sizes(cols, d_in, levels).sum() + support_sizes(rows, d_out, levels).sum())


def apply_sparse(
    x, coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None, levels: int = 1
) -> torch.Tensor:
    """``ΔW x`` (``(..., d_out)`` for ``x`` ``(..., d_in)``) without any transform of the whole input: only the
    ``n`` coefficients ``x̄`` has at the locations' columns, each the inner product of ``x`` with the analysis
    function ``H_N[v_k]`` (its ``2^j`` nonzeros, the permutation folded into their indices), and ``ΔW x`` the sum of
    the synthesis functions ``H_M[u_k]`` they weight: two sparse products (dense row-major times CSC) with ``nnz = Σ_k |supp H_N[v_k]|``
    and ``Σ_k |supp H_M[u_k]|`` (:func:`sparse_cost`) forward, two more backward, no copy of the input, no
    permutation pass. Differentiable wrt ``x`` and ``coeffs``; float32 (float64 for float64 input). The maps
    are built once per layer's locations (:func:`_sparse_plan`)."""
    dtype = _real_dtype(x, coeffs)
    plan = _sparse_plan(rows, cols, d_out, d_in, perm_rows, perm_cols, levels, dtype)
    if plan is None:  # the locations' functions are too long: the whole transforms cost less
        return apply_transform(x, coeffs, rows, cols, d_out, d_in, scaling, perm_rows, perm_cols, levels)
    flat = x.reshape(-1, d_in).to(dtype)
    y = _SparseApply.apply(flat, coeffs.to(dtype) * _sigma(scaling, d_out, d_in), plan)
    return y.reshape(*x.shape[:-1], d_out)


def apply_transform(
    x, coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None, levels: int = 1
) -> torch.Tensor:
    """``ΔW x`` by whole transforms: one DWT of the (permuted) input, the sparse map of the ``n`` coefficients and
    one inverse DWT, ``O(J (M + N))`` per token whatever the locations (:func:`apply`'s ``"fft"`` path where
    the locations' analysis functions are long, :func:`sparse_cost`)."""
    rows, cols, perm_rows, perm_cols = widen(rows, cols, perm_rows, perm_cols)
    dtype, lead = _real_dtype(x, coeffs), x.shape[:-1]
    flat = x.reshape(-1, d_in).to(dtype)
    if perm_cols is not None:  # index_select, not indexing: its backward is an index_add, not an index_put
        flat = flat.index_select(1, perm_cols)
    analysed = dwt(flat, levels)  # (T, N)
    picked = analysed.index_select(1, cols) * (coeffs.to(dtype) * _sigma(scaling, d_out, d_in))
    y = idwt(flat.new_zeros(flat.shape[0], d_out).index_add(1, rows, picked), levels)  # (T, M)
    if perm_rows is not None:
        y = y.index_select(1, torch.argsort(perm_rows))
    return y.reshape(*lead, d_out)


def apply(
    x, coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None, path="auto", levels: int = 1
) -> torch.Tensor:
    """``ΔW x``: ``(..., d_out)`` for ``x`` ``(..., d_in)``, differentiable wrt ``x`` and ``coeffs``.

    Computed and returned in float32 (float64 when ``x`` or ``coeffs`` is float64); the caller casts.
    ``path`` is one of :data:`PATHS` or ``"auto"`` (:func:`choose_path`). The ``"fft"`` path (the one that never
    forms ``ΔW``) is :func:`apply_sparse` when the locations' analysis and synthesis functions have at most
    ``4 (J + 1) (M + N)`` nonzeros in all (:data:`SPARSE_LIMIT`; a one-level adapter has ``4 n``), else (and
    under ``torch.compile``) :func:`apply_transform`.
    """
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects d_in={d_in}")
    dtype = _real_dtype(x, coeffs)
    lead = x.shape[:-1]
    if path == "auto":
        path = choose_path(d_out, d_in, coeffs.numel(), lead.numel(), x.device)
    if path == "dense" or lead.numel() == 0:
        delta = delta_weight(coeffs.to(dtype), rows, cols, d_out, d_in, scaling, perm_rows, perm_cols, levels)
        return F.linear(x.to(dtype), delta)
    if path != "fft":
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS + ('auto',)}")
    if (
        torch.compiler.is_compiling()
    ):  # traced: the whole transforms are plain dense ops, the sparse maps are not
        return apply_transform(x, coeffs, rows, cols, d_out, d_in, scaling, perm_rows, perm_cols, levels)
    return apply_sparse(x, coeffs, rows, cols, d_out, d_in, scaling, perm_rows, perm_cols, levels)


class WaveletBasis:
    """The ``levels``-level Haar basis as a basis of :data:`s2ft.ops.bases.BASES` (one object per level count)."""

    def __init__(self, levels: int) -> None:
        self.levels = levels
        self.name = basis_name(levels)

    def delta_weight(self, coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None):
        return delta_weight(coeffs, rows, cols, d_out, d_in, scaling, perm_rows, perm_cols, self.levels)

    def apply(self, x, coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None, path="auto"):
        return apply(x, coeffs, rows, cols, d_out, d_in, scaling, perm_rows, perm_cols, path, self.levels)

    def project(self, delta, rows, cols, scaling, perm_rows=None, perm_cols=None):
        return project(delta, rows, cols, scaling, perm_rows, perm_cols, self.levels)

    def energy(self, matrix: torch.Tensor) -> torch.Tensor:
        return energy(matrix, self.levels)

    choose_path = staticmethod(choose_path)
    seeded_locations = staticmethod(seeded_locations)


BASES = {basis_name(levels): WaveletBasis(levels) for levels in range(1, MAX_LEVELS + 1)}
