"""The basis an adapter file records (metadata ``s2ft_basis``): a config edited to another basis, or to another
number of Haar levels, is refused in one line with the model unchanged; files without the key load as before."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from s2ft import (
    DCTConfig,
    FourierFTConfig,
    S2FTConfig,
    S2FTWaveletConfig,
    SpectralModel,
    WaveletConfig,
    get_spectral_model,
)
from s2ft.tuner.adapter_io import BASIS_KEY, WEIGHTS_NAME
from tests.helpers import MODELS, forward, make_batches, mlp_loss

FACTORY, TARGETS, SAVES = MODELS["mlp"]
BATCHES = make_batches("mlp")


def trained(config: FourierFTConfig) -> SpectralModel:
    """A tiny MLP with ``config``'s adapter (calibrated if planned), its coefficients random (non-zero ``ΔW``)."""
    torch.manual_seed(0)
    model = get_spectral_model(FACTORY(), config)
    if config.planned:
        model.calibrate(BATCHES, mlp_loss)
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.coeffs.normal_()
    return model.eval()


def config(kind: str, **fields) -> FourierFTConfig:
    classes = {
        "fourierft": FourierFTConfig,
        "dct": DCTConfig,
        "wavelet": WaveletConfig,
        "s2ft": S2FTConfig,
        "s2ft-wavelet": S2FTWaveletConfig,
    }
    return classes[kind](
        target_modules=TARGETS, modules_to_save=SAVES, n_frequency=10, scaling=50.0, **fields
    )


def metadata(folder) -> dict[str, str]:
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        return f.metadata()


def edit_config(folder, method: str, **fields) -> None:
    """Rewrite ``adapter_config.json`` as a hand edit would: another method (the fields it does not have
    dropped), or other field values."""
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    if data["method"] in ("wavelet", "s2ft-wavelet") and method not in ("wavelet", "s2ft-wavelet"):
        del data["levels"], data["wavelet_family"]
    data.update(method=method, **fields)
    path.write_text(json.dumps(data))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "kind, fields, basis",
    [
        ("fourierft", {}, "fourier"),
        ("dct", {}, "dct"),
        ("wavelet", {}, "haar"),
        ("wavelet", {"levels": 3}, "haar3"),
        ("s2ft", {}, "fourier"),
        ("s2ft-wavelet", {"levels": 2}, "haar2"),
    ],
)
def test_every_file_records_its_basis_and_round_trips(kind, fields, basis, tmp_path):
    model = trained(config(kind, **fields))
    model.save_pretrained(tmp_path / "a")
    assert metadata(tmp_path / "a")[BASIS_KEY] == basis
    loaded = SpectralModel.from_pretrained(FACTORY(), tmp_path / "a")
    for batch in BATCHES:
        assert torch.equal(forward(loaded, batch), forward(model, batch))


# (the config saved, the hand edit of adapter_config.json, the basis the file holds, the basis the edit names)
EDITS = [
    ("wavelet", {}, ("fourierft", {}), "1-level Haar", "Fourier"),
    ("fourierft", {}, ("wavelet", {"levels": 1, "wavelet_family": "db1"}), "Fourier", "1-level Haar"),
    ("wavelet", {"levels": 2}, ("wavelet", {"levels": 1}), "2-level Haar", "1-level Haar"),
    ("wavelet", {"levels": 1}, ("wavelet", {"levels": 3}), "1-level Haar", "3-level Haar"),
    ("dct", {}, ("wavelet", {"levels": 1, "wavelet_family": "db1"}), "DCT-II", "1-level Haar"),
    ("s2ft-wavelet", {"levels": 2}, ("s2ft", {}), "2-level Haar", "Fourier"),
    ("s2ft", {}, ("s2ft-wavelet", {"levels": 1, "wavelet_family": "db1"}), "Fourier", "1-level Haar"),
    ("s2ft-wavelet", {"levels": 2}, ("s2ft-wavelet", {"levels": 3}), "2-level Haar", "3-level Haar"),
]


@pytest.mark.parametrize("kind, fields, edit, stored, named", EDITS)
def test_a_config_edited_to_another_basis_is_refused_and_changes_nothing(
    kind, fields, edit, stored, named, tmp_path
):
    model = trained(config(kind, **fields))
    model.save_pretrained(tmp_path / "a")
    edit_config(tmp_path / "a", edit[0], **edit[1])
    message = (
        rf"adapter file .*{WEIGHTS_NAME}: its coefficients are in the {stored} .* reads them in the {named}"
    )
    base = FACTORY()
    before = snapshot(base)
    with pytest.raises(ValueError, match=message) as error:
        SpectralModel.from_pretrained(base, tmp_path / "a")
    assert "\n" not in str(error.value) and "use the adapter_config.json saved with these weights" in str(
        error.value
    )
    assert type(base) is type(FACTORY()) and not any(isinstance(m, SpectralModel) for m in base.modules())
    after = snapshot(base)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # a model already wrapped: load_adapter refuses too, and leaves its adapters, weights and outputs alone
    host = trained(config("fourierft"))
    state, outputs = snapshot(host), [forward(host, b) for b in BATCHES]
    adapters, active = dict(host.peft_config), host.active_adapters
    with pytest.raises(ValueError, match=message):
        host.load_adapter(tmp_path / "a", adapter_name="other")
    assert host.peft_config == adapters and host.active_adapters == active
    after = snapshot(host)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    for batch, out in zip(BATCHES, outputs):
        assert torch.equal(forward(host, batch), out)


def drop_key(folder, value: str | None = None) -> None:
    """Rewrite the weights file without metadata ``s2ft_basis`` (as files written before it), or with
    ``value``."""
    path = folder / WEIGHTS_NAME
    tensors, meta = load_file(str(path)), metadata(folder)
    meta = {k: v for k, v in meta.items() if k != BASIS_KEY}
    if value is not None:
        meta[BASIS_KEY] = value
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "kind, fields",
    [("fourierft", {}), ("dct", {}), ("s2ft", {}), ("wavelet", {"levels": 2}), ("s2ft-wavelet", {})],
)
def test_files_without_the_key_load_in_their_configs_basis_as_before(kind, fields, tmp_path):
    model = trained(config(kind, **fields))
    model.save_pretrained(tmp_path / "a")
    drop_key(tmp_path / "a")
    assert BASIS_KEY not in metadata(tmp_path / "a")
    loaded = SpectralModel.from_pretrained(FACTORY(), tmp_path / "a")
    for batch in BATCHES:
        assert torch.equal(forward(loaded, batch), forward(model, batch))
    loaded.save_pretrained(tmp_path / "b")  # saved again: the key is written
    assert metadata(tmp_path / "b")[BASIS_KEY] == model.peft_config["default"].basis


def test_a_basis_this_s2ft_does_not_know_asks_to_upgrade(tmp_path):
    model = trained(config("wavelet"))
    model.save_pretrained(tmp_path / "a")
    drop_key(tmp_path / "a", "db4-3")
    base = FACTORY()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError, match=r"a basis this s2ft does not know \('db4-3'.*upgrade s2ft"):
        SpectralModel.from_pretrained(base, tmp_path / "a")
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
