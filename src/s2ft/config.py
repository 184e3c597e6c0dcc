"""Adapter configurations: dataclasses validated on creation that round-trip through JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from s2ft.io import atomic_write_text
from s2ft.ops import wavelet
from s2ft.ops.permutation import SEARCHES

# The priors S2FT plans from (S2FTConfig.prior); computed by s2ft.tuner.calibration.gradient_prior.
PRIORS = ("gradient", "adam", "trajectory")
# prior_rank="auto" (S2FTConfig's default): layers at least this wide on both sides are sketched at this rank, the
# others get the exact prior. At k = 64 the sketch kept the three default jobs' test metrics within their seed
# spread (docs/results/*/sketched-prior/); their layers are narrower, so they keep the exact prior. From 1,024 on
# a layer's exact Adam prior (two float32 d_out x d_in matrices) is 10x or more the sketch's numbers.
AUTO_PRIOR_RANK = 64
AUTO_SKETCH_MIN_WIDTH = 1024

LOCATIONS = ("prior", "prior-half", "uniform")
# Where an S2FT plan's permutations (S2FTConfig.plan_from) and locations (locations_from) come from: the prior
# (stored in the file) or the base weights W0 and the seed (recomputed when loading, not stored).
PLAN_SOURCES = ("prior", "base")

CONFIG_NAME = "adapter_config.json"
ALL_LINEAR = "all-linear"  # target_modules: every Linear/Conv1D but the output layer, as in PEFT
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
INITS = ("zeros", "normal")
FORWARD_PATHS = ("auto", "dense", "fft")


# Adapter config classes by method name (the "method" field of an adapter_config.json). A subclass of
# FourierFTConfig that names its own ``method`` registers itself here when it is defined (s2ft.methods.* define
# the others), so load_config and from_dict find it.
CONFIGS: dict[str, type[FourierFTConfig]] = {}


def _is_number(value: Any) -> bool:
    """A real number, and not a bool (``True`` is an ``int`` to Python, never a sensible scaling or gamma)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_regex(field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f"{field}={pattern!r} is not a valid regular expression ({e}); a string is matched as a regex "
            "against the whole module name, a list as exact names or .suffixes"
        ) from None


