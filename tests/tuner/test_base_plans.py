"""Plans of the base weights (S2FTConfig.plan_from / locations_from = "base"): what the file holds, the plan
recomputed bit for bit (in another process too), and another base model refused."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from s2ft import S2FTConfig, SpectralModel, get_spectral_model
from s2ft.ops.permutation import search_order
from s2ft.tuner.adapter_io import FINGERPRINTS, PLAN_KEY, WEIGHTS_NAME
from s2ft.tuner.kinds import weight_matrix
from s2ft.tuner.planner import DIGEST_BYTES, layer_generator
from tests.helpers import MODELS, ROOT, forward, make_batches, mlp_loss

BOTH = {"plan_from": "base", "locations_from": "base"}
PERMS = {"plan_from": "base"}


def trained(kind: str, options: dict, batches: list | None = None, n: int = 24):
    factory, targets, saves = MODELS[kind]
    base = factory()
    config = S2FTConfig(target_modules=targets, modules_to_save=saves, n_frequency=n, seed=5, **options)
    model = get_spectral_model(copy.deepcopy(base), config)
    model.calibrate(make_batches(kind) if batches is None else batches, mlp_loss if kind == "mlp" else None)
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.adapters["default"].coeffs.normal_()
    return base, model.eval()


def served(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return forward(model, batch)


def test_config_options():
    config = S2FTConfig(target_modules=["q"], **BOTH)
    assert not config.stores_locations and not config.stores_permutations and not config.needs_prior
    assert S2FTConfig.from_dict(config.to_dict()) == config
    assert S2FTConfig(target_modules=["q"]).stores_permutations  # the default stores its plan
    with pytest.raises(ValueError, match="needs plan_from='base'"):
        S2FTConfig(target_modules=["q"], locations_from="base")
    with pytest.raises(ValueError, match="plan_from must be one of"):
        S2FTConfig(target_modules=["q"], plan_from="w0")


@pytest.mark.parametrize("kind", ["mlp", "bert", "gpt2"])
def test_permutations_are_the_base_weights_ordering(kind):
    """plan_from='base': each layer's permutations are the greedy orderings of W0's rows, then columns, from the
    layer's generator, whatever the prior; the locations still come from the prior."""
    base, model = trained(kind, PERMS)
    _, other = trained(kind, PERMS, make_batches(kind, seed=9))  # another prior
    for name, layer in model.spectral_layers().items():
        adapter = layer.adapters["default"]
        w0 = weight_matrix(layer.base_layer).detach().float()
        generator = layer_generator(5, name)
        assert torch.equal(adapter.perm_rows, search_order(w0, "greedy", generator))
        assert torch.equal(adapter.perm_cols, search_order(w0.T, "greedy", generator))
        theirs = other.spectral_layers()[name].adapters["default"]
        assert torch.equal(adapter.perm_rows, theirs.perm_rows) and torch.equal(
            adapter.perm_cols, theirs.perm_cols
        )


@pytest.mark.parametrize("options", [PERMS, BOTH, {**BOTH, "permute": False}])
def test_file_holds_no_base_plan_and_loads_bit_for_bit(options, tmp_path):
    base, model = trained("bert", options)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    layers = model.spectral_layers()
    assert state[FINGERPRINTS].dtype == torch.uint8
    assert state[FINGERPRINTS].numel() == DIGEST_BYTES * (len(layers) + 1)
    with safe_open(tmp_path / WEIGHTS_NAME, framework="pt") as f:
        layout = f.metadata()[PLAN_KEY]
    if options.get("locations_from") == "base":  # the coefficients only, as FourierFT (and the fingerprints)
        assert layout == "" and not any(k.endswith(".plan") for k in state)
        assert {k for k in state if not k.startswith("modules_to_save.")} == {
            *(f"{n}.coeffs" for n in layers),
            FINGERPRINTS,
        }
    else:
        assert layout in ("l", "ol")  # the prior's locations, compactly; no permutations
    loaded = SpectralModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    for name, layer in loaded.spectral_layers().items():
        original = model.spectral_layers()[name].adapters["default"]
        for key in ("perm_rows", "perm_cols"):
            a, b = getattr(layer.adapters["default"], key), getattr(original, key)
            assert (a is None and b is None) or torch.equal(a, b)
        if options.get("locations_from") == "base":  # recomputed in the trained order
            assert torch.equal(layer.adapters["default"].rows, original.rows)
            assert torch.equal(layer.adapters["default"].coeffs, original.coeffs)
    for batch in make_batches("bert"):
        assert torch.equal(served(model, batch), served(loaded, batch))


