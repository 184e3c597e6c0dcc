"""Compact adapter files (format 2): plans through the codec, round trips bit for bit, older files, sizes."""

from __future__ import annotations

import copy
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from s2ft import FourierFTConfig, S2FTConfig, SpectralModel, get_spectral_model
from s2ft.methods import METHODS
from s2ft.ops.codec import locations_bound_bits, locations_max_bits, permutation_nbytes
from s2ft.tuner.adapter_io import (
    BASIS_KEY,
    FORMAT_KEY,
    FORMAT_VERSION,
    PLAN_DIGEST_BYTES,
    PLAN_KEY,
    WEIGHTS_NAME,
    fold_groups,
)
from tests.helpers import MODELS, forward, make_batches, mlp_loss

KINDS = ["mlp", "bert", "gpt2"]


def trained(kind: str, n: int = 24, config_class=S2FTConfig, **options):
    """(base, adapted model with random coefficients and head, batches)."""
    factory, targets, saves = MODELS[kind]
    base = factory()
    config = config_class(target_modules=targets, modules_to_save=saves, n_frequency=n, seed=3, **options)
    model = get_spectral_model(copy.deepcopy(base), config)
    batches = make_batches(kind)
    if config.planned:
        model.calibrate(batches, mlp_loss if kind == "mlp" else None)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.adapters["default"].coeffs.normal_()
        for saved in model._trained_copies().values():
            for p in saved.copies["default"].parameters():
                p.add_(0.1 * torch.randn_like(p))
    return base, model.eval(), batches


def adapters(model) -> list:
    return [layer.adapters["default"] for layer in model.spectral_layers().values()]


def outputs(model, batch) -> dict[str, torch.Tensor]:
    """The model's outputs through each forward path, with autograd (training) and without (serving)."""
    result = {}
    for path in ("dense", "fft"):
        for layer in model.spectral_layers().values():
            for adapter in layer.adapters.values():
                adapter.forward_path = path
        result[path] = forward(model, batch).detach()
        with torch.no_grad():
            result[f"{path}, served"] = forward(model, batch)
    return result


def assert_same_outputs(a, b, batch) -> None:
    first, second = outputs(a, batch), outputs(b, batch)
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [24, 120])
def test_round_trip_bit_for_bit(kind, n, tmp_path):
    """n = 120 fills the MLP's 6x20 layer (its set coded through the complement) and puts 3 or 4 locations on
    many folded frequencies of the FFT path, whose trained order the file keeps (part "o")."""
    base, model, batches = trained(kind, n)
    model.save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    state = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    groups = any(
        fold_groups(a.rows, a.cols, layer.d_out, layer.d_in)
        for layer in model.spectral_layers().values()
        for a in [layer.adapters["default"]]
    )
    assert metadata[FORMAT_KEY] == FORMAT_VERSION and metadata[PLAN_KEY] == ("pol" if groups else "pl")
    assert groups or n == 24  # the dense case has such groups
    names = sorted(model.spectral_layers())
    assert {k for k in state if not k.startswith("modules_to_save.")} == {
        f"{name}.{part}" for name in names for part in ("coeffs", "plan")
    }
    for name, layer in model.spectral_layers().items():
        assert state[f"{name}.plan"].dtype == torch.uint8
        adapter = layer.adapters["default"]
        flat = adapter.rows * layer.d_in + adapter.cols
        stored = state[f"{name}.coeffs"]
        if not groups:  # coefficients in the canonical order: increasing flat location
            assert torch.equal(stored, adapter.coeffs.detach()[torch.argsort(flat)])
        else:  # the same coefficients, in another order
            assert torch.equal(torch.sort(stored).values, torch.sort(adapter.coeffs.detach()).values)
    loaded = SpectralModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    for name, layer in loaded.spectral_layers().items():
        original = model.spectral_layers()[name].adapters["default"]
        adapter = layer.adapters["default"]
        assert torch.equal(adapter.perm_rows, original.perm_rows)
        assert torch.equal(adapter.perm_cols, original.perm_cols)
        d_in = layer.d_in
        assert torch.equal(
            torch.sort(adapter.rows * d_in + adapter.cols).values,
            torch.sort(original.rows * d_in + original.cols).values,
        )
    for batch in batches[:2]:
        assert_same_outputs(model, loaded, batch)


def old_format_file(model, directory) -> None:
    """Write ``model``'s adapter as s2ft wrote it before format 2: int tensors rows, cols, perm_rows, perm_cols
    of the smallest dtype, coefficients in the trained order, metadata s2ft_shapes only."""
    os.makedirs(directory, exist_ok=True)
    state = {}
    for name, layer in model.spectral_layers().items():
        adapter = layer.adapters["default"]
        rows_dtype = torch.int8 if layer.d_out <= 128 else torch.int16
        cols_dtype = torch.int8 if layer.d_in <= 128 else torch.int16
        state[f"{name}.coeffs"] = adapter.coeffs.detach().clone()
        state[f"{name}.rows"] = adapter.rows.to(rows_dtype)
        state[f"{name}.cols"] = adapter.cols.to(cols_dtype)
        state[f"{name}.perm_rows"] = adapter.perm_rows.to(rows_dtype)
        state[f"{name}.perm_cols"] = adapter.perm_cols.to(cols_dtype)
    for name, copy_ in model._trained_copies().items():
        for key, value in copy_.copies["default"].state_dict().items():
            state[f"modules_to_save.{name}.{key}"] = value.detach().clone()
    shapes = [
        [model.spectral_layers()[n].d_out, model.spectral_layers()[n].d_in]
        for n in sorted(state and model.spectral_layers())
    ]
    save_file(
        state,
        os.path.join(directory, WEIGHTS_NAME),
        metadata={"format": "pt", "s2ft_shapes": json.dumps(shapes)},
    )
    model.peft_config["default"].to_json_file(os.path.join(directory, "adapter_config.json"))