@dataclass
class FourierFTConfig:
    """FourierFT: train ``n_frequency`` real spectrum coefficients per targeted layer at seeded random locations.

    ``ΔW = scaling * Re(ifft2(F))`` with ``F`` zero but for the coefficients.
    """

    # What a method is, as behaviour the layers and files ask for (never the method's name):
    method: ClassVar[str] = "fourierft"
    basis: ClassVar[str] = "fourier"  # the coefficients' basis, a key of s2ft.ops.bases.BASES
    planned: ClassVar[bool] = False  # True: locations come from calibrate() (S2FT), not from the seed
    stores_locations: ClassVar[bool] = False  # the file holds the locations (else they follow from the seed)
    # The file holds the permutations, if the adapter has any (else they follow from W0 and the seed).
    stores_permutations: ClassVar[bool] = True
    # Part of the plan follows from the base weights W0 (the file holds W0's fingerprint; loading recomputes it).
    plan_from_base: ClassVar[bool] = False
    peft_type: ClassVar[str | None] = "FOURIERFT"  # Hugging Face PEFT's type for the same adapter, if any

    # Modules to adapt. A list: each entry matches a module name exactly or as a ".suffix" ("query" matches
    # "encoder.layer.0.attention.self.query"). A string: a regular expression that must match the whole name.
    target_modules: list[str] | str | None = None
    # Modules trained fully and saved with the adapter, e.g. a new classifier head: ["classifier"].
    modules_to_save: list[str] | None = None
    # Trainable coefficients per adapted matrix.
    n_frequency: int = 1000
    # α in ΔW = α · Re(IDFT2(F)); under Adam it trades almost one for one with the learning rate.
    scaling: float = 150.0
    # Seed of the location draw (FourierFT) and of the permutation starts and location sampling (S2FT).
    seed: int = 777
    # "zeros": the adapted model equals the base model before training. "normal": N(0, 1), as Hugging Face PEFT.
    init: str = "zeros"
    # How training forwards apply ΔW: "dense" builds it, "fft" never does, "auto" picks per layer and input.
    forward_path: str = "auto"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "method" in cls.__dict__:
            CONFIGS[cls.method] = cls

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field and what to use instead."""
        if self.target_modules is None:
            raise ValueError("target_modules is required, e.g. target_modules=['query', 'value']")
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    f"target_modules must be a non-empty list of names, got {self.target_modules!r}"
                )
            self.target_modules = list(self.target_modules)
        elif not isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(
                f"target_modules must be a list of names or a regex string, got {self.target_modules!r}"
            )
        elif self.target_modules != ALL_LINEAR:
            _check_regex("target_modules", self.target_modules)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(
                isinstance(m, str) and m for m in self.modules_to_save
            ):
                raise ValueError(f"modules_to_save must be a list of names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
        if (
            not isinstance(self.n_frequency, int)
            or isinstance(self.n_frequency, bool)
            or self.n_frequency <= 0
        ):
            raise ValueError(f"n_frequency must be a positive integer, got {self.n_frequency!r}")
        if not _is_number(self.scaling) or not math.isfinite(self.scaling) or self.scaling == 0:
            raise ValueError(f"scaling must be a finite non-zero number, got {self.scaling!r}")
        self.scaling = float(self.scaling)
        if (
            not isinstance(self.seed, int)
            or isinstance(self.seed, bool)
            or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]
        ):
            raise ValueError(
                f"seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]} (what torch's generator takes), "
                f"got {self.seed!r}"
            )
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.forward_path not in FORWARD_PATHS:
            raise ValueError(f"forward_path must be one of {FORWARD_PATHS}, got {self.forward_path!r}")

    def seeded_locations(self, d_out: int, d_in: int) -> tuple[Any, Any] | None:
        """The locations of a ``(d_out, d_in)`` layer that follow from the seed (int64 ``(n,)`` tensors on the CPU),
        the same for every layer of a shape, as PEFT's; None when they are planned from data (S2FT)."""
        if self.planned:
            return None
        from s2ft.ops.bases import get_basis

        return get_basis(self.basis).seeded_locations(d_out, d_in, self.n_frequency, self.seed)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def to_json_file(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FourierFTConfig:
        """Build the config of ``data["method"]``; called on a subclass, the method must be that subclass's."""
        data = dict(data)
        method = data.pop("method", None)
        if method is None:
            hint = (
                f" (it looks like a Hugging Face PEFT {data['peft_type']} config)"
                if "peft_type" in data
                else ""
            )
            raise ValueError(f"not an s2ft adapter config: no 'method' field{hint}")
        if method not in CONFIGS:
            raise ValueError(f"unknown adapter method {method!r}; s2ft knows {sorted(CONFIGS)}")
        target = CONFIGS[method]
        if cls is not FourierFTConfig and target is not cls:
            raise ValueError(
                f"this is a {method!r} adapter config, not a {cls.method!r} one; use {target.__name__}"
            )
        names = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown fields for a {method!r} config: {unknown}")
        return target(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> FourierFTConfig:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no adapter config at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"adapter config {path} is not valid JSON: {e}") from None
        except UnicodeDecodeError:
            raise ValueError(
                f"adapter config {path} is not UTF-8 text; is it an adapter_config.json?"
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"adapter config {path} must hold a JSON object")
        return cls.from_dict(data)


@dataclass
class S2FTConfig(FourierFTConfig):
    """S2FT: FourierFT in a row- and column-permuted domain, with locations sampled from a gradient prior.

    Call :meth:`s2ft.SpectralModel.calibrate` once before training: it estimates ``ΔŴ`` from gradients, orders its
    rows and columns by a short path, and samples locations ``∝ |DFT2(permuted ΔŴ)|^gamma``.
    """

    method: ClassVar[str] = "s2ft"
    planned: ClassVar[bool] = True
    peft_type: ClassVar[str | None] = None

    # Exponent of the power spectrum in the location sampling (the paper's ablation: 0.5 < 1.5 > 5).
    gamma: float = 1.5
    # Calibration uses at most this many batches of what it is given (None: all of them).
    calibration_batches: int | None = None
    # Calibration holds the priors of this many layers at a time (None: of all the adapter's layers): each group
    # of layers runs over the same batches (kept in memory), so the prior memory stays that of one group's
    # matrices whatever the number of targeted layers, for one forward and backward per batch and group. The
    # plans are the same whatever the grouping.
    calibration_group_size: int | None = None
    # The row/column ordering search (s2ft.ops.permutation.SEARCHES): "greedy" nearest-neighbour path, as in the
    # paper; "multistart", "2opt", "2opt-cyclic" (shorter paths, more compaction) and "svd" (spectral ordering).
    permutation: str = "greedy"
    # "prior" samples locations ∝ |DFT2|^gamma over the whole spectrum (the paper); "prior-half" over one location of
    # each mirror pair (u, v), (-u, -v), which carry the same real basis function; "uniform" (an ablation) draws
    # them as FourierFT does.
    locations: str = "prior"
    # Ablation: False keeps identity permutations (locations still sampled from the prior's spectrum).
    permute: bool = True
    # The prior ΔŴ the plan is made from (PRIORS): "adam" (the default), the summed gradient at the pretrained
    # weights divided elementwise by the root of the summed squared gradients (an Adam step's direction; it beat
    # "gradient" on 12 of 21 paired runs, every causal-LM one, none in few-shot image training, docs/results);
    # "gradient", the summed gradient (the paper); "trajectory", the change of the weights over one Adam step
    # per calibration batch, at learning rate prior_lr.
    prior: str = "adam"
    prior_lr: float = 1e-4
    # The rank k of a sketched prior: None, the exact prior; k, every layer's prior sketched at rank k; "auto" (the
    # default), the layers at least 1,024 wide on both sides sketched at rank 64 and the others exact. A sketch holds
    # O((d_out + d_in)·k) numbers per layer instead of one or two dense matrices, in one pass over the batches, and
    # the plan is made from the rank-k factors; k is clamped to min(d_out, d_in) per layer, where the sketch is
    # exact. "gradient" and "adam" only (the adam prior's second moment is then factored as Adafactor does;
    # "auto" leaves the trajectory prior exact).
    prior_rank: int | str | None = "auto"
    # The permutations' source (PLAN_SOURCES): "prior", the ordering of the prior's rows and columns, stored in the
    # file (the paper); "base", the same search on the base weights W0 with the seed, recomputed when loading (the
    # file holds W0's fingerprint instead, and loading on another base model is refused).
    plan_from: str = "prior"
    # The locations' source: "prior", sampled from the prior's permuted spectrum and stored; "base" (needs
    # plan_from="base"), sampled from W0's permuted spectrum and recomputed: the file holds the coefficients only.
    locations_from: str = "prior"

    @property
    def stores_locations(self) -> bool:  # type: ignore[override]
        return self.locations_from == "prior"

    @property
    def stores_permutations(self) -> bool:  # type: ignore[override]
        return self.plan_from == "prior"

    @property
    def plan_from_base(self) -> bool:  # type: ignore[override]
        return self.plan_from == "base"

    @property
    def needs_prior(self) -> bool:
        """Whether calibration needs batches: a gradient prior is only computed for what comes from it."""
        return self.plan_from == "prior" or self.locations_from == "prior"

    def validate(self) -> None:
        super().validate()
        for field in ("plan_from", "locations_from"):
            if getattr(self, field) not in PLAN_SOURCES:
                raise ValueError(f"{field} must be one of {PLAN_SOURCES}, got {getattr(self, field)!r}")
        if self.locations_from == "base" and self.plan_from != "base":
            raise ValueError(
                "locations_from='base' needs plan_from='base' (locations of W0's spectrum are taken in W0's own "
                "row and column order)"
            )
        if not _is_number(self.gamma) or not math.isfinite(self.gamma) or self.gamma <= 0:
            raise ValueError(f"gamma must be a finite number > 0, got {self.gamma!r}")
        self.gamma = float(self.gamma)
        if self.calibration_batches is not None and (
            not isinstance(self.calibration_batches, int)
            or isinstance(self.calibration_batches, bool)
            or self.calibration_batches <= 0
        ):
            raise ValueError(
                f"calibration_batches must be a positive integer or None, got {self.calibration_batches!r}"
            )
        if self.calibration_group_size is not None and (
            not isinstance(self.calibration_group_size, int)
            or isinstance(self.calibration_group_size, bool)
            or self.calibration_group_size <= 0
        ):
            raise ValueError(
                "calibration_group_size must be a positive integer or None, got "
                f"{self.calibration_group_size!r}"
            )
        if self.permutation not in SEARCHES:
            raise ValueError(f"permutation must be one of {SEARCHES}, got {self.permutation!r}")
        if self.locations not in LOCATIONS:
            raise ValueError(f"locations must be one of {LOCATIONS}, got {self.locations!r}")
        if not isinstance(self.permute, bool):
            raise ValueError(f"permute must be True or False, got {self.permute!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if not _is_number(self.prior_lr) or not math.isfinite(self.prior_lr) or self.prior_lr <= 0:
            raise ValueError(f"prior_lr must be a finite number > 0, got {self.prior_lr!r}")
        self.prior_lr = float(self.prior_lr)
        if (
            self.prior_rank is not None
            and self.prior_rank != "auto"
            and (
                not isinstance(self.prior_rank, int)
                or isinstance(self.prior_rank, bool)
                or self.prior_rank <= 0
            )
        ):
            raise ValueError(
                "prior_rank must be a positive integer (the sketched prior's rank), 'auto' (sketched where a layer "
                f"is at least {AUTO_SKETCH_MIN_WIDTH} wide on both sides) or None (the exact prior), got {self.prior_rank!r}"
            )
        if self.prior_rank not in (None, "auto") and self.prior == "trajectory":
            raise ValueError(
                "the trajectory prior has no sketched form (it steps the weights themselves): leave prior_rank=None "
                "or 'auto', or use prior='gradient' or 'adam' with prior_rank"
            )
        if self.prior == "trajectory" and self.calibration_group_size is not None:
            raise ValueError(
                "the trajectory prior steps every layer's weights together, so it cannot be calibrated in groups "
                "(calibration_group_size): leave calibration_group_size=None, or use prior='gradient' or 'adam'"
            )


@dataclass
class DCTConfig(FourierFTConfig):
    """DCT: ``ΔW = scaling / sqrt(2 d_out d_in) * C_outᵀ F C_in`` (:mod:`s2ft.ops.dct`), ``F`` zero but for the
    coefficients, at FourierFT's locations for the seed. ``scaling`` is in FourierFT's units: a coefficient moves
    ``ΔW`` as far (in Frobenius norm) in both bases. No mirror pairs: every location is a basis function.

    FourierFT's recipe in the real orthonormal 2-D DCT-II basis, LoCA's DCT parametrization without its location
    learning (the method: :mod:`s2ft.methods.dct`)."""

    method: ClassVar[str] = "dct"
    basis: ClassVar[str] = "dct"
    planned: ClassVar[bool] = False
    stores_locations: ClassVar[bool] = False
    peft_type: ClassVar[str | None] = None


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


CONFIGS[FourierFTConfig.method] = FourierFTConfig


def load_config(path: str | os.PathLike) -> FourierFTConfig:
    """Read an ``adapter_config.json`` (or the folder holding it) of any method in :data:`CONFIGS`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_NAME)
    return FourierFTConfig.from_json_file(path)
