"""Issue 20, library side: adapter files, PEFT folders and adapters that would load or run wrong are refused
with one line naming the file (or adapter) and what to do, and the model is left as it was."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from s2ft import FourierFTConfig, S2FTConfig, SpectralModel, get_spectral_model
from s2ft.tuner.adapter_io import FORMAT_KEY, PLAN_KEY, encode_plans, read_adapter
from tests.helpers import MLP, make_batches, mlp_loss, tiny_mlp

WEIGHTS = "adapter_model.safetensors"


def s2ft_folder(path, saves=("head",)):
    model = get_spectral_model(
        tiny_mlp(), S2FTConfig(target_modules=["fc1", "fc2"], n_frequency=8, modules_to_save=list(saves))
    )
    model.calibrate(make_batches("mlp"), loss_fn=mlp_loss)
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.adapters["default"].coeffs.normal_(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(path)
    return path


def metadata(path):
    with safe_open(path / WEIGHTS, framework="pt") as f:
        return f.metadata()


def load_refused(path, match, model=None):
    """Loading ``path`` raises a one-line ValueError matching ``match``; the model keeps its weights."""
    model = model or tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match) as info:
        SpectralModel.from_pretrained(model, path)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("Spectral" in type(m).__name__ for m in model.modules())
    return str(info.value)


@pytest.mark.parametrize("version", [1, 2])
def test_s2ft_file_without_permutations_is_refused(tmp_path, version):
    folder = s2ft_folder(tmp_path)
    state, _ = read_adapter(str(folder / WEIGHTS))
    state = {k: v for k, v in state.items() if not k.endswith(("perm_rows", "perm_cols"))}
    meta = {k: v for k, v in metadata(folder).items() if k not in (FORMAT_KEY, PLAN_KEY)}
    if version == 2:
        state, meta = encode_plans(state, meta)
        assert meta[PLAN_KEY] == "l"  # a plan of locations only
    save_file(state, folder / WEIGHTS, metadata=meta)
    message = load_refused(folder, r"fc1 stores no permutations.*permute=True")
    assert str(folder / WEIGHTS) in message


def test_permutations_a_config_does_not_use_are_refused(tmp_path):
    folder = s2ft_folder(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "permute": False}))
    load_refused(folder, r"fc1 stores permutations its 's2ft' config does not use")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_saved_head_with_nan_or_inf_is_refused(tmp_path, value):
    folder = s2ft_folder(tmp_path)
    state, meta = load_file(folder / WEIGHTS), metadata(folder)
    state["modules_to_save.head.weight"][0, 1] = value
    save_file(state, folder / WEIGHTS, metadata=meta)
    message = load_refused(folder, r"saved weights of head \(weight\) hold NaN or infinite values")
    assert str(folder / WEIGHTS) in message


def test_truncated_file_names_the_file_and_says_save_again(tmp_path):
    folder = s2ft_folder(tmp_path)
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    message = load_refused(folder, r"truncated or corrupt.*save the adapter again")
    assert str(folder / WEIGHTS) in message


@pytest.mark.parametrize(
    "meta, match",
    [
        ({}, r"no s2ft_shapes metadata.*save the adapter again"),
        ({"s2ft_shapes": '{"fc1": [20, 12]}'}, r"s2ft_shapes must be a JSON list of the 2 adapted modules"),
        ({"s2ft_shapes": "[1, 2]"}, r"s2ft_shapes holds 1, not a \[d_out, d_in\]"),
        ({"s2ft_layers": '[["fc1", 20]]'}, r"s2ft_layers must be a JSON object \{module: \[d_out, d_in\]\}"),
        ({"s2ft_layers": '{"fc1": [20, 12], "fc2": "6x20"}'}, r"s2ft_layers holds '6x20'"),
    ],
)
def test_legacy_or_foreign_metadata_is_one_line_naming_the_file(tmp_path, meta, match):
    folder = s2ft_folder(tmp_path)
    state, _ = read_adapter(str(folder / WEIGHTS))  # format 1 tensors, which need no plan metadata
    save_file(state, folder / WEIGHTS, metadata={"format": "pt", **meta})
    assert str(folder / WEIGHTS) in load_refused(folder, match)


def test_legacy_s2ft_layers_metadata_still_loads(tmp_path):
    folder = s2ft_folder(tmp_path)
    state, shapes = read_adapter(str(folder / WEIGHTS))
    save_file(state, folder / WEIGHTS, metadata={"format": "pt", "s2ft_layers": json.dumps(shapes)})
    loaded = SpectralModel.from_pretrained(tiny_mlp(), folder)
    again = SpectralModel.from_pretrained(tiny_mlp(), s2ft_folder(tmp_path / "again"))
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(x), again(x))


def peft_folder(path, model=None):
    model = get_spectral_model(
        model or tiny_mlp(), FourierFTConfig(target_modules=["fc1", "fc2"], n_frequency=8)
    )
    model.save_pretrained(path, format="peft")
    return path


def test_peft_folder_on_a_model_of_another_width_is_refused(tmp_path):
    folder = peft_folder(tmp_path)
    assert json.loads(metadata(folder)["s2ft_shapes"]) == [[20, 12], [6, 20]]
    message = load_refused(folder, r"fc1 is \[20, 12\] in the file, \[30, 12\] in the model", MLP(hidden=30))
    assert str(folder / WEIGHTS) in message
    SpectralModel.from_pretrained(tiny_mlp(), folder)  # the model it was saved from


@pytest.mark.parametrize("field", ["n_frequency", "target_modules"])
def test_peft_config_missing_a_field_names_it_and_the_file(tmp_path, field):
    folder = peft_folder(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    del config[field]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    message = load_refused(folder, rf"has no '{field}'")
    assert str(folder / "adapter_config.json") in message


def test_truncated_peft_file_names_the_file(tmp_path):
    folder = peft_folder(tmp_path)
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[:20])
    assert str(folder / WEIGHTS) in load_refused(folder, r"truncated or corrupt.*save the adapter again")


def test_deleting_the_active_adapter_warns_naming_the_new_one_and_its_forward_names_it():
    model = get_spectral_model(tiny_mlp(), FourierFTConfig(target_modules=["fc1"], n_frequency=8))
    model.add_adapter("planned", S2FTConfig(target_modules=["fc1"], n_frequency=8))
    with pytest.warns(
        UserWarning, match=r"active adapter is now 'planned'.*calibrate\(batches, adapter_name='planned'\)"
    ):
        model.delete_adapter("default")
    assert model.active_adapters == ["planned"]
    with pytest.raises(RuntimeError, match=r"adapter 'planned' has no locations.*adapter_name='planned'"):
        model(torch.randn(2, 12))
    model.calibrate(make_batches("mlp"), loss_fn=mlp_loss, adapter_name="planned")
    model(torch.randn(2, 12))


def test_deleting_an_inactive_adapter_does_not_warn():
    model = get_spectral_model(tiny_mlp(), FourierFTConfig(target_modules=["fc1"], n_frequency=8))
    model.add_adapter("other", FourierFTConfig(target_modules=["fc1"], n_frequency=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.delete_adapter("other")
    assert model.active_adapters == ["default"]


@pytest.mark.parametrize(
    "loss_fn, match",
    [
        (lambda o, b: torch.nn.functional.cross_entropy(o, b[1], reduction="none"), r"shape \(4,\)"),
        (lambda o, b: 1.0, r"returned float"),
    ],
)
def test_calibrate_with_a_non_scalar_loss_is_one_line(loss_fn, match):
    model = get_spectral_model(tiny_mlp(), S2FTConfig(target_modules=["fc1"], n_frequency=8))
    before = {k: v.clone() for k, v in model.state_dict().items() if v is not None}
    with pytest.raises(ValueError, match=r"loss_fn returned") as info:
        model.calibrate(make_batches("mlp"), loss_fn=loss_fn)
    assert re.search(match, str(info.value)) and "scalar tensor" in str(info.value)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    assert not model.spectral_layers()["fc1"].adapters["default"].is_ready
