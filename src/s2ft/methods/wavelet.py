"""Methods in the orthonormal Haar wavelet basis (:mod:`s2ft.ops.wavelet`), on s2ft's own layers:

- ``wavelet``: WaveFT's recipe (PEFT's ``WaveFTConfig``): ``n`` coefficients per adapted matrix at seeded uniformly
  random locations, nothing stored but the coefficients; one level reproduces PEFT's ``ΔW`` for the same seed.
- ``s2ft-wavelet``: S2FT's recipe in that basis: prior, row and column permutations, locations sampled
  ``∝ |H_M (permuted prior) H_Nᵀ|^gamma`` (the stored compact plan, or with ``plan_from="base"`` and
  ``locations_from="base"`` the plan of ``W0``, recomputed when loading).

Both train on Linear, Conv1D and Conv2d layers through the basis interface (dense path or the transform path,
which never builds ``ΔW``), merge, and serve in mixed batches (on each adapter's own path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from s2ft.config import FourierFTConfig, S2FTConfig
from s2ft.methods.base import Option, Variant
from s2ft.methods.spectral import N_FREQUENCY, S2FT, S2FT_OPTIONS, SCALING, Spectral
from s2ft.ops import wavelet


class _Haar:
    """The fields and checks both wavelet configs share (a mixin of the dataclasses below)."""

    wavelet_family: str
    levels: int
    n_frequency: int

    @property
    def basis(self) -> str:  # the Haar basis of ``levels`` levels in s2ft.ops.bases.BASES
        return wavelet.basis_name(self.levels)

    def _check_wavelet(self) -> None:
        if not isinstance(self.wavelet_family, str):
            raise ValueError(f"wavelet_family must be a string such as 'db1', got {self.wavelet_family!r}")
        wavelet.check_family(self.wavelet_family)
        wavelet.check_levels(self.levels, 2**wavelet.MAX_LEVELS, 2**wavelet.MAX_LEVELS)

    def _check_shape(self, d_out: int, d_in: int) -> None:
        """Refuse a layer shape that cannot take ``levels`` levels (called for every adapted shape when the adapter
        is added, before the model is changed)."""
        wavelet.check_levels(self.levels, d_out, d_in, where="an adapted layer")


@dataclass
class WaveletConfig(_Haar, FourierFTConfig):  # type: ignore[override]  # basis: a property of levels
    """WaveFT's recipe on s2ft's layers: ``ΔW = scaling / sqrt(2 d_out d_in) * H_outᵀ F H_in`` with ``H`` the
    ``levels``-level orthonormal Haar transform (:mod:`s2ft.ops.wavelet`) and ``F`` zero but for the coefficients,
    at PEFT WaveFT's locations for the seed. ``scaling`` is in FourierFT's units (a coefficient moves ``ΔW`` as far
    in every basis); PEFT's ``scaling_peft`` is ``scaling / sqrt(2 d_out d_in)``."""

    method: ClassVar[str] = "wavelet"
    planned: ClassVar[bool] = False
    stores_locations: ClassVar[bool] = False
    peft_type: ClassVar[str | None] = None  # PEFT's WAVEFT: s2ft.tuner.peft_formats.save_peft_waveft
    peft_waveft: ClassVar[bool] = True  # save_peft_waveft writes it (seeded locations, no permutations)

    # The wavelet: "db1" (Haar; "haar" is the same) is the only one implemented.
    wavelet_family: str = "db1"
    # Decomposition levels along each side (1: PEFT WaveFT's single level; each further level splits the
    # approximation band again). Every adapted shape must take them (an odd length passes its last entry through).
    levels: int = 1

    def validate(self) -> None:
        super().validate()
        self._check_wavelet()

    def seeded_locations(self, d_out: int, d_in: int) -> tuple[Any, Any] | None:
        self._check_shape(d_out, d_in)
        return super().seeded_locations(d_out, d_in)


@dataclass
class S2FTWaveletConfig(_Haar, S2FTConfig):  # type: ignore[override]
    """S2FT's recipe in the Haar basis: the prior's rows and columns ordered (as S2FT's), then ``n`` locations
    sampled ``∝ |H_M (permuted prior) H_Nᵀ|^gamma``; ``ΔW`` as :class:`WaveletConfig`'s, permuted back. Every
    option of :class:`s2ft.S2FTConfig` but ``locations="prior-half"`` (the Haar basis has no mirror pairs)."""

    method: ClassVar[str] = "s2ft-wavelet"
    peft_type: ClassVar[str | None] = None

    wavelet_family: str = "db1"
    levels: int = 1

    def validate(self) -> None:
        super().validate()
        self._check_wavelet()
        if self.locations == "prior-half":
            raise ValueError(
                "locations='prior-half' keeps one location of each DFT mirror pair; the Haar basis has no mirror "
                "pairs: use locations='prior'"
            )

    def seeded_locations(self, d_out: int, d_in: int) -> tuple[Any, Any] | None:
        self._check_shape(d_out, d_in)
        return None  # planned by calibrate()


def _levels(value: Any) -> str | None:
    return None if 1 <= value <= wavelet.MAX_LEVELS else f"must be from 1 to {wavelet.MAX_LEVELS}"


WAVELET_OPTIONS = (
    Option(
        "levels",
        int,
        1,
        "wavelet methods: Haar decomposition levels (1: PEFT WaveFT's)",
        check=_levels,
        exclusive=True,
    ),
)


class Wavelet(Spectral):
    """WaveFT's recipe (seeded random locations) in s2ft's Haar basis."""

    name = "wavelet"
    label = "Wavelet (WaveFT recipe)"
    config_class = WaveletConfig
    options: ClassVar[tuple[Option, ...]] = (N_FREQUENCY, SCALING, *WAVELET_OPTIONS)  # type: ignore[assignment]

    def run_label(self, args: Any) -> str:
        return f"Wavelet, n = {args.n_frequency}"


class S2FTWavelet(S2FT):
    """S2FT's recipe (planned permutations and locations) in s2ft's Haar basis."""

    name = "s2ft-wavelet"
    label = "S2FT (wavelet)"
    config_class = S2FTWaveletConfig
    plans = False  # s2ft analyze measures the Fourier S2FT's plans (one planning method)
    # S2FT's options but re-planning (--replan-at stays S2FT's: not measured in this basis)
    options: ClassVar[tuple[Option, ...]] = (  # type: ignore[assignment]
        N_FREQUENCY,
        SCALING,
        *(o for o in S2FT_OPTIONS if o.name != "replan_at"),
        *WAVELET_OPTIONS,
    )

    def variants(self) -> dict[str, Variant]:
        return {
            # the job's default prior (Adam-normalized), named so that a changed default does not change it
            self.name: Variant(self, {"locations": "prior", "prior": "adam"}),
            f"{self.name}-w0": Variant(
                self,
                {"locations": "prior", "plan_from": "base", "locations_from": "base"},
                "plan of W0 (nothing stored)",
                ablation=True,
            ),
        }
