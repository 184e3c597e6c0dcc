"""DCT: FourierFT's recipe in the real orthonormal 2-D DCT-II basis, LoCA's DCT parametrization without its
location learning: ``n`` coefficients per adapted matrix at seeded, uniformly random, distinct locations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from s2ft.config import FourierFTConfig
from s2ft.methods.spectral import Spectral


@dataclass
class DCTConfig(FourierFTConfig):
    """DCT: ``ΔW = scaling / sqrt(2 d_out d_in) * C_outᵀ F C_in`` (:mod:`s2ft.ops.dct`), ``F`` zero but for the
    coefficients, at FourierFT's locations for the seed. ``scaling`` is in FourierFT's units: a coefficient moves
    ``ΔW`` as far (in Frobenius norm) in both bases. No mirror pairs: every location is a basis function."""

    method: ClassVar[str] = "dct"
    basis: ClassVar[str] = "dct"
    planned: ClassVar[bool] = False
    stores_locations: ClassVar[bool] = False
    peft_type: ClassVar[str | None] = None


class DCT(Spectral):
    name = "dct"
    label = "DCT"
    config_class = DCTConfig
