"""The adapted model: :class:`SpectralModel` and its lifecycle (wrap, calibrate, train, serve, merge, save, load).

Its methods delegate: targets and injection to :mod:`s2ft.tuner.targets`, planning to :mod:`s2ft.tuner.planner`,
files to :mod:`s2ft.tuner.saving`; the layers themselves are :mod:`s2ft.tuner.layers`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from s2ft.config import FourierFTConfig
from s2ft.tuner.adapter_io import adapter_file_bytes
from s2ft.tuner.calibration import LossFn
from s2ft.tuner.distributed import MERGE_UNSHARDED, is_partitioned, is_sharded_model, refuse_sharded
from s2ft.tuner.kinds import dequantize_modules, keep_differentiable, kind_of, quantized_merge_error
from s2ft.tuner.layers import (
    BASE,
    DEFAULT,
    MIXED_BREAK,
    SpectralLayer,
    TrainedCopy,
    example_adapters,
    graph_break,
)
from s2ft.tuner.planner import calibrate_adapter, replan_adapter
from s2ft.tuner.saving import (
    adapter_state,
    check_save_options,
    fill,
    read_folder,
    shapes_metadata,
    write_adapters,
)
from s2ft.tuner.serving import (
    head_input_folded,
    names_per_sequence,
    reusing_maps,
    serving_nbytes,
    set_map_cache,
    set_serving_cache,
)
from s2ft.tuner.signature import new_specialized, specialized
from s2ft.tuner.targets import activate, check_name, inject, remove, unwrap
from s2ft.tuner.targets import (
    matches as matches,  # its home before targets.py; s2ft.jobs and s2ft.methods use it
)
from s2ft.tuner.walk import outer_modules

logger = logging.getLogger("s2ft")


def _new_spectral_model(model_class: type) -> SpectralModel:
    """An empty :class:`SpectralModel` specialized to ``model_class``: what models pickled by earlier versions
    of s2ft name to unpickle them."""
    return new_specialized(SpectralModel, model_class)


class SpectralModel(nn.Module):
    """A model whose targeted layers carry named spectral adapters (FourierFT, S2FT, DCT: any config's method).

    It calls, and otherwise behaves like, the wrapped model (``forward``, ``generate``, attributes such as
    ``config``) and works with the transformers Trainer and Accelerate. Build it with :func:`get_spectral_model`
    or :meth:`from_pretrained`; the first adapter is named ``"default"``, as in PEFT. More adapters, of any
    method, come with :meth:`add_adapter` or :meth:`load_adapter`; :meth:`set_adapter` chooses the active ones
    (their ``ΔW`` add), and ``forward``/``generate`` take ``adapter_names`` (one per example, :data:`BASE` for the
    base model alone) to serve a mixed batch without merging.
    """

    # generate() makes the output head's input contiguous for the call (s2ft.tuner.serving.head_input_folded);
    # set False on a model to leave the head as it is
    fold_head_in_generate = True

    def __init__(self, model: nn.Module, config: FourierFTConfig, adapter_name: str = DEFAULT) -> None:
        super().__init__()
        check_name(adapter_name, {})
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.model = model  # as in PEFT's tuners; ``base_model`` is the wrapped model's own (see __getattr__)
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
            self.__class__ = specialized(SpectralModel, type(model))
        logger.info(
            "s2ft: %s on %d modules; %s",
            config.method,
            len(self.spectral_layers()),
            self.trainable_parameters_summary(),
        )

    def _inject(self, adapter_name: str, config: FourierFTConfig) -> None:
        """Add adapter ``adapter_name`` on every target of ``config``, or, on any error, nothing."""
        inject(self.model, adapter_name, config, wrapped_ok=bool(self.peft_config))
        keep_differentiable(self.model)  # bitsandbytes' CPU inference kernel would stop gradients
        self.peft_config[adapter_name] = config
        self._trainable.add(adapter_name)

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is None:  # no context manager: torch.compile sees the wrapped model's forward
            return self.model(*args, **kwargs)
        return self._mixed_forward(adapter_names, *args, **kwargs)

    @graph_break(MIXED_BREAK)
    def _mixed_forward(self, adapter_names: list[str], *args: Any, **kwargs: Any) -> Any:
        """A mixed batch: opened outside any compiled graph (a context manager, Python state); the wrapped model's
        forward inside may be compiled, with no break in inference (:func:`s2ft.tuner.serving.mixed_apply`)."""
        with self._serving(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``; ``adapter_names`` as in ``forward`` (one per prompt: with ``num_beams``
        or ``num_return_sequences``, each name serves all of its prompt's sequences). With
        :attr:`fold_head_in_generate` (the default), the output head's input is made contiguous during the call
        (:func:`s2ft.tuner.serving.head_input_folded`): the frozen head then runs as one matrix product instead of
        a batched one, with the same tokens (the logits to rounding); nothing of it stays after the call."""
        if adapter_names is not None and not isinstance(adapter_names, str):
            adapter_names = names_per_sequence(adapter_names, self.model, kwargs)
        folded = head_input_folded(self.model) if self.fold_head_in_generate else contextlib.nullcontext()
        with folded, self._serving(adapter_names), reusing_maps():
            return self.model.generate(*args, **kwargs)

    def set_serving_cache(self, max_bytes: int | None) -> None:
        """Keep up to ``max_bytes`` of dense ``ΔW`` while serving (off by default; see :mod:`s2ft.tuner.serving`)."""
        set_serving_cache(self.spectral_layers().values(), max_bytes)

    def set_map_cache(self, max_bytes: int | None) -> None:
        """Keep up to ``max_bytes`` of the served adapters' sparse maps, so that mixed batches need not build
        them on each call (off by default; see :mod:`s2ft.tuner.serving`)."""
        set_map_cache(self.spectral_layers().values(), max_bytes)

    def serving_nbytes(self) -> dict[str, int]:
        """Bytes the adapters hold, by what holds them (:func:`s2ft.tuner.serving.serving_nbytes`)."""
        return serving_nbytes(self.spectral_layers().values())

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
        layers = self.spectral_layers()  # one walk of the model for every name (not one per name)
        if any(layer.merged for layer in layers.values()):
            raise RuntimeError("adapter_names cannot be served while adapters are merged: unmerge() first")
        for name in set(adapter_names) - {BASE}:
            self._require_planned(name, layers)
        with example_adapters(adapter_names):
            yield

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickling (``torch.save(model)``, ``copy.deepcopy``): the class is rebuilt from the wrapped model's
        class (:func:`s2ft.tuner.signature.specialized`), since the specialized class itself is made at run time."""
        reduced = super().__reduce_ex__(protocol)
        return (new_specialized, (SpectralModel, type(self.model)), *reduced[2:])

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

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        """Older s2ft state dicts (Trainer checkpoints) kept the wrapped model under ``base_model.``: read them
        as ``model.``."""
        old = prefix + "base_model."
        if not any(k.startswith(prefix + "model.") for k in state_dict):
            for key in [k for k in state_dict if k.startswith(old)]:
                state_dict[prefix + "model." + key[len(old) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle, reading models pickled when the wrapped model was the ``base_model`` submodule."""
        modules = state.get("_modules", {})
        if "base_model" in modules and "model" not in modules:
            state["_modules"] = {("model" if k == "base_model" else k): v for k, v in modules.items()}
        super().__setstate__(state)

    def __getattr__(self, name: str) -> Any:
        """Everything else is the wrapped model's. ``base_model`` is its backbone, as transformers names it
        (``PreTrainedModel.base_model``, which TRL's fused LM-head loss runs), or the wrapped model itself if it has
        none; the wrapped model itself is ``model`` and :meth:`get_base_model`."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            if name == "base_model":
                return getattr(self.model, "base_model", self.model)
            return getattr(self.model, name)

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
        return self.model

    def add_adapter(self, adapter_name: str, config: FourierFTConfig) -> None:
        """Add a new adapter (any method) on ``config``'s targets; it is not activated (see :meth:`set_adapter`).
        A planned one (S2FT) needs ``calibrate(batches, adapter_name=...)`` before it is used."""
        check_name(adapter_name, self.peft_config)
        if any(layer.merged for layer in self.spectral_layers().values()):
            raise RuntimeError("unmerge() before adding an adapter")
        refuse_sharded(self, "add an adapter to", "add every adapter (or load it) before sharding")
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
        activate(self.model, names, self._trainable)
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
        remove(self.model, adapter_name)
        del self.peft_config[adapter_name]
        self._trainable.discard(adapter_name)
        remaining = [n for n in self.active_adapters if n != adapter_name] or [next(iter(self.peft_config))]
        if adapter_name in self.active_adapters and remaining[0] not in self.active_adapters:
            new = remaining[0]
            ready = not self.peft_config[new].planned or all(
                layer.adapters[new].is_ready for layer in self._layers_of(new).values()
            )
            warnings.warn(
                f"deleted the active adapter {adapter_name!r}; the active adapter is now {new!r}"
                + (
                    "" if ready else f" (no spectrum locations yet: calibrate(batches, adapter_name={new!r}))"
                ),
                stacklevel=2,
            )
        self.set_adapter(remaining, check=False)

    def _require_known(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r}; the model has {list(self.peft_config)}")

    def _require_planned(self, name: str, layers: dict[str, SpectralLayer] | None = None) -> None:
        config = self.peft_config[name]
        layers = self.spectral_layers() if layers is None else layers
        if config.planned and not all(
            layer.adapters[name].is_ready for layer in layers.values() if name in layer.adapters
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

    # ------------------------------------------------------------------ inspection
    def spectral_layers(self) -> dict[str, SpectralLayer]:
        """The adapted layers by the name of the module they wrap, in module order."""
        return {n: m for n, m in outer_modules(self.model) if isinstance(m, SpectralLayer)}

    def _trained_copies(self) -> dict[str, TrainedCopy]:
        return {n: m for n, m in outer_modules(self.model) if isinstance(m, TrainedCopy)}

    def _layers_of(self, adapter_name: str) -> dict[str, SpectralLayer]:
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
        layers = self._layers_of(name)
        config = self.peft_config[name]
        runner = self if is_sharded_model(self) else self.model  # FSDP: through the root's hooks
        return calibrate_adapter(runner, layers, name, config, batches, loss_fn, progress, force)

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
        if any(is_partitioned(layer.coeffs) for layer in self._layers_of(name).values()):
            raise RuntimeError(
                "cannot replan under DeepSpeed ZeRO-3: its optimizer keeps its own copy of the coefficients, which "
                "re-planning would not reach. Save the adapter, replan in one process "
                "(SpectralModel.from_pretrained(base, folder, is_trainable=True).replan()), save it and resume from it"
            )
        return replan_adapter(self._layers_of(name), name, self.peft_config[name], priors)

    # ------------------------------------------------------------------ merge
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Add the ``ΔW`` of ``adapter_names`` (default: the active adapters) into the base weights
        (``unmerge`` undoes it)."""
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        for name in names:
            self._require_known(name)
            self._require_planned(name)
        refuse_sharded(self, "merge", MERGE_UNSHARDED)
        layers = self.spectral_layers()
        for module, layer in layers.items():
            if layer.kind.quantized and any(n in layer.adapters for n in names):
                raise quantized_merge_error(module, layer.base_layer)
        for layer in layers.values():
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
        switched: list[nn.Module] = [*layers.values(), *copies.values()]
        for module in switched:
            module.disabled = True
        try:
            yield
        finally:
            for module in switched:
                module.disabled = False
            for name, names in merged.items():
                layers[name].merge(names)

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """PEFT's name for :meth:`disable_adapters`: ``with model.disable_adapter(): ...`` runs the base model."""
        return self.disable_adapters()

    def merge_and_unload(self, adapter_names: list[str] | None = None, dequantize: bool = False) -> nn.Module:
        """Merge ``adapter_names`` (default: the active adapters), take every adapter out, and return the original
        model class with merged weights (and, in ``modules_to_save``, the first merged adapter's trained copy).

        A quantized base (bitsandbytes) cannot hold ``ΔW``: ``dequantize=True`` first replaces every quantized
        layer by an ``nn.Linear`` with its dequantized weight (:func:`s2ft.tuner.kinds.dequantize_modules`, in
        the model's float dtype) and returns that float model, ``ΔW`` merged; without it such a model is refused,
        unchanged."""
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        if dequantize:
            for name in names:
                self._require_known(name)
                self._require_planned(name)
            dequantize_modules(self.model)
            for layer in self.spectral_layers().values():
                layer.kind = kind_of(layer.base_layer)
        self.merge(names)
        return self._unload(names)

    def unload(self) -> nn.Module:
        """Take every adapter out without merging: the original model, as before wrapping."""
        self.unmerge()
        return self._unload([])

    def _unload(self, names: list[str]) -> nn.Module:
        model = unwrap(self.model, names)
        for name, param in model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, True))
        return model

    # ------------------------------------------------------------------ save and load
    def adapter_state_dict(
        self, adapter_name: str | None = None, coefficient_dtype: torch.dtype = torch.float32
    ) -> dict[str, torch.Tensor]:
        """What an adapter's file stores (:func:`s2ft.tuner.saving.adapter_state`): the coefficients (float32, or
        ``coefficient_dtype``), the locations if its method stores them (FourierFT's follow from the seed, as in
        PEFT), any permutations, and its trained ``modules_to_save``. Nothing of the base model."""
        name = adapter_name or self.active_adapter
        self._require_known(name)
        copies = self._trained_copies()
        return adapter_state(self._layers_of(name), copies, name, self.peft_config[name], coefficient_dtype)

    def _metadata(self, adapter_name: str | None = None) -> dict[str, str]:
        """The file's metadata: the shapes ``[d_out, d_in]`` of the adapted modules, in the sorted order of their
        names, and the basis of the adapter's coefficients."""
        name = adapter_name or self.active_adapter
        return shapes_metadata(self._layers_of(name), self.peft_config[name].basis)

    def adapter_nbytes(
        self, adapter_name: str | None = None, coefficient_dtype: torch.dtype = torch.float32
    ) -> int:
        """Size in bytes of the adapter file ``save_pretrained`` writes (header included; the JSON config aside)."""
        state = self.adapter_state_dict(adapter_name, coefficient_dtype)
        return len(adapter_file_bytes(state, self._metadata(adapter_name)))

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

        ``format="peft"`` writes adapters whose config has a ``peft_type`` (FourierFT) in Hugging Face PEFT's own
        format (``PeftModel`` loads them); S2FT and DCT have none. ``coefficient_dtype=torch.float16`` (or
        ``bfloat16``) stores the coefficients in 16 bits: on the default text job that left test accuracy unchanged
        (0.4045) and the file 18% smaller (``benchmarks/storage.py``); they load back into float32. PEFT's other
        keyword arguments (``safe_serialization``, ...) are accepted; s2ft always writes safetensors.
        """
        if kwargs.get("safe_serialization") is False:
            logger.warning("s2ft writes safetensors only; safe_serialization=False is ignored")
        check_save_options(format, coefficient_dtype, bool(self.spectral_layers()))
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        for name in names:
            self._require_known(name)
        write_adapters(self, save_directory, names, format, coefficient_dtype)

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
        config, state = read_folder(adapter_directory, model, wrapped=False)
        spectral = cls(model, config, adapter_name)
        try:
            fill(spectral._layers_of(adapter_name), spectral._trained_copies(), adapter_name, state)
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
        check_name(adapter_name, self.peft_config)
        config, state = read_folder(adapter_directory, self.model, wrapped=True)
        self.add_adapter(adapter_name, config)
        try:
            fill(self._layers_of(adapter_name), self._trained_copies(), adapter_name, state)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self._trainable.discard(adapter_name)
        self.set_adapter(self.active_adapters, check=False)


def _is_adapter_key(key: str) -> bool:
    """Whether a state-dict key belongs to an adapter (its coefficients, locations, or a trained copy)."""
    return ".adapters." in key or ".copies." in key


def get_spectral_model(
    model: nn.Module, config: FourierFTConfig, adapter_name: str = DEFAULT
) -> SpectralModel:
    """Wrap every module of ``model`` that ``config.target_modules`` names with an adapter, in place.

    Everything else is frozen but ``config.modules_to_save``. Adapters with seeded locations (FourierFT, DCT) are
    ready to train; planned ones (S2FT) need :meth:`SpectralModel.calibrate` first. Raises, leaving the model as it
    was, if a target is missing or unsupported.
    """
    return SpectralModel(model, config, adapter_name)
