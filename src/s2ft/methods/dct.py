"""DCT: FourierFT's recipe in the real orthonormal 2-D DCT-II basis, LoCA's DCT parametrization without its
location learning: ``n`` coefficients per adapted matrix at seeded, uniformly random, distinct locations. Its
adapter config, :class:`s2ft.DCTConfig`, lives with the others in :mod:`s2ft.config`."""

from __future__ import annotations

from s2ft.config import DCTConfig
from s2ft.methods.spectral import Spectral

__all__ = ["DCT", "DCTConfig"]  # DCTConfig: importable from here as before


class DCT(Spectral):
    name = "dct"
    label = "DCT"
    config_class = DCTConfig
