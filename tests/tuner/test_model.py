"""The adapter lifecycle, run through the same table of behaviours for every tiny model and every registered
spectral config (s2ft.config.CONFIGS: FourierFT, S2FT, DCT, and any config registered later)."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

import s2ft.methods  # noqa: F401  (defines, and so registers, every method's adapter config)
from s2ft import FourierFTConfig, SpectralLayer, SpectralModel, get_spectral_model, load_config
from s2ft.config import CONFIGS
from s2ft.ops.bases import get_basis
from s2ft.tuner.layers import TrainedCopy
from tests.helpers import MODELS, forward, make_batches, mlp_loss

METHODS = sorted(CONFIGS)  # a newly registered config runs through every test below


def build(kind: str, method: str, **overrides):
    """(base model, a deep copy wrapped and ready to train, batches, loss_fn)."""
    factory, targets, saves = MODELS[kind]
    base = factory()
    config = CONFIGS[method](
        target_modules=targets,
        modules_to_save=saves,
        n_frequency=overrides.pop("n_frequency", 40),
        **overrides,
    )
    model = get_spectral_model(copy.deepcopy(base), config)
    batches = make_batches(kind)
    loss_fn = mlp_loss if kind in ("mlp", "convnet") else None
    if config.planned:  # locations from data (S2FT): planned before training
        model.calibrate(batches, loss_fn)
    return base, model, batches, loss_fn


def randomize(model: SpectralModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.coeffs.copy_(torch.randn(layer.coeffs.shape, generator=g))


def train_steps(model, batches, loss_fn, steps: int = 3, lr: float = 0.05) -> None:
    from s2ft.tuner.calibration import batch_loss

    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        opt.zero_grad()
        batch_loss(model, batches[i % len(batches)], loss_fn).backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("method", METHODS)
def test_zeros_init_equals_base(model_kind, method):
    base, model, batches, _ = build(model_kind, method)
    for batch in batches:
        assert torch.equal(forward(model, batch), forward(base, batch))


@pytest.mark.parametrize("method", METHODS)
def test_training_changes_only_adapter_and_saved_modules(model_kind, method):
    base, model, batches, loss_fn = build(model_kind, method)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, batches, loss_fn)
    assert not torch.allclose(forward(model, batches[0]), forward(base, batches[0]), atol=1e-4)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed, "training changed nothing"
    assert changed <= trainable
    assert all(n.endswith(".coeffs") or ".copies." in n for n in trainable)
    assert any(n.endswith(".coeffs") for n in changed)
    if MODELS[model_kind][2]:
        assert any(".copies." in n for n in changed)


@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_and_unload(model_kind, method):
    _, model, batches, _ = build(model_kind, method, init="normal", scaling=20.0)
    randomize(model)
    expected = forward(model, batches[0])
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in model.spectral_layers().items()}
    model.merge()
    torch.testing.assert_close(forward(model, batches[0]), expected, atol=1e-5, rtol=1e-5)
    model.unmerge()
    for name, layer in model.spectral_layers().items():
        torch.testing.assert_close(layer.base_layer.weight, weights[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(forward(model, batches[0]), expected, atol=1e-5, rtol=1e-5)
    unloaded = model.merge_and_unload()
    assert type(unloaded) is type(MODELS[model_kind][0]())
    assert not any(isinstance(m, (SpectralLayer, TrainedCopy)) for m in unloaded.modules())
    assert not any("s2ft" in type(m).__module__ for m in unloaded.modules())
    torch.testing.assert_close(forward(unloaded, batches[0]), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_disable_adapters_gives_base_outputs(model_kind, method):
    base, model, batches, loss_fn = build(model_kind, method)
    train_steps(model, batches, loss_fn)
    adapted = forward(model, batches[0])
    for merged in (False, True):
        if merged:
            model.merge()
        with model.disable_adapters():
            torch.testing.assert_close(
                forward(model, batches[0]), forward(base, batches[0]), atol=1e-5, rtol=1e-5
            )
        torch.testing.assert_close(forward(model, batches[0]), adapted, atol=1e-5, rtol=1e-5)
    assert all(layer.merged for layer in model.spectral_layers().values())


@pytest.mark.parametrize("method", METHODS)
def test_save_load_roundtrip(model_kind, method, tmp_path):
    base, model, batches, loss_fn = build(model_kind, method)
    train_steps(model, batches, loss_fn)
    expected = forward(model, batches[1])
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert model.adapter_nbytes() == os.path.getsize(tmp_path / "adapter_model.safetensors")
    assert type(load_config(tmp_path)) is type(model.spectral_config)
    loaded = SpectralModel.from_pretrained(copy.deepcopy(base), tmp_path)
    for batch in batches:  # bit for bit
        with torch.no_grad():
            assert torch.equal(forward(loaded, batch), forward(model, batch))
    torch.testing.assert_close(forward(loaded, batches[1]), expected, atol=1e-6, rtol=1e-6)
    assert loaded.num_trainable_parameters() == 0
    trainable = SpectralModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert trainable.num_trainable_parameters() == model.num_trainable_parameters()
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(forward(merged, batches[1]), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_layers_hold_their_bases_delta_weight_at_the_seeded_or_planned_locations(model_kind, method):
    """Each layer's ΔW is its config's basis's (in the layer kind's matrix view) at its locations; a config whose
    locations follow from the seed installs exactly those, in every layer."""
    _, model, batches, loss_fn = build(model_kind, method, scaling=300.0, n_frequency=30)
    config = model.spectral_config
    train_steps(model, batches, loss_fn, steps=2)
    for layer in model.spectral_layers().values():
        assert layer.basis.name == config.basis
        seeded = config.seeded_locations(layer.d_out, layer.d_in)
        assert (seeded is None) == config.planned
        if seeded is not None:
            assert torch.equal(layer.rows.cpu().long(), seeded[0]) and torch.equal(
                layer.cols.cpu().long(), seeded[1]
            )
        expected = get_basis(config.basis).delta_weight(
            layer.coeffs.detach().double(),
            layer.rows,
            layer.cols,
            layer.d_out,
            layer.d_in,
            300.0,
            layer.perm_rows,
            layer.perm_cols,
        )
        torch.testing.assert_close(layer.delta_weight().double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_fft_and_dense_paths_agree_in_training(method):
    outputs, grads = {}, {}
    for path in ("dense", "fft"):
        _, model, batches, _ = build("bert", method, forward_path=path, init="normal", n_frequency=30)
        model.train()
        out = forward(model, batches[0])
        out.square().sum().backward()
        outputs[path] = out.detach()
        grads[path] = [layer.coeffs.grad for layer in model.spectral_layers().values()]
    torch.testing.assert_close(outputs["fft"], outputs["dense"], rtol=1e-4, atol=1e-5)
    for fft, dense in zip(grads["fft"], grads["dense"]):
        torch.testing.assert_close(fft, dense, rtol=1e-3, atol=1e-4)


def test_adapter_file_stores_compact_plans_and_no_base_weights(tmp_path):
    from safetensors.torch import load_file

    from s2ft.ops.codec import encode_locations, permutation_nbytes
    from s2ft.tuner.adapter_io import fold_groups

    _, model, _, _ = build("bert", "s2ft")
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    name = "bert.encoder.layer.0.attention.self.query"
    assert state[f"{name}.plan"].dtype == torch.uint8  # file format 2: one compact plan per matrix
    assert state[f"{name}.coeffs"].dtype == torch.float32
    assert not any(k.endswith("base_layer.weight") or "embeddings" in k for k in state)
    # each plan: two permutations of 32 (Lehmer codes), the location set's code and, if any matrix has fold
    # groups, their count and orders
    layers = model.spectral_layers()
    ordered = any(
        fold_groups(a.rows, a.cols, 32, 32) for a in (layer.adapters["default"] for layer in layers.values())
    )
    plans = 0
    for module, layer in layers.items():
        adapter = layer.adapters["default"]
        groups = len(fold_groups(adapter.rows, adapter.cols, 32, 32))
        size = 2 * permutation_nbytes(32) + encode_locations(adapter.rows, adapter.cols, 32, 32)[0].numel()
        size += 8  # file format 3: the plan's digest first
        assert state[f"{module}.plan"].numel() == size + (1 + groups if ordered else 0)
        plans += state[f"{module}.plan"].numel()
    # 4 layers x 40 float32 coefficients + the plans + the classifier head (3x32 + 3), under format 1's
    # 4 x (2x40 + 2x32) one-byte integers
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert total == 4 * 40 * 4 + plans + (3 * 32 + 3) * 4 and plans < 4 * (2 * 40 + 2 * 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_base_weights(method, dtype):
    base, model32, batches, _ = build("llama", method, init="normal", scaling=20.0)
    randomize(model32)
    expected = forward(model32, batches[0])
    half = copy.deepcopy(base).to(dtype)
    config = copy.deepcopy(model32.spectral_config)
    model = get_spectral_model(half, config)
    for name, layer in model.spectral_layers().items():
        ref = model32.spectral_layers()[name]
        assert layer.coeffs.dtype == torch.float32
        layer.set_locations(ref.rows, ref.cols, ref.perm_rows, ref.perm_cols)
        with torch.no_grad():
            layer.coeffs.copy_(ref.coeffs)
        assert layer.delta_weight().dtype == torch.float32
    out = forward(model, batches[0])
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)
    out.float().sum().backward()  # gradients reach the float32 coefficients through half-precision activations
    grads = [layer.coeffs.grad for layer in model.spectral_layers().values()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    model.merge()
    torch.testing.assert_close(forward(model, batches[0]).float(), expected, atol=0.1, rtol=0.05)


def test_trainable_parameter_count():
    _, model, _, _ = build("bert", "fourierft")
    head = 3 * 32 + 3
    assert model.num_trainable_parameters() == 4 * 40 + head
    assert "trainable params: 259" in model.trainable_parameters_summary()


def test_forward_signature_and_attributes_are_the_wrapped_models():
    import inspect

    base, model, _, _ = build("bert", "fourierft")
    assert "input_ids" in inspect.signature(model.forward).parameters
    assert model.config is model.base_model.config
    assert model.spectral_config.method == "fourierft"


def test_generate_runs_through_adapters():
    _, model, batches, _ = build("gpt2", "fourierft", init="normal", scaling=500.0)
    randomize(model)
    ids = batches[0]["input_ids"][:1, :4]
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with model.disable_adapters():
        out_base = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    assert torch.equal(out[:, :4], ids)
    assert out_base.shape == (1, 7)


def test_state_dict_roundtrip_and_to():
    _, model, batches, _ = build("mlp", "s2ft", init="normal")
    state = model.state_dict()
    assert any(k.endswith(".perm_rows") for k in state)  # buffers travel with the module
    _, other, _, _ = build("mlp", "s2ft", seed=1, init="normal")
    other.load_state_dict(state)
    torch.testing.assert_close(forward(other, batches[0]), forward(model, batches[0]))
    model.to(torch.float64)
    assert all(layer.rows.dtype == torch.int32 for layer in model.spectral_layers().values())  # kept compact
    assert math.isfinite(float(forward(model, (batches[0][0].double(), None)).sum().detach()))


def test_locations_are_kept_flat_and_old_state_dicts_load():
    _, model, batches, loss_fn = build("mlp", "s2ft", init="normal")
    layer = next(iter(model.spectral_layers().values()))
    adapter = layer.adapters["default"]
    rows, cols = adapter.rows.clone(), adapter.cols.clone()
    assert adapter.locations.dtype == torch.int32 and adapter.locations.shape == rows.shape
    assert torch.equal(adapter.locations.long(), rows.long() * layer.d_in + cols.long())
    state = model.state_dict()
    assert not any(k.endswith((".rows", ".cols")) for k in state)
    # a state dict of the (rows, cols) buffers that adapters had before loads into the flat form
    old = {}
    for key, value in state.items():
        if key.endswith(".locations"):
            prefix = key[: -len("locations")]
            d_in = model.get_submodule(prefix[:-1]).d_in
            old[prefix + "rows"] = torch.div(value, d_in, rounding_mode="floor")
            old[prefix + "cols"] = value % d_in
        else:
            old[key] = value
    _, other, _, _ = build("mlp", "s2ft", seed=1, init="normal")
    other.load_state_dict(old)
    torch.testing.assert_close(forward(other, batches[0]), forward(model, batches[0]))
    assert torch.equal(other.spectral_layers()[next(iter(model.spectral_layers()))].rows, rows)
    # no-grad or eval-mode use (serving, merging) keeps nothing derived from the locations; training reads the
    # same (rows, cols) tensors every step (the FFT path's plan is cached per rows tensor); in-place changes are followed
    _, fresh, _, _ = build("mlp", "s2ft", init="normal")
    adapter = next(iter(fresh.spectral_layers().values())).adapters["default"]
    with torch.no_grad():
        forward(fresh, batches[0])
        assert adapter.rows is not adapter.rows and "_kept_locations" not in vars(adapter)
    fresh.eval()
    with torch.enable_grad():  # e.g. merging in eval mode
        assert adapter.rows is not adapter.rows and "_kept_locations" not in vars(adapter)
    fresh.train()
    with torch.enable_grad():
        assert adapter.rows is adapter.rows
        rows, cols = adapter.rows.clone(), adapter.cols.clone()
        with torch.no_grad():
            adapter.locations[0] = adapter.locations[1] + 0
        assert adapter.rows[0] == rows[1] and adapter.cols[0] == cols[1]


class PixelBasis:
    """A toy basis for the test below: coefficient ``k`` is the entry ``ΔW̄[rows[k], cols[k]] / scaling``."""

    name = "pixel"

    @staticmethod
    def delta_weight(coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None):
        dtype = torch.float64 if coeffs.dtype == torch.float64 else torch.float32
        bar = torch.zeros(d_out, d_in, dtype=dtype).index_put((rows, cols), coeffs.to(dtype) * scaling)
        if perm_rows is not None:
            bar = bar[torch.argsort(perm_rows)][:, torch.argsort(perm_cols)]
        return bar

    @classmethod
    def apply(cls, x, coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None, path="auto"):
        delta = cls.delta_weight(coeffs, rows, cols, d_out, d_in, scaling, perm_rows, perm_cols)
        return torch.nn.functional.linear(x.to(delta.dtype), delta)

    @staticmethod
    def project(delta, rows, cols, scaling, perm_rows=None, perm_cols=None):
        permuted = delta if perm_rows is None else delta[perm_rows][:, perm_cols]
        return permuted[rows, cols] / scaling

    @staticmethod
    def seeded_locations(d_out, d_in, n, seed):
        flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
        return flat // d_in, flat % d_in


def test_a_new_basis_and_config_work_through_the_tuner_unchanged(monkeypatch, tmp_path):
    """A method is its config class and its basis: the tuner asks them, never the method's name."""
    import dataclasses

    from s2ft import config as config_module
    from s2ft.ops import bases

    @dataclasses.dataclass
    class PixelConfig(FourierFTConfig):
        method = "pixel"
        basis = "pixel"
        peft_type = None

    monkeypatch.setitem(bases.BASES, "pixel", PixelBasis())
    monkeypatch.setitem(config_module.CONFIGS, "pixel", PixelConfig)
    base, _, batches, loss_fn = build("mlp", "fourierft")
    config = PixelConfig(target_modules=["fc1", "fc2"], n_frequency=30, scaling=2.0, forward_path="fft")
    model = get_spectral_model(copy.deepcopy(base), config)
    randomize(model)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in model.spectral_layers().items():  # ΔW from the coefficients, by hand
            rows, cols, coeffs = layer.rows, layer.cols, layer.coeffs.detach()
            torch.testing.assert_close(  # installed as int32
                (rows.long(), cols.long()), PixelBasis.seeded_locations(layer.d_out, layer.d_in, 30, 777)
            )
            reference.get_submodule(name).weight[rows, cols] += 2.0 * coeffs
    x = batches[0][0]
    expected = reference(x)
    model.train()
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)  # training's path
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)  # serving's path
        model.merge()
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
        model.unmerge()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert not any(k.endswith((".rows", ".cols")) for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = SpectralModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(loaded.spectral_config) is PixelConfig
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="no Hugging Face PEFT format"):
        model.save_pretrained(tmp_path / "peft", format="peft")
    with pytest.raises(ValueError, match="is for S2FT"):
        model.calibrate(batches, loss_fn)
