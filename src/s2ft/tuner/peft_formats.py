"""Hugging Face PEFT's adapter files: FourierFT both ways (:mod:`s2ft.tuner.peft_fourierft`), loading one into a
:class:`s2ft.SpectralModel`, a ``wavelet`` adapter written as PEFT's WaveFT (:func:`save_peft_waveft`), and any
spectral adapter exported as a LoRA adapter.

LoRA export: each ``ΔW`` ``(d_out, d_in)`` (the layer kind's matrix view) is factored by a truncated SVD,
``ΔW ≈ B A`` with ``B = U_r √S_r`` ``(d_out, r)`` and ``A = √S_r V_rᵀ`` ``(r, d_in)``, and written with
``lora_alpha = r`` per layer (PEFT's scaling ``alpha / r`` is then 1). The rank is fixed, or chosen per layer as the
smallest that keeps a share of ``ΔW``'s energy (``Σ s_i²``), through PEFT's ``rank_pattern``/``alpha_pattern``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from s2ft.tuner.distributed import full
from s2ft.tuner.model import SpectralModel
from s2ft.tuner.peft_fourierft import (  # noqa: F401 (this module's public names since before the split)
    FOURIERFT,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    fourierft_to_peft,
    is_peft_folder,
    peft_shapes,
    read_peft_fourierft,
    save_peft_fourierft,
    saved_modules,
    write_peft_folder,
)


def lora_factors(delta: torch.Tensor, rank: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, relative error)`` of the best rank-``r`` approximation ``B A`` of ``delta`` ``(d_out, d_in)``.

    ``rank >= 1`` is the rank (at most ``min(d_out, d_in)``); ``0 < rank < 1`` keeps the smallest rank whose
    singular values hold that share of the energy ``Σ s_i²``. ``A`` ``(r, d_in)``, ``B`` ``(d_out, r)``, float32;
    the error is ``||delta - B A||_F / ||delta||_F`` (0 for a zero matrix), computed in float64.
    """
    matrix = delta.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    energy = s.square()
    total = float(energy.sum())
    if rank < 1:
        if not rank > 0:
            raise ValueError(f"rank must be a positive integer or an energy share in (0, 1), got {rank}")
        kept = torch.cumsum(energy, 0) / total if total > 0 else torch.ones_like(energy)
        r = int(torch.searchsorted(kept, torch.tensor(rank, dtype=torch.float64) - 1e-12)) + 1
    else:
        if rank != int(rank):
            raise ValueError(f"rank must be a positive integer or an energy share in (0, 1), got {rank}")
        r = int(rank)
    r = max(1, min(r, s.numel()))
    root = s[:r].sqrt()
    b, a = u[:, :r] * root, root[:, None] * vh[:r]
    error = math.sqrt(max(float(energy[r:].sum()), 0.0) / total) if total > 0 else 0.0
    return a.float(), b.float(), error


def export_lora(
    model: SpectralModel, directory: str | os.PathLike, rank: float, adapter_name: str | None = None
) -> dict[str, dict[str, float]]:
    """Write every adapted module's ``ΔW`` of one adapter (``adapter_name``, default the active one; either
    method) of a :class:`s2ft.SpectralModel` as a PEFT LoRA adapter in ``directory``, loadable with
    ``peft.PeftModel.from_pretrained`` on the same base model. Its trained ``modules_to_save`` are written too.
    Returns ``{module: {"rank": r, "relative_error": e}}``."""
    adapter = adapter_name or model.active_adapter
    state: dict[str, torch.Tensor] = {}
    report: dict[str, dict[str, float]] = {}
    fan_in_fan_out = False
    for name, layer in model._layers_of(adapter).items():
        a, b, error = lora_factors(layer.delta_weight(adapter), rank)
        a, b = layer.kind.lora_weights(layer.base_layer, a, b)
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous().cpu()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous().cpu()
        report[name] = {"rank": a.shape[0], "relative_error": error}
        fan_in_fan_out = fan_in_fan_out or layer.kind.lora_fan_in_fan_out
    state.update(saved_modules(model, adapter))
    ranks = {name: int(r["rank"]) for name, r in report.items()}
    top = max(ranks.values())
    config = model.peft_config[adapter]
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": {n: r for n, r in ranks.items() if r != top},
        "alpha_pattern": {n: r for n, r in ranks.items() if r != top},
        "target_modules": sorted(ranks),
        "modules_to_save": config.modules_to_save,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }
    write_peft_folder(directory, peft_config, state)
    return report


