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

from typing import Any, ClassVar

from s2ft.config import S2FTWaveletConfig, WaveletConfig
from s2ft.methods.base import Option, Variant
from s2ft.methods.spectral import N_FREQUENCY, S2FT, S2FT_OPTIONS, SCALING, Spectral
from s2ft.ops import wavelet


def _levels(value: Any) -> str | None:
    return None if 1 <= value <= wavelet.MAX_LEVELS else f"must be from 1 to {wavelet.MAX_LEVELS}"


WAVELET_OPTIONS = (
    Option(
        "levels",
        int,
        1,
        "wavelet methods: Haar decomposition levels (1: PEFT WaveFT's)",
        check=_levels,
    ),
)


class Wavelet(Spectral):
    """WaveFT's recipe (seeded random locations) in s2ft's Haar basis."""

    name = "wavelet"
    label = "Wavelet (WaveFT recipe)"
    config_class = WaveletConfig
    options: ClassVar[tuple[Option, ...]] = (N_FREQUENCY, SCALING, *WAVELET_OPTIONS)

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
