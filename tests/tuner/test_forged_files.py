"""Issue 34, adapter files: forged shapes are refused before any plan is decoded (at once, whatever they claim),
every plan carries a digest checked on load (a flipped bit or plans swapped between modules are refused), files
written before the digest still load, and the format and spectrum errors say what is wrong."""

from __future__ import annotations

import faulthandler
import json
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from s2ft import FourierFTConfig, S2FTConfig, SpectralModel, get_spectral_model
from s2ft.tuner.adapter_io import (
    FORMAT_KEY,
    FORMAT_VERSION,
    PLAN_DIGEST_BYTES,
    PLAN_KEY,
    UNCHECKED_FORMAT,
    WEIGHTS_NAME,
    decode_plans,
    plan_digest,
    read_adapter,
)
from tests.helpers import MLP, make_batches, mlp_loss


def square_mlp() -> MLP:
    """fc1 and fc2 both 12x12: two modules whose plans could be swapped."""
    torch.manual_seed(0)
    return MLP(d_in=12, hidden=12, d_out=12).eval()


def saved(path, model_factory=square_mlp, n: int = 10):
    """An S2FT adapter (both parts of the plan stored) with random coefficients saved in ``path``: (model, path)."""
    model = get_spectral_model(
        model_factory(), S2FTConfig(target_modules=["fc1", "fc2"], n_frequency=n, modules_to_save=["head"])
    )
    model.calibrate(make_batches("mlp"), loss_fn=mlp_loss)
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.adapters["default"].coeffs.normal_(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(path)
    return model.eval(), path


def file_of(path):
    with safe_open(path / WEIGHTS_NAME, framework="pt") as f:
        return load_file(path / WEIGHTS_NAME), f.metadata()


def refused(path, match, model_factory=square_mlp) -> str:
    """Loading ``path`` raises a one-line ValueError naming the file and matching ``match``; the model is left
    as it was."""
    model = model_factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match) as info:
        SpectralModel.from_pretrained(model, path)
    message = str(info.value)
    assert "\n" not in message and str(path / WEIGHTS_NAME) in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return message


def redigest(state, metadata) -> dict:
    """``state`` with each plan's digest recomputed for the metadata's (forged) shapes: what a forger who knows
    the scheme writes."""
    shapes = json.loads(metadata["s2ft_shapes"])
    names = sorted(k.removesuffix(".plan") for k in state if k.endswith(".plan"))
    out = dict(state)
    for name, shape in zip(names, shapes):
        body = state[f"{name}.plan"][PLAN_DIGEST_BYTES:]
        out[f"{name}.plan"] = torch.cat([plan_digest(name, shape, metadata[PLAN_KEY], body), body])
    return out


def without_digests(state, metadata) -> tuple[dict, dict]:
    """The file as format 2 wrote it: the same plans without their digests."""
    state = {k: v[PLAN_DIGEST_BYTES:] if k.endswith(".plan") else v for k, v in state.items()}
    return state, {**metadata, FORMAT_KEY: UNCHECKED_FORMAT}


# ---------------------------------------------------------------------------------------------- forged shapes
@pytest.mark.parametrize("size", [2**40, 300_000])
@pytest.mark.parametrize("variant", ["as saved", "digests forged too", "format 2"])
def test_forged_shapes_are_refused_at_once(tmp_path, size, variant):
    """Shapes claiming a [size, size] module: refused before any plan is decoded (decoding a permutation of
    2**40 would compute (2**40)! and never end), whether or not the digests were forged to match."""
    _, path = saved(tmp_path)
    state, metadata = file_of(path)
    metadata = {**metadata, "s2ft_shapes": json.dumps([[size, size], [12, 12]])}
    if variant == "digests forged too":
        state = redigest(state, metadata)
    elif variant == "format 2":
        state, metadata = without_digests(state, metadata)
    save_file(state, path / WEIGHTS_NAME, metadata=metadata)
    faulthandler.dump_traceback_later(120, exit=True)  # a regression fails the run instead of hanging it
    try:
        start = time.perf_counter()
        match = "does not match its digest" if variant == "as saved" else r"fc1.plan has \d+ bytes, too few"
        refused(path, match)
        with pytest.raises(ValueError, match=match):  # the file alone (no model to compare with) too
            read_adapter(str(path / WEIGHTS_NAME))
        assert time.perf_counter() - start < 10
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize("size", [2**62, 2**40, 2**31, 300_000])
def test_forged_shapes_of_a_plan_of_locations_only_are_refused_at_once(tmp_path, size):
    """S2FT without permutations (a plan of locations only, format 2, so no digest): the file alone is refused
    as corrupt, and against a model by its shapes, before any decoding; at once either way."""
    model = get_spectral_model(
        square_mlp(), S2FTConfig(target_modules=["fc1", "fc2"], n_frequency=10, permute=False)
    )
    model.calibrate(make_batches("mlp"), loss_fn=mlp_loss)
    model.save_pretrained(tmp_path)
    state, metadata = file_of(tmp_path)
    assert metadata[PLAN_KEY] == "l"
    metadata = {**metadata, "s2ft_shapes": json.dumps([[size, size], [12, 12]])}
    state, metadata = without_digests(state, metadata)
    save_file(state, tmp_path / WEIGHTS_NAME, metadata=metadata)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="is truncated or corrupt"):
        read_adapter(str(tmp_path / WEIGHTS_NAME))
    refused(tmp_path, rf"fc1 is \[{size}, {size}\] in the file, \[12, 12\] in the model")
    assert time.perf_counter() - start < 10