@pytest.mark.parametrize("kind", ["mlp", "bert"])
def test_old_format_still_loads(kind, tmp_path):
    base, model, batches = trained(kind)
    old_format_file(model, tmp_path / "old")
    loaded = SpectralModel.from_pretrained(copy.deepcopy(base), tmp_path / "old").eval()
    for name, layer in loaded.spectral_layers().items():  # the file's order is kept
        original = model.spectral_layers()[name].adapters["default"]
        for key in ("coeffs", "rows", "cols", "perm_rows", "perm_cols"):
            assert torch.equal(getattr(layer.adapters["default"], key), getattr(original, key)), key
    assert_same_outputs(model, loaded, batches[0])
    # saved again, it is written in format 2, smaller, and loads to the same outputs
    loaded.save_pretrained(tmp_path / "new")
    assert os.path.getsize(tmp_path / "new" / WEIGHTS_NAME) < os.path.getsize(tmp_path / "old" / WEIGHTS_NAME)
    again = SpectralModel.from_pretrained(copy.deepcopy(base), tmp_path / "new").eval()
    assert_same_outputs(model, again, batches[0])


def file_parts(path) -> dict[str, int]:
    """Bytes on disk by tensor (from the header's offsets) and the header itself (length field included)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    return {"header": 8 + length, **sizes}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("options", [{}, {"permute": False}])
def test_sizes_on_disk_equal_the_sizes_reported(dtype, options, tmp_path):
    base, model, _ = trained("bert", 40, **options)
    model.save_pretrained(tmp_path, coefficient_dtype=dtype)
    path = tmp_path / WEIGHTS_NAME
    on_disk = file_parts(path)
    reported = METHODS["s2ft"].stored_parts(model, dtype)
    assert os.path.getsize(path) == model.adapter_nbytes(None, dtype) == sum(reported.values())
    assert sum(on_disk.values()) == os.path.getsize(path)
    assert reported["header"] == on_disk["header"]
    assert reported["coefficients"] == sum(v for k, v in on_disk.items() if k.endswith(".coeffs"))
    assert reported["coefficients"] == 40 * dtype.itemsize * len(model.spectral_layers())
    assert reported["modules_to_save"] == sum(
        v for k, v in on_disk.items() if k.startswith("modules_to_save.")
    )
    plans = sum(v for k, v in on_disk.items() if k.endswith(".plan"))
    digests = PLAN_DIGEST_BYTES * len(model.spectral_layers())  # one per plan
    assert reported["fingerprint"] == digests
    assert reported["locations"] + reported["permutations"] + digests == plans
    layers = model.spectral_layers().values()
    perms = sum(permutation_nbytes(layer.d_out) + permutation_nbytes(layer.d_in) for layer in layers)
    assert reported["permutations"] == (0 if options else perms)
    # the locations: at least their information content, log2 C(d_out * d_in, n) bits per matrix, at most the
    # codec's worst case, and one byte per fold group the file orders (and its count) when it orders any
    low = sum(locations_bound_bits(40, layer.d_out, layer.d_in) / 8 for layer in layers)
    groups = sum(len(fold_groups(a.rows, a.cols, a.d_out, a.d_in)) for a in adapters(model))
    high = sum((locations_max_bits(40, layer.d_out, layer.d_in) + 7) // 8 for layer in layers)
    assert low <= reported["locations"] <= high + (len(layers) + groups if groups else 0)


def test_header_is_small(tmp_path):
    """Two tensors per adapted matrix (coefficients and plan); metadata of a few short keys (the coefficients'
    basis among them)."""
    _, model, _ = trained("bert", 40)
    model.save_pretrained(tmp_path)
    on_disk = file_parts(tmp_path / WEIGHTS_NAME)
    assert len(on_disk) - 1 == 2 * len(model.spectral_layers()) + 2  # + the classifier's weight and bias
    with safe_open(tmp_path / WEIGHTS_NAME, framework="pt") as f:
        assert set(f.metadata()) == {"format", "s2ft_shapes", FORMAT_KEY, PLAN_KEY, BASIS_KEY}


def test_fourierft_files_unchanged(tmp_path):
    """A FourierFT file holds what it always held: coefficients and head, no plan, no format key."""
    _, model, _ = trained("bert", 24, FourierFTConfig)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    expected = model.adapter_state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    with safe_open(tmp_path / WEIGHTS_NAME, framework="pt") as f:
        assert f.metadata() == model._metadata()
    assert os.path.getsize(tmp_path / WEIGHTS_NAME) == model.adapter_nbytes()


def test_corrupt_or_newer_files_are_refused(tmp_path):
    base, model, _ = trained("mlp")
    model.save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    state = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    cut = dict(state, **{"fc1.plan": state["fc1.plan"][:-1]})
    save_file(cut, path, metadata=metadata)
    with pytest.raises(ValueError, match="the plan of fc1 does not match its digest"):
        SpectralModel.from_pretrained(copy.deepcopy(base), tmp_path)
    save_file(state, path, metadata={**metadata, FORMAT_KEY: str(int(FORMAT_VERSION) + 1)})
    with pytest.raises(ValueError, match=r"written by a newer s2ft \(file format 4; .*upgrade s2ft"):
        SpectralModel.from_pretrained(copy.deepcopy(base), tmp_path)
    bad = dict(state, **{"fc1.plan": torch.full_like(state["fc1.plan"], 255)})
    save_file(bad, path, metadata=metadata)
    with pytest.raises(ValueError, match="the plan of fc1 does not match its digest"):
        SpectralModel.from_pretrained(copy.deepcopy(base), tmp_path)
