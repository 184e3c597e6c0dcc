"""Saving and loading a :class:`s2ft.SpectralModel`'s adapters: one adapter's tensors, its folder (s2ft's format
or PEFT's), and a folder read back and checked against a model. The format itself is :mod:`s2ft.tuner.adapter_io`.

The functions take the adapted layers (``{module name: SpectralLayer}``) and trained copies
(``{module name: TrainedCopy}``) of one adapter, or, to write folders, the model itself.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from s2ft.config import FourierFTConfig, load_config
from s2ft.ops.locations import smallest_int_dtype
from s2ft.tuner.adapter_io import (
    BASIS_KEY,
    FINGERPRINTS,
    SAVE_PREFIX,
    WEIGHTS_NAME,
    check_adapter,
    check_adapter_folder,
    check_basis,
    check_shapes,
    decode_file_plans,
    open_adapter,
    write_adapter_folder,
)
from s2ft.tuner.distributed import copy_into, full, is_sharded_model, on_main_then_wait
from s2ft.tuner.layers import DEFAULT, SpectralLayer, TrainedCopy
from s2ft.tuner.peft_fourierft import (
    fourierft_to_peft,
    is_peft_folder,
    peft_shapes,
    read_peft_fourierft,
    read_peft_shapes,
    write_peft_folder,
)
from s2ft.tuner.planner import base_fingerprints, recompute_base_plans
from s2ft.tuner.targets import base_of, resolve, shape_of

FORMATS = ("s2ft", "peft")
COEFFICIENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def adapter_state(
    layers: dict[str, SpectralLayer],
    copies: dict[str, TrainedCopy],
    adapter_name: str,
    config: FourierFTConfig,
    coefficient_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name``'s file, contiguous on the CPU: ``{module}.coeffs`` ``(n,)`` in
    ``coefficient_dtype``; if ``config.stores_locations``, ``{module}.rows``/``.cols`` ``(n,)``; any permutations
    ``perm_rows`` ``(d_out,)`` and ``perm_cols`` ``(d_in,)`` (indices in the smallest integer dtype that fits); and
    ``modules_to_save.{module}.{key}`` of its trained copies. Under FSDP or DeepSpeed ZeRO-3 the sharded tensors
    are gathered whole (every rank calls this and gets the same tensors)."""
    state: dict[str, torch.Tensor] = {}
    for module, layer in layers.items():
        adapter = layer.adapters[adapter_name]
        adapter._require_ready()
        rows_dtype, cols_dtype = smallest_int_dtype(layer.d_out - 1), smallest_int_dtype(layer.d_in - 1)
        state[f"{module}.coeffs"] = full(adapter.coeffs).detach().to(coefficient_dtype)
        if config.stores_locations:  # else they follow from the seed
            state[f"{module}.rows"] = adapter.rows.to(rows_dtype)
            state[f"{module}.cols"] = adapter.cols.to(cols_dtype)
        if adapter.perm_rows is not None and config.stores_permutations:  # else they follow from W0
            state[f"{module}.perm_rows"] = adapter.perm_rows.to(rows_dtype)
            state[f"{module}.perm_cols"] = adapter.perm_cols.to(cols_dtype)
    for module, copy in copies.items():
        if adapter_name in copy.copies:
            for key, value in copy.copies[adapter_name].state_dict(keep_vars=True).items():
                state[f"{SAVE_PREFIX}{module}.{key}"] = full(value).detach()
    if config.plan_from_base:  # the plan follows from W0: its fingerprint instead
        state[FINGERPRINTS] = base_fingerprints(layers, adapter_name, config)
    return {k: v.contiguous().cpu() for k, v in state.items()}


def shapes_metadata(layers: dict[str, SpectralLayer], basis: str | None = None) -> dict[str, str]:
    """The file's metadata: the shapes ``[d_out, d_in]`` of the adapted modules, in the sorted order of their
    names, and the coefficients' ``basis`` (metadata ``s2ft_basis``, checked when reading:
    :func:`s2ft.tuner.adapter_io.check_basis`)."""
    shapes = [[layers[name].d_out, layers[name].d_in] for name in sorted(layers)]
    metadata = {"format": "pt", "s2ft_shapes": json.dumps(shapes, separators=(",", ":"))}
    if basis is not None:
        metadata[BASIS_KEY] = basis
    return metadata


def check_save_options(format: str, coefficient_dtype: torch.dtype, has_layers: bool) -> None:
    """Refuse an unknown ``format`` or ``coefficient_dtype``, and a model with no adapted layer left."""
    if format not in FORMATS:
        raise ValueError(f"format must be 's2ft' or 'peft', got {format!r}")
    if coefficient_dtype not in COEFFICIENT_DTYPES:
        raise ValueError(
            f"coefficient_dtype must be torch.float32, float16 or bfloat16, got {coefficient_dtype}"
        )
    if not has_layers:
        raise RuntimeError(
            "this model holds no adapter any more (merge_and_unload() folded it into the base weights), so there "
            "is nothing to save as an adapter: save before merge_and_unload(), or save the merged model with its "
            "own save_pretrained"
        )


