"""Injection and the adapter lifecycle: wrap, calibrate, train, merge, save and load."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from s2ft.config import ALL_LINEAR, FourierFTConfig, load_config
from s2ft.ops.bases import get_basis
from s2ft.ops.locations import check_n_frequency, smallest_int_dtype
from s2ft.tuner.adapter_io import (
    SAVE_PREFIX,
    WEIGHTS_NAME,
    check_adapter,
    check_adapter_folder,
    read_adapter,
    write_adapter_folder,
)
from s2ft.tuner.calibration import LossFn, gradient_prior
from s2ft.tuner.layers import (
    BASE,
    SUPPORTED_LAYERS,
    SUPPORTED_NAMES,
    SpectralLinear,
    TrainedCopy,
    example_adapters,
    layer_shape,
)
from s2ft.tuner.planner import plan_for

logger = logging.getLogger("s2ft")

DEFAULT = "default"  # the name of the adapter get_spectral_model creates, as in PEFT


def matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list entry matches exactly or as a suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _shape(module: nn.Module) -> tuple[int, int]:
    return (module.d_out, module.d_in) if isinstance(module, SpectralLinear) else layer_shape(module)


def _output_layer(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _is_target(name: str, module: nn.Module, config: FourierFTConfig, output: nn.Module | None) -> bool:
    """PEFT's rules, and ``"all-linear"``: every Linear/Conv1D but the output layer (an LM head) and the
    modules to save."""
    if config.target_modules == ALL_LINEAR:
        base = module.base_layer if isinstance(module, SpectralLinear) else module
        saved = bool(config.modules_to_save) and matches(name, config.modules_to_save)
        return (
            isinstance(base, SUPPORTED_LAYERS)
            and not isinstance(base, nn.Conv2d)
            and base is not output
            and not saved
        )
    return matches(name, config.target_modules)


def _resolve(
    model: nn.Module, config: FourierFTConfig, wrapped_ok: bool = False
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """The modules to adapt and to train fully, after checking every one of them. Changes nothing.

    With ``wrapped_ok`` (adding an adapter to a wrapped model), adapted layers and trained copies count as the
    modules they wrap; what is inside them is never a target.
    """
    output = _output_layer(model)
    targets, saves, unsupported, inside = [], [], [], []
    linear_names = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, (SpectralLinear, TrainedCopy)):
            if not wrapped_ok:
                raise ValueError(
                    f"the model already holds s2ft adapters (at {name!r}); wrap an unwrapped model, or add "
                    "another adapter with SpectralModel.add_adapter"
                )
            inside.append(name)
        supported = isinstance(module, (*SUPPORTED_LAYERS, SpectralLinear))
        if supported:
            linear_names.append(name)
        if _is_target(name, module, config, output):
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
        held = [t for t, _ in targets if t.startswith(kept + ".")]
        if held:
            raise ValueError(
                f"modules_to_save names {kept!r}, which holds adapted modules ({', '.join(held[:3])}): a module "
                "is either trained fully or adapted, not both; name only new heads in modules_to_save"
            )
    for name, module in targets:
        try:
            check_n_frequency(config.n_frequency, *_shape(module))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    _warn_tied(model, targets)
    return targets, saves


def _warn_tied(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    """Warn, as PEFT does, when a target's weight is tied to another parameter: merging changes both."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name, module in targets:
        weight = (module.base_layer if isinstance(module, SpectralLinear) else module).weight
        tied = [n for n in owners.get(id(weight), []) if not n.startswith(name + ".")]
        if tied:
            warnings.warn(
                f"{name}'s weight is tied to {', '.join(tied)}: merging the adapter changes both",
                stacklevel=3,
            )


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
            return SpectralModel.forward(self, *args, **kwargs)

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
    """A model whose targeted layers carry named FourierFT or S2FT adapters.

    It calls, and otherwise behaves like, the wrapped model (``forward``, ``generate``, attributes such as
    ``config``) and works with the transformers Trainer and Accelerate. Build it with :func:`get_spectral_model`
    or :meth:`from_pretrained`; the first adapter is named ``"default"``, as in PEFT. More adapters, of either
    method, come with :meth:`add_adapter` or :meth:`load_adapter`; :meth:`set_adapter` chooses the active ones
    (their ``ΔW`` add), and ``forward``/``generate`` take ``adapter_names`` (one per example, :data:`BASE` for the
    base model alone) to serve a mixed batch without merging.
    """

    def __init__(self, model: nn.Module, config: FourierFTConfig, adapter_name: str = DEFAULT) -> None:
        super().__init__()
        _check_name(adapter_name, {})
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.base_model = model
        self.peft_config: dict[str, FourierFTConfig] = {}
        self.active_adapters: list[str] = []
        self._trainable: set[str] = set()
        try:
            model.requires_grad_(False)
            self._inject(adapter_name, config)
        except BaseException:  # leave the model as it was
            for name, param in model.named_parameters():
                param.requires_grad_(self._requires_grad.get(name, param.requires_grad))
            raise
        self.active_adapters = [adapter_name]
        if type(self) is SpectralModel:
            self.__class__ = _specialized(type(model))
        logger.info(
            "s2ft: %s on %d modules; %s",
            config.method,
            len(self.spectral_layers()),
            self.trainable_parameters_summary(),
        )

    def _inject(self, adapter_name: str, config: FourierFTConfig) -> None:
        """Add adapter ``adapter_name`` on every target of ``config``, or, on any error, nothing."""
        model = self.base_model
        targets, saves = _resolve(model, config, wrapped_ok=bool(self.peft_config))
        seeded: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor] | None] = {}
        undo: list[Callable[[], Any]] = []
        basis = get_basis(config.basis)
        options = (config.n_frequency, config.scaling, config.init, config.forward_path, basis)
        try:
            for name, module in targets:
                if isinstance(module, SpectralLinear):
                    module.add_adapter(adapter_name, *options)
                    undo.append(lambda m=module: m.delete_adapter(adapter_name))
                    layer = module
                else:
                    layer = SpectralLinear(module, *options, adapter_name=adapter_name)
                    _set_submodule(model, name, layer)
                    undo.append(lambda n=name, m=module: _set_submodule(model, n, m))
                shape = (layer.d_out, layer.d_in)
                if shape not in seeded:  # the same draw for every layer of a shape, as PEFT's
                    seeded[shape] = config.seeded_locations(*shape)  # None: planned by calibrate()
                if seeded[shape] is not None:
                    # each layer its own tensors: shared ones break safetensors checkpoints ("share memory")
                    layer.adapters[adapter_name].set_locations(*(t.clone() for t in seeded[shape]))
            for name, module in saves:
                if isinstance(module, TrainedCopy):
                    module.add_copy(adapter_name)
                    undo.append(lambda m=module: m.copies.pop(adapter_name))
                else:
                    _set_submodule(model, name, TrainedCopy(module, adapter_name))
                    undo.append(lambda n=name, m=module: _set_submodule(model, n, m))
        except BaseException:
            for step in reversed(undo):
                step()
            raise
        self.peft_config[adapter_name] = config
        self._trainable.add(adapter_name)

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        with self._serving(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``; ``adapter_names`` as in ``forward`` (one per example)."""
        with self._serving(adapter_names):
            return self.base_model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _serving(self, adapter_names: list[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError("adapter_names must be a list of adapter names, one per example")
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise ValueError(
                f"unknown adapter names {unknown}; the model has {list(self.peft_config)} and {BASE!r}"
            )
        if any(layer.merged for layer in self.spectral_layers().values()):
            raise RuntimeError("adapter_names cannot be served while adapters are merged: unmerge() first")
        for name in set(adapter_names) - {BASE}:
            self._require_planned(name)
        with example_adapters(adapter_names):
            yield

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickling (``torch.save(model)``, ``copy.deepcopy``): the class is rebuilt by :func:`_specialized` from
        the wrapped model's class, since the specialized class itself is made at run time."""
        reduced = super().__reduce_ex__(protocol)
        return (_new_spectral_model, (type(self.base_model),), *reduced[2:])

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """What the adapters train and need: coefficients, locations, permutations and trained copies of every
        adapter, not the frozen base model (``get_base_model().state_dict()`` has everything). This keeps the
        transformers Trainer's checkpoints small, and it works for models with tied weights, whose full state
        dict safetensors refuses ("Some tensors share memory")."""
        full = super().state_dict(*args, **kwargs)
        return type(full)((k, v) for k, v in full.items() if _is_adapter_key(k))

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load what :meth:`state_dict` holds; base-model entries, if present, are loaded too. With ``strict``,
        every adapter entry must be there and no key may be unknown."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if _is_adapter_key(k)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"adapter state does not fit: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
        return type(result)(missing, result.unexpected_keys)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ named adapters
    @property
    def active_adapter(self) -> str:
        """The first active adapter's name."""
        return self.active_adapters[0] if self.active_adapters else next(iter(self.peft_config))

    @property
    def spectral_config(self) -> FourierFTConfig:
        """The config of the active adapter (the first, when several are active)."""
        return self.peft_config[self.active_adapter]

    def get_base_model(self) -> nn.Module:
        """The wrapped model (its targeted layers still carry the adapters; see :meth:`merge_and_unload`)."""
        return self.base_model

    def add_adapter(self, adapter_name: str, config: FourierFTConfig) -> None:
        """Add a new adapter (either method) on ``config``'s targets; it is not activated (see :meth:`set_adapter`).
        An S2FT adapter needs ``calibrate(batches, adapter_name=...)`` before it is used."""
        _check_name(adapter_name, self.peft_config)
        if any(layer.merged for layer in self.spectral_layers().values()):
            raise RuntimeError("unmerge() before adding an adapter")
        self._inject(adapter_name, config)
        self.set_adapter(self.active_adapters, check=False)

    def set_adapter(self, adapter_name: str | list[str], check: bool = True) -> None:
        """Make ``adapter_name`` (or a list of names, whose ``ΔW`` add) the active adapters: the forward applies
        them and only they are trained (those loaded with ``is_trainable=False`` stay frozen). An S2FT adapter
        must be calibrated first."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise ValueError("set_adapter needs at least one adapter name")
        for name in names:
            self._require_known(name)
            if check:
                self._require_planned(name)
        for layer in self.spectral_layers().values():
            layer.active = [n for n in names if n in layer.adapters]
            for name, adapter in layer.adapters.items():
                adapter.coeffs.requires_grad_(name in names and name in self._trainable)
        for copy in self._trained_copies().values():
            copy.active = next((n for n in names if n in copy.copies), None)
            for name, module in copy.copies.items():
                module.requires_grad_(name == copy.active and name in self._trainable)
        self.active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer; layers left without adapters get their base layer back."""
        self._require_known(adapter_name)
        if len(self.peft_config) == 1:
            raise ValueError(
                f"{adapter_name!r} is the model's last adapter; merge_and_unload() or unload() to take it out"
            )
        if any(adapter_name in layer._merged for layer in self.spectral_layers().values()):
            raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge() before deleting it")
        for name, layer in self.spectral_layers().items():
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
                if not layer.adapters:
                    _set_submodule(self.base_model, name, layer.base_layer)
        for name, copy in self._trained_copies().items():
            if adapter_name in copy.copies:
                copy.copies.pop(adapter_name)
                if not copy.copies:
                    _set_submodule(self.base_model, name, copy.original_module)
        del self.peft_config[adapter_name]
        self._trainable.discard(adapter_name)
        remaining = [n for n in self.active_adapters if n != adapter_name] or [next(iter(self.peft_config))]
        self.set_adapter(remaining, check=False)

    def _require_known(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r}; the model has {list(self.peft_config)}")

    def _require_planned(self, name: str) -> None:
        config = self.peft_config[name]
        if config.planned and not all(
            layer.adapters[name].is_ready for layer in self._layers_of(name).values()
        ):
            raise RuntimeError(
                f"adapter {name!r} ({config.method}) has no spectrum locations yet: "
                f"calibrate(batches, adapter_name={name!r}) before using it"
            )

    def _require_plannable(self, name: str, action: str) -> None:
        """``action`` (calibrate, replan) needs an adapter whose locations are planned, and nothing merged."""
        config = self.peft_config[name]
        if not config.planned:
            raise ValueError(
                f"{action}() is for S2FT, whose locations are planned from data; adapter {name!r} is "
                f"{config.method!r}, whose locations follow from its seed"
            )
        if any(layer.merged for layer in self.spectral_layers().values()):
            raise RuntimeError(f"unmerge() the adapters before {action}()")
        if any(layer.merged for layer in self.spectral_layers().values()):
            raise RuntimeError(f"unmerge() the adapters before {action}()")

    # ------------------------------------------------------------------ inspection
    def spectral_layers(self) -> dict[str, SpectralLinear]:
        """The adapted layers by the name of the module they wrap, in module order."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, SpectralLinear)}

    def _trained_copies(self) -> dict[str, TrainedCopy]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, TrainedCopy)}

    def _layers_of(self, adapter_name: str) -> dict[str, SpectralLinear]:
        return {n: layer for n, layer in self.spectral_layers().items() if adapter_name in layer.adapters}

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

    def delta_weight(self, name: str, adapter_name: str | None = None) -> torch.Tensor:
        """The dense float32 ``ΔW`` ``(d_out, d_in)`` of an adapter (the active one) on module ``name``."""
        layers = self.spectral_layers()
        if name not in layers:
            raise KeyError(f"no adapter on {name!r}; adapted modules: {list(layers)}")
        return layers[name].delta_weight(adapter_name or self.active_adapter)

    # ------------------------------------------------------------------ S2FT calibration
    def calibrate(
        self,
        batches: Iterable[Any],
        loss_fn: LossFn | None = None,
        progress: bool = False,
        force: bool = False,
        adapter_name: str | None = None,
    ) -> dict[str, dict[str, float]]:
        """S2FT's one-time setup of one adapter (``adapter_name``, default the active one): gradient prior,
        row/column permutations and locations for each of its layers.

        ``batches`` yields what the model takes: mappings of keyword arguments (with ``labels`` for the model's own
        loss), tensors, or ``(inputs, targets)`` pairs; ``loss_fn(outputs, batch)`` gives the loss otherwise. At most
        ``config.calibration_batches`` are used. No weight changes; every adapter is off meanwhile. Deterministic
        for a seed; under ``torch.distributed`` every rank must call it and gets the same result. Returns per-layer
        path lengths.

        An adapter that was trained or loaded (coefficients not all zero) is not calibrated again: its
        coefficients belong to its locations. ``force=True`` does it anyway and resets the coefficients to zero,
        so the model again computes what the base model computes.
        """
        name = adapter_name or self.active_adapter
        self._require_known(name)
        self._require_plannable(name, "calibrate")
        config = self.peft_config[name]
        layers = self._layers_of(name)
        adapters = {n: layer.adapters[name] for n, layer in layers.items()}
        trained = [n for n, a in adapters.items() if a.is_ready and bool(a.coeffs.detach().any())]
        if trained and not force:
            raise RuntimeError(
                f"{len(trained)} layers of adapter {name!r} already hold trained coefficients (e.g. {trained[0]}); "
                "calibrating again would move them to new locations, where they mean nothing. Pass force=True to "
                "re-plan and reset the coefficients to zero"
            )
        others = [layer for layer in self.spectral_layers().values() if not layer.disabled]
        try:
            for layer in others:  # the prior is the base model's gradient: every adapter off
                layer.disabled = True
            priors = gradient_prior(
                self.base_model,
                layers,
                batches,
                loss_fn,
                config.calibration_batches,
                progress,
                kind=config.prior,
                lr=config.prior_lr,
            )
        finally:
            for layer in others:
                layer.disabled = False
        plans = {n: plan_for(prior, n, config) for n, prior in priors.items()}
        for n, plan in plans.items():
            adapters[n].set_locations(plan.rows, plan.cols, plan.perm_rows, plan.perm_cols)
            if force:
                with torch.no_grad():
                    adapters[n].coeffs.zero_()
        return {
            n: {"path_length_before": p.path_length_before, "path_length_after": p.path_length_after}
            for n, p in plans.items()
        }

    @torch.no_grad()
    def replan(
        self, adapter_name: str | None = None, priors: dict[str, torch.Tensor] | None = None
    ) -> dict[str, dict[str, float]]:
        """Plan one S2FT adapter (default: the active one) again from a new prior, and project its ``ΔW`` there.

        The prior of each layer is ``priors[name]`` ``(d_out, d_in)`` if given, else the adapter's own trained
        ``ΔW``. New permutations and locations come from it as in :meth:`calibrate`; the coefficients become the
        least-squares projection of the current ``ΔW`` onto the new plan
        (:func:`s2ft.ops.apply.project_delta`), so the model's outputs stay the same where ``ΔW`` lies in the new
        plan's span, and otherwise lose what falls outside it. The coefficient tensors are updated in place (an
        optimizer holding them keeps them; its state for them no longer fits and should be cleared). Returns,
        per layer, ``energy_kept``: ``||projected ΔW||² / ||ΔW||²``.
        """
        name = adapter_name or self.active_adapter
        self._require_known(name)
        self._require_plannable(name, "replan")
        self._require_planned(name)
        config = self.peft_config[name]
        adapters = {n: layer.adapters[name] for n, layer in self._layers_of(name).items()}
        if priors is not None:  # every prior checked before any layer changes
            missing = sorted(set(adapters) - set(priors))
            if missing:
                raise ValueError(
                    f"priors lacks {len(missing)} layers of adapter {name!r}, e.g. {missing[0]!r}"
                )
            for n, adapter in adapters.items():
                if tuple(priors[n].shape) != (adapter.d_out, adapter.d_in):
                    raise ValueError(
                        f"the prior of {n!r} is {tuple(priors[n].shape)}, its layer needs "
                        f"{(adapter.d_out, adapter.d_in)}"
                    )
        elif not any(bool(a.coeffs.any()) for a in adapters.values()):
            raise ValueError(
                f"adapter {name!r} has no trained ΔW to plan from (its coefficients are all zero): train it first, "
                "or pass priors"
            )
        report = {}
        for n, adapter in adapters.items():
            basis, shape = adapter.basis, (adapter.d_out, adapter.d_in, adapter.scaling)
            # float64: the projection is exact to rounding where it should be
            delta = basis.delta_weight(
                adapter.coeffs.double(),
                adapter.rows,
                adapter.cols,
                *shape,
                adapter.perm_rows,
                adapter.perm_cols,
            )
            prior = priors[n] if priors is not None else delta
            plan = plan_for(prior.detach().float().to(delta.device), n, config)
            coeffs = basis.project(
                delta, plan.rows, plan.cols, adapter.scaling, plan.perm_rows, plan.perm_cols
            )
            projected = basis.delta_weight(
                coeffs, plan.rows, plan.cols, *shape, plan.perm_rows, plan.perm_cols
            )
            total = float(delta.square().sum())
            adapter.set_locations(plan.rows, plan.cols, plan.perm_rows, plan.perm_cols)
            adapter.coeffs.copy_(coeffs)
            report[n] = {"energy_kept": float(projected.square().sum()) / total if total > 0 else 1.0}
        return report

    # ------------------------------------------------------------------ merge
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Add the ``ΔW`` of ``adapter_names`` (default: the active adapters) into the base weights
        (``unmerge`` undoes it)."""
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        for name in names:
            self._require_known(name)
            self._require_planned(name)
        for layer in self.spectral_layers().values():
            layer.merge([n for n in names if n in layer.adapters])

    def unmerge(self) -> None:
        for layer in self.spectral_layers().values():
            layer.unmerge()

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Inside, the model computes what the base model computed before wrapping (original ``modules_to_save`` too)."""
        layers, copies = self.spectral_layers(), self._trained_copies()
        merged = {name: list(layer._merged) for name, layer in layers.items() if layer.merged}
        for name in merged:
            layers[name].unmerge()
        for module in [*layers.values(), *copies.values()]:
            module.disabled = True
        try:
            yield
        finally:
            for module in [*layers.values(), *copies.values()]:
                module.disabled = False
            for name, names in merged.items():
                layers[name].merge(names)

    def merge_and_unload(self, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge ``adapter_names`` (default: the active adapters), take every adapter out, and return the original
        model class with merged weights (and, in ``modules_to_save``, the first merged adapter's trained copy)."""
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        self.merge(names)
        return self._unload(names)

    def unload(self) -> nn.Module:
        """Take every adapter out without merging: the original model, as before wrapping."""
        self.unmerge()
        return self._unload([])

    def _unload(self, names: list[str]) -> nn.Module:
        model = self.base_model
        for name, layer in self.spectral_layers().items():
            _set_submodule(model, name, layer.base_layer)
        for name, copy in self._trained_copies().items():
            chosen = next((n for n in names if n in copy.copies), None)
            _set_submodule(model, name, copy.copies[chosen] if chosen else copy.original_module)
        for name, param in model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, True))
        return model

    # ------------------------------------------------------------------ save and load
    def adapter_state_dict(
        self, adapter_name: str | None = None, coefficient_dtype: torch.dtype = torch.float32
    ) -> dict[str, torch.Tensor]:
        """What an adapter's file stores: the coefficients (float32, or ``coefficient_dtype``), S2FT's locations and permutations in the smallest
        integer dtype that fits (FourierFT's follow from the seed, as in PEFT), and its trained
        ``modules_to_save``. Nothing of the base model."""
        name = adapter_name or self.active_adapter
        self._require_known(name)
        state: dict[str, torch.Tensor] = {}
        for module, layer in self._layers_of(name).items():
            adapter = layer.adapters[name]
            adapter._require_ready()
            rows_dtype, cols_dtype = smallest_int_dtype(layer.d_out - 1), smallest_int_dtype(layer.d_in - 1)
            state[f"{module}.coeffs"] = adapter.coeffs.detach().to(coefficient_dtype)
            if self.peft_config[name].stores_locations:  # else they follow from the seed
                state[f"{module}.rows"] = adapter.rows.to(rows_dtype)
                state[f"{module}.cols"] = adapter.cols.to(cols_dtype)
            if adapter.perm_rows is not None:
                state[f"{module}.perm_rows"] = adapter.perm_rows.to(rows_dtype)
                state[f"{module}.perm_cols"] = adapter.perm_cols.to(cols_dtype)
        for module, copy in self._trained_copies().items():
            if name in copy.copies:
                for key, value in copy.copies[name].state_dict().items():
                    state[f"{SAVE_PREFIX}{module}.{key}"] = value.detach()
        return {k: v.contiguous().cpu() for k, v in state.items()}

    def _metadata(self, adapter_name: str | None = None) -> dict[str, str]:
        """The shapes ``[d_out, d_in]`` of the adapted modules, in the sorted order of their names."""
        layers = self._layers_of(adapter_name or self.active_adapter)
        shapes = [[layers[name].d_out, layers[name].d_in] for name in sorted(layers)]
        return {"format": "pt", "s2ft_shapes": json.dumps(shapes, separators=(",", ":"))}

    def adapter_nbytes(
        self, adapter_name: str | None = None, coefficient_dtype: torch.dtype = torch.float32
    ) -> int:
        """Size in bytes of the adapter file ``save_pretrained`` writes (header included; the JSON config aside)."""
        state = self.adapter_state_dict(adapter_name, coefficient_dtype)
        return len(save(state, metadata=self._metadata(adapter_name)))

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        format: str = "s2ft",
        coefficient_dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> None:
        """Write each adapter (default: all) as ``adapter_config.json`` and ``adapter_model.safetensors``: the
        ``"default"`` adapter in ``save_directory``, the others in subfolders named after them, as PEFT does.
        Each pair is written as a whole: both to temporary files first, and the old pair restored if replacing
        them fails. Other files are left alone.

        ``format="peft"`` writes FourierFT adapters in Hugging Face PEFT's own format (``PeftModel`` loads them);
        S2FT has none. ``coefficient_dtype=torch.float16`` (or ``bfloat16``) stores the coefficients in 16 bits:
        on the default text job that left test accuracy unchanged (0.4045) and the file 18% smaller
        (``benchmarks/storage.py``); they load back into float32. PEFT's other keyword arguments (``safe_serialization``, ...) are accepted; s2ft always
        writes safetensors.
        """
        if kwargs.get("safe_serialization") is False:
            logger.warning("s2ft writes safetensors only; safe_serialization=False is ignored")
        if format not in ("s2ft", "peft"):
            raise ValueError(f"format must be 's2ft' or 'peft', got {format!r}")
        if coefficient_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"coefficient_dtype must be torch.float32, float16 or bfloat16, got {coefficient_dtype}"
            )
        if not self.spectral_layers():
            raise RuntimeError(
                "this model holds no adapter any more (merge_and_unload() folded it into the base weights), so there "
                "is nothing to save as an adapter: save before merge_and_unload(), or save the merged model with its "
                "own save_pretrained"
            )
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        for name in names:
            self._require_known(name)
        from s2ft.tuner.peft_formats import fourierft_to_peft, save_peft_fourierft

        if format == "peft":
            for name in names:
                fourierft_to_peft(self, name)  # refuses an S2FT adapter before anything is written
        for name in names:
            directory = os.fspath(save_directory) if name == DEFAULT else os.path.join(save_directory, name)
            os.makedirs(directory, exist_ok=True)
            if format == "peft":
                save_peft_fourierft(self, directory, name)
                continue
            config_text = json.dumps(self.peft_config[name].to_dict(), indent=2) + "\n"
            state = self.adapter_state_dict(name, coefficient_dtype)
            write_adapter_folder(directory, state, self._metadata(name), config_text)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter_directory: str | os.PathLike,
        adapter_name: str = DEFAULT,
        is_trainable: bool = False,
    ) -> SpectralModel:
        """Wrap ``model`` and load a saved adapter into it (an s2ft folder or a PEFT FourierFT one). Everything is
        checked before the model is touched. With ``is_trainable=False`` (the default, as in PEFT) the adapter is
        frozen, for inference."""
        config, state = _read_folder(adapter_directory, model, wrapped=False)
        spectral = cls(model, config, adapter_name)
        try:
            spectral._fill(adapter_name, state)
        except Exception:
            spectral._unload([])
            raise
        if not is_trainable:
            spectral._trainable.discard(adapter_name)
            spectral.set_adapter(adapter_name)
        return spectral

    def load_adapter(
        self, adapter_directory: str | os.PathLike, adapter_name: str, is_trainable: bool = False
    ) -> None:
        """Load a saved adapter (s2ft or PEFT FourierFT folder) under ``adapter_name``; it is not activated."""
        _check_name(adapter_name, self.peft_config)
        config, state = _read_folder(adapter_directory, self.base_model, wrapped=True)
        self.add_adapter(adapter_name, config)
        try:
            self._fill(adapter_name, state)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self._trainable.discard(adapter_name)
        self.set_adapter(self.active_adapters, check=False)

    def _fill(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, layer in self._layers_of(adapter_name).items():
                adapter = layer.adapters[adapter_name]
                adapter.coeffs.copy_(state[f"{name}.coeffs"])
                if f"{name}.rows" in state:  # else FourierFT's, from the seed, are in place
                    perms = [state.get(f"{name}.perm_rows"), state.get(f"{name}.perm_cols")]
                    adapter.set_locations(state[f"{name}.rows"], state[f"{name}.cols"], *perms)
            for name, copy in self._trained_copies().items():
                if adapter_name in copy.copies:
                    prefix = f"{SAVE_PREFIX}{name}."
                    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                    copy.copies[adapter_name].load_state_dict(sub, strict=True)


def _is_adapter_key(key: str) -> bool:
    """Whether a state-dict key belongs to an adapter (its coefficients, locations, or a trained copy)."""
    return ".adapters." in key or ".copies." in key


def _check_name(name: str, existing: dict[str, Any]) -> None:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"an adapter name must be a non-empty string without '/', got {name!r}")
    if name == BASE:
        raise ValueError(f"{BASE!r} is reserved (it means the base model alone in adapter_names)")
    if name in existing:
        raise ValueError(
            f"the model already has an adapter named {name!r}; delete_adapter() it or choose another name"
        )


