"""Hugging Face PEFT's adapter files: FourierFT both ways, and any spectral adapter exported as a LoRA adapter.

PEFT's FourierFT stores one ``fourierft_spectrum`` ``(n,)`` per adapted module and derives its locations from
``random_loc_seed``, exactly as s2ft's FourierFT does (same draw, same ``ΔW``), so the two formats carry the same
adapter. S2FT has no PEFT type (its permutations and sampled locations have no place there): it is exported by
merging, or as LoRA.

LoRA export: each ``ΔW`` ``(d_out, d_in)`` (the layer kind's matrix view) is factored by a truncated SVD,
``ΔW ≈ B A`` with ``B = U_r √S_r`` ``(d_out, r)`` and ``A = √S_r V_rᵀ`` ``(r, d_in)``, and written with
``lora_alpha = r`` per layer (PEFT's scaling ``alpha / r`` is then 1). The rank is fixed, or chosen per layer as the
smallest that keeps a share of ``ΔW``'s energy (``Σ s_i²``), through PEFT's ``rank_pattern``/``alpha_pattern``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from s2ft.config import CONFIG_NAME, FourierFTConfig
from s2ft.io import atomic_write, atomic_write_text

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
FOURIERFT = "FOURIERFT"  # PEFT's type of the FourierFT adapter (a config's peft_type)


def is_peft_folder(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a PEFT adapter config (a ``peft_type`` field)."""
    try:
        with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
            return "peft_type" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------- FourierFT
def fourierft_to_peft(
    model: Any, adapter_name: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's ``adapter_config.json`` content and tensors for a FourierFT adapter of a :class:`s2ft.SpectralModel`
    (``adapter_name``, default the active one)."""
    name = adapter_name or model.active_adapter
    config = model.peft_config[name]
    if config.peft_type != FOURIERFT:
        raise ValueError(
            f"a {config.method!r} adapter has no Hugging Face PEFT format (PEFT has no type for it; S2FT's "
            "permutations and sampled locations have no place there); merge it into the model (merge_and_unload, "
            "s2ft merge) or export it as LoRA (s2ft export-lora, s2ft.export_lora)"
        )
    state = {
        f"{PEFT_PREFIX}{module}.fourierft_spectrum": layer.adapters[name].coeffs.detach().float()
        for module, layer in model._layers_of(name).items()
    }
    state.update(_saved_modules(model, name))
    base = model.base_model
    peft_config = {
        "peft_type": FOURIERFT,
        "task_type": None,
        "n_frequency": config.n_frequency,
        "scaling": config.scaling,
        "random_loc_seed": config.seed,
        "target_modules": config.target_modules,
        "modules_to_save": config.modules_to_save,
        "fan_in_fan_out": False,
        "init_weights": config.init == "zeros",
        "inference_mode": True,
        "bias": "none",
        "base_model_name_or_path": getattr(getattr(base, "config", None), "_name_or_path", None) or None,
    }
    return peft_config, {k: v.contiguous().cpu() for k, v in state.items()}


def save_peft_fourierft(model: Any, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Write a FourierFT adapter as PEFT writes it, for ``peft.PeftModel.from_pretrained``."""
    peft_config, state = fourierft_to_peft(model, adapter_name)
    _write(directory, peft_config, state)


def read_peft_fourierft(directory: str | os.PathLike) -> tuple[FourierFTConfig, dict[str, torch.Tensor]]:
    """A PEFT FourierFT adapter folder as an s2ft config and the s2ft-format tensors ``{module}.coeffs`` and
    ``modules_to_save.{module}.{key}`` (locations follow from the seed). Another PEFT type is refused."""
    with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
        data = json.load(f)
    peft_type = str(data.get("peft_type", "")).upper()
    if peft_type != FOURIERFT:
        raise ValueError(
            f"{directory} holds a Hugging Face PEFT {peft_type} adapter; s2ft reads PEFT's FOURIERFT adapters only "
            "(load this one with peft.PeftModel.from_pretrained)"
        )
    if data.get("fan_in_fan_out"):
        raise ValueError(f"{directory}: fan_in_fan_out=True PEFT FourierFT adapters are not supported")
    config = FourierFTConfig(
        target_modules=data["target_modules"],
        modules_to_save=data.get("modules_to_save") or None,
        n_frequency=data["n_frequency"],
        scaling=data["scaling"],
        seed=data.get("random_loc_seed", 777),
        init="zeros" if data.get("init_weights", False) else "normal",
    )
    raw = load_file(os.path.join(directory, PEFT_WEIGHTS))
    state = {}
    for key, value in raw.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith(".fourierft_spectrum"):
            state[name.removesuffix(".fourierft_spectrum") + ".coeffs"] = value
        else:
            state[f"modules_to_save.{name}"] = value
    return config, state


# ---------------------------------------------------------------------------------------------- LoRA
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
    model: Any, directory: str | os.PathLike, rank: float, adapter_name: str | None = None
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
        a, b = _lora_weights(layer.base_layer, a, b)
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous().cpu()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous().cpu()
        report[name] = {"rank": a.shape[0], "relative_error": error}
        fan_in_fan_out = fan_in_fan_out or layer.kind.name == "conv1d"
    state.update(_saved_modules(model, adapter))
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
    _write(directory, peft_config, state)
    return report


def _lora_weights(base: nn.Module, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``lora_A``/``lora_B`` weights for ``base``: the matrices for Linear and Conv1D; for Conv2d, ``A`` as a
    ``(r, in, kh, kw)`` convolution and ``B`` as a 1x1 one ``(out, r, 1, 1)``."""
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise ValueError("a grouped Conv2d has no PEFT LoRA form; merge the adapter instead")
        return a.reshape(a.shape[0], *base.weight.shape[1:]), b[:, :, None, None]
    return a, b


def _saved_modules(model: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """An adapter's trained ``modules_to_save`` under PEFT's keys (``base_model.model.{module}.{key}``)."""
    return {
        f"{PEFT_PREFIX}{name}.{key}": value.detach()
        for name, module in model._trained_copies().items()
        if adapter_name in module.copies
        for key, value in module.copies[adapter_name].state_dict().items()
    }


def _write(directory: str | os.PathLike, peft_config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    os.makedirs(directory, exist_ok=True)
    atomic_write(
        os.path.join(directory, PEFT_WEIGHTS), lambda tmp: save_file(state, tmp, metadata={"format": "pt"})
    )
    atomic_write_text(os.path.join(directory, CONFIG_NAME), json.dumps(peft_config, indent=2) + "\n")


def load_peft_fourierft(model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False) -> Any:
    """Wrap ``model`` with the FourierFT adapter of a PEFT folder: a :class:`s2ft.SpectralModel` with the same
    locations and coefficients, and so the same outputs, trained and served on s2ft's paths. (The same as
    ``SpectralModel.from_pretrained``, which reads PEFT folders too.)"""
    from s2ft.tuner.model import SpectralModel

    return SpectralModel.from_pretrained(model, directory, is_trainable=is_trainable)
