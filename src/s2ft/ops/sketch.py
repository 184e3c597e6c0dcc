"""Randomized low-rank sketches of a sum of matrices, and the rank-``k`` matrix they give back.

A matrix ``A`` ``(m, n)`` that arrives as a sum ``A = Σ_b A_b`` is sketched by two linear maps, so the sketches add
up batch by batch (and across processes) in ``(m + n)·k`` numbers instead of ``m·n``:

- the range sketch ``Y = A Ω`` ``(m, k)``, with a Gaussian test matrix ``Ω`` ``(n, k)``;
- the co-range sketch ``W = Ψ A`` ``(l, n)``, with a Gaussian ``Ψ`` ``(l, m)`` and ``l = min(k + p, m)``
  (:func:`corange_width`; oversampling ``p``, :data:`CORANGE_OVERSAMPLE` by default).

:func:`low_rank_from_sketches` returns ``Â = Q (ΨQ)⁺ W`` with ``Q`` an orthonormal basis of ``Y`` (Tropp, Yurtsever,
Udell and Cevher, "Practical sketching algorithms for low-rank matrix approximation", 2017, Algorithm 3), which is
``A`` itself when ``rank(A) ≤ k``, and otherwise close to the best rank-``k`` approximation when ``A``'s spectrum
decays (Halko, Martinsson and Tropp 2011). It also takes a diagonal scaling ``diag(r) A diag(c)`` known only after the
sum is complete (the Adafactor-normalised Adam prior): scaling the columns does not change the range, scaling the rows
maps it by ``diag(r)``, so the same sketches serve.

:class:`LowRank` holds the result as ``U diag(s) Vᵀ`` and answers what S2FT's planner asks of a prior: the rows'
and columns' coordinates (distances between rows of ``Â`` are those between rows of ``U diag(s)``, since ``V`` has
orthonormal columns) and the power spectrum of the row- and column-permuted matrix, ``|F_m U' (F_n V')ᵀ|`` from the
transformed factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from s2ft.ops.locations import FactoredPower


@dataclass
class LowRank:
    """``U diag(s) Vᵀ`` ``(d_out, d_in)``: ``u`` ``(d_out, k)`` and ``v`` ``(d_in, k)`` with orthonormal columns,
    ``s`` ``(k,)`` non-negative and non-increasing."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.u.shape[0], self.v.shape[0]))

    @property
    def rank(self) -> int:
        return self.s.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.u.dtype

    @property
    def device(self) -> torch.device:
        return self.u.device

    def dense(self) -> torch.Tensor:
        """The matrix ``(d_out, d_in)`` itself (for tests and reports: it is what the factors avoid)."""
        return (self.u * self.s) @ self.v.T

    def row_points(self) -> torch.Tensor:
        """``U diag(s)`` ``(d_out, k)``: its rows are as far apart as the matrix's rows."""
        return self.u * self.s

    def col_points(self) -> torch.Tensor:
        """``V diag(s)`` ``(d_in, k)``: its rows are as far apart as the matrix's columns."""
        return self.v * self.s

    def energy(self) -> float:
        """``||Â||_F²``."""
        return float(self.s.double().square().sum())

    def permuted_power_spectrum(
        self, perm_rows: torch.Tensor | None = None, perm_cols: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``|DFT2(Â[perm_rows][:, perm_cols])|`` ``(d_out, d_in)``, float32 (float64 for float64 factors), from the
        factors: ``DFT2(L Rᵀ) = (F_m L)(F_n R)ᵀ`` with ``L = U[perm_rows] diag(s)`` and ``R = V[perm_cols]``
        (O(d_out·d_in·k) for the product, FFTs of ``k`` columns only)."""
        left, right = self.permuted_spectrum_factors(perm_rows, perm_cols)
        return (left @ right.T).abs()

    def permuted_spectrum_factors(
        self, perm_rows: torch.Tensor | None = None, perm_cols: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F_m L, F_n R)``, complex ``(d_out, k)`` and ``(d_in, k)``, of :meth:`permuted_power_spectrum`: the
        spectrum's rows ``a:b`` are ``|(F_m L)[a:b] (F_n R)ᵀ|`` (:meth:`permuted_power_rows`)."""
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        left = self.row_points().to(dtype)
        right = self.v.to(dtype)
        if perm_rows is not None:
            left = left[perm_rows.to(left.device)]
        if perm_cols is not None:
            right = right[perm_cols.to(right.device)]
        return torch.fft.fft(left, dim=0), torch.fft.fft(right, dim=0)

    def permuted_power_rows(
        self, perm_rows: torch.Tensor | None = None, perm_cols: torch.Tensor | None = None
    ) -> FactoredPower:
        """``rows(a, b)``: rows ``a:b`` of :meth:`permuted_power_spectrum`, ``(b - a, d_in)``, computed when asked;
        a :class:`s2ft.ops.locations.FactoredPower`, which :func:`s2ft.ops.locations.sample_locations_in_blocks`
        samples computing the power only where a draw may win."""
        return FactoredPower(*self.permuted_spectrum_factors(perm_rows, perm_cols))

    def kept_energy(self, matrix: torch.Tensor) -> float:
        """The share of ``matrix``'s energy ``||M||_F²`` inside the sketch's row and column spaces,
        ``||U Uᵀ M V Vᵀ||_F² / ||M||_F²`` (1 when ``M = Â``, 1.0 for a zero ``M``)."""
        m = matrix.to(torch.float64)
        u, v = self.u.to(m.device, torch.float64), self.v.to(m.device, torch.float64)
        total = float(m.square().sum())
        return float((u.T @ m @ v).square().sum()) / total if total > 0 else 1.0


# The co-range sketch's oversampling p (l = k + p). Tropp et al. (2017) analyse l = 2k + 1; any l >= k gives A back
# when rank(A) <= k, and a smaller p costs only accuracy beyond rank k, through the least-squares solve against the
# (l, k) Gaussian ΨQ (its error factor grows like k / (l - k - 1)). The default p = min(k + 1, max(k // 2, 17)) is
# 2k + 1 up to k = 16 and k + k/2 from k = 34 on: W takes 1.5·k·n numbers instead of (2k + 1)·n where it is large.
# Measured (benchmarks/results/cpu/sketch_quality_corange.md, text job, 2 seeds): p = k/2 at k = 64 catches
# 0.001-0.0035 less of a full fine-tune's ΔW energy than 2k + 1 (of 0.064), p = 8 0.012-0.019 less at k = 64 and
# 0.006-0.008 at k = 16.
CORANGE_OVERSAMPLE: int | None = None  # None: min(k + 1, max(k // 2, 17))


def corange_width(rank: int, rows: int, oversample: int | None = None) -> int:
    """``l = min(k + p, m)``: the co-range sketch's width for rank ``k`` of an ``m``-row matrix, with oversampling
    ``p`` (None: :data:`CORANGE_OVERSAMPLE`, whose None is ``min(k + 1, max(k // 2, 17))``: Tropp et al.'s
    ``2k + 1`` up to ``k = 16``, ``k + k/2`` from ``k = 34``). Refuses a ``p`` that is not an integer ``>= 0``."""
    if oversample is None:
        oversample = CORANGE_OVERSAMPLE
    if oversample is None:
        oversample = min(rank + 1, max(rank // 2, 17))
    if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
        raise ValueError(f"the co-range oversampling must be an integer >= 0, got {oversample!r}")
    return min(rank + oversample, rows)


def sketch_matrices(
    rows: int,
    cols: int,
    rank: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    oversample: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian ``Ω`` ``(cols, rank)`` and ``Ψ`` ``(l, rows)`` (:func:`corange_width`), drawn on the CPU from
    ``generator`` in that order: the same on every machine for one generator state. In ``dtype`` (rounded from
    float64: the rounded matrices are the test matrices, as Gaussian as the sketch needs)."""
    omega = torch.randn(cols, rank, generator=generator, dtype=torch.float64).to(dtype)
    width = corange_width(rank, rows, oversample)
    psi = torch.randn(width, rows, generator=generator, dtype=torch.float64).to(dtype)
    return omega, psi


def low_rank_from_sketches(
    y: torch.Tensor,
    w: torch.Tensor,
    psi: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
) -> LowRank:
    """The rank-``k`` approximation of ``P = diag(r) A diag(c)`` from ``A``'s sketches ``y = A Ω`` ``(m, k)`` and
    ``w = Ψ A`` ``(l, n)``, ``l ≥ k`` (``r``, ``c``: ``row_scale`` ``(m,)`` and ``col_scale`` ``(n,)``, ones if None).

    ``P``'s range is ``diag(r)``'s image of ``A``'s, and ``W diag(c) = (Ψ diag(r⁺)) P`` (``r⁺``: ``1/r``, 0 where
    ``r = 0``, rows where ``A`` must then be 0), so ``Q = orth(diag(r) y)`` and ``B = (Ψ diag(r⁺) Q)⁺ W diag(c)``
    give ``P ≈ Q B``; an SVD of ``B`` ``(k, n)`` makes the factors orthonormal. Exact (to rounding) when
    ``rank(A) ≤ k``. Computed in float64; returned in ``y``'s dtype, promoted to at least float32."""
    dtype = torch.promote_types(y.dtype, torch.float32)
    y64, w64, psi64 = y.double(), w.double(), psi.double()
    if row_scale is not None:
        r = row_scale.double()
        y64 = y64 * r[:, None]
        psi64 = psi64 * torch.where(r == 0, 0.0, 1.0 / torch.where(r == 0, 1.0, r))[None, :]
    if col_scale is not None:
        w64 = w64 * col_scale.double()[None, :]
    q = torch.linalg.qr(y64).Q  # (m, k)
    b = torch.linalg.lstsq(psi64 @ q, w64).solution  # (k, n)
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    return LowRank((q @ ub).to(dtype), s.to(dtype), vh.T.to(dtype))
