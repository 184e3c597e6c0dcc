"""Where adapters go: PEFT's target matching (and ``"all-linear"``), the checks made before anything changes, and
the injection that wraps the targets, all or nothing; then what acts on every wrapper of a model at once:
activation, removal, and unwrapping, which gives the modules back. The one place that changes the modules of the
user's model.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from s2ft.config import ALL_LINEAR, FourierFTConfig
from s2ft.ops.bases import get_basis
from s2ft.ops.locations import check_n_frequency
from s2ft.tuner.kinds import find_kind, layer_shape, supported_names, unsupported_quantized
from s2ft.tuner.layers import BASE, SpectralLayer, TrainedCopy
from s2ft.tuner.walk import outer_modules, outer_named_parameters


def matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list entry matches exactly or as a suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def shape_of(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a supported layer or of an adapted one."""
    return (module.d_out, module.d_in) if isinstance(module, SpectralLayer) else layer_shape(module)


def output_layer(model: nn.Module) -> nn.Module | None:
    """The model's output layer (an LM head), which ``"all-linear"`` leaves out; None if it has none."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def is_target(name: str, module: nn.Module, config: FourierFTConfig, output: nn.Module | None) -> bool:
    """PEFT's rules, and ``"all-linear"``: every layer whose kind counts as linear (``LayerKind.all_linear``:
    Linear and Conv1D) but the output layer (an LM head) and the modules to save."""
    if config.target_modules == ALL_LINEAR:
        base = module.base_layer if isinstance(module, SpectralLayer) else module
        saved = bool(config.modules_to_save and matches(name, config.modules_to_save))
        kind = find_kind(base)
        linear = (kind is not None and kind.all_linear) or unsupported_quantized(base)
        return linear and base is not output and not saved
    return config.target_modules is not None and matches(name, config.target_modules)


def resolve(
    model: nn.Module, config: FourierFTConfig, wrapped_ok: bool = False
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """The modules to adapt and to train fully, after checking every one of them. Changes nothing.

    With ``wrapped_ok`` (adding an adapter to a wrapped model), adapted layers and trained copies count as the
    modules they wrap; what is inside them is never a target.
    """
    output = output_layer(model)
    targets: list[tuple[str, nn.Module]] = []
    saves: list[tuple[str, nn.Module]] = []
    unsupported: list[str] = []
    inside: list[str] = []
    linear_names = []
    for name, module in outer_modules(model):
        if not name or any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, (SpectralLayer, TrainedCopy)):
            if not wrapped_ok:
                raise ValueError(
                    f"the model already holds s2ft adapters (at {name!r}); wrap an unwrapped model, or add "
                    "another adapter with SpectralModel.add_adapter"
                )
            inside.append(name)
        supported = isinstance(module, SpectralLayer) or find_kind(module) is not None
        if supported:
            linear_names.append(name)
        if is_target(name, module, config, output):
            if supported:
                targets.append((name, module))
            else:
                unsupported.append(f"{name} ({type(module).__name__})")
        elif (
            config.modules_to_save
            and matches(name, config.modules_to_save)
            and not any(name.startswith(s + ".") for s, _ in saves)
        ):
            saves.append((name, module))
    quantized = [f"{n} ({type(m).__name__})" for n, m in outer_modules(model) if unsupported_quantized(m)]
    if quantized and any(u in quantized for u in unsupported):
        raise TypeError(
            f"the model holds quantized layers of a kind s2ft cannot adapt: {', '.join(quantized[:5])}; "
            "the quantized layers it adapts are bitsandbytes' (load the model with a BitsAndBytesConfig) and "
            "torchao's (quantize_ with a weight-only config); "
            f"supported: {supported_names()}"
        )
    if unsupported:
        raise TypeError(
            f"target_modules matched modules s2ft cannot adapt: {', '.join(unsupported[:5])}; "
            f"only {supported_names()} are supported: narrow target_modules to those layers"
        )
    if not targets:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of the model; "
            f"its linear layers are named (by suffix): {suffixes[:20]}"
        )
    both = [t for t, _ in targets if config.modules_to_save and matches(t, config.modules_to_save)]
    if both:
        raise ValueError(
            f"{', '.join(both[:3])} matched both target_modules and modules_to_save; a module is either adapted "
            "or trained fully: take it out of one of them"
        )
    if config.modules_to_save and not saves:
        raise ValueError(f"modules_to_save={config.modules_to_save!r} matched no module of the model")
    for kept, _ in saves:
        held = [t for t, _ in targets if t.startswith(kept + ".")]
        if held:
            raise ValueError(
                f"modules_to_save names {kept!r}, which holds adapted modules ({', '.join(held[:3])}): a module "
                "is either trained fully or adapted, not both; name only new heads in modules_to_save"
            )
    for name, module in targets:
        try:
            check_n_frequency(config.n_frequency, *shape_of(module))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    warn_tied(model, targets)
    return targets, saves


def warn_tied(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    """Warn, as PEFT does, when a target's weight is tied to another parameter: merging changes both."""
    owners: dict[int, list[str]] = {}
    for name, param in outer_named_parameters(model):  # the adapters' own coefficients tie nothing
        owners.setdefault(id(param), []).append(name)
    for name, module in targets:
        weight = (module.base_layer if isinstance(module, SpectralLayer) else module).weight
        tied = [n for n in owners.get(id(weight), []) if not n.startswith(name + ".")]
        if tied:
            warnings.warn(
                f"{name}'s weight is tied to {', '.join(tied)}: merging the adapter changes both",
                stacklevel=3,
            )


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def base_of(module: nn.Module) -> nn.Module:
    """The module an adapted layer or a trained copy wraps (the module itself otherwise)."""
    if isinstance(module, SpectralLayer):
        return module.base_layer
    return module.original_module if isinstance(module, TrainedCopy) else module