def write_adapters(
    model: Any,
    save_directory: str | os.PathLike,
    names: list[str],
    format: str = "s2ft",
    coefficient_dtype: torch.dtype = torch.float32,
) -> None:
    """Write adapters ``names`` of a :class:`s2ft.SpectralModel` (:meth:`s2ft.SpectralModel.save_pretrained`):
    :data:`DEFAULT` in ``save_directory``, the others in subfolders named after them; each folder as a whole.

    A model sharded by FSDP (or partitioned by DeepSpeed ZeRO-3) is saved by every rank together: the tensors are gathered whole on every rank, rank 0
    writes, and the others wait for it. Otherwise the calling process writes (under DDP, rank 0 alone may call)."""
    sharded = is_sharded_model(model)
    if format == "peft":
        for name in names:  # refuses an adapter without a PEFT type before anything is written
            fourierft_to_peft(model, name)
    for name in names:
        directory = os.fspath(save_directory) if name == DEFAULT else os.path.join(save_directory, name)
        if format == "peft":
            peft_config, state = fourierft_to_peft(model, name)
            state = {key: full(value) for key, value in state.items()}
        else:
            state = model.adapter_state_dict(name, coefficient_dtype)
        with on_main_then_wait(collective=sharded) as main:
            if main:
                os.makedirs(directory, exist_ok=True)
                if format == "peft":
                    write_peft_folder(directory, peft_config, state, peft_shapes(model, name))
                else:
                    config_text = json.dumps(model.peft_config[name].to_dict(), indent=2) + "\n"
                    write_adapter_folder(directory, state, model._metadata(name), config_text)


def read_folder(
    directory: str | os.PathLike, model: nn.Module, wrapped: bool
) -> tuple[FourierFTConfig, dict[str, torch.Tensor]]:
    """The config and tensors of an s2ft or PEFT FourierFT adapter folder, checked against ``model`` (which, with
    ``wrapped``, may hold adapters already). Changes nothing."""
    directory = check_adapter_folder(directory)
    weights = os.path.join(directory, WEIGHTS_NAME)  # PEFT's file has the same name
    metadata: dict[str, str] | None = None
    shapes: dict[str, list[int]] | None = None
    if is_peft_folder(directory):
        config, state = read_peft_fourierft(directory)
    else:
        config = load_config(directory)
        state, metadata, shapes = open_adapter(weights)  # checked, plans not decoded yet
    targets, saves = resolve(model, config, wrapped_ok=wrapped)
    bases, saved = [(n, base_of(m)) for n, m in targets], [(n, base_of(m)) for n, m in saves]
    try:
        if metadata is not None:  # the coefficients' basis first: a file of another basis is not read further
            check_basis(metadata, config)
        if metadata is None:
            shapes = read_peft_shapes(directory, [n for n, _ in targets])
        if shapes is None:  # a file PEFT wrote records no shapes
            shapes = {name: list(shape_of(module)) for name, module in targets}
        # the shapes against the model's before any plan is decoded (a forged shape would take forever)
        check_shapes(shapes, bases)
        if metadata is not None:
            state = decode_file_plans(weights, state, metadata, shapes)
        check_adapter(state, shapes, config, bases, saved)
    except ValueError as e:  # one line naming the file
        message = str(e).removeprefix("adapter file: ").removeprefix(f"adapter file {weights}: ")
        if message.startswith(f"adapter file {weights} "):
            raise ValueError(message) from None
        raise ValueError(f"adapter file {weights}: {message}") from None
    if config.plan_from_base:  # recomputed from W0, or refused on another base model
        state = recompute_base_plans(state, config, {n: base_of(m) for n, m in targets}, FINGERPRINTS)
    return config, state


def fill(
    layers: dict[str, SpectralLayer],
    copies: dict[str, TrainedCopy],
    adapter_name: str,
    state: dict[str, torch.Tensor],
) -> None:
    """Copy a checked file's tensors (:func:`read_folder`) into adapter ``adapter_name``'s layers and copies
    (sharded ones keep their slice: under FSDP every rank passes the whole file)."""
    with torch.no_grad():
        for name, layer in layers.items():
            adapter = layer.adapters[adapter_name]
            copy_into(adapter.coeffs, state[f"{name}.coeffs"])  # a sharded one keeps its slice
            if f"{name}.rows" in state:  # else the seeded ones are in place
                perms = [state.get(f"{name}.perm_rows"), state.get(f"{name}.perm_cols")]
                adapter.set_locations(state[f"{name}.rows"], state[f"{name}.cols"], *perms)
        for name, copy in copies.items():
            if adapter_name in copy.copies:
                prefix = f"{SAVE_PREFIX}{name}."
                sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                module = copy.copies[adapter_name]
                if not is_sharded_model(module):
                    module.load_state_dict(sub, strict=True)
                    continue
                target = module.state_dict(keep_vars=True)  # FSDP: each rank keeps its slice
                for key in set(sub) | set(target):
                    if key not in sub or key not in target:
                        raise KeyError(f"{prefix}{key}: in the file or the module but not both")
                    copy_into(target[key], sub[key])
