"""Serving adapters without autograd, at the adapters' own size.

No dense ``ΔW`` is kept per adapter by default:

- a mixed batch (``adapter_names``) goes through one :class:`s2ft.ops.mixed.MixedBank` per layer, assembled from
  the bank *pieces* of the distinct adapters it names (a piece is one adapter's sparse spectral map, ``O(n)``
  floats, built on first use and rebuilt when its coefficients, locations or permutations change) and kept for
  the next batch naming the same adapters (generation steps);
- a single adapter, or an adapter whose basis has no bank (DCT), is applied per call on the path its
  ``forward_path`` names (``"auto"``: :func:`s2ft.ops.apply.choose_path`), as in training;
- :func:`set_serving_cache` turns on a :class:`DenseCache`, shared by every layer of a model and bounded in
  bytes, that keeps the most recently used adapters' dense ``ΔW`` (a small matmul per adapter: it wins at widths
  of 384 and less and on thin layers, ``benchmarks/results/cpu/mixed_apply.md``).

:func:`serving_nbytes` reports every byte these hold, with the adapters' own tensors.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch
from torch import nn

from s2ft.ops.apply import _PLANS
from s2ft.ops.mixed import MixedBank

BANK_BASES = ("fourier",)  # the bases whose adapters a MixedBank serves


def version_key(adapter: nn.Module) -> tuple:
    """What a served structure of ``adapter`` depends on: its coefficients, locations and permutations (each
    tensor's identity, version counter and device)."""
    tensors = (adapter.coeffs, adapter.rows, adapter.cols, adapter.perm_rows, adapter.perm_cols)
    return tuple((id(t), t._version, t.device) if t is not None else None for t in tensors)


class DenseCache:
    """Dense float32 ``ΔW`` of the most recently used adapters, at most ``max_bytes`` in all (least recently
    used first out). One cache serves every layer of a model; entries are keyed by adapter object."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[int, tuple[tuple, torch.Tensor]] = OrderedDict()

    def nbytes(self) -> int:
        return sum(delta.numel() * delta.element_size() for _, delta in self._entries.values())

    def get(self, adapter: nn.Module) -> torch.Tensor | None:
        """``adapter``'s dense ``ΔW`` ``(d_out, d_in)``, built and kept if it fits; None if it never fits."""
        key = version_key(adapter)
        entry = self._entries.get(id(adapter))
        if entry is not None and entry[0] == key:
            self._entries.move_to_end(id(adapter))
            return entry[1]
        self._entries.pop(id(adapter), None)
        size = adapter.d_out * adapter.d_in * 4
        if size > self.max_bytes:
            return None
        while self._entries and self.nbytes() + size > self.max_bytes:
            self._entries.popitem(last=False)
        with torch.no_grad():
            delta = adapter.delta_weight()
        self._entries[id(adapter)] = (key, delta)
        return delta


def cached_delta(layer: nn.Module, adapter: nn.Module) -> torch.Tensor | None:
    """The dense ``ΔW`` of ``adapter`` from the layer's serving cache, or None (no cache, or it does not fit)."""
    cache = layer.__dict__.get("_dense_cache")
    return None if cache is None else cache.get(adapter)


def bank_piece(adapter: nn.Module) -> MixedBank | None:
    """A one-adapter :class:`MixedBank` of ``adapter`` on its device, kept on the adapter until its tensors
    change; None for a basis without a bank."""
    if getattr(adapter.basis, "name", None) not in BANK_BASES:
        return None
    key = version_key(adapter)
    cached = adapter.__dict__.get("_bank_piece")
    if cached is None or cached[0] != key:
        adapter._require_ready()
        piece = MixedBank.pack([adapter], adapter.d_out, adapter.d_in).to(adapter.coeffs.device)
        cached = (key, piece)
        adapter.__dict__["_bank_piece"] = cached  # not a buffer: never saved or moved
    return cached[1]


def layer_bank(layer: nn.Module, names: list[str]) -> MixedBank:
    """The bank of adapters ``names`` of ``layer``, in that order; the last one assembled is kept for the next
    call with the same pieces."""
    pieces = tuple(bank_piece(layer.adapters[name]) for name in names)
    cached = layer.__dict__.get("_bank")
    if (
        cached is not None
        and len(cached[0]) == len(pieces)
        and all(a is b for a, b in zip(cached[0], pieces))
    ):
        return cached[1]
    bank = MixedBank.concat(pieces)
    layer.__dict__["_bank"] = (pieces, bank)
    return bank


def serve_mixed(
    layer: nn.Module, x: torch.Tensor, groups: dict[str, list[int]], result: torch.Tensor
) -> None:
    """Add into ``result`` ``(B, ..., d_out)`` each example's adapter applied to ``x`` ``(B, ..., d_in)``:
    ``groups`` maps adapter names (not :data:`BASE`) to their examples. Banked adapters in one pass; cached or
    bankless ones (DCT) group by group. No autograd."""
    banked = []
    for name, rows in groups.items():
        adapter = layer.adapters[name]
        if cached_delta(layer, adapter) is None and bank_piece(adapter) is not None:
            banked.append(name)
            continue
        index = torch.tensor(rows, device=x.device)
        delta = layer.kind.apply(layer, adapter, x.index_select(0, index))
        result.index_add_(0, index, delta.to(result.dtype))
    if not banked:
        return
    position = torch.full((x.shape[0],), -1, dtype=torch.long)
    for i, name in enumerate(banked):
        position[groups[name]] = i
    flat = x.reshape(-1, x.shape[-1])  # (B * L, d_in)
    which = position.to(x.device).repeat_interleave(flat.shape[0] // x.shape[0])  # (B * L,)
    delta = layer_bank(layer, banked).apply(flat, which)  # (B * L, d_out)
    result += delta.view(result.shape).to(result.dtype)


# ---------------------------------------------------------------------------------------------- model level
def set_serving_cache(model: nn.Module, max_bytes: int | None) -> None:
    """Keep up to ``max_bytes`` of dense ``ΔW`` (most recently used adapters, all layers together) while
    serving; ``None`` or 0 turns the cache off and frees it."""
    cache = DenseCache(max_bytes) if max_bytes else None
    for layer in _spectral_layers(model):
        layer.__dict__["_dense_cache"] = cache


def serving_nbytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model's adapters hold, by what holds them (tensors shared between them counted once):

    - ``adapters``: their own tensors (coefficients, locations, permutations);
    - ``banks``: bank pieces and each layer's last assembled bank (mixed batches);
    - ``plans``: the FFT path's index plans (:func:`s2ft.ops.apply._plan`) of the adapters' locations;
    - ``dense_cache``: the :func:`set_serving_cache` cache;
    - ``total``.
    """
    seen: set[int] = set()
    report = dict.fromkeys(("adapters", "banks", "plans", "dense_cache"), 0)
    caches = {}
    for layer in _spectral_layers(model):
        for adapter in layer.adapters.values():
            report["adapters"] += tensor_bytes(
                (adapter.coeffs, adapter.rows, adapter.cols, adapter.perm_rows, adapter.perm_cols), seen
            )
        for adapter in layer.adapters.values():
            report["banks"] += tensor_bytes(adapter.__dict__.get("_bank_piece"), seen)
            if adapter.rows is not None:
                report["plans"] += tensor_bytes(_PLANS.get(adapter.rows), seen)
        report["banks"] += tensor_bytes(layer.__dict__.get("_bank"), seen)
        cache = layer.__dict__.get("_dense_cache")
        if cache is not None:
            caches[id(cache)] = cache
    for cache in caches.values():
        report["dense_cache"] += tensor_bytes(list(cache._entries.values()), seen)
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


def _spectral_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "adapters") and hasattr(m, "kind")]
