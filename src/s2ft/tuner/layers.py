"""The adapter: a module that wraps a frozen supported layer (:mod:`s2ft.tuner.kinds`) and adds a spectral ``ΔW``;
and the trained copy of a module to save."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import threading
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from s2ft.ops.bases import get_basis
from s2ft.ops.locations import index_dtype
from s2ft.tuner.kinds import (  # noqa: F401 (their home before kinds.py)
    KINDS,
    SUPPORTED_LAYERS,
    SUPPORTED_NAMES,
    Conv1DKind,
    Conv2dKind,
    LayerKind,
    kind_of,
    layer_shape,
    quantized_merge_error,
    weight_matrix,
)
from s2ft.tuner.serving import layer_handle, mixed_apply, serve_mixed

BASE = "__base__"  # the reserved adapter name of a mixed batch's examples that run on the base model alone
DEFAULT = "default"  # the name of the adapter get_spectral_model creates, as in PEFT
_EXAMPLE_ADAPTERS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "s2ft_adapter_names", default=None
)
# How many example_adapters() contexts are open, in any thread: a plain module global, which torch.compile reads
# and guards on, so a forward outside any mixed batch (training, evaluation, generate with the active adapters)
# never calls ContextVar.get, which Dynamo cannot trace. Opening a context fails the guard (on _ANY_MIXED below):
# the next call recompiles; in inference the names are then read inside the mixed operator, with autograd in one
# place outside the graph (_example_names).
_OPEN_MIXED = 0
_OPEN_MIXED_LOCK = threading.Lock()
# Whether any is open: what a compiled forward reads (a bool, so that Dynamo's guard on it takes two values, not one
# per count of open batches). Compiled inference under a mixed batch is then one custom operator per adapted layer
# (s2ft.tuner.serving.mixed_apply), which looks the names up itself, in eager code: no graph break.
_ANY_MIXED = False
MIXED_BREAK = (
    "a mixed batch (adapter_names) is opened in Python, and with autograd or through a trained copy "
    "(modules_to_save) looks up each example's adapter in Python: that runs outside the compiled graph (a graph "
    "break; torch.compile(fullgraph=True) refuses it). For mixed inference without a break, compile the wrapped "
    "model's forward (model.get_base_model().forward) and serve under torch.no_grad(); or compile for one set of "
    "active adapters (set_adapter)"
)

MERGED_BREAK = (
    "a layer with merged adapters checks in Python that their coefficients are unchanged: it runs outside the "
    "compiled graph (a graph break; torch.compile(fullgraph=True) refuses it). Compile the model returned by "
    "merge_and_unload(), or unmerge() first"
)


@contextlib.contextmanager
def example_adapters(names: list[str] | None) -> Iterator[None]:
    """Inside, every adapted layer applies to example ``i`` of its input only the adapter ``names[i]`` (or none,
    for :data:`BASE`): a mixed batch, served without merging."""
    global _OPEN_MIXED, _ANY_MIXED
    token = _EXAMPLE_ADAPTERS.set(list(names) if names is not None else None)
    with _OPEN_MIXED_LOCK:
        _OPEN_MIXED += 1
        _ANY_MIXED = True
    try:
        yield
    finally:
        with _OPEN_MIXED_LOCK:
            _OPEN_MIXED -= 1
            _ANY_MIXED = _OPEN_MIXED > 0
        _EXAMPLE_ADAPTERS.reset(token)


# Functions compiled graphs call but never trace (their Python state is not traceable): each is run through
# ``torch.compiler.disable`` once the first layer is made. Not at import: decorating with it imports Dynamo (about
# a second), which ``import s2ft`` should not cost; a model is only compiled after it was wrapped.
_GRAPH_BREAKS: list[Any] = []


def graph_break(reason: str) -> Any:
    """Decorator: ``fn`` runs outside any compiled graph (``torch.compiler.disable(fn, reason=reason)``), the
    disabling done by :func:`_prepare_graph_breaks` when the first :class:`SpectralLayer` is made."""

    def decorate(fn: Any) -> Any:
        disabled: list[Any] = []

        def call(*args: Any, **kwargs: Any) -> Any:
            return (disabled[0] if disabled else fn)(*args, **kwargs)

        def prepare() -> None:
            if not disabled:
                disabled.append(torch.compiler.disable(fn, reason=reason))

        call.__name__, call.__qualname__, call.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        _GRAPH_BREAKS.append(prepare)
        return call

    return decorate


def _prepare_graph_breaks() -> None:
    if _GRAPH_BREAKS:
        for prepare in _GRAPH_BREAKS:
            prepare()
        _GRAPH_BREAKS.clear()


@graph_break(MIXED_BREAK)
def _example_names() -> list[str] | None:
    """The names of the innermost :func:`example_adapters` of this thread (or task), or None."""
    return _EXAMPLE_ADAPTERS.get()


def example_names() -> list[str] | None:
    """The per-example adapter names in force, or None (no mixed batch open anywhere: no lookup at all)."""
    return _example_names() if _OPEN_MIXED else None


class SpectralAdapter(nn.Module):
    """One named adapter on one layer: ``n`` trainable coefficients ``coeffs`` at locations ``(rows[k], cols[k])``
    of a ``d_out x d_in`` grid in the adapter's ``basis`` (an object of :data:`s2ft.ops.bases.BASES`), and,
    optionally (S2FT), the permutations ``perm_rows`` ``(d_out,)`` and ``perm_cols`` ``(d_in,)``. In the Fourier
    basis ``ΔW[perm_rows[i], perm_cols[j]] = scaling * Re(ifft2(F))[i, j]``, ``F`` zero but for the coefficients.
    All of ``ΔW``'s math goes through the basis. The coefficients stay float32 whatever the base layer's dtype.

    The locations are kept as one buffer ``locations`` of flat positions ``rows * d_in + cols`` (int32 below
    2**31 entries: 4 bytes a location, half of a (rows, cols) pair); ``rows`` and ``cols`` are derived from it
    when read, and kept (with the FFT path's plan, which is cached per ``rows`` tensor) only while training (train
    mode, gradients enabled). A served adapter holds its coefficients, locations and permutations only."""

    def __init__(
        self,
        d_out: int,
        d_in: int,
        n_frequency: int,
        scaling: float,
        init: str = "zeros",
        forward_path: str = "auto",
        basis: Any = "fourier",
        device: torch.device | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.d_out, self.d_in = d_out, d_in
        self.adapter_name = name  # for errors
        self.n_frequency, self.scaling, self.forward_path = n_frequency, scaling, forward_path
        self.basis = get_basis(basis) if isinstance(basis, str) else basis
        coeffs = (
            torch.zeros(n_frequency, device=device)
            if init == "zeros"
            else torch.randn(n_frequency).to(device)
        )
        self.coeffs = nn.Parameter(coeffs)
        self.register_buffer("locations", None)
        self.register_buffer("perm_rows", None)
        self.register_buffer("perm_cols", None)

    @property
    def is_ready(self) -> bool:
        """Whether the locations are set (from the seed at creation; for a planned method such as S2FT, after
        calibration or loading)."""
        return self.locations is not None

    def set_locations(self, rows, cols, perm_rows=None, perm_cols=None) -> None:
        """Install locations (and S2FT's permutations) as int32 buffers on the coefficients' device
        (:func:`s2ft.ops.locations.index_dtype`)."""
        device = self.coeffs.device
        rows, cols = rows.to(device, torch.int64), cols.to(device, torch.int64)
        self.locations = (rows * self.d_in + cols).to(index_dtype(self.d_out * self.d_in))
        self.perm_rows = None if perm_rows is None else perm_rows.to(device, index_dtype(self.d_out))
        self.perm_cols = None if perm_cols is None else perm_cols.to(device, index_dtype(self.d_in))

    @property
    def rows(self) -> torch.Tensor | None:
        """The locations' rows ``(n,)`` (int32), derived from ``locations``."""
        unpacked = self._unpacked()
        return None if unpacked is None else unpacked[0]

    @property
    def cols(self) -> torch.Tensor | None:
        """The locations' columns ``(n,)`` (int32), derived from ``locations``."""
        unpacked = self._unpacked()
        return None if unpacked is None else unpacked[1]

    def _unpacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(rows, cols)`` of ``locations``; kept while training (train mode, gradients enabled: the same tensors
        every step, so the FFT path's plan stays cached), for as long as ``locations`` is the same unchanged
        tensor. A merge or an eval-mode forward keeps nothing."""
        flat = self.locations
        if flat is None:
            return None
        if torch.compiler.is_compiling():  # derived in the graph (two fused elementwise ops), nothing kept
            rows = torch.div(flat, self.d_in, rounding_mode="floor")
            return rows.to(index_dtype(self.d_out)), (flat - rows * self.d_in).to(index_dtype(self.d_in))
        key = (flat._version,) if not flat.is_inference() else None
        kept = self.__dict__.get("_kept_locations")
        if kept is not None and kept[0] is flat and key is not None and kept[1] == key:
            return kept[2]
        rows = torch.div(flat, self.d_in, rounding_mode="floor")
        unpacked = (rows.to(index_dtype(self.d_out)), (flat - rows * self.d_in).to(index_dtype(self.d_in)))
        if torch.is_grad_enabled() and self.training and key is not None:
            self.__dict__["_kept_locations"] = (flat, key, unpacked)
        else:
            self.__dict__.pop("_kept_locations", None)
        return unpacked

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # State dicts from before the flat locations hold "rows" and "cols" instead
        rows, cols = state_dict.get(prefix + "rows"), state_dict.get(prefix + "cols")
        if rows is not None and cols is not None and prefix + "locations" not in state_dict:
            flat = rows.long() * self.d_in + cols.long()
            state_dict[prefix + "locations"] = flat.to(index_dtype(self.d_out * self.d_in))
            del state_dict[prefix + "rows"], state_dict[prefix + "cols"]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _require_ready(self) -> None:
        if not self.is_ready:
            known = self.__dict__.get("adapter_name")  # None in an adapter pickled before it had a name
            name = "this adapter" if known is None else f"adapter {known!r}"
            calibrate = "batches" if known is None else f"batches, adapter_name={known!r}"
            raise RuntimeError(
                f"{name} has no locations yet (its method, S2FT, plans them from data): call "
                f"model.calibrate({calibrate}) before using it, or load a trained adapter with "
                "SpectralModel.from_pretrained"
            )

    def _spectrum(self, coeffs: torch.Tensor | None = None) -> tuple:
        """The arguments the basis's ``delta_weight`` and (after ``x``) ``apply`` take."""
        self._require_ready()
        coeffs = self.coeffs if coeffs is None else coeffs
        rows, cols = cast(
            "tuple[torch.Tensor, torch.Tensor]", self._unpacked()
        )  # ready: it has locations  # once: outside training each read derives them anew
        return (
            coeffs.float(),
            rows,
            cols,
            self.d_out,
            self.d_in,
            self.scaling,
            self.perm_rows,
            self.perm_cols,
        )

    def delta_weight(self, coeffs: torch.Tensor | None = None) -> torch.Tensor:
        """The dense ``ΔW``, ``(d_out, d_in)`` in float32 (the layer kind's matrix view), of the adapter's
        coefficients or of ``coeffs`` ``(n,)`` at its locations."""
        return self.basis.delta_weight(*self._spectrum(coeffs))

    def served_delta(self) -> torch.Tensor:
        """:meth:`delta_weight` for inference, not differentiable and not kept (a bounded cache of dense ``ΔW``
        is optional: :func:`s2ft.tuner.serving.set_serving_cache`)."""
        with torch.no_grad():
            return self.delta_weight()

    def extra_repr(self) -> str:
        return (
            f"basis={getattr(self.basis, 'name', self.basis)}, n={self.n_frequency}, scaling={self.scaling}"
        )


class SpectralLayer(nn.Module):
    """``y = base_layer(x) + Σ_active ΔW_a x``: a supported layer with named spectral adapters (:class:`SpectralAdapter`).

    ``adapters`` holds them by name; ``active`` lists those the forward applies (their ``ΔW`` add). Under
    :func:`example_adapters`, example ``i`` gets only the adapter ``names[i]``. The attributes of one adapter
    (``coeffs``, ``rows``, ..., ``set_locations``, ``delta_weight``) are those of the first active one, so a layer
    with one adapter reads like that adapter.

    Shapes: ``x`` ``(..., d_in)`` -> ``(..., d_out)`` for Linear and Conv1D; ``(N, C, H, W)`` for Conv2d.
    """

    per_adapter_children = ("adapters",)  # what s2ft.tuner.walk.outer_modules does not visit

    def __init__(
        self,
        base_layer: nn.Module,
        n_frequency: int,
        scaling: float,
        init: str = "zeros",
        forward_path: str = "auto",
        basis: Any = "fourier",
        adapter_name: str = DEFAULT,
    ) -> None:
        super().__init__()
        _prepare_graph_breaks()
        self.kind = kind_of(base_layer)
        self.base_layer = base_layer
        self.d_out, self.d_in = self.kind.shape(base_layer)
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False
        # Merged adapters: name -> (the coefficients merged, their version); and, for a weight in a dtype coarser
        # than float32, the weight as it was before any merge, so that unmerging restores it bit for bit.
        self._merged: dict[str, tuple[torch.Tensor, int]] = {}
        self._kept_weight: torch.Tensor | None = None
        self._mixed_handle = layer_handle(self)  # names this layer to the compiled mixed operator
        self.add_adapter(adapter_name, n_frequency, scaling, init, forward_path, basis)
        self.active = [adapter_name]
        self.train(base_layer.training)  # in the mode of the layer it replaces

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self, name, n_frequency, scaling, init="zeros", forward_path="auto", basis: Any = "fourier"
    ) -> None:
        """Add adapter ``name`` in ``basis`` (a basis object or its name in :data:`s2ft.ops.bases.BASES`)."""
        if name in self.adapters:
            raise ValueError(f"the layer already has an adapter named {name!r}")
        self.adapters[name] = SpectralAdapter(
            self.d_out,
            self.d_in,
            n_frequency,
            scaling,
            init,
            forward_path,
            basis,
            self.base_layer.weight.device,
            name,
        )
        self.adapters[name].train(self.training)

    def delete_adapter(self, name: str) -> None:
        if name in self._merged:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge() before deleting it")
        del self.adapters[name]
        self.active = [a for a in self.active if a != name]

    @property
    def current(self) -> SpectralAdapter:
        """The first active adapter (or the only one)."""
        name = self.active[0] if self.active else next(iter(self.adapters))
        return self.adapters[name]

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.half()``, ``.bfloat16()`` cast the base layer; the coefficients stay float32."""
        super()._apply(fn, recurse)
        for adapter in self.adapters.values():
            if adapter.coeffs.dtype != torch.float32:
                adapter.coeffs.data = adapter.coeffs.data.float()
        return self

    # The attributes of the current adapter, so that a layer with one adapter reads like it.
    coeffs = property(lambda self: self.current.coeffs)
    rows = property(lambda self: self.current.rows)
    cols = property(lambda self: self.current.cols)
    perm_rows = property(lambda self: self.current.perm_rows)
    perm_cols = property(lambda self: self.current.perm_cols)
    n_frequency = property(lambda self: self.current.n_frequency)
    scaling = property(lambda self: self.current.scaling)
    forward_path = property(lambda self: self.current.forward_path)
    basis = property(lambda self: self.current.basis)
    is_ready = property(lambda self: self.current.is_ready)

    def _require_ready(self) -> None:
        self.current._require_ready()

    def _spectrum(self) -> tuple:
        return self.current._spectrum()

    def set_locations(
        self, rows, cols, perm_rows=None, perm_cols=None, adapter_name: str | None = None
    ) -> None:
        """Install locations (and S2FT's permutations) of an adapter (the current one by default)."""
        name = adapter_name or (self.active[0] if self.active else next(iter(self.adapters)))
        if name in self._merged:
            raise RuntimeError("unmerge() the adapter before changing its locations")
        self.adapters[name].set_locations(rows, cols, perm_rows, perm_cols)

    def delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """The dense ``ΔW`` ``(d_out, d_in)`` of an adapter (the current one by default), float32."""
        return (self.adapters[adapter_name] if adapter_name else self.current).delta_weight()

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and ``copy.deepcopy``: without the handle (:func:`s2ft.tuner.serving.layer_handle`), which
        names this layer alone; :meth:`__setstate__` gives the copy its own."""
        state = super().__getstate__()
        state.pop("_mixed_handle", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._mixed_handle = layer_handle(self)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _ANY_MIXED and torch.compiler.is_compiling() and not torch.is_grad_enabled() and not self._merged:
            # Compiled inference while a mixed batch is open (in this thread or another): the adapters' part is one
            # custom operator that runs the eager serving code (_served_delta), names and caches included.
            result = self.base_layer(x)
            if self.disabled:
                return result
            return result + mixed_apply(x, result, self._mixed_handle)
        names = example_names()
        if self._merged:
            self._check_merged_unchanged()
            if names is not None:
                raise RuntimeError(
                    "adapter_names cannot be served while adapters are merged: unmerge() first"
                )
            if (
                self.training
                and torch.is_grad_enabled()
                and any(self.adapters[a].coeffs.requires_grad for a in self._merged)
            ):
                raise RuntimeError(
                    "this adapter is merged into the base weight, so a training step would train nothing: "
                    "unmerge() before training (for inference while merged, call model.eval() or use "
                    "torch.no_grad())"
                )
        if self.disabled:
            return self.base_layer(x)
        if names is not None:
            return self._mixed(x, names)
        applied = [self.adapters[a] for a in self.active if a not in self._merged]
        if not applied:
            return self.base_layer(x)
        path = self._fusion_path(applied[0], x) if len(applied) == 1 else None
        if path == "dense":
            # One GEMM with W + ΔW: the dense path's separate ΔW x would cost two more GEMMs of the layer's
            # size per training step (its forward and its input gradient); ΔW's own gradient is the same.
            weight = self.base_layer.weight
            coeffs, *spectrum = applied[0]._spectrum()
            delta = applied[0].basis.delta_weight(coeffs.to(weight.dtype), *spectrum)  # float64 for float64
            return F.linear(x, weight + delta, self.base_layer.bias)
        # The branches run before the base layer, so that backward runs them after (reverse order): the base
        # layer's input gradient arrives first and autograd adds the branches' into it in place.
        delta = self.kind.apply(self, applied[0], x, path)
        for adapter in applied[1:]:
            delta = delta + self.kind.apply(self, adapter, x)
        result = self.base_layer(x)
        return result + delta.to(result.dtype)

    def _fusion_path(self, adapter: SpectralAdapter, x: torch.Tensor) -> str | None:
        """The path of ``adapter`` in this training forward where its ``ΔW`` could join the base weight in one
        GEMM: ``"dense"`` (then fused) or ``"fft"``, ``"auto"`` resolved with the fused dense path's costs.
        ``None`` where it could not: not a plain ``nn.Linear`` whose weight is float32 or float64 like ``x`` (a
        16-bit weight would round ``ΔW`` away), under autocast, or without autograd."""
        base = self.base_layer
        if not torch.is_grad_enabled() or type(base) is not nn.Linear or self.kind.quantized:
            return None
        if base.weight.dtype not in (torch.float32, torch.float64) or x.dtype != base.weight.dtype:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        path = adapter.forward_path
        choose = getattr(adapter.basis, "choose_path", None)
        if path == "auto" and choose is not None:
            tokens = x.numel() // max(1, self.d_in)
            path = choose(self.d_out, self.d_in, adapter.n_frequency, tokens, x.device, fused=True)
        return path

    def _fusable(self, adapter: SpectralAdapter, x: torch.Tensor) -> bool:
        """Whether ``adapter``'s ``ΔW`` joins the base weight in one GEMM for this training forward."""
        return self._fusion_path(adapter, x) == "dense"

    @graph_break(MIXED_BREAK)
    def _mixed(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Example ``i`` of ``x`` (dimension 0) through the base layer plus adapter ``names[i]`` only."""
        groups = self._groups(x, names)
        result = self.base_layer(x)
        if not torch.is_grad_enabled():
            return self._add_served(x, groups, result)
        return self._add_groups(x, groups, result.clone())  # the branches add into it in place

    def _groups(self, x: torch.Tensor, names: list[str]) -> dict[str, list[int]]:
        """The examples of each name in ``names`` (one per example of ``x``), every name checked."""
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} names for a batch of {x.shape[0]} examples")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        unknown = [name for name in groups if name != BASE and name not in self.adapters]
        if unknown:
            raise KeyError(
                f"no adapter named {unknown[0]!r}; the model has {list(self.adapters)} (and {BASE!r})"
            )
        return groups

    def _add_served(
        self, x: torch.Tensor, groups: dict[str, list[int]], result: torch.Tensor
    ) -> torch.Tensor:
        """``result`` plus, for each example, its adapter's ``ΔW x`` (in ``result``'s dtype), without autograd;
        ``result`` may be added into in place."""
        if type(self.kind).apply is LayerKind.apply:  # ΔW maps the last dimension: one banked pass
            adapted = {name: rows for name, rows in groups.items() if name != BASE}
            if len(adapted) == 1 and len(next(iter(adapted.values()))) == x.shape[0]:
                return result + self.kind.apply(self, self.adapters[next(iter(adapted))], x).to(result.dtype)
            serve_mixed(self, x, adapted, result)
            return result
        return self._add_groups(x, groups, result)

    def _add_groups(
        self, x: torch.Tensor, groups: dict[str, list[int]], result: torch.Tensor
    ) -> torch.Tensor:
        """``result`` plus, group by group, each adapter's ``ΔW`` on its examples (added in place)."""
        for name, rows in groups.items():
            if name == BASE:
                continue
            if len(rows) == x.shape[0]:  # the whole batch: no gather or scatter
                result += self.kind.apply(self, self.adapters[name], x).to(result.dtype)
                continue
            index = torch.tensor(rows, device=x.device)
            delta = self.kind.apply(self, self.adapters[name], x.index_select(0, index))
            result.index_add_(0, index, delta.to(result.dtype))
        return result

    @torch.no_grad()
    def _served_delta(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What the adapters add to the base layer's output ``result`` for ``x`` (a new tensor like ``result``),
        without autograd, as the eager forward computes it in this thread: each example's adapter of this
        thread's innermost mixed batch, or, with none open here (another thread's is), the active adapters'.
        The compiled mixed operator's body (:func:`s2ft.tuner.serving.mixed_apply`)."""
        names = example_names()
        if names is None:
            applied = [self.adapters[a] for a in self.active if a not in self._merged]
            if not applied:
                return torch.zeros_like(result)
            delta = self.kind.apply(self, applied[0], x)
            for adapter in applied[1:]:
                delta = delta + self.kind.apply(self, adapter, x)
            return delta.to(result.dtype)
        return self._add_served(x, self._groups(x, names), torch.zeros_like(result))

    # ------------------------------------------------------------------ merge
    @property
    def merged(self) -> bool:
        return bool(self._merged)

    @graph_break(MERGED_BREAK)
    def _check_merged_unchanged(self) -> None:
        for name, (_, version) in self._merged.items():
            if self.adapters[name].coeffs._version != version:
                raise RuntimeError(
                    "the coefficients of a merged adapter were changed; the base weight holds the ΔW of the "
                    "merged ones: unmerge() (it restores the base weight from the merged coefficients), then "
                    "change them"
                )

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Add the ``ΔW`` of ``adapter_names`` (default: the active adapters) into the base weight.

        A weight in float16 or bfloat16 is kept as it was before the first merge (a copy, until the last unmerge),
        so that unmerging restores it bit for bit; a float32 weight is restored by subtraction (within float32
        rounding).
        """
        if self.kind.quantized:
            raise quantized_merge_error(type(self.base_layer).__name__, self.base_layer)
        weight = self.base_layer.weight
        for name in adapter_names if adapter_names is not None else list(self.active):
            if name in self._merged:
                continue
            adapter = self.adapters[name]
            if self._kept_weight is None and torch.finfo(weight.dtype).bits < 32:
                self._kept_weight = weight.detach().clone()
            delta = self.kind.to_weight(self.base_layer, adapter.delta_weight().detach())
            with torch.no_grad():
                weight.copy_((weight.float() + delta).to(weight.dtype))
            self._merged[name] = (adapter.coeffs.detach().clone(), adapter.coeffs._version)

    def unmerge(self) -> None:
        """Take every merged ``ΔW`` out of the base weight again. Coefficients changed while merged are an error,
        raised after the weight is restored from the merged coefficients."""
        if not self._merged:
            return
        weight = self.base_layer.weight
        changed = [n for n, (_, v) in self._merged.items() if self.adapters[n].coeffs._version != v]
        with torch.no_grad():
            if self._kept_weight is not None:
                weight.copy_(self._kept_weight)
            else:
                for name, (coeffs, _) in self._merged.items():
                    merged = self.adapters[name].delta_weight(coeffs)
                    weight.copy_(
                        (weight.float() - self.kind.to_weight(self.base_layer, merged)).to(weight.dtype)
                    )
        self._merged, self._kept_weight = {}, None
        if changed:
            raise RuntimeError(
                "the coefficients were changed while the adapter was merged; the base weight was restored from "
                "the merged coefficients, and the changes were never applied: change coefficients only unmerged"
            )

    def extra_repr(self) -> str:
        return f"kind={self.kind.name}, d_out={self.d_out}, d_in={self.d_in}, active={self.active}"


SpectralLinear = SpectralLayer  # its name before it wrapped Conv2d too


class TrainedCopy(nn.Module):
    """A module of ``modules_to_save``: each adapter trains and saves its own copy (``copies[name]``); the frozen
    original is kept. With adapters disabled the original runs, so the model computes exactly what it computed
    before wrapping; with several active adapters, the first one's copy runs."""

    per_adapter_children = ("copies",)  # what s2ft.tuner.walk.outer_modules does not visit

    def __init__(self, module: nn.Module, adapter_name: str = DEFAULT) -> None:
        super().__init__()
        self.original_module = module
        self.original_module.requires_grad_(False)
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.add_copy(adapter_name)
        self.train(module.training)

    def add_copy(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original_module).requires_grad_(True)
        self.active = name if self.active is None else self.active

    @property
    def trained_module(self) -> nn.Module:
        """The copy the forward uses: the active adapter's."""
        return self.copies[cast(str, self.active)]  # set by the first add_copy, in __init__

    def forward(self, *args, **kwargs):
        names = example_names()
        if names is not None:
            return self._mixed(names, *args, **kwargs)
        if self.disabled or self.active is None:
            return self.original_module(*args, **kwargs)
        return self.trained_module(*args, **kwargs)

    @graph_break(MIXED_BREAK)
    def _mixed(self, names: list[str], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Example ``i`` of ``x`` (dimension 0) through adapter ``names[i]``'s copy (the original for an adapter
        without one, or :data:`BASE`)."""
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} names for a batch of {x.shape[0]} examples")
        groups: dict[nn.Module, list[int]] = {}
        for i, name in enumerate(names):
            module = self.copies[name] if name in self.copies else self.original_module  # noqa: SIM401
            groups.setdefault(module, []).append(i)
        if len(groups) <= 1:  # one module for the whole batch (or an empty batch: the original)
            return next(iter(groups), self.original_module)(x, *args, **kwargs)
        result = None
        for module, rows in groups.items():
            index = torch.tensor(rows, device=x.device)
            out = module(x.index_select(0, index), *args, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"a mixed batch needs {type(module).__name__} to return a tensor")
            result = out.new_zeros((x.shape[0], *out.shape[1:])) if result is None else result
            result.index_copy_(0, index, out)
        assert result is not None  # two groups or more
        return result
