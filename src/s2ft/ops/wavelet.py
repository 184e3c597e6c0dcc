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

import math

import torch
import torch.nn.functional as F

from s2ft.ops.locations import fourierft_locations, widen

PATHS = ("dense", "fft")
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
    """The path ``"auto"`` takes: ``"fft"`` (the transform path) when ``d_out * d_in > 64 (d_out + d_in) + 16 n``,
    else ``"dense"``; ``fused`` is accepted and not used. The transform path costs ``O(M + N + n)`` per token, the
    dense one ``M N`` multiply-adds per token plus building ``ΔW``. Measured on the shared 2-core CPU, one thread
    (``benchmarks/results/cpu/wavelet_speed.md``, n = 1000): the transform path 1.04-19x faster than the dense one at
    widths 1,024 to 4,096 (512 and 4,096 tokens); at 384 x 384 with 1,024 tokens the two were within 1.3x of each
    other in either order over two runs (the rule takes the transform path there)."""
    return "fft" if d_out * d_in > 64 * (d_out + d_in) + 16 * n else "dense"


def apply(
    x, coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None, path="auto", levels: int = 1
) -> torch.Tensor:
    """``ΔW x``: ``(..., d_out)`` for ``x`` ``(..., d_in)``, differentiable wrt ``x`` and ``coeffs``.

    Computed and returned in float32 (float64 when ``x`` or ``coeffs`` is float64); the caller casts.
    ``path`` is one of :data:`PATHS` or ``"auto"`` (:func:`choose_path`).
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
    rows, cols, perm_rows, perm_cols = widen(rows, cols, perm_rows, perm_cols)
    flat = x.reshape(-1, d_in).to(dtype)
    if perm_cols is not None:  # index_select, not indexing: its backward is an index_add, not an index_put
        flat = flat.index_select(1, perm_cols)
    analysed = dwt(flat, levels)  # (T, N)
    picked = analysed.index_select(1, cols) * (coeffs.to(dtype) * _sigma(scaling, d_out, d_in))
    y = idwt(flat.new_zeros(flat.shape[0], d_out).index_add(1, rows, picked), levels)  # (T, M)
    if perm_rows is not None:
        y = y.index_select(1, torch.argsort(perm_rows))
    return y.reshape(*lead, d_out)


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