def test_shapes_are_compared_with_the_model_before_plans_are_decoded(tmp_path, monkeypatch):
    """A file of another model's shapes is refused by the shapes, without decoding a plan."""
    _, path = saved(tmp_path)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a plan was decoded")

    monkeypatch.setattr("s2ft.tuner.adapter_io.decode_permutation", no_decoding)
    refused(path, r"fc1 is \[12, 12\] in the file, \[30, 12\] in the model", lambda: MLP(d_in=12, hidden=30))


def test_more_coefficients_than_the_shape_has_entries_are_refused(tmp_path):
    _, path = saved(tmp_path)
    state, metadata = file_of(path)
    metadata = {**metadata, "s2ft_shapes": json.dumps([[2, 3], [12, 12]])}
    save_file(redigest(state, metadata), path / WEIGHTS_NAME, metadata=metadata)
    refused(path, r"fc1 holds 10 coefficients, more than its 2x3 spectrum has entries")


# ---------------------------------------------------------------------------------------------- digests
def test_every_single_bit_flip_of_a_plan_is_refused(tmp_path):
    """All single-bit flips of both modules' plans (digest included): none decodes."""
    _, path = saved(tmp_path)
    state, metadata = file_of(path)
    shapes = dict(zip(["fc1", "fc2"], json.loads(metadata["s2ft_shapes"])))
    decode_plans(state, metadata, shapes)  # the file as saved decodes
    flips = 0
    for name in ("fc1", "fc2"):
        plan = state[f"{name}.plan"]
        for byte in range(plan.numel()):
            for bit in range(8):
                flipped = plan.clone()
                flipped[byte] ^= 1 << bit
                with pytest.raises(ValueError, match=f"the plan of {name} does not match its digest"):
                    decode_plans({**state, f"{name}.plan": flipped}, metadata, shapes)
                flips += 1
    assert flips == 8 * (state["fc1.plan"].numel() + state["fc2.plan"].numel()) > 300


def test_a_flipped_bit_is_refused_on_load_and_the_model_left_alone(tmp_path):
    _, path = saved(tmp_path)
    state, metadata = file_of(path)
    plan = state["fc2.plan"].clone()
    plan[-1] ^= 1
    save_file({**state, "fc2.plan": plan}, path / WEIGHTS_NAME, metadata=metadata)
    refused(path, r"the plan of fc2 does not match its digest: the file was damaged or altered")


def test_plans_swapped_between_modules_of_one_shape_are_refused(tmp_path):
    _, path = saved(tmp_path)
    state, metadata = file_of(path)
    assert not torch.equal(state["fc1.plan"], state["fc2.plan"])
    swapped = {**state, "fc1.plan": state["fc2.plan"], "fc2.plan": state["fc1.plan"]}
    save_file(swapped, path / WEIGHTS_NAME, metadata=metadata)
    refused(path, r"the plan of fc1 does not match its digest.*moved between modules")


def test_files_written_before_the_digest_still_load_and_save_again_with_it(tmp_path):
    """Format 2 (plans without a digest, what s2ft wrote before): loaded as before, to the same outputs; saved
    again, in the current format with digests."""
    model, path = saved(tmp_path / "new")
    state, metadata = file_of(path)
    old, old_meta = without_digests(state, metadata)
    save_file(old, path / WEIGHTS_NAME, metadata=old_meta)
    loaded = SpectralModel.from_pretrained(square_mlp(), path).eval()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded(x), model(x))
    loaded.save_pretrained(tmp_path / "again")
    again, again_meta = file_of(tmp_path / "again")
    assert again_meta[FORMAT_KEY] == FORMAT_VERSION
    assert all(torch.equal(again[k], state[k]) for k in state)  # the digests back, bit for bit


# ---------------------------------------------------------------------------------------------- messages
def test_a_newer_format_says_upgrade(tmp_path):
    _, path = saved(tmp_path)
    state, metadata = file_of(path)
    newer = str(int(FORMAT_VERSION) + 1)
    save_file(state, path / WEIGHTS_NAME, metadata={**metadata, FORMAT_KEY: newer})
    message = refused(
        path, rf"written by a newer s2ft \(file format {newer}; this s2ft reads formats up to 3\)"
    )
    assert "upgrade s2ft" in message and "corrupt" not in message


@pytest.mark.parametrize("version", ["1", "0", "abc", "2.5"])
def test_a_format_no_s2ft_writes_is_named(tmp_path, version):
    """Format 1 files have no s2ft_format key: one marked "1" that holds encoded plans was altered."""
    _, path = saved(tmp_path)
    state, metadata = file_of(path)
    save_file(state, path / WEIGHTS_NAME, metadata={**metadata, FORMAT_KEY: version})
    message = refused(path, rf"metadata s2ft_format is '{version}', which no s2ft writes .*fc1.plan")
    assert "newer" not in message and "save the adapter again" in message


def test_plans_without_a_format_key_are_named(tmp_path):
    _, path = saved(tmp_path)
    state, metadata = file_of(path)
    del metadata[FORMAT_KEY]
    save_file(state, path / WEIGHTS_NAME, metadata=metadata)
    refused(path, r"holds encoded plans \(fc1.plan\) but no s2ft_format metadata")


@pytest.mark.parametrize("with_shapes", [True, False])
def test_a_peft_folder_missing_a_spectrum_names_the_layer(tmp_path, with_shapes):
    model = get_spectral_model(square_mlp(), FourierFTConfig(target_modules=["fc1", "fc2"], n_frequency=8))
    model.save_pretrained(tmp_path, format="peft")
    state, metadata = file_of(tmp_path)
    del state["base_model.model.fc2.fourierft_spectrum"]
    if not with_shapes:  # as PEFT writes it
        metadata = {"format": "pt"}
    save_file(state, tmp_path / WEIGHTS_NAME, metadata=metadata)
    refused(tmp_path, r"has no spectrum for fc2 \(base_model.model.fc2.fourierft_spectrum\)")
