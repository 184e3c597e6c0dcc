"""The adapter folder: ``adapter_config.json`` and ``adapter_model.safetensors``, read and checked against a model.

The weights file holds float32 coefficients, locations and permutations in the smallest integer dtype that fits,
and the trained ``modules_to_save``; its metadata ``s2ft_shapes`` lists the ``[d_out, d_in]`` of the adapted
modules in the sorted order of their names (files of earlier versions map names to shapes in ``s2ft_layers``).
Everything is checked before the model is touched.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from s2ft.config import CONFIG_NAME, FourierFTConfig
from s2ft.io import atomic_write_group
from s2ft.ops.permutation import is_permutation
from s2ft.tuner.kinds import layer_shape

WEIGHTS_NAME = "adapter_model.safetensors"
SAVE_PREFIX = "modules_to_save."


def read_adapter(path: str) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter weights at {path}")
    try:
        state = load_file(path)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        if "s2ft_layers" in metadata:
            shapes = json.loads(metadata["s2ft_layers"])
        else:
            names = sorted(k.removesuffix(".coeffs") for k in state if k.endswith(".coeffs"))
            listed = json.loads(metadata["s2ft_shapes"])
            if len(listed) != len(names):
                raise ValueError(f"{len(listed)} shapes for {len(names)} adapted modules")
            shapes = dict(zip(names, listed))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"adapter file {path} is truncated or corrupt ({type(e).__name__}: {e}); save the adapter again"
        ) from None
    return state, shapes


def check_adapter(
    state: dict[str, torch.Tensor],
    shapes: dict[str, list[int]],
    config: FourierFTConfig,
    targets: list[tuple[str, nn.Module]],
    saves: list[tuple[str, nn.Module]],
) -> None:
    """Raise a ``ValueError`` naming the first mismatch between the adapter file and the model."""
    model_shapes = {name: list(layer_shape(module)) for name, module in targets}
    if set(model_shapes) != set(shapes):
        missing, extra = sorted(set(shapes) - set(model_shapes)), sorted(set(model_shapes) - set(shapes))
        raise ValueError(
            "the adapter does not fit this model: "
            f"adapted in the file but not found in the model: {missing[:5]}; targeted in the model but not in the file: {extra[:5]}"
        )
    n = config.n_frequency
    for name, shape in model_shapes.items():
        if shapes[name] != shape:
            raise ValueError(
                f"the adapter does not fit this model: {name} is {shapes[name]} in the file, {shape} in the model"
            )
        d_out, d_in = shape
        # A method that does not store its locations (FourierFT) leaves them out: they follow from the seed.
        needed = (
            ("coeffs",)
            if not config.stores_locations and f"{name}.rows" not in state
            else ("coeffs", "rows", "cols")
        )
        for key in needed:
            t = state.get(f"{name}.{key}")
            if t is None or tuple(t.shape) != (n,):
                raise ValueError(f"adapter file: {name}.{key} is missing or not of shape ({n},)")
        coeffs = state[f"{name}.coeffs"]
        if not coeffs.is_floating_point():
            raise ValueError(
                f"adapter file: the coefficients of {name} are {coeffs.dtype}, not floating point"
            )
        if not torch.isfinite(coeffs).all():
            raise ValueError(f"adapter file: the coefficients of {name} hold NaN or infinite values")
        for key in ("rows", "cols", "perm_rows", "perm_cols"):
            t = state.get(f"{name}.{key}")
            if t is not None and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
                raise ValueError(f"adapter file: {name}.{key} is {t.dtype}; indices must be integers")
        if "rows" not in needed:
            continue
        rows, cols = state[f"{name}.rows"].long(), state[f"{name}.cols"].long()
        if rows.min() < 0 or rows.max() >= d_out or cols.min() < 0 or cols.max() >= d_in:
            raise ValueError(f"adapter file: locations of {name} fall outside its {d_out}x{d_in} spectrum")
        if torch.unique(rows * d_in + cols).numel() != n:
            raise ValueError(f"adapter file: {name} has the same spectrum location more than once")
        if (f"{name}.perm_rows" in state) != (f"{name}.perm_cols" in state):
            raise ValueError(f"adapter file: {name} has only one of its two permutations")
        if f"{name}.perm_rows" in state and not (
            is_permutation(state[f"{name}.perm_rows"], d_out)
            and is_permutation(state[f"{name}.perm_cols"], d_in)
        ):
            raise ValueError(
                f"adapter file: the permutations of {name} are not permutations of its rows and columns"
            )
    for name, module in saves:
        prefix = f"{SAVE_PREFIX}{name}."
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        found = {k[len(prefix) :]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
        if expected != found:
            raise ValueError(f"adapter file: the saved weights of {name} do not fit that module of the model")


def write_adapter_folder(
    directory: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, str], config_text: str
) -> None:
    """Write the weights file and the config of an adapter folder together (all or nothing)."""

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(config_text)

    atomic_write_group(
        {
            os.path.join(directory, WEIGHTS_NAME): lambda tmp: save_file(state, tmp, metadata=metadata),
            os.path.join(directory, CONFIG_NAME): write_config,
        }
    )


def check_adapter_folder(path: str | os.PathLike) -> str:
    """``path`` as the adapter folder to read, or a clear error: given the weights file or the config file itself,
    say to pass the folder that holds them."""
    path = os.fspath(path)
    if os.path.isfile(path):
        raise ValueError(
            f"{path} is a file; pass the adapter folder that holds {CONFIG_NAME} and {WEIGHTS_NAME} "
            f"({os.path.dirname(os.path.abspath(path))})"
        )
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no adapter folder at {path}")
    return path
