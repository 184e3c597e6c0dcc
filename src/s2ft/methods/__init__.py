"""Fine-tuning methods: one module each, one line each in :data:`METHODS`."""

from __future__ import annotations

from s2ft.errors import RunError
from s2ft.methods.base import Method
from s2ft.methods.full import Full
from s2ft.methods.lora import LoRA
from s2ft.methods.spectral import S2FT, FourierFT
from s2ft.methods.waveft import WaveFT

METHODS: dict[str, Method] = {m.name: m for m in (S2FT(), FourierFT(), LoRA(), WaveFT(), Full())}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise RunError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "get_method"]
