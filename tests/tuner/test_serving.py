"""Serving without dense caches: mixed batches of FourierFT, S2FT and DCT adapters equal each example alone,
generation per prompt (beams included), and what serving holds in memory against the tensors actually held."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import s2ft.ops.mixed as mixed_ops
from s2ft import DCTConfig, FourierFTConfig, S2FTConfig, get_spectral_model
from s2ft.ops.apply import _PLANS
from s2ft.tuner.layers import BASE
from tests.helpers import MODELS, make_batches, mlp_loss

NAMES = ["default", "s2ft", "dct"]


def three_adapters(kind: str, path: str = "auto"):
    """A model with "default" FourierFT, "s2ft" S2FT and "dct" DCT adapters, random coefficients; batches."""
    factory, targets, saves = MODELS[kind]
    options = {"target_modules": targets, "modules_to_save": saves, "n_frequency": 24, "forward_path": path}
    model = get_spectral_model(copy.deepcopy(factory()), FourierFTConfig(init="normal", **options))
    model.add_adapter("s2ft", S2FTConfig(seed=3, **options))
    model.add_adapter("dct", DCTConfig(seed=5, **options))
    batches = make_batches(kind, batch_size=5)
    model.calibrate(batches, mlp_loss if kind in ("mlp", "convnet") else None, adapter_name="s2ft")
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            for adapter in layer.adapters.values():
                adapter.coeffs.normal_()
    return model.eval(), batches


def output(model, batch, **kwargs):
    with torch.no_grad():
        if isinstance(batch, tuple):
            return model(batch[0], **kwargs)
        return model(input_ids=batch["input_ids"], **kwargs).logits


def alone(model, batch, i: int, name: str) -> torch.Tensor:
    one = (batch[0][i : i + 1],) if isinstance(batch, tuple) else {"input_ids": batch["input_ids"][i : i + 1]}
    if name == BASE:
        with model.disable_adapters():
            return output(model, one)
    model.set_adapter(name)
    return output(model, one)


def assert_mixed_equals_alone(model, batch, names):
    mixed = output(model, batch, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i : i + 1], alone(model, batch, i, name), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "mlp", "convnet"])
@pytest.mark.parametrize("path", ["dense", "fft"])
def test_mixed_batch_of_three_methods_equals_each_example_alone(kind, path):
    model, batches = three_adapters(kind, path)
    assert_mixed_equals_alone(model, batches[0], ["dct", BASE, "default", "s2ft", "default"])
    assert_mixed_equals_alone(model, batches[1], ["s2ft", "s2ft", BASE, "s2ft", "s2ft"])


def test_mixed_batch_follows_changed_coefficients_and_locations():
    """The bank pieces are rebuilt when an adapter's coefficients change in place or its locations are replaced."""
    model, batches = three_adapters("llama")
    names = ["s2ft", "default", BASE, "dct", "s2ft"]
    before = output(model, batches[0], adapter_names=names)
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.adapters["s2ft"].coeffs.mul_(-2.0)
    after = output(model, batches[0], adapter_names=names)
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1], after[1])
    assert_mixed_equals_alone(model, batches[0], names)
    for layer in model.spectral_layers().values():
        adapter = layer.adapters["default"]
        adapter.set_locations((adapter.rows + 1) % layer.d_out, adapter.cols)  # distinct locations still
    assert_mixed_equals_alone(model, batches[0], names)


