"""Hugging Face PEFT's FourierFT adapter folder, both ways.

PEFT's FourierFT stores one ``fourierft_spectrum`` ``(n,)`` per adapted module and derives its locations from
``random_loc_seed``, exactly as s2ft's FourierFT does (same draw, same ``ΔW``), so the two formats carry the same
adapter. Only a config whose ``peft_type`` is PEFT's ``"FOURIERFT"`` is written so; S2FT has no PEFT type (its
permutations and sampled locations have no place there). The functions take a :class:`s2ft.SpectralModel` and
never import it (:mod:`s2ft.tuner.peft_formats` holds what builds one).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from s2ft.config import CONFIG_NAME, FourierFTConfig
from s2ft.io import atomic_write, atomic_write_text
from s2ft.tuner.adapter_io import metadata_shapes
from s2ft.tuner.distributed import full

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
        f"{PEFT_PREFIX}{module}.fourierft_spectrum": full(layer.adapters[name].coeffs).detach().float()
        for module, layer in model._layers_of(name).items()
    }
    state.update(saved_modules(model, name))
    base = model.get_base_model()
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
    write_peft_folder(directory, peft_config, state, peft_shapes(model, adapter_name or model.active_adapter))


def peft_shapes(model: Any, adapter_name: str) -> dict[str, list[int]]:
    """``{module: [d_out, d_in]}`` of an adapter's layers: s2ft writes them in the PEFT file's metadata (PEFT
    ignores it), so that loading it on a model of other shapes is refused."""
    return {module: [layer.d_out, layer.d_in] for module, layer in model._layers_of(adapter_name).items()}


_PEFT_FIELDS = {
    "target_modules": "the names of the adapted modules",
    "n_frequency": "the number of spectral coefficients per layer",
    "scaling": "the scale of ΔW",
}


def read_peft_fourierft(directory: str | os.PathLike) -> tuple[FourierFTConfig, dict[str, torch.Tensor]]:
    """A PEFT FourierFT adapter folder as an s2ft config and the s2ft-format tensors ``{module}.coeffs`` and
    ``modules_to_save.{module}.{key}`` (locations follow from the seed). Another PEFT type, a config missing a
    field and an unreadable weights file are refused with a one-line ``ValueError`` naming the file."""
    config_path = os.path.join(directory, CONFIG_NAME)
    with open(config_path, encoding="utf-8") as f:
        data = json.load(f)
    peft_type = str(data.get("peft_type", "")).upper()
    if peft_type != FOURIERFT:
        raise ValueError(
            f"{directory} holds a Hugging Face PEFT {peft_type} adapter; s2ft reads PEFT's FOURIERFT adapters only "
            "(load this one with peft.PeftModel.from_pretrained)"
        )
    if data.get("fan_in_fan_out"):
        raise ValueError(f"{directory}: fan_in_fan_out=True PEFT FourierFT adapters are not supported")
    for field, meaning in _PEFT_FIELDS.items():
        if data.get(field) is None:
            raise ValueError(
                f"PEFT FourierFT config {config_path} has no {field!r} ({meaning}); add it, or save the adapter "
                "again with PEFT or s2ft"
            )
    try:
        config = FourierFTConfig(
            target_modules=data["target_modules"],
            modules_to_save=data.get("modules_to_save") or None,
            n_frequency=data["n_frequency"],
            scaling=data["scaling"],
            seed=data.get("random_loc_seed", 777),
            init="zeros" if data.get("init_weights", False) else "normal",
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"PEFT FourierFT config {config_path}: {e}") from None
    state = {}
    for key, value in _read_weights(directory)[0].items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith(".fourierft_spectrum"):
            state[name.removesuffix(".fourierft_spectrum") + ".coeffs"] = value
        else:
            state[f"modules_to_save.{name}"] = value
    return config, state


def _read_weights(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a PEFT folder's weights file, or a one-line error naming it."""
    path = os.path.join(directory, PEFT_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter weights at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(path), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"adapter file {path} is truncated or corrupt ({type(e).__name__}: {e}); save the adapter again"
        ) from None


def read_peft_shapes(
    directory: str | os.PathLike, targets: list[str] | None = None
) -> dict[str, list[int]] | None:
    """The ``{module: [d_out, d_in]}`` s2ft wrote in a PEFT folder's weights file (:func:`peft_shapes`), or None
    for a file written by PEFT (it records no shapes). With ``targets`` (the modules the adapter's config targets
    in the model), a file without the spectrum of one of them is refused naming it."""
    state, metadata = _read_weights(directory)
    names = sorted(
        k.removeprefix(PEFT_PREFIX).removesuffix(".fourierft_spectrum")
        for k in state
        if k.endswith(".fourierft_spectrum")
    )
    path = os.path.join(directory, PEFT_WEIGHTS)
    missing = sorted(set(targets or ()) - set(names))
    if missing:
        raise ValueError(
            f"adapter file {path} has no spectrum for {missing[0]} ({PEFT_PREFIX}{missing[0]}.fourierft_spectrum)"
            + (f" and {len(missing) - 1} other targeted modules" if len(missing) > 1 else "")
            + ", which the adapter's config targets in this model: the file is incomplete; save the adapter again"
        )
    if "s2ft_shapes" not in metadata:
        return None
    try:
        return metadata_shapes(metadata, names)
    except ValueError as e:
        raise ValueError(f"adapter file {path}: {e}") from None


def saved_modules(model: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """An adapter's trained ``modules_to_save`` under PEFT's keys (``base_model.model.{module}.{key}``)."""
    return {
        f"{PEFT_PREFIX}{name}.{key}": value.detach()
        for name, module in model._trained_copies().items()
        if adapter_name in module.copies
        for key, value in module.copies[adapter_name].state_dict().items()
    }


def write_peft_folder(
    directory: str | os.PathLike,
    peft_config: dict[str, Any],
    state: dict[str, torch.Tensor],
    shapes: dict[str, list[int]] | None = None,
) -> None:
    """A PEFT adapter folder: ``adapter_model.safetensors`` and ``adapter_config.json``; with ``shapes``
    (:func:`peft_shapes`), the weights file's metadata ``s2ft_shapes`` lists them in the sorted order of the
    modules' names."""
    metadata = {"format": "pt"}
    if shapes is not None:
        metadata["s2ft_shapes"] = json.dumps([shapes[n] for n in sorted(shapes)], separators=(",", ":"))
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, PEFT_WEIGHTS), lambda tmp: save_file(state, tmp, metadata=metadata))
    atomic_write_text(os.path.join(directory, CONFIG_NAME), json.dumps(peft_config, indent=2) + "\n")
