"""Applying ΔW: the dense reference path (a faster train-time path replaces ``spectral_apply``'s "auto")."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def delta_weight(coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None) -> torch.Tensor:
    """Dense ``ΔW`` ``(d_out, d_in)`` in float32: ``scaling * Re(ifft2(F))``, then rows and columns permuted."""
    spectrum = torch.zeros(d_out, d_in, dtype=torch.complex64, device=coeffs.device)
    spectrum = spectrum.index_put((rows, cols), coeffs.to(torch.complex64))
    delta = torch.fft.ifft2(spectrum).real * scaling
    if perm_rows is not None:
        delta = delta[torch.argsort(perm_rows)][:, torch.argsort(perm_cols)]
    return delta


def spectral_apply(x, coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None, path="auto"):
    """``ΔW x`` ``(..., d_out)`` in float32 for ``x`` ``(..., d_in)``."""
    return F.linear(x.float(), delta_weight(coeffs, rows, cols, d_out, d_in, scaling, perm_rows, perm_cols))
