"""Fine-tuning methods: one module each, one line each in :data:`METHODS`.

Everything else is derived from the methods' declarations (:class:`Method`): the jobs' option fields and flags
(:func:`options`), the variants of ``s2ft compare`` (:data:`VARIANTS`), and the methods the jobs need in a role
(:func:`full_method`, :func:`planning_method`, :func:`paired_baseline`).
"""

from __future__ import annotations

from s2ft.errors import RunError
from s2ft.methods.base import Method, Option, Variant
from s2ft.methods.dct import DCT
from s2ft.methods.full import Full
from s2ft.methods.lora import LoRA
from s2ft.methods.spectral import S2FT, FourierFT
from s2ft.methods.waveft import WaveFT
from s2ft.methods.wavelet import S2FTWavelet, Wavelet

METHODS: dict[str, Method] = {
    m.name: m for m in (FourierFT(), S2FT(), DCT(), LoRA(), WaveFT(), Wavelet(), S2FTWavelet(), Full())
}
DEFAULT_METHOD = S2FT.name


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise RunError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def _the(trait: str) -> Method:
    found = [m for m in METHODS.values() if getattr(m, trait)]
    if len(found) != 1:
        raise RuntimeError(f"exactly one method must have {trait}, found {[m.name for m in found]}")
    return found[0]


def full_method() -> Method:
    """The method that trains every weight: the head warm-up and analyze's short full fine-tune run as it."""
    return _the("trains_everything")


def planning_method() -> Method:
    """The method that plans its adapter from data (S2FT): what ``s2ft analyze`` measures."""
    return _the("plans")


def paired_baseline() -> Method:
    """The method ``s2ft compare`` subtracts from the other variants of its budget, seed by seed (FourierFT)."""
    return _the("paired_baseline")


def options() -> dict[str, Option]:
    """Every method's options by name, in the order the methods declare them (a shared option once)."""
    found: dict[str, Option] = {}
    for method in METHODS.values():
        for option in method.options:
            if found.setdefault(option.name, option) is not option:
                raise RuntimeError(f"two methods declare different options named {option.name!r}")
    return found


def owners(name: str) -> list[Method]:
    """The methods that declare the option ``name``."""
    return [m for m in METHODS.values() if any(o.name == name for o in m.options)]


def after_warmup() -> set[str]:
    """The names of the methods' options that do not change a warmed head (all but ``affects_warmup``)."""
    return {name for name, option in options().items() if not option.affects_warmup}


def _variants() -> dict[str, Variant]:
    found = [item for method in METHODS.values() for item in method.variants().items()]
    ordered = [item for item in found if not item[1].ablation] + [item for item in found if item[1].ablation]
    return dict(ordered)


# ``s2ft compare``'s variants by name: each method's main variants, then the ablations.
VARIANTS: dict[str, Variant] = _variants()

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "VARIANTS",
    "Method",
    "Option",
    "Variant",
    "after_warmup",
    "full_method",
    "get_method",
    "options",
    "owners",
    "paired_baseline",
    "planning_method",
]
