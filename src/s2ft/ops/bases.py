"""The 2-D bases a spectral adapter's coefficients live in, one object each, one line each in :data:`BASES`.

A basis turns ``n`` real coefficients at locations ``(rows[k], cols[k])`` of a ``d_out x d_in`` grid (and,
optionally, row and column permutations) into a weight change, and back:

- ``delta_weight(coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None)``: the dense ``ΔW``
  ``(d_out, d_in)``, differentiable wrt ``coeffs``;
- ``apply(x, coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None, path="auto")``: ``ΔW x``
  ``(..., d_out)`` for ``x`` ``(..., d_in)``, float32 (float64 for float64 input), differentiable wrt both;
- ``project(delta, rows, cols, scaling, perm_rows=None, perm_cols=None)``: the coefficients whose ``ΔW`` is
  nearest ``delta`` in Frobenius norm;
- ``choose_path(d_out, d_in, n, num_tokens, device, fused=False)`` (optional): the path ``apply(path="auto")``
  takes (``fused``: the dense path would run fused into the base layer's GEMM);
- ``seeded_locations(d_out, d_in, n, seed)``: ``n`` distinct locations drawn uniformly for a seed (int64, CPU);
- ``energy(matrix)`` (optional): ``|coefficients|`` ``(d_out, d_in)`` of a matrix in the basis, which S2FT's planner
  samples locations from (:func:`s2ft.tuner.planner.plan_layer`; the Fourier basis' is the DFT power spectrum).

The Haar wavelet bases (:mod:`s2ft.ops.wavelet`) are one object per number of levels: ``"haar"`` (one level, PEFT
WaveFT's), ``"haar2"`` ... ``"haar8"``.

An adapter config names its basis (``config.basis``); the layers look it up here and never ask which method
they serve.
"""

from __future__ import annotations

from s2ft.ops import apply as _apply
from s2ft.ops import locations as _locations
from s2ft.ops.dct import DCTBasis
from s2ft.ops.wavelet import BASES as WAVELET_BASES


class FourierBasis:
    """The 2-D DFT: ``ΔW̄ = scaling * Re(ifft2(F))`` (FourierFT, S2FT); see :mod:`s2ft.ops.apply`."""

    name = "fourier"
    delta_weight = staticmethod(_apply.delta_weight)
    apply = staticmethod(_apply.spectral_apply)
    choose_path = staticmethod(_apply.choose_path)
    project = staticmethod(_apply.project_delta)
    seeded_locations = staticmethod(_locations.fourierft_locations)


BASES = {"fourier": FourierBasis(), "dct": DCTBasis(), **WAVELET_BASES}


def get_basis(name: str):
    """The basis named ``name`` (a key of :data:`BASES`)."""
    if name not in BASES:
        raise ValueError(f"unknown basis {name!r}; s2ft knows {sorted(BASES)}")
    return BASES[name]