def load_peft_fourierft(
    model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False
) -> SpectralModel:
    """Wrap ``model`` with the FourierFT adapter of a PEFT folder: a :class:`s2ft.SpectralModel` with the same
    locations and coefficients, and so the same outputs, trained and served on s2ft's paths. (The same as
    ``SpectralModel.from_pretrained``, which reads PEFT folders too.)"""
    return SpectralModel.from_pretrained(model, directory, is_trainable=is_trainable)


WAVEFT = "WAVEFT"  # PEFT's type of the WaveFT adapter
WAVEFT_SCALING = 25.0  # the scaling written into an exported PEFT WaveFT config (PEFT's default)


def waveft_to_peft(
    model: SpectralModel, adapter_name: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's ``adapter_config.json`` content and tensors for a ``wavelet`` adapter (WaveFT's recipe) of a
    :class:`s2ft.SpectralModel`: ``peft.PeftModel.from_pretrained`` then computes the same ``ΔW``.

    PEFT draws the same locations from the seed (``randperm`` of ``d_out * d_in``) in its own quadrant layout
    (:func:`s2ft.ops.wavelet.to_peft_layout`) and writes ``ΔW = scaling_peft * waverec2d(F)``, so each coefficient
    is written as ``c * σ / scaling_peft`` with ``σ = scaling / sqrt(2 d_out d_in)`` of its layer and
    ``scaling_peft = 25``. PEFT has one level, Haar's even shapes (it pads and crops an odd side), Linear and
    Conv1D only: anything else is refused before anything is written."""
    from transformers.pytorch_utils import Conv1D

    name = adapter_name or model.active_adapter
    config = model.peft_config[name]
    if not getattr(config, "peft_waveft", False):  # a behaviour of the config, not its name
        raise ValueError(
            f"a {config.method!r} adapter has no Hugging Face PEFT WaveFT form (only the 'wavelet' method, "
            "WaveFT's recipe, has: PEFT's WaveFT has no permutations nor planned locations); merge it or export "
            "it as LoRA (s2ft export-lora)"
        )
    levels = getattr(config, "levels", 1)
    if levels != 1:
        raise ValueError(
            f"PEFT's WaveFT has one wavelet level; this adapter has levels={levels}: merge it or export "
            "it as LoRA"
        )
    layers = model._layers_of(name)
    state: dict[str, torch.Tensor] = {}
    fan_in_fan_out = set()
    for module, layer in layers.items():
        base = layer.base_layer
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise ValueError(
                f"{module} is a {type(base).__name__}; PEFT's WaveFT adapts nn.Linear and Conv1D only"
            )
        if layer.d_out % 2 or layer.d_in % 2:
            raise ValueError(
                f"{module} has shape ({layer.d_out}, {layer.d_in}); PEFT's WaveFT pads an odd side and crops, "
                "which is not this orthonormal basis: only even shapes export"
            )
        fan_in_fan_out.add(isinstance(base, Conv1D))
        sigma = layer.scaling / math.sqrt(2 * layer.d_out * layer.d_in)
        coeffs = full(layer.adapters[name].coeffs).detach().double() * (sigma / WAVEFT_SCALING)
        state[f"{PEFT_PREFIX}{module}.waveft_spectrum"] = coeffs.float()
    if len(fan_in_fan_out) > 1:
        raise ValueError("PEFT's WaveFT config has one fan_in_fan_out: Linear and Conv1D targets cannot mix")
    state.update(saved_modules(model, name))
    base_model = model.get_base_model()
    peft_config = {
        "peft_type": WAVEFT,
        "task_type": None,
        "n_frequency": config.n_frequency,
        "scaling": WAVEFT_SCALING,
        "wavelet_family": "db1",
        "use_idwt": True,
        "random_loc_seed": config.seed,
        "target_modules": sorted(layers),
        "modules_to_save": config.modules_to_save,
        "fan_in_fan_out": fan_in_fan_out == {True},
        "init_weights": True,
        "proportional_parameters": False,
        "inference_mode": True,
        "bias": "none",
        "base_model_name_or_path": getattr(getattr(base_model, "config", None), "_name_or_path", None)
        or None,
    }
    return peft_config, {k: v.contiguous().cpu() for k, v in state.items()}


def save_peft_waveft(
    model: SpectralModel, directory: str | os.PathLike, adapter_name: str | None = None
) -> None:
    """Write a ``wavelet`` adapter as PEFT's WaveFT writes it, for ``peft.PeftModel.from_pretrained``
    (:func:`waveft_to_peft`); everything is checked before the folder is written (atomically, file by file)."""
    peft_config, state = waveft_to_peft(model, adapter_name)
    write_peft_folder(directory, peft_config, state, peft_shapes(model, adapter_name or model.active_adapter))
