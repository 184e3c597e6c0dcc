"""Injection and the adapter lifecycle: wrap, calibrate, train, merge, save and load."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from s2ft.config import FourierFTConfig, load_config
from s2ft.ops.locations import check_n_frequency, fourierft_locations, smallest_int_dtype
from s2ft.tuner.adapter_io import (
    SAVE_PREFIX,
    WEIGHTS_NAME,
    check_adapter,
    check_adapter_folder,
    read_adapter,
    write_adapter_folder,
)
from s2ft.tuner.calibration import LossFn, gradient_prior
from s2ft.tuner.layers import SUPPORTED_LAYERS, SUPPORTED_NAMES, SpectralLinear, TrainedCopy, layer_shape
from s2ft.tuner.planner import plan_for

logger = logging.getLogger("s2ft")


def matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list entry matches exactly or as a suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _resolve(
    model: nn.Module, config: FourierFTConfig
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """The modules to adapt and to train fully, after checking every one of them. Changes nothing."""
    for name, module in model.named_modules():
        if isinstance(module, (SpectralLinear, TrainedCopy)):
            raise ValueError(f"the model already holds s2ft adapters (at {name!r}); wrap an unwrapped model")
    targets, saves, unsupported = [], [], []
    linear_names = []
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, SUPPORTED_LAYERS):
            linear_names.append(name)
        if matches(name, config.target_modules):
            if isinstance(module, SUPPORTED_LAYERS):
                targets.append((name, module))
            else:
                unsupported.append(f"{name} ({type(module).__name__})")
        elif (
            config.modules_to_save
            and matches(name, config.modules_to_save)
            and not any(name.startswith(s + ".") for s, _ in saves)
        ):
            saves.append((name, module))
    if unsupported:
        raise TypeError(
            f"target_modules matched modules s2ft cannot adapt: {', '.join(unsupported[:5])}; "
            f"only {SUPPORTED_NAMES} are supported: narrow target_modules to those layers"
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
        inside = [t for t, _ in targets if t.startswith(kept + ".")]
        if inside:
            raise ValueError(
                f"modules_to_save names {kept!r}, which holds adapted modules ({', '.join(inside[:3])}): a module "
                "is either trained fully or adapted, not both; name only new heads in modules_to_save"
            )
    for name, module in targets:
        try:
            check_n_frequency(config.n_frequency, *layer_shape(module))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return targets, saves


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


_SPECIALIZED: dict[type, type] = {}


def _specialized(model_class: type) -> type[SpectralModel]:
    """A ``SpectralModel`` subclass whose ``forward`` has ``model_class.forward``'s signature, so tools that inspect
    it (the Trainer's label detection and column pruning) see the wrapped model's real argument names."""
    if model_class not in _SPECIALIZED:
        try:
            signature = inspect.signature(model_class.forward)
        except (TypeError, ValueError):
            return SpectralModel

        def forward(self: SpectralModel, *args: Any, **kwargs: Any) -> Any:
            return self.base_model(*args, **kwargs)

        forward.__signature__ = signature  # type: ignore[attr-defined]
        forward.__doc__ = model_class.forward.__doc__
        namespace = {"forward": forward, "__module__": __name__, "__qualname__": "SpectralModel"}
        _SPECIALIZED[model_class] = type("SpectralModel", (SpectralModel,), namespace)
    return _SPECIALIZED[model_class]


def _new_spectral_model(model_class: type) -> SpectralModel:
    """An empty :class:`SpectralModel` of the class specialized to ``model_class``, for unpickling."""
    cls = _specialized(model_class)
    return cls.__new__(cls)


class SpectralModel(nn.Module):
    """A model whose targeted linear layers carry FourierFT or S2FT adapters.

    It calls, and otherwise behaves like, the wrapped model (``forward``, ``generate``, attributes such as ``config``)
    and works with the transformers Trainer and Accelerate. Build it with :func:`get_spectral_model` or
    :meth:`from_pretrained`.
    """

    def __init__(self, model: nn.Module, config: FourierFTConfig) -> None:
        super().__init__()
        targets, saves = _resolve(model, config)
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        locations: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        wrapped: list[tuple[str, nn.Module]] = []
        try:
            model.requires_grad_(False)
            for name, module in targets:
                layer = SpectralLinear(
                    module,
                    config.n_frequency,
                    config.scaling,
                    config.init,
                    config.forward_path,
                    config.method,
                )
                if config.method == "fourierft":
                    shape = (layer.d_out, layer.d_in)
                    if shape not in locations:  # the same draw for every layer of a shape, as PEFT's
                        locations[shape] = fourierft_locations(*shape, config.n_frequency, config.seed)
                    # each layer its own tensors: shared ones break safetensors checkpoints ("share memory")
                    layer.set_locations(*(t.clone() for t in locations[shape]))
                _set_submodule(model, name, layer)
                wrapped.append((name, module))
            for name, module in saves:
                _set_submodule(model, name, TrainedCopy(module))
                wrapped.append((name, module))
        except BaseException:  # leave the model as it was
            for name, module in reversed(wrapped):
                _set_submodule(model, name, module)
            for name, param in model.named_parameters():
                param.requires_grad_(self._requires_grad.get(name, param.requires_grad))
            raise
        self.base_model = model
        self.spectral_config = config
        if type(self) is SpectralModel:
            self.__class__ = _specialized(type(model))
        logger.info(
            "s2ft: %s on %d modules (%s); %s",
            config.method,
            len(targets),
            ", ".join(n for n, _ in targets[:4]) + (", ..." if len(targets) > 4 else ""),
            self.trainable_parameters_summary(),
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickling (``torch.save(model)``, ``copy.deepcopy``): the class is rebuilt by :func:`_specialized` from
        the wrapped model's class, since the specialized class itself is made at run time."""
        reduced = super().__reduce_ex__(protocol)
        return (_new_spectral_model, (type(self.base_model),), *reduced[2:])

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ inspection
    def spectral_layers(self) -> dict[str, SpectralLinear]:
        """The adapters by the name of the module they wrap, in module order."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, SpectralLinear)}

    def _trained_copies(self) -> dict[str, TrainedCopy]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, TrainedCopy)}

    @property
    def adapted_modules(self) -> list[str]:
        return list(self.spectral_layers())

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def trainable_parameters_summary(self) -> str:
        total = sum(p.numel() for n, p in self.named_parameters() if ".original_module." not in n)
        trainable = self.num_trainable_parameters()
        return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"

    def print_trainable_parameters(self) -> None:
        print(self.trainable_parameters_summary())

    def delta_weight(self, name: str) -> torch.Tensor:
        """The dense float32 ``ΔW`` ``(d_out, d_in)`` of the adapter on module ``name``."""
        layers = self.spectral_layers()
        if name not in layers:
            raise KeyError(f"no adapter on {name!r}; adapted modules: {list(layers)}")
        return layers[name].delta_weight()

    # ------------------------------------------------------------------ S2FT calibration
    def calibrate(
        self,
        batches: Iterable[Any],
        loss_fn: LossFn | None = None,
        progress: bool = False,
        force: bool = False,
    ) -> dict[str, dict[str, float]]:
        """S2FT's one-time setup: gradient prior, row/column permutations and locations for every adapter.

        ``batches`` yields what the model takes: mappings of keyword arguments (with ``labels`` for the model's own
        loss), tensors, or ``(inputs, targets)`` pairs; ``loss_fn(outputs, batch)`` gives the loss otherwise. At most
        ``config.calibration_batches`` are used. No weight changes. Deterministic for a seed; under
        ``torch.distributed`` every rank must call it and gets the same result. Returns per-layer path lengths.

        An adapter that was trained or loaded (coefficients not all zero) is not calibrated again: its
        coefficients belong to its locations. ``force=True`` does it anyway and resets the coefficients to zero,
        so the model again computes what the base model computes.
        """
        config = self.spectral_config
        if config.method != "s2ft":
            raise ValueError(f"calibrate() is for S2FT; this model's adapters are {config.method!r}")
        layers = self.spectral_layers()
        if any(layer.merged for layer in layers.values()):
            raise RuntimeError("unmerge() the adapters before calibrating")
        trained = [n for n, layer in layers.items() if layer.is_ready and bool(layer.coeffs.detach().any())]
        if trained and not force:
            raise RuntimeError(
                f"{len(trained)} adapters already hold trained coefficients (e.g. {trained[0]}); calibrating again "
                "would move them to new locations, where they mean nothing. Pass force=True to re-plan and reset "
                "the coefficients to zero"
            )
        priors = gradient_prior(
            self.base_model, layers, batches, loss_fn, config.calibration_batches, progress
        )
        plans = {name: plan_for(prior, name, config) for name, prior in priors.items()}
        for name, plan in plans.items():
            layers[name].set_locations(plan.rows, plan.cols, plan.perm_rows, plan.perm_cols)
            if force:
                with torch.no_grad():
                    layers[name].coeffs.zero_()
        return {
            name: {"path_length_before": p.path_length_before, "path_length_after": p.path_length_after}
            for name, p in plans.items()
        }

    # ------------------------------------------------------------------ merge
    def merge(self) -> None:
        """Add every ``ΔW`` into its base weight (``unmerge`` undoes it)."""
        for layer in self.spectral_layers().values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.spectral_layers().values():
            layer.unmerge()

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Inside, the model computes what the base model computed before wrapping (original ``modules_to_save`` too)."""
        layers, copies = self.spectral_layers(), self._trained_copies()
        merged = [layer for layer in layers.values() if layer.merged]
        for layer in merged:
            layer.unmerge()
        for module in [*layers.values(), *copies.values()]:
            module.disabled = True
        try:
            yield
        finally:
            for module in [*layers.values(), *copies.values()]:
                module.disabled = False
            for layer in merged:
                layer.merge()

    def merge_and_unload(self) -> nn.Module:
        """Merge, take every adapter out, and return the original model class with merged weights."""
        self.merge()
        return self._unload()

    def _unload(self) -> nn.Module:
        model = self.base_model
        for name, layer in self.spectral_layers().items():
            _set_submodule(model, name, layer.base_layer)
        for name, module in self._trained_copies().items():
            _set_submodule(model, name, module.trained_module)
        for name, param in model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, True))
        return model

    # ------------------------------------------------------------------ save and load
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What the adapter file stores: float32 coefficients, S2FT's locations and permutations in the smallest
        integer dtype that fits (FourierFT's follow from the seed, as in PEFT), and the ``modules_to_save``'s
        trained weights. Nothing of the base model."""
        state: dict[str, torch.Tensor] = {}
        for name, layer in self.spectral_layers().items():
            layer._require_ready()
            rows_dtype, cols_dtype = smallest_int_dtype(layer.d_out - 1), smallest_int_dtype(layer.d_in - 1)
            state[f"{name}.coeffs"] = layer.coeffs.detach().float()
            if self.spectral_config.method != "fourierft":  # FourierFT's locations follow from its seed
                state[f"{name}.rows"] = layer.rows.to(rows_dtype)
                state[f"{name}.cols"] = layer.cols.to(cols_dtype)
            if layer.perm_rows is not None:
                state[f"{name}.perm_rows"] = layer.perm_rows.to(rows_dtype)
                state[f"{name}.perm_cols"] = layer.perm_cols.to(cols_dtype)
        for name, module in self._trained_copies().items():
            for key, value in module.trained_module.state_dict().items():
                state[f"{SAVE_PREFIX}{name}.{key}"] = value.detach()
        return {k: v.contiguous().cpu() for k, v in state.items()}

    def _metadata(self) -> dict[str, str]:
        """The shapes ``[d_out, d_in]`` of the adapted modules, in the sorted order of their names."""
        layers = self.spectral_layers()
        shapes = [[layers[name].d_out, layers[name].d_in] for name in sorted(layers)]
        return {"format": "pt", "s2ft_shapes": json.dumps(shapes, separators=(",", ":"))}

    def adapter_nbytes(self) -> int:
        """Size in bytes of the adapter file ``save_pretrained`` writes (header included; the JSON config aside)."""
        return len(save(self.adapter_state_dict(), metadata=self._metadata()))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``save_directory``, as a pair: both
        are written to temporary files first, and the old pair is restored if replacing them fails, so the folder
        holds either the old adapter or the new one, never a mix. Other files in the folder are left alone.

        PEFT's keyword arguments (``safe_serialization``, ``selected_adapters``, ...) are accepted; s2ft always
        writes safetensors.
        """
        if kwargs.get("safe_serialization") is False:
            logger.warning("s2ft writes safetensors only; safe_serialization=False is ignored")
        if not self.spectral_layers():
            raise RuntimeError(
                "this model holds no adapter any more (merge_and_unload() folded it into the base weights), so there "
                "is nothing to save as an adapter: save before merge_and_unload(), or save the merged model with its "
                "own save_pretrained"
            )
        state, metadata = self.adapter_state_dict(), self._metadata()
        config_text = json.dumps(self.spectral_config.to_dict(), indent=2) + "\n"
        os.makedirs(save_directory, exist_ok=True)
        write_adapter_folder(save_directory, state, metadata, config_text)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, adapter_directory: str | os.PathLike, is_trainable: bool = False
    ) -> SpectralModel:
        """Wrap ``model`` and load a saved adapter into it. Everything is checked before the model is touched.

        With ``is_trainable=False`` (the default, as in PEFT) the adapter is frozen, for inference.
        """
        adapter_directory = check_adapter_folder(adapter_directory)
        config = load_config(adapter_directory)
        state, shapes = read_adapter(os.path.join(adapter_directory, WEIGHTS_NAME))
        targets, saves = _resolve(model, config)
        check_adapter(state, shapes, config, targets, saves)
        spectral = cls(model, config)
        try:
            with torch.no_grad():
                for name, layer in spectral.spectral_layers().items():
                    layer.coeffs.copy_(state[f"{name}.coeffs"])
                    if f"{name}.rows" in state:  # else FourierFT's, from the seed, are in place
                        perms = [state.get(f"{name}.perm_rows"), state.get(f"{name}.perm_cols")]
                        layer.set_locations(state[f"{name}.rows"], state[f"{name}.cols"], *perms)
                for name, module in spectral._trained_copies().items():
                    prefix = f"{SAVE_PREFIX}{name}."
                    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                    module.trained_module.load_state_dict(sub, strict=True)
        except Exception:
            spectral._unload()
            raise
        if not is_trainable:
            spectral.requires_grad_(False)
        return spectral


def get_spectral_model(model: nn.Module, config: FourierFTConfig) -> SpectralModel:
    """Wrap every module of ``model`` that ``config.target_modules`` names with an adapter, in place.

    Everything else is frozen but ``config.modules_to_save``. FourierFT adapters are ready to train; S2FT ones
    need :meth:`SpectralModel.calibrate` first. Raises, leaving the model as it was, if a target is missing or
    unsupported.
    """
    return SpectralModel(model, config)
