"""Bad input: a clear error naming the problem, and the model and files left as they were."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from s2ft import FourierFTConfig, S2FTConfig, SpectralModel, get_spectral_model, load_config
from tests.helpers import MLP, MODELS, make_batches, mlp_loss


def snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}, [
        (n, type(m)) for n, m in model.named_modules()
    ]


def assert_same(model, snap):
    params, modules = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n][0]) and p.requires_grad == params[n][1]


def test_no_module_matched_names_the_available_layers():
    model = MODELS["bert"][0]()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"matched no module.*'query'"):
        get_spectral_model(model, FourierFTConfig(target_modules=["q_proj"]))
    assert_same(model, snap)


def test_unsupported_module_type():
    model = MODELS["bert"][0]()
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"LayerNorm.*only torch.nn.Linear"):
        get_spectral_model(model, FourierFTConfig(target_modules=r".*attention\.output\.(dense|LayerNorm)"))
    assert_same(model, snap)


def test_modules_to_save_matching_nothing():
    model = MODELS["mlp"][0]()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save"):
        get_spectral_model(model, FourierFTConfig(target_modules=["fc1"], modules_to_save=["classifier"]))
    assert_same(model, snap)


def test_wrapping_twice_is_refused():
    model = MODELS["mlp"][0]()
    get_spectral_model(model, FourierFTConfig(target_modules=["fc1"], n_frequency=10))
    with pytest.raises(ValueError, match="already holds s2ft adapters"):
        get_spectral_model(model, FourierFTConfig(target_modules=["fc2"], n_frequency=10))


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_n_frequency_must_be_positive_integer(n):
    with pytest.raises(ValueError, match="n_frequency"):
        FourierFTConfig(target_modules=["fc1"], n_frequency=n)


def test_n_frequency_larger_than_the_spectrum():
    model = MLP()  # fc2 is 6x20 = 120 entries
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"fc2: n_frequency=121 is larger than the 6x20 spectrum"):
        get_spectral_model(model, S2FTConfig(target_modules=["fc1", "fc2"], n_frequency=121))
    assert_same(model, snap)


@pytest.mark.parametrize("gamma", [0, -1.0, float("nan")])
def test_gamma_must_be_positive(gamma):
    with pytest.raises(ValueError, match="gamma"):
        S2FTConfig(target_modules=["fc1"], gamma=gamma)


@pytest.mark.parametrize(
    "field, value",
    [
        ("init", "uniform"),
        ("scaling", 0.0),
        ("target_modules", []),
        ("target_modules", None),
        ("permutation", "tsp"),
    ],
)
def test_other_invalid_fields(field, value):
    kwargs = {"target_modules": ["fc1"], field: value}
    with pytest.raises(ValueError, match=field):
        S2FTConfig(**kwargs)


def test_config_json_roundtrip_and_method_check(tmp_path):
    config = S2FTConfig(target_modules="fc[12]", modules_to_save=["head"], n_frequency=7, gamma=2.0, seed=3)
    config.to_json_file(tmp_path / "adapter_config.json")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["method"] == "s2ft"
    assert load_config(tmp_path) == config
    assert S2FTConfig.from_json_file(tmp_path / "adapter_config.json") == config
    FourierFTConfig(target_modules=["fc1"]).to_json_file(tmp_path / "f.json")
    with pytest.raises(ValueError, match="'fourierft' adapter config, not a 's2ft' one"):
        S2FTConfig.from_json_file(tmp_path / "f.json")


def saved_adapter(tmp_path, kind="mlp"):
    factory, targets, saves = MODELS[kind]
    model = get_spectral_model(
        factory(), S2FTConfig(target_modules=targets, modules_to_save=saves, n_frequency=20)
    )
    model.calibrate(make_batches(kind), mlp_loss if kind == "mlp" else None)
    model.save_pretrained(tmp_path)
    return model


def test_loading_a_config_of_another_method(tmp_path):
    import peft

    peft.LoraConfig(target_modules=["fc1"]).save_pretrained(tmp_path)
    model = MLP()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="PEFT LORA adapter"):
        SpectralModel.from_pretrained(model, tmp_path)
    assert_same(model, snap)


def test_loading_onto_a_model_with_other_names_or_shapes(tmp_path):
    saved_adapter(tmp_path)
    wider = MLP(hidden=24)
    snap = snapshot(wider)
    with pytest.raises(ValueError, match=r"fc1 is \[20, 12\] in the file, \[24, 12\] in the model"):
        SpectralModel.from_pretrained(wider, tmp_path)
    assert_same(wider, snap)

    class Renamed(MLP):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Sequential()
            self.extra.fc1 = torch.nn.Linear(12, 20)

    renamed = Renamed()
    snap = snapshot(renamed)
    with pytest.raises(ValueError, match=r"targeted in the model but not in the file: \['extra.fc1'\]"):
        SpectralModel.from_pretrained(renamed, tmp_path)
    assert_same(renamed, snap)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_truncated_or_corrupt_adapter_file(tmp_path, damage):
    saved_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xff" * 50, "empty": b""}[damage])
    model = MODELS["mlp"][0]()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        SpectralModel.from_pretrained(model, tmp_path)
    assert_same(model, snap)


def test_tampered_permutation_is_caught(tmp_path):
    from safetensors.torch import load_file, save_file

    saved_adapter(tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    state = load_file(path)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    # file format 3: the plan's digest no longer matches
    from s2ft.ops.codec import permutation_nbytes
    from s2ft.tuner.adapter_io import FORMAT_KEY, PLAN_DIGEST_BYTES, PLAN_KEY, read_adapter

    bad = state["fc1.plan"].clone()
    bad[PLAN_DIGEST_BYTES : PLAN_DIGEST_BYTES + permutation_nbytes(20)] = 255
    save_file({**state, "fc1.plan": bad}, path, metadata=metadata)
    with pytest.raises(ValueError, match="the plan of fc1 does not match its digest"):
        SpectralModel.from_pretrained(MODELS["mlp"][0](), tmp_path)
    # file format 2 (no digest): a permutation's code whose rank is not below d! is no permutation
    old = {k: v[PLAN_DIGEST_BYTES:] if k.endswith(".plan") else v for k, v in state.items()}
    old["fc1.plan"] = bad[PLAN_DIGEST_BYTES:]
    save_file(old, path, metadata={**metadata, FORMAT_KEY: "2"})
    with pytest.raises(ValueError, match="corrupt"):
        SpectralModel.from_pretrained(MODELS["mlp"][0](), tmp_path)
    # file format 1 (integer plans), which loading still checks
    save_file(state, path, metadata=metadata)
    state, _ = read_adapter(path)
    metadata = {k: v for k, v in metadata.items() if k not in (FORMAT_KEY, PLAN_KEY)}
    state["fc1.perm_rows"][0] = state["fc1.perm_rows"][1]
    save_file(state, path, metadata=metadata)
    with pytest.raises(ValueError, match="not permutations"):
        SpectralModel.from_pretrained(MODELS["mlp"][0](), tmp_path)


def test_failed_save_leaves_the_previous_adapter(tmp_path, monkeypatch):
    model = saved_adapter(tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    with torch.no_grad():
        model.spectral_layers()["fc1"].coeffs.add_(1.0)

    def broken_save(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("s2ft.tuner.adapter_io.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert {
        f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)
    } == before  # no temp file left either
    loaded = SpectralModel.from_pretrained(copy.deepcopy(MODELS["mlp"][0]()), tmp_path)
    assert loaded.num_trainable_parameters() == 0