def test_generation_per_prompt_equals_each_prompt_alone():
    model, _ = three_adapters("llama")
    prompts = torch.randint(64, (4, 5), generator=torch.Generator().manual_seed(4))
    names = ["dct", "s2ft", BASE, "default"]
    for beams in ({}, {"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2}):
        options = {"min_new_tokens": 4, **beams}  # no sequence ends early: all are as long
        mixed = model.generate(
            input_ids=prompts, adapter_names=names, max_new_tokens=4, do_sample=False, **options
        )
        per_prompt = mixed.shape[0] // len(names)
        for i, name in enumerate(names):
            one = {"input_ids": prompts[i : i + 1], "max_new_tokens": 4, "do_sample": False, **options}
            if name == BASE:
                with model.disable_adapters():
                    expected = model.generate(**one)
            else:
                model.set_adapter(name)
                expected = model.generate(**one)
            assert torch.equal(mixed[i * per_prompt : (i + 1) * per_prompt], expected), (beams, name)


def test_generation_builds_each_layers_maps_once_and_keeps_none(monkeypatch):
    """The decode steps of one ``generate`` serve the same adapters: each layer builds their maps once (for the
    prompt) and reuses them; after it, nothing more is held than before."""
    model, _ = three_adapters("llama", "fft")
    prompts = torch.randint(64, (3, 5), generator=torch.Generator().manual_seed(4))
    names = ["s2ft", "default", "s2ft"]
    before = model.serving_nbytes()
    built = []
    original = mixed_ops._Maps.build
    monkeypatch.setattr(mixed_ops._Maps, "build", lambda *a: built.append(1) or original(*a))
    model.generate(
        input_ids=prompts, adapter_names=names, max_new_tokens=5, min_new_tokens=5, do_sample=False
    )
    assert len(built) == len(model.spectral_layers())
    assert model.serving_nbytes() == before
    model.generate(
        input_ids=prompts, adapter_names=names, max_new_tokens=2, min_new_tokens=2, do_sample=False
    )
    assert len(built) == 2 * len(model.spectral_layers())  # nothing kept from one call to the next
    with torch.no_grad():
        model(input_ids=prompts, adapter_names=names)
        model(input_ids=prompts, adapter_names=names)
    assert len(built) == 4 * len(model.spectral_layers())  # forward calls reuse nothing


def held_tensors(model) -> dict[int, torch.Tensor]:
    """Every tensor storage the adapters hold, by address: their parameters and buffers, whatever their layers'
    and adapters' ``__dict__`` reach (containers, dataclasses, plain objects), and the FFT plans of their
    locations."""
    found: dict[int, torch.Tensor] = {}

    def walk(obj, depth=0):
        if depth > 8:
            return
        if isinstance(obj, torch.Tensor):
            if obj.untyped_storage().nbytes():
                found.setdefault(obj.untyped_storage().data_ptr(), obj)
        elif isinstance(obj, dict):
            for value in list(obj.values()):
                walk(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value, depth + 1)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            walk([getattr(obj, f.name) for f in dataclasses.fields(obj)], depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("s2ft.tuner"):
            walk(vars(obj), depth + 1)

    for layer in model.spectral_layers().values():
        walk({k: v for k, v in vars(layer).items() if k not in ("_parameters", "_buffers", "_modules")})
        for adapter in layer.adapters.values():
            walk(dict(adapter.named_parameters()))
            walk(dict(adapter.named_buffers()))
            walk({k: v for k, v in vars(adapter).items() if k not in ("_parameters", "_buffers", "_modules")})
            kept = vars(adapter).get("_kept_locations")
            walk(_PLANS.get(kept[2][0]) if kept else None)
    return found


def dense_sized(model, held) -> list[torch.Tensor]:
    """The held tensors with as many floats as some layer's ``ΔW``."""
    sizes = {layer.d_out * layer.d_in for layer in model.spectral_layers().values()}
    return [t for t in held.values() if t.is_floating_point() and t.numel() in sizes]


@pytest.mark.parametrize("kind, path", [("llama", "fft"), ("llama", "dense"), ("convnet", "auto")])
def test_serving_holds_no_dense_delta_and_reports_every_byte(kind, path):
    model, batches = three_adapters(kind, path)
    names = ["dct", BASE, "default", "s2ft", "default"]
    output(model, batches[0], adapter_names=names)
    model.set_adapter("s2ft")
    output(model, batches[0])  # a single adapter's no-grad forward
    held = held_tensors(model)
    report = model.serving_nbytes()
    assert report["dense_cache"] == 0 and not dense_sized(model, held)
    assert report["total"] == sum(t.untyped_storage().nbytes() for t in held.values())
    if (
        kind == "llama"
    ):  # the mixed batch's banks reference the adapters' tensors; no FFT plan kept per adapter
        assert report["adapters"] == report["total"]


def test_bounded_dense_cache():
    """The optional cache keeps at most its byte limit of dense ΔW; outputs are the same with it."""
    model, batches = three_adapters("llama", "fft")
    names = ["dct", BASE, "default", "s2ft", "s2ft"]
    without = output(model, batches[0], adapter_names=names)
    layer = next(iter(model.spectral_layers().values()))
    limit = 3 * layer.d_out * layer.d_in * 4  # three of the first layer's ΔW
    model.set_serving_cache(limit)
    with_cache = output(model, batches[0], adapter_names=names)
    torch.testing.assert_close(with_cache, without, atol=1e-5, rtol=1e-5)
    held = held_tensors(model)
    report = model.serving_nbytes()
    assert 0 < report["dense_cache"] <= limit
    assert report["total"] == sum(t.untyped_storage().nbytes() for t in held.values())
    # what it holds: the dense ΔW and, to notice writes through .data, a copy of each cached adapter's tensors
    entries = layer.__dict__["_dense_cache"].values()
    copies = sum(t.untyped_storage().nbytes() for _, kept in entries for t in kept if t is not None)
    assert (
        sum(t.untyped_storage().nbytes() for t in dense_sized(model, held)) + copies == report["dense_cache"]
    )
    assert_mixed_equals_alone(model, batches[0], names)
    model.set_serving_cache(None)
    assert model.serving_nbytes()["dense_cache"] == 0 and not dense_sized(model, held_tensors(model))


def test_bounded_map_cache(monkeypatch):
    """The optional map cache keeps at most its byte limit of adapters' maps: outputs equal those without it, a
    batch whose adapters it holds builds no map, it follows changed coefficients and locations, and every byte
    it holds is reported."""
    model, batches = three_adapters("llama", "fft")
    names = ["dct", BASE, "default", "s2ft", "s2ft"]
    without = output(model, batches[0], adapter_names=names)
    without_reversed = output(model, batches[1], adapter_names=names[::-1])
    model.set_map_cache(1 << 30)
    built = []
    original = mixed_ops._Maps.build
    monkeypatch.setattr(mixed_ops._Maps, "build", lambda *a: built.append(len(a[0])) or original(*a))
    torch.testing.assert_close(output(model, batches[0], adapter_names=names), without, atol=1e-5, rtol=1e-5)
    layers = len(model.spectral_layers())
    assert built == [2] * layers  # the two banked adapters ("default", "s2ft") of each layer, built together
    reversed_ = output(model, batches[1], adapter_names=names[::-1])
    torch.testing.assert_close(reversed_, without_reversed, atol=1e-5, rtol=1e-5)
    assert built == [2] * layers  # nothing built again
    held = held_tensors(model)
    report = model.serving_nbytes()
    assert report["map_cache"] > 0 and report["dense_cache"] == 0
    assert report["total"] == sum(t.untyped_storage().nbytes() for t in held.values())
    assert_mixed_equals_alone(model, batches[0], names)
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.adapters["s2ft"].coeffs.mul_(-2.0)
    assert_mixed_equals_alone(model, batches[0], names)  # "s2ft" built again: its coefficients changed
    assert built[-1] == 1
    # A limit below two maps of the first layer keeps at most one of them at a time.
    layer = next(iter(model.spectral_layers().values()))
    adapter = layer.adapters["s2ft"]
    one = original([adapter], layer.d_out, layer.d_in, "cpu").nbytes()
    one += adapter.coeffs.numel() * 4 + adapter.locations.numel() * adapter.locations.element_size()  # copies
    model.set_map_cache(one + 1)
    assert_mixed_equals_alone(model, batches[0], names)
    assert 0 < model.serving_nbytes()["map_cache"] <= one + 1
    model.set_map_cache(None)
    assert model.serving_nbytes()["map_cache"] == 0