def inject(model: nn.Module, adapter_name: str, config: FourierFTConfig, wrapped_ok: bool = False) -> None:
    """Add adapter ``adapter_name`` on every target of ``config`` in ``model`` (wrapping each target in a
    :class:`SpectralLayer`, each module to save in a :class:`TrainedCopy`, or adding to the wrapper already
    there with ``wrapped_ok``), or, on any error, nothing. Seeded locations (``config.seeded_locations``) are
    installed; planned ones wait for calibration."""
    targets, saves = resolve(model, config, wrapped_ok=wrapped_ok)
    seeded: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor] | None] = {}
    undo: list[Callable[[], Any]] = []
    basis = get_basis(config.basis)
    options = (config.n_frequency, config.scaling, config.init, config.forward_path, basis)
    try:
        for name, module in targets:
            if isinstance(module, SpectralLayer):
                module.add_adapter(adapter_name, *options)
                undo.append(functools.partial(module.delete_adapter, adapter_name))
                layer = module
            else:
                layer = SpectralLayer(module, *options, adapter_name=adapter_name)
                set_submodule(model, name, layer)
                undo.append(functools.partial(set_submodule, model, name, module))
            shape = (layer.d_out, layer.d_in)
            if shape not in seeded:  # the same draw for every layer of a shape, as PEFT's
                seeded[shape] = config.seeded_locations(*shape)  # None: planned by calibrate()
            locations = seeded[shape]
            if locations is not None:
                # each layer its own tensors: shared ones break safetensors checkpoints ("share memory")
                layer.adapters[adapter_name].set_locations(*(t.clone() for t in locations))
        for name, module in saves:
            if isinstance(module, TrainedCopy):
                module.add_copy(adapter_name)
                undo.append(functools.partial(module.copies.pop, adapter_name))
            else:
                set_submodule(model, name, TrainedCopy(module, adapter_name))
                undo.append(functools.partial(set_submodule, model, name, module))
    except BaseException:
        for step in reversed(undo):
            step()
        raise


def activate(model: nn.Module, names: list[str], trainable: set[str]) -> None:
    """Make ``names`` the active adapters of every wrapper in ``model`` (a layer applies those it holds, their
    ``ΔW`` added; a trained copy runs the first one's copy); only active adapters in ``trainable`` train."""
    for _, module in outer_modules(model):
        if isinstance(module, SpectralLayer):
            module.active = [n for n in names if n in module.adapters]
            for name, adapter in module.adapters.items():
                wanted = name in names and name in trainable
                if adapter.coeffs.requires_grad != wanted:
                    adapter.coeffs.requires_grad_(wanted)
        elif isinstance(module, TrainedCopy):
            module.active = next((n for n in names if n in module.copies), None)
            for name, copy in module.copies.items():
                copy.requires_grad_(name == module.active and name in trainable)


def remove(model: nn.Module, adapter_name: str) -> None:
    """Take adapter ``adapter_name`` off every layer and trained copy of ``model``; a wrapper left without adapters
    is replaced by the module it wraps."""
    for name, module in list(outer_modules(model)):
        if isinstance(module, SpectralLayer) and adapter_name in module.adapters:
            module.delete_adapter(adapter_name)
            if not module.adapters:
                set_submodule(model, name, module.base_layer)
        elif isinstance(module, TrainedCopy) and adapter_name in module.copies:
            module.copies.pop(adapter_name)
            if not module.copies:
                set_submodule(model, name, module.original_module)


def unwrap(model: nn.Module, names: list[str]) -> nn.Module:
    """``model`` with every wrapper replaced by what it wraps: a layer's base layer; for a trained copy, the copy
    of the first adapter in ``names`` that has one, else the original module. Returns ``model``."""
    for name, module in list(outer_modules(model)):
        if isinstance(module, SpectralLayer):
            set_submodule(model, name, module.base_layer)
        elif isinstance(module, TrainedCopy):
            chosen = next((n for n in names if n in module.copies), None)
            set_submodule(model, name, module.copies[chosen] if chosen else module.original_module)
    return model


NAME_MAX_BYTES = 255  # the longest file name most file systems take (an adapter other than the default is saved in a folder of its name)


def check_name(name: str, existing: dict[str, Any]) -> None:
    """Refuse an adapter name that is not a plain non-empty string usable as a folder name (it is one when the
    adapter is saved) and as a module key (no ``.``), is reserved (:data:`BASE`), or is taken."""
    if (
        not isinstance(name, str)
        or not name
        or any(c in name for c in "/\\.")
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or len(name.encode("utf-8", "surrogatepass")) > NAME_MAX_BYTES
    ):
        raise ValueError(
            "an adapter name must be a non-empty string that can name a folder and a module: no '/', '\\' or "
            f"'.', no control characters (such as NUL or a newline), at most {NAME_MAX_BYTES} bytes; got "
            f"{name if not isinstance(name, str) else name[:80]!r}"
        )
    if name == BASE:
        raise ValueError(f"{BASE!r} is reserved (it means the base model alone in adapter_names)")
    if name in existing:
        raise ValueError(
            f"the model already has an adapter named {name!r}; delete_adapter() it or choose another name"
        )