def _read_folder(
    directory: str | os.PathLike, model: nn.Module, wrapped: bool
) -> tuple[FourierFTConfig, dict[str, torch.Tensor]]:
    """The config and tensors of an s2ft or PEFT FourierFT adapter folder, checked against ``model``."""
    from s2ft.tuner.peft_formats import is_peft_folder, read_peft_fourierft

    directory = check_adapter_folder(directory)
    if is_peft_folder(directory):
        config, state = read_peft_fourierft(directory)
        shapes = None
    else:
        config = load_config(directory)
        state, shapes = read_adapter(os.path.join(directory, WEIGHTS_NAME))
    targets, saves = _resolve(model, config, wrapped_ok=wrapped)
    if shapes is None:
        shapes = {name: list(_shape(module)) for name, module in targets}
    check_adapter(
        state, shapes, config, [(n, _base(m)) for n, m in targets], [(n, _base(m)) for n, m in saves]
    )
    return config, state


def _base(module: nn.Module) -> nn.Module:
    """The module an adapted layer or a trained copy wraps (the module itself otherwise)."""
    if isinstance(module, SpectralLinear):
        return module.base_layer
    return module.original_module if isinstance(module, TrainedCopy) else module


def get_spectral_model(
    model: nn.Module, config: FourierFTConfig, adapter_name: str = DEFAULT
) -> SpectralModel:
    """Wrap every module of ``model`` that ``config.target_modules`` names with an adapter, in place.

    Everything else is frozen but ``config.modules_to_save``. FourierFT adapters are ready to train; S2FT ones
    need :meth:`SpectralModel.calibrate` first. Raises, leaving the model as it was, if a target is missing or
    unsupported.
    """
    return SpectralModel(model, config, adapter_name)
