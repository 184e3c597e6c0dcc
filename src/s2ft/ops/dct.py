"""The real orthonormal 2-D DCT-II basis: the ``dct`` method, a DCT-domain sibling of FourierFT.

Notation: ``M = d_out``, ``N = d_in``. ``C_L`` is the orthonormal DCT-II matrix of size ``L``,

    C_L[k, j] = s_k cos(π (2j + 1) k / (2L)),   s_0 = sqrt(1/L),  s_k = sqrt(2/L) for k > 0,   C_L C_Lᵀ = I.

``n`` real coefficients ``c[k]`` sit at distinct locations ``(u_k, v_k) = (rows[k], cols[k])`` of an otherwise
zero real ``M x N`` matrix ``F``, and

    ΔW̄ = σ C_Mᵀ F C_N,   ΔW̄[p, q] = σ Σ_k c_k C_M[u_k, p] C_N[v_k, q],   σ = scaling / sqrt(2MN),
    ΔW[perm_rows[i], perm_cols[j]] = ΔW̄[i, j]    (the ``dct`` method has no permutations; the basis takes them).

This is LoCA's DCT parametrization (without its location learning), with ``scaling`` in FourierFT's units: a
coefficient's basis function has Frobenius norm ``σ`` here and ``scaling/sqrt(2MN)`` there (FourierFT's
``scaling/(MN) cos(2π(up/M + vq/N))``), so the same scaling, learning rate and init move ``ΔW`` equally fast in
both bases and a comparison sees the basis alone. Unlike the DFT's real part, every location is a basis function
of its own (no mirror pairs) and all ``MN`` are orthonormal: the least-squares coefficients of a ``ΔW`` are
inner products (:func:`project`).

Both transforms go through FFTs of length ``2L`` (:func:`dct`, :func:`idct`). Paths of :func:`apply`, both
differentiable wrt ``x`` and ``coeffs`` by autograd:

- ``"dense"``: build ``ΔW`` (:func:`delta_weight`, two inverse transforms of ``F``) and ``F.linear``;
- ``"fft"``: ``ΔW̄ x̄ = σ idct(H)`` with ``H[u_k] += c_k dct(x̄)[v_k]``: never forms ``ΔW`` nor a weight
  gradient, ``O(N log N + M log M + n)`` per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from s2ft.ops.apply import num_threads
from s2ft.ops.locations import fourierft_locations, widen

PATHS = ("dense", "fft")


def _real_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _twiddle(size: int, dtype: torch.dtype, device, sign: int) -> torch.Tensor:
    """``s_k e^{sign iπk/(2L)}`` ``(L,)`` complex, from float64 angles."""
    k = torch.arange(size, dtype=torch.float64, device=device)
    scale = torch.full((size,), math.sqrt(2 / size), dtype=torch.float64, device=device)
    scale[0] = math.sqrt(1 / size)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return torch.polar(scale, sign * math.pi * k / (2 * size)).to(complex_dtype)


def dct(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II of ``x`` ``(..., L)`` along its last dimension: ``x @ C_Lᵀ``, ``(..., L)``.

    ``X_k = s_k Re(e^{-iπk/(2L)} Σ_j x_j e^{-2πi jk/(2L)})``: an ``rfft`` of ``x`` zero-padded to ``2L``.
    """
    size = x.shape[-1]
    spectrum = torch.fft.rfft(x, n=2 * size, dim=-1)[..., :size]
    return (spectrum * _twiddle(size, x.dtype, x.device, -1)).real