def test_calibration_needs_no_batches_for_a_base_plan():
    base, model = trained("mlp", BOTH, batches=[])
    _, again = trained("mlp", BOTH)  # batches given: unused
    for name, layer in model.spectral_layers().items():
        theirs = again.spectral_layers()[name].adapters["default"]
        for key in ("rows", "cols", "perm_rows", "perm_cols"):
            assert torch.equal(getattr(layer.adapters["default"], key), getattr(theirs, key))


_CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.helpers import MODELS, make_batches, forward
from s2ft import SpectralModel
base = MODELS["bert"][0]()
base.load_state_dict(torch.load({weights!r}))
model = SpectralModel.from_pretrained(base, {adapter!r}).eval()
with torch.no_grad():
    torch.save(forward(model, make_batches("bert")[0]), {out!r})
"""


@pytest.mark.parametrize("options", [PERMS, BOTH])
def test_another_process_recomputes_the_same_plan(options, tmp_path):
    base, model = trained("bert", options)
    model.save_pretrained(tmp_path / "adapter")
    torch.save(base.state_dict(), tmp_path / "base.pt")
    script = _CHILD.format(
        root=ROOT,
        weights=str(tmp_path / "base.pt"),
        adapter=str(tmp_path / "adapter"),
        out=str(tmp_path / "y.pt"),
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    assert torch.equal(torch.load(tmp_path / "y.pt"), served(model, make_batches("bert")[0]))


@pytest.mark.parametrize("options", [PERMS, BOTH])
def test_another_base_model_is_refused(options, tmp_path):
    base, model = trained("bert", options)
    model.save_pretrained(tmp_path)
    other = copy.deepcopy(base)
    name = sorted(model.spectral_layers())[1]
    with torch.no_grad():
        other.get_submodule(name).weight[3, 7] += 1e-6  # one weight, one ulp or so
    with pytest.raises(ValueError, match=f"other base weights: {name}'s weight differs"):
        SpectralModel.from_pretrained(other, tmp_path)
    assert not any(hasattr(m, "adapters") for m in other.modules())  # the model left as it was
    # the same base in half precision is another base too
    with pytest.raises(ValueError, match="other base weights"):
        SpectralModel.from_pretrained(copy.deepcopy(base).half(), tmp_path)


def test_a_plan_recomputed_differently_is_refused(tmp_path):
    base, model = trained("mlp", BOTH)
    model.save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    state = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tampered = state[FINGERPRINTS].clone()
    tampered[-1] ^= 1  # the plans' digest, as if this machine ordered W0 otherwise
    save_file({**state, FINGERPRINTS: tampered}, path, metadata=metadata)
    with pytest.raises(ValueError, match="recomputed from the base weights differs"):
        SpectralModel.from_pretrained(copy.deepcopy(base), tmp_path)
    del state[FINGERPRINTS]
    save_file(state, path, metadata=metadata)
    with pytest.raises(ValueError, match="fingerprints"):
        SpectralModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_saving_while_merged_is_refused(tmp_path):
    _, model = trained("mlp", PERMS)
    model.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        model.save_pretrained(tmp_path)
    model.unmerge()
    model.save_pretrained(tmp_path)


def test_base_plan_file_is_near_fourierft_size(tmp_path):
    """With locations_from='base' the file is FourierFT's plus 8 bytes per layer (and 8) and its header."""
    from s2ft import FourierFTConfig

    base, model = trained("bert", BOTH, n=40)
    factory, targets, saves = MODELS["bert"]
    fourier = get_spectral_model(
        copy.deepcopy(base), FourierFTConfig(target_modules=targets, modules_to_save=saves, n_frequency=40)
    )
    layers = len(model.spectral_layers())
    extra = model.adapter_nbytes() - fourier.adapter_nbytes()
    assert DIGEST_BYTES * (layers + 1) <= extra <= DIGEST_BYTES * (layers + 1) + 160
