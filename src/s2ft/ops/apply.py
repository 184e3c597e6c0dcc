"""Applying ``ΔW`` to activations, with or without building the dense ``ΔW``.

Notation: ``M = d_out``, ``N = d_in``; ``n`` real coefficients ``c[k]`` sit at spectrum locations
``(u_k, v_k) = (rows[k], cols[k])`` of an otherwise zero complex ``M x N`` matrix ``F``, and

    ΔW̄ = scaling * Re(ifft2(F)),   ΔW̄[p, q] = scaling/(MN) * Σ_k c_k cos(2π(u_k p/M + v_k q/N)),
    ΔW[perm_rows[i], perm_cols[j]] = ΔW̄[i, j]    (identity permutations for FourierFT).

Paths of :func:`spectral_apply` (all return ``ΔW x`` and are differentiable wrt ``x`` and ``c``):

- ``"dense"``: build ``ΔW`` with :func:`delta_weight` and ``F.linear``; autograd forms a dense weight gradient
  and an ``fft2`` for the gradient of ``c``. This is what Hugging Face PEFT's FourierFT does.
- ``"fft"``: never forms ``ΔW`` nor a weight gradient. With ``x̄ = x[..., perm_cols]`` and real input and
  coefficients, ``ΔW̄ x̄ = scaling/N * irfft(H, M)`` where ``H = rfft(x̄) S``: ``S`` is a sparse real
  ``2(N/2+1) x 2(M/2+1)`` map on the interleaved real and imaginary parts of the half spectra, with ``2n``
  entries that fold each location onto them by Hermitian symmetry (see :class:`_Plan`). The gather of the
  column frequencies, the multiply by ``c`` and the scatter-add into the row frequencies are thus one sparse
  matmul. Backward: ``grad x`` is the same computation for ``ΔW̄ᵀ = scaling * Re(ifft2(Fᵀ))`` (locations
  swapped), and ``grad c_k = scaling/(MN) Σ_tokens Re(X[v_k] G[u_k])``, with ``X`` and ``G`` the DFTs of ``x̄``
  and of the output gradient, is one sampled dense-dense product (``torch.sparse.sampled_addmm``): ``O(n)``
  per token. Only ``x`` itself is saved (no copy), its ``rfft`` is recomputed in backward, and tokens go
  through in chunks, so the spectra never exist for the whole batch at once.

``"auto"`` asks :func:`choose_path`.

Under ``torch.compile`` the FFT path is one custom operator of the graph, ``s2ft::fft_apply`` (and
``s2ft::fft_apply_backward`` for its backward), which runs the chunked sparse code above: Dynamo cannot trace the
sparse map's construction, and a version in dense index operations that it can trace (a gather, a multiply and an
``index_add``) measured no faster compiled than this path eager with static shapes, and about 4x slower once the
number of tokens varies (dynamic shapes). In the graph the index tensors are derived afresh on each call, so the
operator keeps its plans by the indices' contents (:func:`_plan_by_content`), not by tensor identity.
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from s2ft.ops.locations import widen

PATHS = ("dense", "fft")

# torch warns once per process ("Sparse CSR tensor support is in beta state") at the first compressed sparse
# tensor; the few CSR/CSC ops used here are stable. Spend that one warning here, silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.sparse_csr_tensor(
        torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0)
    )


def delta_weight(coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None) -> torch.Tensor:
    """Dense ``ΔW`` ``(d_out, d_in)``: ``scaling * Re(ifft2(F))``, then rows and columns permuted.

    ``ΔW[perm_rows[i], perm_cols[j]] = ΔW̄[i, j]``, i.e. ``ΔW = ΔW̄[argsort(perm_rows)][:, argsort(perm_cols)]``.
    Float32, or float64 for float64 ``coeffs``. Differentiable wrt ``coeffs``.
    """
    rows, cols, perm_rows, perm_cols = widen(rows, cols, perm_rows, perm_cols)
    complex_dtype = torch.complex128 if coeffs.dtype == torch.float64 else torch.complex64
    spectrum = torch.zeros(d_out, d_in, dtype=complex_dtype, device=coeffs.device)
    spectrum = spectrum.index_put((rows, cols), coeffs.to(complex_dtype))
    delta = torch.fft.ifft2(spectrum).real * scaling
    if perm_rows is not None:
        delta = delta[torch.argsort(perm_rows)]
    if perm_cols is not None:
        delta = delta[:, torch.argsort(perm_cols)]
    return delta


def project_delta(delta, rows, cols, scaling, perm_rows=None, perm_cols=None) -> torch.Tensor:
    """The coefficients at ``(rows, cols)`` whose :func:`delta_weight` is nearest ``delta`` in Frobenius norm: the
    least-squares projection of ``delta`` ``(d_out, d_in)`` onto the plan's span, minimum-norm where a location and
    its mirror ``(-u, -v)`` are both planned (they carry the same real basis function; each gets half).

    In the permuted domain ``D = delta[perm_rows][:, perm_cols]``, location ``k`` carries
    ``scaling/(MN) cos(2π(u_k p/M + v_k q/N))``; distinct cosines are orthogonal with squared norm ``MN/2``
    (``MN`` where ``(u, v)`` is its own mirror), and ``<D, cos> = Re(fft2(D)[u, v])``, so
    ``c_k = 2 Re(fft2(D)[u_k, v_k]) / scaling`` (halved for a mirrored pair; not doubled for a self-mirror).
    Exact (``delta_weight(project_delta(ΔW)) == ΔW``) when ``delta`` lies in the span. Float64 for float64 input,
    else float32.
    """
    d_out, d_in = delta.shape
    rows, cols, perm_rows, perm_cols = widen(rows, cols, perm_rows, perm_cols)
    dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    permuted = delta.to(dtype)
    if perm_rows is not None:
        permuted = permuted[perm_rows]
    if perm_cols is not None:
        permuted = permuted[:, perm_cols]
    inner = torch.fft.fft2(permuted)[rows, cols].real
    mirror_rows, mirror_cols = (-rows) % d_out, (-cols) % d_in
    self_mirror = (mirror_rows == rows) & (mirror_cols == cols)
    paired = torch.isin(mirror_rows * d_in + mirror_cols, rows * d_in + cols) & ~self_mirror
    factor = torch.where(self_mirror, 1.0, 2.0) / torch.where(paired, 2.0, 1.0)
    return (inner * factor.to(dtype) / scaling).to(dtype)


def choose_path(d_out: int, d_in: int, n: int, num_tokens: int, device, fused: bool = False) -> str:
    """The path ``"auto"`` takes for a layer of shape ``(d_out, d_in)`` with ``n`` coefficients and ``num_tokens``
    tokens; ``fused``: whether the dense path would run fused into the base layer's GEMM (a float32 or float64
    ``nn.Linear`` in training, :meth:`s2ft.tuner.layers.SpectralLayer.forward`).

    CPU, not fused: ``"fft"`` when ``d_out * d_in > threads * (64 * (d_out + d_in) + 25 * n)``, else ``"dense"``,
    with ``threads = torch.get_num_threads()``. Model, from a sweep of layer sizes at one thread (float32,
    forward+backward): per token, the dense path costs about ``0.24 ns * d_out * d_in`` (three GEMMs) and the FFT
    path about ``30 ns`` per feature (five real FFTs with their copies) plus ``6 ns`` per coefficient (two sparse
    products and a sampled one, memory-bound). The GEMMs speed up with threads, the memory-bound FFT path hardly:
    at two threads ``benchmarks/bench.py`` found the two paths level at width 384 with n = 1000, dense ahead
    at n = 3000, and the FFT path 4x ahead at 1024 and 4-30x at 2048-4096. The number of tokens (8 to 4096)
    barely moves the crossover.

    CPU, fused: the dense path adds one GEMM (the weight gradient) per step and a few passes over the weight
    (``ifft2``, the permutations, ``fft2`` of the gradient) however few the tokens; ``"dense"`` when
    ``d_out * d_in * (35 + 0.022 * T) < sqrt(threads) * (T + 100) * (8 * (d_out + d_in) + 5 * n)`` (ns, with
    ``T = num_tokens``). Fitted to ``benchmarks/path_choice.py`` (shapes 192x576 to 2048x2048, 128 to 2,048
    tokens, one and two threads, ``benchmarks/results/cpu/path_choice-*.md``): the fused overhead is about
    ``d_out * d_in * (35 ns + 22 ps * T) / threads``, the FFT path's ``(T + 100) * (8 ns * (d_out + d_in) +
    5 ns * n)``, which two threads speed up by about 1.4x. The tokens matter here: at 192x576 the FFT path wins
    at 128 tokens on one thread, the fused dense path at 512 and beyond.

    CUDA (not measured: no GPU was available): the dense path is a few fp32 GEMMs, fast on a GPU, while the FFT
    path is some twenty small memory-bound kernels per chunk, whose launch cost dominates small problems. Our
    guess is ``"dense"`` while ``num_tokens * d_out * d_in < 2**28`` (e.g. 2048 tokens at width 384) and
    ``"fft"`` above, where the dense weight and its gradient also start to cost memory; fused or not.
    """
    if torch.device(device).type == "cuda":
        return "dense" if num_tokens * d_out * d_in < 2**28 else "fft"
    threads = num_threads()
    if fused:
        dense_ns = d_out * d_in * (35 + 0.022 * num_tokens)
        fft_ns = threads**0.5 * (num_tokens + 100) * (8 * (d_out + d_in) + 5 * n)
        return "dense" if dense_ns < fft_ns else "fft"
    return "fft" if d_out * d_in > threads * (64 * (d_out + d_in) + 25 * n) else "dense"


# The thread count last read outside torch.compile (at import, then at every eager call): a compiled graph reads
# this global as a constant Dynamo guards on, since it cannot trace ``torch.get_num_threads()``. (Not
# ``torch.compiler.assume_constant_result``: decorating with it imports Dynamo, a second, at ``import s2ft``.)
_THREADS = [torch.get_num_threads()]


def num_threads() -> int:
    """``torch.get_num_threads()``; under ``torch.compile`` the count last read eagerly (a constant of the graph)."""
    if torch.compiler.is_compiling():
        return _THREADS[0]
    _THREADS[0] = torch.get_num_threads()
    return _THREADS[0]


def spectral_apply(
    x, coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None, path="auto"
) -> torch.Tensor:
    """``ΔW x``: ``(..., d_out)`` for ``x`` ``(..., d_in)`` of any float dtype, differentiable wrt ``x``, ``coeffs``.

    Computed and returned in float32 (float64 when ``x`` or ``coeffs`` is float64); the caller casts.
    ``coeffs``, ``rows``, ``cols`` are ``(n,)``; ``rows``, ``cols`` and the optional permutations
    ``perm_rows`` ``(d_out,)``, ``perm_cols`` ``(d_in,)`` are integers (any dtype) on the device of ``coeffs``.
    ``path`` is one of :data:`PATHS` or ``"auto"`` (:func:`choose_path`).
    """
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects d_in={d_in}")
    dtype = torch.float64 if torch.float64 in (x.dtype, coeffs.dtype) else torch.float32
    lead = x.shape[:-1]
    if lead.numel() == 0:  # MKL's FFT rejects empty batches; the dense path handles them
        path = "dense"
    elif path == "auto":
        path = choose_path(d_out, d_in, coeffs.numel(), lead.numel(), x.device)
    if path == "dense":
        delta = delta_weight(coeffs.to(dtype), rows, cols, d_out, d_in, scaling, perm_rows, perm_cols)
        return F.linear(x.to(dtype), delta)
    if path != "fft":
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS + ('auto',)}")
    if torch.compiler.is_compiling():
        flat = x.reshape(-1, d_in)
        y = _fft_apply_op(
            flat, coeffs.to(dtype), rows, cols, perm_rows, perm_cols, d_out, d_in, float(scaling)
        )
        return y.reshape(*lead, d_out)
    plan = _plan(rows, cols, d_out, d_in, perm_rows, perm_cols)
    y = _SpectralFFT.apply(x.reshape(-1, d_in), coeffs.to(dtype), plan, float(scaling), dtype)
    return y.reshape(*lead, d_out)


# Tokens per chunk of the FFT path: a sixteenth of the batch, kept between these many elements (tokens times
# max(d_out, d_in)) per thread. Few chunks keep the per-call overhead low; small ones keep the chunk's buffers in
# cache and its extra memory a few percent of the batch's activations. History: raised from (2**16, 2**18) to
# (2**18, 2**19) in total, measured at 2 threads (one training step of the branch at 512 tokens took 0.73-0.93x
# the time at widths 1,024-4,096 and 0.92-1.01x at 4,096 tokens; chunks of a quarter of the batch were slower at
# 4,096 tokens, 1.2-1.3x). At one thread, chunks of at most 2**17 elements (512 KiB of float32 per buffer)
# instead took 0.74-1.01x the CPU time at 4,096 tokens and width 1,024, 0.91-0.94x at 2,048 and 0.93-1.02x at
# 4,096, and 0.97-1.09x at 512 tokens (more chunks), three runs on the shared machine
# (`benchmarks/chunk_size_ab.py`, `benchmarks/results/cpu/bench_compile_layer.md`); the adapted layer's peak
# memory fell from 1.03-1.50x LoRA r = 8's to 1.01-1.12x. The bounds are per thread (intra-op threads split
# each chunk's FFTs and products; at 2 threads this gives 2**17-2**18, not re-measured).
_CHUNK_ELEMENTS = (1 << 16, 1 << 17)


@dataclass(frozen=True)
class _Pattern:
    """Sparsity pattern of a real ``(2 K_src, 2 K_dst)`` map between interleaved (real, imaginary) half spectra.

    Compressed by destination (CSC, for ``spectrum @ map``) or by source (CSR, for ``sampled_addmm``).
    Location ``k`` owns entry ``slot[k]`` (real to real) and ``slot[n + k]`` (imaginary to imaginary);
    locations that fold onto the same entry share it.
    """

    compressed: torch.Tensor
    plain: torch.Tensor
    slot: torch.Tensor
    size: tuple[int, int]
    by_columns: bool

    @staticmethod
    def build(src, dst, src_len, dst_len, by_columns) -> _Pattern:
        """``src``, ``dst``: folded frequencies ``(n,)`` in ``[0, src_len//2]`` and ``[0, dst_len//2]``."""
        size = (2 * (src_len // 2 + 1), 2 * (dst_len // 2 + 1))
        flat = (torch.cat([2 * src, 2 * src + 1]), torch.cat([2 * dst, 2 * dst + 1]))
        (major, minor), (n_major, n_minor) = (flat[::-1], size[::-1]) if by_columns else (flat, size)
        keys, slot = torch.unique(major * n_minor + minor, sorted=True, return_inverse=True)
        compressed = torch.zeros(n_major + 1, dtype=torch.int32, device=src.device)
        compressed[1:] = torch.bincount(keys // n_minor, minlength=n_major).cumsum(0)
        return _Pattern(compressed, (keys % n_minor).int(), slot, size, by_columns)

    def matrix(self, per_location: torch.Tensor) -> torch.Tensor:
        """The sparse map whose entries sum ``per_location`` ``(2n,)`` over the locations sharing them."""
        values = per_location.new_zeros(self.plain.numel()).index_add_(0, self.slot, per_location)
        constructor = torch.sparse_csc_tensor if self.by_columns else torch.sparse_csr_tensor
        return constructor(self.compressed, self.plain, values, self.size, check_invariants=False)


@dataclass(frozen=True)
class _Plan:
    """Index structures for one layer's locations and permutations; cached by :func:`_plan`.

    Folding. With ``R = rfft(x̄)`` (``N/2+1`` bins), the DFT with positive exponent that ``ifft2`` applies is
    ``X[v] = Σ_q x̄[q] e^{2πi vq/N} = conj(R[v])`` for ``v <= N/2`` and ``R[N-v]`` otherwise. The output only
    needs ``Re(Σ_u e^{2πi up/M} Z[u])`` with ``Z[u_k] += c_k X[v_k]``; that equals ``M * irfft(H, M)`` for the
    Hermitian half spectrum ``H[u] = (Z[u] + conj(Z[M-u])) / 2`` (``H[0] = Re Z[0]``, same at ``u = M/2``, where
    irfft ignores the imaginary part). Hence, per location, in terms of real and imaginary parts:

        Re H[u'_k] += w_k c_k Re R[v'_k],    Im H[u'_k] += w_k c_k σ_k Im R[v'_k],
        u' = min(u, M-u),  v' = min(v, N-v),  w = 1 at u' ∈ {0, M/2} else 1/2,
        σ = +1 when exactly one of (v > N/2, u > M/2) holds, else -1.

    ``ΔW̄ᵀ`` has the same form with the roles of ``(u, M)`` and ``(v, N)`` swapped (same ``σ``, ``w`` from ``v``),
    and ``grad c_k = scaling/(MN) Σ_t (Re R[t, v'_k] Re G[t, u'_k] + σ_k Im R[t, v'_k] Im G[t, u'_k])``
    with ``G = rfft(ḡ)`` of the output gradient ``ḡ``.
    """

    d_out: int
    d_in: int
    forward: _Pattern  # CSC (2 (N/2+1), 2 (M/2+1)): rfft(x̄) -> H
    forward_factor: torch.Tensor  # (2n,): w and wσ
    adjoint: _Pattern  # CSC (2 (M/2+1), 2 (N/2+1)): rfft(ḡ) -> H' for grad x
    adjoint_factor: torch.Tensor  # (2n,): w' and w'σ
    grad: _Pattern  # CSR (2 (N/2+1), 2 (M/2+1)): where grad c samples rfft(x̄)ᵀ rfft(ḡ)
    grad_sign: torch.Tensor  # (2n,): 1 and σ
    perm_rows: torch.Tensor | None
    inv_perm_rows: torch.Tensor | None
    perm_cols: torch.Tensor | None
    inv_perm_cols: torch.Tensor | None

    @staticmethod
    def build(rows, cols, d_out, d_in, perm_rows, perm_cols) -> _Plan:
        rows, cols, perm_rows, perm_cols = widen(rows, cols, perm_rows, perm_cols)
        rows_high, cols_high = 2 * rows > d_out, 2 * cols > d_in
        row_fold = torch.where(rows_high, d_out - rows, rows)
        col_fold = torch.where(cols_high, d_in - cols, cols)
        sign = torch.where(rows_high ^ cols_high, 1.0, -1.0)
        row_weight = torch.where((row_fold == 0) | (2 * row_fold == d_out), 1.0, 0.5)
        col_weight = torch.where((col_fold == 0) | (2 * col_fold == d_in), 1.0, 0.5)
        return _Plan(
            d_out,
            d_in,
            _Pattern.build(col_fold, row_fold, d_in, d_out, by_columns=True),
            torch.cat([row_weight, row_weight * sign]),
            _Pattern.build(row_fold, col_fold, d_out, d_in, by_columns=True),
            torch.cat([col_weight, col_weight * sign]),
            _Pattern.build(col_fold, row_fold, d_in, d_out, by_columns=False),
            torch.cat([torch.ones_like(sign), sign]),
            perm_rows,
            None if perm_rows is None else torch.argsort(perm_rows),
            perm_cols,
            None if perm_cols is None else torch.argsort(perm_cols),
        )

    def chunks(self, num_tokens: int):
        """Slices of ``num_tokens // 16`` tokens, clamped to :data:`_CHUNK_ELEMENTS` times the thread count,
        covering ``num_tokens``."""
        width, threads = max(self.d_out, self.d_in), num_threads()
        low, high = (max(1, elements * threads // width) for elements in _CHUNK_ELEMENTS)
        step = min(high, max(low, num_tokens // 16))
        return (slice(start, start + step) for start in range(0, num_tokens, step))


_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _plan(rows, cols, d_out, d_in, perm_rows, perm_cols) -> _Plan:
    """The :class:`_Plan` for these index tensors, cached per ``rows`` tensor.

    An entry is reused only for the same ``cols`` and permutation objects, the same shape and unchanged version
    counters, so replacing or modifying any index tensor in place (``copy_``, ``load_state_dict``) rebuilds it.
    Inference-mode tensors have no version counter and are not cached.
    """
    if any(t is not None and t.is_inference() for t in (rows, cols, perm_rows, perm_cols)):
        return _Plan.build(rows, cols, d_out, d_in, perm_rows, perm_cols)
    tensors = (cols, perm_rows, perm_cols)
    versions = tuple(None if t is None else t._version for t in (rows, *tensors))
    cached = _PLANS.get(rows)
    if cached is not None:
        cached_tensors, cached_key, plan = cached
        if all(a is b for a, b in zip(cached_tensors, tensors)) and cached_key == (d_out, d_in, versions):
            return plan
    plan = _Plan.build(rows, cols, d_out, d_in, perm_rows, perm_cols)
    _PLANS[rows] = (tensors, (d_out, d_in, versions), plan)
    return plan


# Plans of the compiled operator, by the contents of their index tensors (least recently used first). Sized for
# every adapted layer of a ~1B model's all-linear targets (154 there); a plan holds O(n + d_out + d_in) integers.
_CONTENT_PLANS: OrderedDict[tuple, _Plan] = OrderedDict()
_CONTENT_PLANS_MAX = 256


def _plan_by_content(rows, cols, d_out, d_in, perm_rows, perm_cols) -> _Plan:
    """The :class:`_Plan` for these indices, kept by their contents (bytes; the dictionary compares them in full, so
    equal keys are equal indices). Under ``torch.compile`` the operator receives index tensors derived in the graph,
    new objects on every call, so :func:`_plan`'s cache by identity would never hit; rebuilding cost about 1-3 ms a
    call at n = 1000 (forward and backward each). Reading the contents costs O(n + d_out + d_in) bytes (on a GPU,
    a copy to the host; building the plan synchronizes there too)."""
    tensors = (rows, cols, perm_rows, perm_cols)
    key = (d_out, d_in, str(rows.device)) + tuple(
        None if t is None else (str(t.dtype), t.detach().cpu().numpy().tobytes()) for t in tensors
    )
    plan = _CONTENT_PLANS.get(key)
    if plan is not None:
        _CONTENT_PLANS.move_to_end(key)
        return plan
    plan = _Plan.build(rows, cols, d_out, d_in, perm_rows, perm_cols)
    _CONTENT_PLANS[key] = plan
    while len(_CONTENT_PLANS) > _CONTENT_PLANS_MAX:
        _CONTENT_PLANS.popitem(last=False)
    return plan


def _gather_columns(
    signal: torch.Tensor, perm: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``signal[:, perm]`` (into ``out`` if given). ``index_select`` on dimension 1: with torch 2.13 on the CPU it
    copies chunk-sized blocks in about 0.6x the time of ``gather`` with an index broadcast over the rows (an earlier
    measurement had it the other way round), and the compiled branch's step took 0.85-0.93x the time at 5 of 6
    shapes (``benchmarks/compile_layer_ab.py``, ``benchmarks/results/cpu/compile_layer_ab_index_select.md``)."""
    if out is None:
        return torch.index_select(signal, 1, perm)
    return torch.index_select(signal, 1, perm, out=out)


def _half_spectrum(signal: torch.Tensor, perm: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``rfft`` of ``signal[:, perm]`` in ``dtype``, as interleaved reals ``(T, 2 (L/2+1))`` (a view)."""
    signal = signal.to(dtype)
    if perm is not None:
        signal = _gather_columns(signal, perm)
    spectrum = torch.fft.rfft(signal, dim=1)
    return torch.view_as_real(spectrum).reshape(signal.shape[0], -1)


def _mix(spectrum: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``spectrum @ matrix`` for a CSC ``matrix``, written straight into a new dense result.

    ``addmm`` with ``out=`` and ``beta=0`` skips the zero-filled result and the copy that ``@`` makes.
    """
    out = spectrum.new_empty(spectrum.shape[0], matrix.shape[1])
    return torch.addmm(out, spectrum, matrix, beta=0.0, out=out)


def _synthesize(half: torch.Tensor, inv_perm: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out[:, perm] = irfft(half)`` for interleaved reals ``half`` ``(T, 2 (L/2+1))`` and ``out`` ``(T, L)``."""
    spectrum = torch.view_as_complex(half.view(half.shape[0], -1, 2))
    if inv_perm is None and out.dtype == half.dtype:
        torch.fft.irfft(spectrum, n=out.shape[1], dim=1, out=out)
        return
    signal = torch.fft.irfft(spectrum, n=out.shape[1], dim=1)
    if inv_perm is None:
        out.copy_(signal)
    elif out.dtype == half.dtype:
        _gather_columns(signal, inv_perm, out=out)
    else:
        out.copy_(_gather_columns(signal, inv_perm))


def _fft_forward(x, coeffs, plan: _Plan, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """``y = ΔW x`` ``(T, d_out)`` in ``dtype`` for ``x`` ``(T, d_in)``, chunk by chunk (no autograd)."""
    mix = plan.forward.matrix(coeffs.repeat(2) * plan.forward_factor.to(dtype) * (scaling / plan.d_in))
    y = x.new_empty(x.shape[0], plan.d_out, dtype=dtype)
    for rows in plan.chunks(x.shape[0]):
        _synthesize(_mix(_half_spectrum(x[rows], plan.perm_cols, dtype), mix), plan.inv_perm_rows, y[rows])
    return y


def _fft_backward(
    grad_y, x, coeffs, plan: _Plan, scaling: float, dtype: torch.dtype, need_x: bool, need_c: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(grad x, grad coeffs)`` of :func:`_fft_forward` (None where not needed), chunk by chunk."""
    if need_x:
        adjoint = plan.adjoint.matrix(
            coeffs.repeat(2) * plan.adjoint_factor.to(dtype) * (scaling / plan.d_out)
        )
        grad_x = x.new_empty(x.shape)
    if need_c:
        pattern = plan.grad.matrix(torch.zeros_like(plan.grad_sign, dtype=dtype))
        sampled = torch.zeros_like(pattern.values())
    # Each chunk buffer is dropped as soon as it is used: at most three are alive at a time.
    for rows in plan.chunks(x.shape[0]):
        grad_spectrum = _half_spectrum(grad_y[rows], plan.perm_rows, dtype)
        if need_c:  # sampled_addmm wants the spectrum (frequency, token)-contiguous; it would copy it too
            spectrum = _half_spectrum(x[rows], plan.perm_cols, dtype).T.contiguous()
            sampled += torch.sparse.sampled_addmm(pattern, spectrum, grad_spectrum, beta=0.0).values()
            del spectrum
        if need_x:
            half = _mix(grad_spectrum, adjoint)
            del grad_spectrum
            _synthesize(half, plan.inv_perm_cols, grad_x[rows])
            del half
    grad_c = None
    if need_c:
        per_part = sampled[plan.grad.slot] * plan.grad_sign.to(dtype)
        grad_c = per_part.view(2, -1).sum(0) * (scaling / (plan.d_out * plan.d_in))
    return (grad_x if need_x else None), grad_c


class _SpectralFFT(torch.autograd.Function):
    """``y = ΔW x`` for ``x`` ``(T, d_in)`` by the FFT path; see :class:`_Plan` for the algebra.

    Tokens are processed in chunks (:meth:`_Plan.chunks`), so the spectra never exist for the whole batch:
    beyond its output, the forward allocates a few chunk-sized buffers, and so does the backward beyond
    ``grad x``. Saves ``x`` itself (no copy) and recomputes its ``rfft`` in backward. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, coeffs, plan: _Plan, scaling: float, dtype: torch.dtype):
        ctx.save_for_backward(x, coeffs)
        ctx.plan, ctx.scaling, ctx.dtype = plan, scaling, dtype
        return _fft_forward(x, coeffs, plan, scaling, dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, coeffs = ctx.saved_tensors
        need_x, need_c = ctx.needs_input_grad[:2]
        grad_x, grad_c = _fft_backward(grad_y, x, coeffs, ctx.plan, ctx.scaling, ctx.dtype, need_x, need_c)
        return grad_x, grad_c, None, None, None


# Under torch.compile the FFT path is one operator of the graph (its forward and its backward), running the eager
# chunked sparse code above, with plans kept by the indices' contents (_plan_by_content). The operators' names end
# in a digest of both schemas (and OPERATOR_REVISION): torch's compile caches key a graph by the operators it calls,
# not by their registered backward, so a cache filled by an s2ft whose backward took other arguments would replay a
# backward that no longer fits; a new name misses that cache instead. Bump OPERATOR_REVISION when the meaning of an
# argument changes without the schema changing.
OPERATOR_REVISION = 1


def _fft_apply_impl(
    x: torch.Tensor,
    coeffs: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    perm_rows: torch.Tensor | None,
    perm_cols: torch.Tensor | None,
    d_out: int,
    d_in: int,
    scaling: float,
) -> torch.Tensor:
    plan = _plan_by_content(rows, cols, d_out, d_in, perm_rows, perm_cols)
    return _fft_forward(x, coeffs, plan, scaling, coeffs.dtype)


def _fft_apply_backward_impl(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    coeffs: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    perm_rows: torch.Tensor | None,
    perm_cols: torch.Tensor | None,
    d_out: int,
    d_in: int,
    scaling: float,
    need_x: bool,
    need_c: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad x, grad coeffs)``; an empty tensor stands for a gradient not needed."""
    plan = _plan_by_content(rows, cols, d_out, d_in, perm_rows, perm_cols)
    grad_x, grad_c = _fft_backward(grad_y, x, coeffs, plan, scaling, coeffs.dtype, need_x, need_c)
    return (x.new_empty(0) if grad_x is None else grad_x), (coeffs.new_empty(0) if grad_c is None else grad_c)


def _schema_digest(*functions: Any) -> str:
    """8 hex digits of SHA-256 over the functions' signatures and :data:`OPERATOR_REVISION`."""
    text = "|".join(str(inspect.signature(f)) for f in functions) + f"|{OPERATOR_REVISION}"
    return hashlib.sha256(text.encode()).hexdigest()[:8]


FFT_OPERATOR = (
    f"fft_apply_{_schema_digest(_fft_apply_impl, _fft_apply_backward_impl)}"  # in the namespace s2ft
)
_fft_apply_op = torch.library.custom_op(f"s2ft::{FFT_OPERATOR}", mutates_args=())(_fft_apply_impl)
_fft_apply_backward_op = torch.library.custom_op(f"s2ft::{FFT_OPERATOR}_backward", mutates_args=())(
    _fft_apply_backward_impl
)


@_fft_apply_op.register_fake
def _(x, coeffs, rows, cols, perm_rows, perm_cols, d_out, d_in, scaling):
    return x.new_empty(x.shape[0], d_out, dtype=coeffs.dtype)


@_fft_apply_backward_op.register_fake
def _(grad_y, x, coeffs, rows, cols, perm_rows, perm_cols, d_out, d_in, scaling, need_x, need_c):
    return x.new_empty(x.shape if need_x else 0), coeffs.new_empty(coeffs.shape if need_c else 0)


def _fft_apply_setup(ctx, inputs, output) -> None:
    x, coeffs, rows, cols, perm_rows, perm_cols, d_out, d_in, scaling = inputs
    ctx.save_for_backward(x, coeffs, rows, cols, perm_rows, perm_cols)
    ctx.shape = (d_out, d_in, scaling)


def _fft_apply_grad(ctx, grad_y):
    x, coeffs, rows, cols, perm_rows, perm_cols = ctx.saved_tensors
    need_x, need_c = ctx.needs_input_grad[:2]
    grad_x, grad_c = _fft_apply_backward_op(
        grad_y, x, coeffs, rows, cols, perm_rows, perm_cols, *ctx.shape, need_x, need_c
    )
    return (grad_x if need_x else None), (grad_c if need_c else None), *([None] * 7)


_fft_apply_op.register_autograd(_fft_apply_grad, setup_context=_fft_apply_setup)