def idct(h: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct` (orthonormal DCT-III) along the last dimension: ``h @ C_L``, ``(..., L)``.

    ``y_p = Σ_k a_k cos(π k (2p + 1)/(2L))`` with ``a_k = s_k h_k`` is ``L irfft(H, 2L)[p]`` for the half
    spectrum ``H_k = a_k e^{iπk/(2L)}`` (``H_0 = 2 a_0``, ``H_L = 0``).
    """
    size = h.shape[-1]
    half = h * _twiddle(size, h.dtype, h.device, 1)
    half = torch.cat([half[..., :1] * 2, half[..., 1:], torch.zeros_like(half[..., :1])], dim=-1)
    return torch.fft.irfft(half, n=2 * size, dim=-1)[..., :size] * size


def dct_matrix(size: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """``C_L`` ``(L, L)`` from its definition (integer angle reduction, float64 cosines)."""
    k = torch.arange(size, device=device)[:, None]
    j = torch.arange(size, device=device)[None, :]
    angle = ((2 * j + 1) * k % (4 * size)).double() * math.pi / (2 * size)
    scale = torch.full((size, 1), math.sqrt(2 / size), dtype=torch.float64, device=device)
    scale[0] = math.sqrt(1 / size)
    return (scale * torch.cos(angle)).to(dtype)


def _sigma(scaling: float, d_out: int, d_in: int) -> float:
    return float(scaling) / math.sqrt(2 * d_out * d_in)


def delta_weight(coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None) -> torch.Tensor:
    """Dense ``ΔW`` ``(d_out, d_in)``: ``σ C_Mᵀ F C_N``, then rows and columns permuted (as FourierFT's).

    Float32, or float64 for float64 ``coeffs``. Differentiable wrt ``coeffs``.
    """
    rows, cols, perm_rows, perm_cols = widen(rows, cols, perm_rows, perm_cols)
    dtype = _real_dtype(coeffs)
    spectrum = torch.zeros(d_out, d_in, dtype=dtype, device=coeffs.device)
    spectrum = spectrum.index_put((rows, cols), coeffs.to(dtype), accumulate=True)  # a repeated location: sum
    delta = idct(idct(spectrum).T).T * _sigma(scaling, d_out, d_in)  # C_Mᵀ (F C_N)
    if perm_rows is not None:
        delta = delta[torch.argsort(perm_rows)]
    if perm_cols is not None:
        delta = delta[:, torch.argsort(perm_cols)]
    return delta


def project(delta, rows, cols, scaling, perm_rows=None, perm_cols=None) -> torch.Tensor:
    """The coefficients at ``(rows, cols)`` whose :func:`delta_weight` is nearest ``delta`` ``(d_out, d_in)`` in
    Frobenius norm: ``c_k = (C_M D C_Nᵀ)[u_k, v_k] / σ`` for the permuted ``D = delta[perm_rows][:, perm_cols]``
    (the basis is orthonormal), shared equally by repeated locations (the minimum-norm solution). Exact when
    ``delta`` lies in the span. Float64 for float64 input, else float32.
    """
    d_out, d_in = delta.shape
    rows, cols, perm_rows, perm_cols = widen(rows, cols, perm_rows, perm_cols)
    permuted = delta.to(_real_dtype(delta))
    if perm_rows is not None:
        permuted = permuted[perm_rows]
    if perm_cols is not None:
        permuted = permuted[:, perm_cols]
    inner = dct(dct(permuted).T).T[rows, cols]  # C_M (D C_Nᵀ)
    _, inverse, counts = torch.unique(rows * d_in + cols, return_inverse=True, return_counts=True)
    return inner / counts[inverse].to(inner.dtype) / _sigma(scaling, d_out, d_in)


def seeded_locations(d_out: int, d_in: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` distinct uniformly random locations for a seed: FourierFT's draw
    (:func:`s2ft.ops.locations.fourierft_locations`), so the two methods use the same grid points for a seed.
    Int64 ``(n,)`` tensors on the CPU."""
    return fourierft_locations(d_out, d_in, n, seed)


def choose_path(d_out: int, d_in: int, n: int, num_tokens: int, device, fused: bool = False) -> str:
    """The path ``"auto"`` takes for a layer of shape ``(d_out, d_in)`` with ``n`` coefficients. ``fused`` (the
    dense path fused into the base GEMM) is accepted and not used: this basis' model was fitted without fusion,
    which makes the dense path cheaper, so it errs towards the FFT path there.

    CPU: ``"fft"`` when ``d_out * d_in > threads * (100 * (d_out + d_in) + 140 * n)``, else ``"dense"``. Model,
    from a sweep at one thread (float32, forward+backward, 512 tokens, widths 256 to 2048, n = 100 to 3000): per
    token the dense path costs about ``0.5 ns * d_out * d_in``, the FFT path about ``50 ns`` per feature (two
    FFTs of length ``2d`` each way) plus ``70 ns`` per coefficient (the gather and scatter, forward and backward).
    Measured: level at width 384 with n = 100, dense 1.6x ahead there at n = 1000, the FFT path 2x ahead at 768
    and 6x at 2048. Threads speed up the GEMMs more than the FFTs (measured for the Fourier paths,
    :func:`s2ft.ops.apply.choose_path`; not for these, the shared machine gave no usable two-thread timings), hence
    the factor. The number of tokens barely moves the crossover.

    CUDA: the same guess as the Fourier paths' (not measured): ``"dense"`` while
    ``num_tokens * d_out * d_in < 2**28``, else ``"fft"``.
    """
    if torch.device(device).type == "cuda":
        return "dense" if num_tokens * d_out * d_in < 2**28 else "fft"
    threads = num_threads()
    return "fft" if d_out * d_in > threads * (100 * (d_out + d_in) + 140 * n) else "dense"


def apply(
    x, coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None, path="auto"
) -> torch.Tensor:
    """``ΔW x``: ``(..., d_out)`` for ``x`` ``(..., d_in)``, differentiable wrt ``x`` and ``coeffs``.

    Computed and returned in float32 (float64 when ``x`` or ``coeffs`` is float64); the caller casts.
    ``coeffs``, ``rows``, ``cols`` are ``(n,)``; the optional permutations are ``(d_out,)`` and ``(d_in,)``.
    ``path`` is one of :data:`PATHS` or ``"auto"`` (:func:`choose_path`).
    """
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects d_in={d_in}")
    dtype = _real_dtype(x, coeffs)
    lead = x.shape[:-1]
    if path == "auto":
        path = choose_path(d_out, d_in, coeffs.numel(), lead.numel(), x.device)
    if path == "dense" or lead.numel() == 0:
        delta = delta_weight(coeffs.to(dtype), rows, cols, d_out, d_in, scaling, perm_rows, perm_cols)
        return F.linear(x.to(dtype), delta)
    if path != "fft":
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS + ('auto',)}")
    rows, cols, perm_rows, perm_cols = widen(rows, cols, perm_rows, perm_cols)
    flat = x.reshape(-1, d_in).to(dtype)
    if perm_cols is not None:
        flat = flat[:, perm_cols]
    spectrum = dct(flat)  # (T, N)
    mixed = flat.new_zeros(flat.shape[0], d_out).index_add(1, rows, spectrum[:, cols] * coeffs.to(dtype))
    y = idct(mixed) * _sigma(scaling, d_out, d_in)  # (T, M)
    if perm_rows is not None:
        y = y[:, torch.argsort(perm_rows)]
    return y.reshape(*lead, d_out)


class DCTBasis:
    """This module as a basis of :data:`s2ft.ops.bases.BASES`."""

    name = "dct"
    delta_weight = staticmethod(delta_weight)
    apply = staticmethod(apply)
    choose_path = staticmethod(choose_path)
    project = staticmethod(project)
    seeded_locations = staticmethod(seeded_locations)
