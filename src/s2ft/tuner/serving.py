"""Serving adapters without autograd, at the adapters' own size.

No dense ``ΔW`` is kept per adapter by default:

- a mixed batch (``adapter_names``) goes through one :class:`s2ft.ops.mixed.MixedBank` per layer
  (:class:`LayerBank`), which references the adapters' own tensors and builds the sparse spectral maps of the
  adapters in the batch on each call: one pass serves any number of distinct adapters, and a loaded adapter
  costs its own tensors only;
- a single adapter is applied per call on the path its ``forward_path`` names (``"auto"``:
  :func:`s2ft.ops.apply.choose_path`), as in training, the FFT path through the layer's bank (which keeps no
  per-adapter plan); an adapter whose basis has no bank (DCT) on its basis's own path;
- :func:`set_serving_cache` turns on a :class:`DenseCache`, shared by every layer of a model and bounded in
  bytes, that keeps the most recently used adapters' dense ``ΔW`` (a small matmul per adapter: it wins at widths
  of 384 and less and on thin layers, ``benchmarks/results/cpu/mixed_apply.md``);
- :func:`set_map_cache` turns on a :class:`MapCache`, bounded in bytes, that keeps the served adapters' sparse
  maps (12 bytes per location, and 8 for a copy of its coefficients and locations that tells when they
  change), which a mixed batch otherwise builds on each call: with short sequences
  that build costs more than serving the tokens (``benchmarks/results/cpu/serving.md``).

:func:`serving_nbytes` reports every byte these hold, with the adapters' own tensors. :func:`fold_head_input`
keeps ``generate``'s output head one ``mm`` on the frozen base weights
(``benchmarks/results/cpu/serving_compile_gen.md``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import numbers
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from s2ft.ops.apply import _PLANS, _schema_digest, choose_path
from s2ft.ops.mixed import MixedBank, check

BANK_BASES = ("fourier",)  # the bases whose adapters a MixedBank serves


def version_key(adapter: nn.Module) -> tuple:
    """What a served structure of ``adapter`` depends on: its coefficients, locations and permutations (each
    tensor's identity, version counter and device) and its scaling. A write through ``.data``
    (``coeffs.data.mul_(3)``) changes none of these: the caches also compare the tensors' contents
    (:class:`_ByteLRU`)."""
    # straight from the module's dicts (four nn.Module.__getattr__ calls cost more: this runs for every adapter of
    # a mixed batch at every layer call)
    coeffs, buffers = adapter._parameters["coeffs"], adapter._buffers
    locations, perm_rows, perm_cols = buffers["locations"], buffers["perm_rows"], buffers["perm_cols"]
    return (
        id(coeffs),
        coeffs._version,
        coeffs.device,  # the module's tensors move together (``to`` may keep a parameter's identity)
        id(locations),
        None if locations is None else locations._version,
        id(perm_rows),
        None if perm_rows is None else perm_rows._version,
        id(perm_cols),
        None if perm_cols is None else perm_cols._version,
        adapter.__dict__.get("scaling"),
    )


def _watched(adapter: nn.Module, names: tuple[str, ...]) -> list[torch.Tensor | None]:
    """``adapter``'s tensors ``names`` (``coeffs`` and buffers), straight from the module's dicts."""
    return [adapter._parameters[n] if n == "coeffs" else adapter._buffers[n] for n in names]


def check_cache_bytes(max_bytes: object, parameter: str = "max_bytes") -> int:
    """``max_bytes`` as a byte count (``None`` meaning 0, off), or a ``ValueError`` naming ``parameter``: a byte
    count is a non-negative integer (not a bool, a float such as 1.5 or nan, or a string)."""
    if max_bytes is None:
        return 0
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral) or max_bytes < 0:
        raise ValueError(
            f"{parameter} must be a non-negative integer number of bytes (or None or 0 to turn the cache off), "
            f"got {max_bytes!r}"
        )
    return int(max_bytes)


class _ByteLRU:
    """Values derived from adapters, at most ``max_bytes`` in all, least recently used first out; keyed by
    adapter object and valid while its tensors are unchanged. One serves every layer of a model.

    Unchanged means the same :func:`version_key` and the same contents of the tensors ``WATCHED``: each entry
    keeps a copy of them (counted in its bytes), because a write through ``.data`` changes neither a tensor's
    identity nor its version counter."""

    WATCHED: tuple[str, ...] = ("coeffs", "locations", "perm_rows", "perm_cols")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = check_cache_bytes(max_bytes)
        # id: (key, value, bytes, copies of the watched tensors)
        self._entries: OrderedDict[int, tuple[tuple, object, int, list]] = OrderedDict()
        self._held = 0  # bytes of the entries, kept as they come and go

    def nbytes(self) -> int:
        return self._held

    def values(self) -> list:
        return [(value, copies) for _, value, _, copies in self._entries.values()]

    def watched_nbytes(self, adapter: nn.Module) -> int:
        """Bytes of the copies an entry of ``adapter`` keeps."""
        return sum(t.numel() * t.element_size() for t in _watched(adapter, self.WATCHED) if t is not None)

    def _drop(self, key: int | None = None) -> None:
        """Drop the entry of adapter id ``key`` (if any), or the least recently used one."""
        entry = self._entries.pop(key, None) if key is not None else self._entries.popitem(last=False)[1]
        if entry is not None:
            self._held -= entry[2]

    def lookup(self, adapter: nn.Module):
        entry = self._entries.get(id(adapter))
        if (
            entry is not None
            and entry[0] == version_key(adapter)
            and all(
                (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                for a, b in zip(entry[3], _watched(adapter, self.WATCHED))
            )
        ):
            self._entries.move_to_end(id(adapter))
            return entry[1]
        self._drop(id(adapter))
        return None

    def store(self, adapter: nn.Module, value, size: int) -> None:
        """Keep ``value`` (``size`` bytes, and the copies of the watched tensors) if it fits at all, evicting
        the least recently used."""
        size += self.watched_nbytes(adapter)
        if size > self.max_bytes:
            return
        self._drop(id(adapter))
        while self._entries and self._held + size > self.max_bytes:
            self._drop()
        copies = [None if t is None else t.detach().clone() for t in _watched(adapter, self.WATCHED)]
        self._entries[id(adapter)] = (version_key(adapter), value, size, copies)
        self._held += size


class DenseCache(_ByteLRU):
    """Dense float32 ``ΔW`` of the most recently used adapters (:func:`set_serving_cache`)."""

    def get(self, adapter: nn.Module) -> torch.Tensor | None:
        """``adapter``'s dense ``ΔW`` ``(d_out, d_in)``, built and kept if it fits; None if it never fits."""
        delta = self.lookup(adapter)
        if delta is not None:
            return delta
        size = adapter.d_out * adapter.d_in * 4
        if size + self.watched_nbytes(adapter) > self.max_bytes:
            return None
        with torch.no_grad():
            delta = adapter.delta_weight()
        self.store(adapter, delta, size)
        return delta


class MapCache(_ByteLRU):
    """The sparse spectral maps of the most recently served adapters (:func:`set_map_cache`): 12 bytes per
    location and 8 per output frequency, against ``4 d_out d_in`` for a dense ``ΔW``. A mixed batch then builds
    only the maps of the adapters the cache does not hold (:class:`s2ft.ops.mixed.MapStore`). An entry also
    keeps a copy of the adapter's coefficients and locations (8 bytes per location), to notice writes that leave
    no other trace (:class:`_ByteLRU`); the maps do not depend on the permutations."""

    WATCHED = ("coeffs", "locations")

    def get(self, adapter: nn.Module):
        return self.lookup(adapter)

    def put(self, adapter: nn.Module, maps) -> None:
        self.store(adapter, maps, maps.nbytes())


def cached_delta(layer: nn.Module, adapter: nn.Module) -> torch.Tensor | None:
    """The dense ``ΔW`` of ``adapter`` from the layer's serving cache, or None (no cache, or it does not fit)."""
    cache = layer.__dict__.get("_dense_cache")
    return None if cache is None else cache.get(adapter)


def bankable(adapter: nn.Module) -> bool:
    return getattr(adapter.basis, "name", None) in BANK_BASES


class LayerBank:
    """Which of a layer's adapters have been checked for mixed batches (:func:`s2ft.ops.mixed.check`), kept in
    ``layer.__dict__`` (never saved or moved). The :class:`MixedBank` of a batch references the adapters' own
    tensors, so it holds nothing; an adapter is checked again when its locations or permutations change
    (:func:`version_key`)."""

    def __init__(self) -> None:
        self.checked: dict[str, tuple] = {}  # name -> version key when checked

    @staticmethod
    def of(layer: nn.Module) -> LayerBank:
        if "_bank" not in layer.__dict__:
            layer.__dict__["_bank"] = LayerBank()
        return layer.__dict__["_bank"]

    def bank(self, layer: nn.Module, names: list[str]) -> MixedBank:
        """The bank of adapters ``names`` of ``layer``, in this order."""
        adapters = [layer.adapters[name] for name in names]
        for name, adapter in zip(names, adapters):
            key = version_key(adapter)[3:]  # the coefficients do not matter here
            if self.checked.get(name) != key:
                adapter._require_ready()
                check(adapter, layer.d_out, layer.d_in)
                self.checked[name] = key
        return MixedBank(layer.d_out, layer.d_in, tuple(adapters))

    def apply(
        self, layer: nn.Module, x: torch.Tensor, names: list[str], position: torch.Tensor
    ) -> torch.Tensor:
        """``ΔW x`` ``(T, d_out)`` for ``x`` ``(T, d_in)``, token ``t`` through adapter ``names[position[t]]``
        (none where ``position[t] == -1``)."""
        cache = layer.__dict__.get("_map_cache")
        reused = _REUSED_MAPS.get()
        if reused is None:
            return self.bank(layer, names).apply(x, position.to(x.device), None, cache)
        # inside reusing_maps(): per layer and names, the bank and the plans of its batches, while the adapters'
        # versions stay the same
        versions = tuple(version_key(layer.adapters[name]) for name in names)
        entry = reused.get((id(layer), tuple(names)))
        if entry is None or entry[0] != versions:
            entry = reused[(id(layer), tuple(names))] = (versions, self.bank(layer, names), {})
        return entry[1].apply(x, position.to(x.device), entry[2], cache)


_REUSED_MAPS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("s2ft_reused_maps", default=None)


@contextlib.contextmanager
def reusing_maps() -> Iterator[None]:
    """Inside, every layer keeps the sparse maps of the batches it serves and reuses them while the same
    adapters, unchanged, come again: ``generate`` serves the same adapters at every new token. All are dropped
    on exit, so nothing stays held after serving."""
    token = _REUSED_MAPS.set({})
    try:
        yield
    finally:
        _REUSED_MAPS.reset(token)


def serve_one(layer: nn.Module, adapter: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``ΔW x`` of one adapter without autograd from the dense cache, or through the layer's bank where the
    adapter's path is the FFT one; None where the basis's own (dense) path should run."""
    dense = cached_delta(layer, adapter)
    if dense is not None:
        return torch.nn.functional.linear(x.float(), dense)
    if not bankable(adapter) or x.numel() == 0:
        return None
    path = adapter.forward_path
    if path == "auto":
        path = choose_path(layer.d_out, layer.d_in, adapter.n_frequency, x.numel() // layer.d_in, x.device)
    if path != "fft":
        return None
    name = next(n for n, a in layer.adapters.items() if a is adapter)
    flat = x.reshape(-1, layer.d_in)
    out = LayerBank.of(layer).apply(layer, flat, [name], torch.zeros(flat.shape[0], dtype=torch.long))
    return out.view(*x.shape[:-1], layer.d_out)


def serve_mixed(
    layer: nn.Module, x: torch.Tensor, groups: dict[str, list[int]], result: torch.Tensor
) -> None:
    """Add into ``result`` ``(B, ..., d_out)`` each example's adapter applied to ``x`` ``(B, ..., d_in)``:
    ``groups`` maps adapter names (not :data:`BASE`) to their examples. Banked adapters in one pass; cached or
    bankless ones (DCT) group by group. No autograd."""
    banked = []
    for name, rows in groups.items():
        adapter = layer.adapters[name]
        if cached_delta(layer, adapter) is None and bankable(adapter):
            banked.append(name)
            continue
        index = torch.tensor(rows, device=x.device)
        delta = layer.kind.apply(layer, adapter, x.index_select(0, index))
        result.index_add_(0, index, delta.to(result.dtype))
    if not banked:
        return
    position = torch.full((x.shape[0],), -1, dtype=torch.long)
    examples = [row for name in banked for row in groups[name]]
    position[examples] = torch.tensor([i for i, name in enumerate(banked) for _ in groups[name]])
    flat = x.reshape(-1, x.shape[-1])  # (B * L, d_in)
    position = position.repeat_interleave(flat.shape[0] // x.shape[0])  # (B * L,)
    delta = LayerBank.of(layer).apply(layer, flat, banked, position)  # (B * L, d_out)
    result += delta.view(result.shape).to(result.dtype)


# ------------------------------------------------------------------------------- compiled mixed batches
# Under torch.compile, a mixed batch's adapters are applied by one custom operator per adapted layer,
# ``s2ft::mixed_apply_<digest>`` (the digest as for the FFT path's operator, s2ft.ops.apply.FFT_OPERATOR). Its
# body is the eager serving code (the layer's _served_delta: the per-example names of this thread's mixed batch,
# read from their ContextVar, the banks, the memo of reusing_maps and the caches), so Dynamo traces no Python state
# and the graph has no break; the names, the adapters and their coefficients are read when the operator runs, so
# a changed names list, a new adapter or edited coefficients are served without recompiling. The layer is named
# by an integer handle (a constant of the graph) into a registry of weak references.
_LAYERS: dict[int, weakref.ref] = {}
_HANDLES = itertools.count(1)
_HANDLES_LOCK = threading.Lock()


def layer_handle(layer: nn.Module) -> int:
    """A new handle for ``layer`` (each layer, and each copy of one, gets its own), kept until it is freed."""
    with _HANDLES_LOCK:
        handle = next(_HANDLES)

        def forget(_: weakref.ref) -> None:
            _LAYERS.pop(handle, None)

        _LAYERS[handle] = weakref.ref(layer, forget)
    return handle


def _mixed_apply_impl(x: torch.Tensor, result: torch.Tensor, handle: int) -> torch.Tensor:
    ref = _LAYERS.get(handle)
    layer = None if ref is None else ref()
    if layer is None:
        raise RuntimeError(
            f"s2ft: the compiled graph calls layer handle {handle}, which names no live layer; compile the model again"
        )
    return layer._served_delta(x, result)


MIXED_OPERATOR = f"mixed_apply_{_schema_digest(_mixed_apply_impl)}"  # in the namespace s2ft
_mixed_apply_op = torch.library.custom_op(f"s2ft::{MIXED_OPERATOR}", mutates_args=())(_mixed_apply_impl)


@_mixed_apply_op.register_fake
def _(x, result, handle):
    return torch.empty_like(result)


def mixed_apply(x: torch.Tensor, result: torch.Tensor, handle: int) -> torch.Tensor:
    """What layer ``handle``'s adapters add to its base output ``result`` for input ``x``, without autograd, in
    the current mixed batch (a tensor like ``result``): one operator of a compiled graph."""
    return _mixed_apply_op(x, result, handle)


# ---------------------------------------------------------------------------------------------- model level
def set_serving_cache(layers: Iterable[nn.Module], max_bytes: int | None) -> None:
    """Keep up to ``max_bytes`` of dense ``ΔW`` (most recently used adapters, all layers together) while
    serving; ``None`` or 0 turns the cache off and frees it. Any other value than a non-negative integer is
    refused (``ValueError``)."""
    max_bytes = check_cache_bytes(max_bytes)
    cache = DenseCache(max_bytes) if max_bytes else None
    for layer in layers:
        layer.__dict__["_dense_cache"] = cache


def set_map_cache(layers: Iterable[nn.Module], max_bytes: int | None) -> None:
    """Keep up to ``max_bytes`` of the sparse maps of the most recently served adapters (all layers together),
    so that mixed batches do not build them again; ``None`` or 0 turns the cache off and frees it. Any other
    value than a non-negative integer is refused (``ValueError``)."""
    max_bytes = check_cache_bytes(max_bytes)
    cache = MapCache(max_bytes) if max_bytes else None
    for layer in layers:
        layer.__dict__["_map_cache"] = cache


def serving_nbytes(layers: Iterable[nn.Module]) -> dict[str, int]:
    """Bytes the adapters of a model's spectral ``layers`` hold, by what holds them (tensors shared between them
    counted once):

    - ``adapters``: their own tensors (coefficients, locations, permutations);
    - ``plans``: what training keeps of them: the ``(rows, cols)`` derived from the flat locations and the FFT
      path's index plans (:func:`s2ft.ops.apply._plan`);
    - ``dense_cache``: the :func:`set_serving_cache` cache;
    - ``map_cache``: the :func:`set_map_cache` cache;
    - ``total``.
    """
    seen: set[int] = set()
    report = dict.fromkeys(("adapters", "plans", "dense_cache", "map_cache"), 0)
    caches = {}
    for layer in layers:
        for adapter in layer.adapters.values():
            report["adapters"] += tensor_bytes(
                (adapter.coeffs, adapter.locations, adapter.perm_rows, adapter.perm_cols), seen
            )
        for adapter in layer.adapters.values():
            kept = adapter.__dict__.get("_kept_locations")  # (rows, cols) kept for training
            if kept is not None:
                report["plans"] += tensor_bytes(kept[2], seen) + tensor_bytes(_PLANS.get(kept[2][0]), seen)
        for part in ("dense_cache", "map_cache"):
            cache = layer.__dict__.get("_" + part)
            if cache is not None:
                caches[id(cache)] = (part, cache)
    for part, cache in caches.values():
        report[part] += tensor_bytes(cache.values(), seen)
    report["total"] = sum(report.values())
    return report


def tensor_bytes(obj, seen: set[int]) -> int:
    """Bytes of the tensor storages in ``obj`` (tensors, and tuples, lists, dicts and dataclasses of them) not
    already in ``seen`` (storage addresses, updated)."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        obj = list(obj.values())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(item, seen) for item in obj)
    return 0


def names_per_sequence(names: list[str], model: nn.Module, kwargs: dict) -> list[str]:
    """``names`` (one per prompt) repeated for the sequences ``model.generate(**kwargs)`` expands each prompt
    into: ``max(num_beams, num_return_sequences)``, from ``kwargs`` or the generation config."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
    returned = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1
    expand = max(int(beams), int(returned))
    return [name for name in names for _ in range(expand)]


# ------------------------------------------------------------------------------------------- the output head
def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: a 3-D or larger input that is not contiguous, made contiguous; any other left alone."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() > 2 and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def _output_head(model: nn.Module) -> nn.Linear | None:
    """``model.get_output_embeddings()`` where that is an ``nn.Linear``, else None."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, nn.Linear) else None


@contextlib.contextmanager
def head_input_folded(model: nn.Module) -> Iterator[None]:
    """:func:`fold_head_input` on ``model`` for the duration (what :meth:`SpectralModel.generate
    <s2ft.tuner.model.SpectralModel.generate>` does), taken off again at the end unless it was on before."""
    head = _output_head(model)
    was_on = head is not None and any(hook is _contiguous_input for hook in head._forward_pre_hooks.values())
    fold_head_input(model)
    try:
        yield
    finally:
        if not was_on:
            fold_head_input(model, on=False)


def fold_head_input(model: nn.Module, on: bool = True) -> bool:
    """Make the input of ``model``'s output head (``get_output_embeddings()``, an ``nn.Linear``) contiguous
    before the head runs (``on=False``: take that hook off again); True if ``model`` has such a head.

    Why: ``generate`` slices the last position of the hidden states (``hidden[:, -1:, :]``, not contiguous), and
    torch's ``matmul`` folds a 3-D input into one ``mm`` only when that costs no copy or when an operand requires
    gradients. The base weights of a wrapped model are frozen, so the head (``576 x 49,152`` on SmolLM2) runs as a
    ``bmm`` against its weight expanded over the batch: on one CPU thread about 0.9 s for the prompt step of a
    batch of 64, against about 0.1 s for the ``mm`` that the merged model (whose weights require gradients
    again) gets. Copying the ``(B, 1, d)`` slice costs microseconds. The hook is traced into a compiled graph
    (it looks at the input's dimensions and strides only, which Dynamo guards on) and does nothing to a
    contiguous or 2-D input (training's full logits). :meth:`SpectralModel.generate
    <s2ft.tuner.model.SpectralModel.generate>` installs it for each call (:func:`head_input_folded`); call this
    for the wrapped model's own ``generate`` or forward. Installing it twice installs it once."""
    head = _output_head(model)
    if head is None:
        return False
    hooks = head._forward_pre_hooks  # looked up there (not a kept handle): a deep copy keeps them right
    installed = [key for key, hook in hooks.items() if hook is _contiguous_input]
    if on and not installed:
        head.register_forward_pre_hook(_contiguous_input)
    for key in [] if on else installed:
        del hooks[key]
    return True
