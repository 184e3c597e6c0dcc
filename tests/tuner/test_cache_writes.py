"""Issue 34, serving caches: writes that change neither a tensor's identity nor its version counter (through
``.data``) are seen by the map and dense caches, and the caches' byte limits are checked like config values."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from s2ft import FourierFTConfig, S2FTConfig, get_spectral_model
from s2ft.tuner.layers import BASE
from tests.helpers import MODELS, make_batches

NAMES = ["s2ft", "default", BASE, "s2ft", "default"]


def two_adapters():
    """Tiny Llama with a FourierFT ("default") and an S2FT ("s2ft") adapter, random coefficients, FFT path."""
    factory, targets, _ = MODELS["llama"]
    options = {"target_modules": targets, "n_frequency": 24, "forward_path": "fft"}
    model = get_spectral_model(copy.deepcopy(factory()), FourierFTConfig(init="normal", **options))
    model.add_adapter("s2ft", S2FTConfig(seed=3, **options))
    batches = make_batches("llama", batch_size=len(NAMES))
    model.calibrate(batches, None, adapter_name="s2ft")
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            for adapter in layer.adapters.values():
                adapter.coeffs.normal_()
    return model.eval(), batches[0]


def output(model, batch, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], **kwargs).logits


def each_alone(model, batch) -> torch.Tensor:
    """Each example through its adapter alone (or the base model), no cache on: the reference."""
    model.set_map_cache(None)
    model.set_serving_cache(None)
    rows = []
    for i, name in enumerate(NAMES):
        one = {"input_ids": batch["input_ids"][i : i + 1]}
        if name == BASE:
            with model.disable_adapters():
                rows.append(output(model, one))
        else:
            model.set_adapter(name)
            rows.append(output(model, one))
    return torch.cat(rows)


def adapters(model, name):
    return [layer.adapters[name] for layer in model.spectral_layers().values()]


def shifted_locations(adapter) -> torch.Tensor:
    """The adapter's flat locations with each row moved by one: distinct still, another ΔW."""
    return ((adapter.rows.long() + 1) % adapter.d_out * adapter.d_in + adapter.cols.long()).to(
        adapter.locations.dtype
    )


WRITES = {
    "coeffs.data.mul_": lambda a: a.coeffs.data.mul_(3),
    "coeffs.data =": lambda a: setattr(a.coeffs, "data", a.coeffs.data * -2),
    "coeffs.detach().copy_": lambda a: a.coeffs.detach().copy_(a.coeffs.detach().flip(0)),
    "locations.data.copy_": lambda a: a.locations.data.copy_(shifted_locations(a)),
    "perm_rows.data.copy_": lambda a: a.perm_rows.data.copy_(a.perm_rows.flip(0)),
    "scaling": lambda a: setattr(a, "scaling", 2.5 * a.scaling),
}


@pytest.mark.parametrize("cache", ["map", "dense"])
@pytest.mark.parametrize("write", sorted(WRITES))
def test_writes_through_data_are_seen_by_the_caches(cache, write):
    """Serve a mixed batch (the cache fills), write, serve it again: it equals each example through its adapter
    alone with no cache, and differs from before the write."""
    model, batch = two_adapters()
    getattr(model, "set_map_cache" if cache == "map" else "set_serving_cache")(1 << 30)
    before = output(model, batch, adapter_names=NAMES)
    assert model.serving_nbytes()[f"{cache}_cache"] > 0
    name = "s2ft" if write.startswith("perm") else "default" if write.startswith("locations") else "s2ft"
    for adapter in adapters(model, name):
        WRITES[write](adapter)
    after = output(model, batch, adapter_names=NAMES)
    expected = each_alone(model, batch)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
    changed = [i for i, n in enumerate(NAMES) if n == name]
    assert (before[changed] - after[changed]).abs().max() > 1e-3  # the write mattered
    unchanged = [i for i, n in enumerate(NAMES) if n != name]
    torch.testing.assert_close(before[unchanged], after[unchanged], atol=1e-5, rtol=1e-5)


def test_an_unchanged_adapter_is_served_from_the_cache(monkeypatch):
    """The contents check does not defeat the cache: a second batch builds no map."""
    import s2ft.ops.mixed as mixed_ops

    model, batch = two_adapters()
    model.set_map_cache(1 << 30)
    output(model, batch, adapter_names=NAMES)
    built = []
    original = mixed_ops._Maps.build
    monkeypatch.setattr(mixed_ops._Maps, "build", lambda *a: built.append(1) or original(*a))
    output(model, batch, adapter_names=NAMES)
    assert not built


@pytest.mark.parametrize("method", ["set_map_cache", "set_serving_cache"])
@pytest.mark.parametrize("value", ["abc", math.nan, 1.5, True, False, -1, 2.0, [1]])
def test_cache_sizes_must_be_byte_counts(method, value):
    model, _ = two_adapters()
    with pytest.raises(ValueError, match=r"max_bytes must be a non-negative integer number of bytes") as info:
        getattr(model, method)(value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("method", ["set_map_cache", "set_serving_cache"])
def test_none_and_zero_turn_a_cache_off(method):
    import numpy as np

    model, batch = two_adapters()
    part = "map_cache" if method == "set_map_cache" else "dense_cache"
    for value in (1 << 20, np.int64(1 << 20)):  # any integer, NumPy's too
        getattr(model, method)(value)
        output(model, batch, adapter_names=NAMES)
        assert model.serving_nbytes()[part] > 0
        getattr(model, method)(0 if value == 1 << 20 else None)
        assert model.serving_nbytes()[part] == 0
