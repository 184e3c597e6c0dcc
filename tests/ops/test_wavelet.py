"""The Haar wavelet basis (s2ft.ops.wavelet) against a float64 naive reference and PEFT's WaveFT, and the two
methods on it (wavelet: WaveFT's recipe; s2ft-wavelet: S2FT's)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from s2ft import S2FTWaveletConfig, SpectralModel, WaveletConfig, get_spectral_model, load_config
from s2ft.config import CONFIGS, FourierFTConfig
from s2ft.methods import METHODS, VARIANTS, planning_method
from s2ft.ops import wavelet
from s2ft.ops.bases import get_basis
from tests.helpers import MODELS, forward, make_batches, mlp_loss

R = math.sqrt(0.5)


def naive_haar(length: int, levels: int) -> torch.Tensor:
    """``H_L`` by applying the definition to each unit vector, one Python float at a time."""
    columns = []
    for j in range(length):
        x = [1.0 if i == j else 0.0 for i in range(length)]
        m = length
        for _ in range(levels):
            half = m // 2
            approx = [R * (x[2 * i] + x[2 * i + 1]) for i in range(half)] + ([x[m - 1]] if m % 2 else [])
            detail = [R * (x[2 * i] - x[2 * i + 1]) for i in range(half)]
            x = approx + detail + x[m:]
            m = len(approx)
        columns.append(x)
    return torch.tensor(columns, dtype=torch.float64).T


def naive_delta(coeffs, rows, cols, d_out, d_in, scaling, levels=1, perm_rows=None, perm_cols=None):
    """``ΔW[perm_rows[i], perm_cols[j]] = σ Σ_k c_k H_M[u_k, i] H_N[v_k, j]``, entry by entry."""
    sigma = scaling / math.sqrt(2 * d_out * d_in)
    hm, hn = naive_haar(d_out, levels), naive_haar(d_in, levels)
    delta = torch.zeros(d_out, d_in, dtype=torch.float64)
    for i in range(d_out):
        for j in range(d_in):
            value = sum(float(c) * float(hm[u, i]) * float(hn[v, j]) for c, u, v in zip(coeffs, rows, cols))
            pi = int(perm_rows[i]) if perm_rows is not None else i
            pj = int(perm_cols[j]) if perm_cols is not None else j
            delta[pi, pj] = sigma * value
    return delta


def layer(d_out, d_in, n, seed=0, permuted=False):
    g = torch.Generator().manual_seed(seed)
    rows, cols = wavelet.seeded_locations(d_out, d_in, n, seed)
    coeffs = torch.randn(n, generator=g, dtype=torch.float64)
    perms = (
        (torch.randperm(d_out, generator=g), torch.randperm(d_in, generator=g)) if permuted else (None, None)
    )
    return coeffs, rows, cols, perms


# ---------------------------------------------------------------------------------------------- the transforms
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 24])
def test_transforms_match_the_definition_and_invert_exactly(size):
    for levels in range(1, wavelet.max_levels(size) + 1):
        matrix = naive_haar(size, levels)
        assert torch.equal(wavelet.haar_matrix(size, levels), matrix)
        torch.testing.assert_close(matrix @ matrix.T, torch.eye(size, dtype=torch.float64))  # orthonormal
        x = torch.randn(3, size, dtype=torch.float64)
        torch.testing.assert_close(wavelet.dwt(x, levels), x @ matrix.T)
        torch.testing.assert_close(wavelet.idwt(x, levels), x @ matrix)
        torch.testing.assert_close(wavelet.idwt(wavelet.dwt(x, levels), levels), x, rtol=0, atol=1e-13)


def test_an_odd_length_passes_its_last_entry_through():
    x = torch.arange(1.0, 8.0, dtype=torch.float64)  # length 7: pairs (1,2), (3,4), (5,6), then 7
    y = wavelet.dwt(x, 1)
    torch.testing.assert_close(y[:3], torch.tensor([3.0, 7.0, 11.0], dtype=torch.float64) * R)
    assert y[3] == 7.0
    torch.testing.assert_close(y[4:], torch.full((3,), -R, dtype=torch.float64))


@pytest.mark.parametrize("size", [576, 192, 384, 1536, 5632])
def test_every_default_width_at_every_level_is_exactly_inverted(size):
    x = torch.randn(2, size, dtype=torch.float64)
    for levels in range(1, wavelet.max_levels(size) + 1):
        y = wavelet.dwt(x, levels)
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # orthonormal
        torch.testing.assert_close(wavelet.idwt(y, levels), x, rtol=0, atol=1e-12)
    assert wavelet.max_levels(size) == wavelet.MAX_LEVELS


@pytest.mark.parametrize(
    "shape,n,levels", [((6, 8), 10, 1), ((7, 5), 12, 2), ((9, 12), 20, 3), ((1, 6), 3, 1)]
)
@pytest.mark.parametrize("permuted", [False, True])
def test_delta_weight_is_the_explicit_sum(shape, n, levels, permuted):
    coeffs, rows, cols, perms = layer(*shape, n, permuted=permuted)
    got = wavelet.delta_weight(coeffs, rows, cols, *shape, 3.0, *perms, levels=levels)
    torch.testing.assert_close(got, naive_delta(coeffs, rows, cols, *shape, 3.0, levels, *perms))


@pytest.mark.parametrize("path", ["dense", "fft"])
@pytest.mark.parametrize("permuted", [False, True])
def test_apply_paths_give_delta_x_and_its_gradients(path, permuted):
    d_out, d_in, n, levels = 10, 13, 25, 3
    coeffs, rows, cols, perms = layer(d_out, d_in, n, permuted=permuted)
    coeffs.requires_grad_(True)
    x = torch.randn(2, 4, d_in, dtype=torch.float64, requires_grad=True)
    y = wavelet.apply(x, coeffs, rows, cols, d_out, d_in, 2.0, *perms, path=path, levels=levels)
    delta = naive_delta(coeffs.detach(), rows, cols, d_out, d_in, 2.0, levels, *perms)
    torch.testing.assert_close(y, x.detach() @ delta.T)
    assert torch.autograd.gradcheck(
        lambda c, v: wavelet.apply(v, c, rows, cols, d_out, d_in, 2.0, *perms, path=path, levels=levels),
        (coeffs, x),
    )


@pytest.mark.parametrize(
    "length, levels", [(1, 1), (2, 1), (7, 2), (12, 3), (13, 3), (27, 4), (576, 4), (1100, 8)]
)
def test_sparse_rows_of_the_analysis_matrix_are_the_definitions(length, levels):
    crow, col, value = wavelet.haar_rows(length, levels)
    rows = torch.repeat_interleave(torch.arange(length), crow[1:] - crow[:-1])
    dense = torch.zeros(length, length, dtype=torch.float64).index_put((rows, col), value)
    torch.testing.assert_close(
        dense, naive_haar(length, levels) if length < 600 else wavelet.haar_matrix(length, levels)
    )
    assert col.numel() <= length * (levels + 1) and bool((value != 0).all())


@pytest.mark.parametrize("method", ["apply_sparse", "apply_transform"])
@pytest.mark.parametrize(
    "shape, n, levels", [((10, 13), 25, 3), ((16, 6), 20, 1), ((1, 9), 4, 1), ((33, 64), 60, 2)]
)
def test_both_fast_paths_give_delta_x_and_its_gradients(method, shape, n, levels):
    coeffs, rows, cols, perms = layer(*shape, n, permuted=True)
    coeffs.requires_grad_(True)
    x = torch.randn(3, 2, shape[1], dtype=torch.float64, requires_grad=True)
    run = getattr(wavelet, method)
    y = run(x, coeffs, rows, cols, *shape, 2.0, *perms, levels=levels)
    torch.testing.assert_close(
        y, x.detach() @ naive_delta(coeffs.detach(), rows, cols, *shape, 2.0, levels, *perms).T
    )
    assert torch.autograd.gradcheck(
        lambda c, v: run(v, c, rows, cols, *shape, 2.0, *perms, levels=levels), (coeffs, x)
    )


def test_the_sparse_maps_are_cached_per_layer_and_rebuilt_when_the_locations_change():
    coeffs, rows, cols, perms = layer(16, 12, 10, permuted=True)
    plan = wavelet._sparse_plan(rows, cols, 16, 12, *perms, 2, torch.float32)
    assert wavelet._sparse_plan(rows, cols, 16, 12, *perms, 2, torch.float32) is plan
    assert wavelet._sparse_plan(rows, cols, 16, 12, *perms, 1, torch.float32) is not plan
    x = torch.randn(5, 12, dtype=torch.float64)
    before = wavelet.apply_sparse(x, coeffs, rows, cols, 16, 12, 2.0, *perms, levels=2)
    cols.copy_(torch.roll(cols, 1))  # in place: the version counter moves, the maps are rebuilt
    after = wavelet.apply_sparse(x, coeffs, rows, cols, 16, 12, 2.0, *perms, levels=2)
    expected = x @ naive_delta(coeffs, rows, cols, 16, 12, 2.0, 2, *perms).T
    torch.testing.assert_close(after, expected)
    assert not torch.allclose(before, after)


def test_long_analysis_functions_take_the_whole_transforms(monkeypatch):
    coeffs, rows, cols, perms = layer(24, 32, 40, permuted=True)
    x = torch.randn(3, 32, dtype=torch.float64)
    cost = wavelet.sparse_cost(rows, cols, 24, 32, 3)
    assert cost <= wavelet.SPARSE_LIMIT * 4 * (24 + 32)  # within the limit: the sparse maps
    assert wavelet._sparse_plan(rows, cols, 24, 32, *perms, 3, torch.float64) is not None
    # a limit below the cost: the whole transforms, the same ΔW x
    monkeypatch.setattr(wavelet, "SPARSE_LIMIT", cost / (4 * (24 + 32)) / 2)
    assert wavelet._sparse_plan(rows.clone(), cols, 24, 32, *perms, 3, torch.float64) is None
    got = wavelet.apply(x, coeffs, rows.clone(), cols, 24, 32, 2.0, *perms, path="fft", levels=3)
    torch.testing.assert_close(got, x @ naive_delta(coeffs, rows, cols, 24, 32, 2.0, 3, *perms).T)


def test_the_fast_path_compiles_whole_as_the_transforms():
    """Under ``torch.compile`` the fast path is the whole transforms (dense ops, one graph), equal to eager's
    sparse maps."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6))
    config = WaveletConfig(
        target_modules=["0", "2"], n_frequency=10, init="normal", forward_path="fft", levels=2
    )
    model = get_spectral_model(base, config)
    x = torch.randn(5, 12)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_float32_paths_agree():
    coeffs, rows, cols, perms = layer(384, 1536, 500, permuted=True)
    x = torch.randn(64, 1536)
    dense = wavelet.apply(x, coeffs.float(), rows, cols, 384, 1536, 150.0, *perms, path="dense", levels=2)
    fast = wavelet.apply(x, coeffs.float(), rows, cols, 384, 1536, 150.0, *perms, path="fft", levels=2)
    assert dense.dtype == fast.dtype == torch.float32
    torch.testing.assert_close(fast, dense, rtol=1e-4, atol=1e-5)


def test_project_is_exact_in_the_span_and_the_least_squares_solution_outside():
    coeffs, rows, cols, perms = layer(12, 10, 30, permuted=True)
    delta = wavelet.delta_weight(coeffs, rows, cols, 12, 10, 5.0, *perms, levels=2)
    torch.testing.assert_close(wavelet.project(delta, rows, cols, 5.0, *perms, levels=2), coeffs)
    noise = torch.randn(12, 10, dtype=torch.float64)
    got = wavelet.project(noise, rows, cols, 5.0, *perms, levels=2)
    basis = torch.stack(
        [
            wavelet.delta_weight(
                torch.eye(30, dtype=torch.float64)[k], rows, cols, 12, 10, 5.0, *perms, levels=2
            )
            for k in range(30)
        ]
    ).reshape(30, -1)
    expected = torch.linalg.lstsq(basis.T, noise.reshape(-1, 1)).solution.squeeze(1)
    torch.testing.assert_close(got, expected)


def test_scaling_is_in_fourierfts_units():
    for basis, d_out, d_in in (("haar", 6, 8), ("haar3", 9, 7)):
        delta = get_basis(basis).delta_weight(
            torch.ones(1, dtype=torch.float64), torch.tensor([2]), torch.tensor([3]), d_out, d_in, 7.0
        )
        torch.testing.assert_close(
            delta.norm(), torch.tensor(7.0 / math.sqrt(2 * d_out * d_in), dtype=torch.float64)
        )


def test_the_registry_serves_each_level_count():
    for levels in range(1, wavelet.MAX_LEVELS + 1):
        basis = get_basis(wavelet.basis_name(levels))
        assert basis.levels == levels and basis.name == wavelet.basis_name(levels)
    basis = get_basis("haar2")
    coeffs, rows, cols, perms = layer(6, 9, 11, permuted=True)
    x = torch.randn(4, 9, dtype=torch.float64)
    delta = basis.delta_weight(coeffs, rows, cols, 6, 9, 2.0, *perms)
    torch.testing.assert_close(basis.apply(x, coeffs, rows, cols, 6, 9, 2.0, *perms, path="fft"), x @ delta.T)
    torch.testing.assert_close(basis.project(delta, rows, cols, 2.0, *perms), coeffs)
    torch.testing.assert_close(basis.energy(delta), wavelet.dwt2(delta.float(), 2).abs())


# ---------------------------------------------------------------------------------------------- PEFT's WaveFT
def peft_delta(spectrum_values, indices, d_out, d_in, scaling):
    """PEFT WaveFT's get_delta_weight for these coefficients at these (PEFT-layout) indices, float64."""
    from peft.tuners.waveft.waverec2d import waverec2d

    dense = torch.zeros(d_out, d_in, dtype=torch.float64)
    dense[indices[0], indices[1]] = spectrum_values
    h, w = d_out // 2, d_in // 2
    return waverec2d((dense[:h, :w], (dense[:h, w:], dense[h:, :w], dense[h:, w:])), "db1") * scaling


@pytest.mark.parametrize("shape", [(6, 8), (384, 384), (192, 576)])
def test_one_level_is_peft_waveft_for_the_same_seed_and_coefficients(shape):
    d_out, d_in = shape
    n, seed, peft_scaling = 300, 5, 25.0
    generator = torch.Generator().manual_seed(seed)  # PEFT's draw (WaveFTLayer.update_layer)
    flat = torch.randperm(d_out * d_in, generator=generator)[: min(n, d_out * d_in)]
    indices = torch.stack([flat // d_in, flat % d_in])
    values = torch.randn(flat.numel(), dtype=torch.float64)
    expected = peft_delta(values, indices, d_out, d_in, peft_scaling)
    rows, cols = wavelet.seeded_locations(d_out, d_in, flat.numel(), seed)
    assert torch.equal(torch.stack(wavelet.to_peft_layout(rows, cols, d_out, d_in)), indices)
    scaling = peft_scaling * math.sqrt(2 * d_out * d_in)  # FourierFT's units
    torch.testing.assert_close(wavelet.delta_weight(values, rows, cols, d_out, d_in, scaling), expected)


def test_peft_layout_is_refused_for_odd_shapes():
    with pytest.raises(ValueError, match="even shapes"):
        wavelet.to_peft_layout(torch.tensor([0]), torch.tensor([0]), 7, 8)


def test_the_whole_peft_model_matches_the_wavelet_method():
    import peft

    factory, targets, saves = MODELS["bert"]
    base = factory()
    reference = peft.get_peft_model(
        copy.deepcopy(base),
        peft.WaveFTConfig(
            n_frequency=40, scaling=25.0, random_loc_seed=3, target_modules=targets, init_weights=False
        ),
    )
    model = get_spectral_model(
        copy.deepcopy(base), WaveletConfig(target_modules=targets, n_frequency=40, seed=3, init="normal")
    )
    ours, theirs = model.spectral_layers(), dict(reference.named_modules())
    for name, layer in ours.items():
        peft_layer = theirs[f"base_model.model.{name}"]
        with torch.no_grad():  # PEFT's coefficients: c = c_peft scaling_peft / σ
            layer.coeffs.copy_(
                peft_layer.waveft_spectrum["default"] * 25.0 * math.sqrt(2 * layer.d_out * layer.d_in) / 150.0
            )
        torch.testing.assert_close(
            layer.delta_weight(), peft_layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6
        )
    batch = make_batches("bert")[0]
    torch.testing.assert_close(
        forward(model.eval(), batch), forward(reference.eval(), batch), rtol=1e-4, atol=1e-5
    )


# ---------------------------------------------------------------------------------------------- the methods
def wavelet_model(kind: str, config_class=WaveletConfig, **overrides):
    factory, targets, saves = MODELS[kind]
    base = factory()
    config = config_class(target_modules=targets, modules_to_save=saves, n_frequency=30, **overrides)
    model = get_spectral_model(copy.deepcopy(base), config)
    return base, model, make_batches(kind), mlp_loss if kind in ("mlp", "convnet") else None


def adam_steps(model, batches, loss_fn, steps: int = 2) -> None:
    from s2ft.tuner.calibration import batch_loss

    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for i in range(steps):
        opt.zero_grad()
        batch_loss(model, batches[i % len(batches)], loss_fn).backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("kind", ["mlp", "bert", "gpt2", "convnet"])
@pytest.mark.parametrize("config_class", [WaveletConfig, S2FTWaveletConfig])
def test_wavelet_adapters_train_merge_and_round_trip(kind, config_class, tmp_path):
    base, model, batches, loss_fn = wavelet_model(kind, config_class, scaling=300.0, levels=1)
    if config_class is S2FTWaveletConfig:
        model.calibrate(batches, loss_fn)
    for batch in batches:  # zeros init: the base model
        assert torch.equal(forward(model, batch), forward(base, batch))
    layers = model.spectral_layers()
    adam_steps(model, batches, loss_fn)
    trained = [forward(model, b).detach() for b in batches]
    assert not torch.allclose(trained[0], forward(base, batches[0]), atol=1e-4)
    for layer in layers.values():  # the layer's ΔW is the basis's, in the layer kind's matrix view
        assert layer.basis.name == "haar"
        if config_class is WaveletConfig:
            rows, cols = wavelet.seeded_locations(layer.d_out, layer.d_in, 30, 777)
            assert torch.equal(layer.rows.cpu().long(), rows) and torch.equal(layer.cols.cpu().long(), cols)
        else:
            assert layer.perm_rows is not None
        expected = wavelet.delta_weight(
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
    model.save_pretrained(tmp_path / "adapter")
    assert type(load_config(tmp_path / "adapter")) is config_class
    loaded = SpectralModel.from_pretrained(
        wavelet_model(kind, config_class)[0], str(tmp_path / "adapter")
    ).eval()
    for batch, out in zip(batches, trained):
        assert torch.equal(forward(loaded, batch), out)
    merged = loaded.merge_and_unload()
    for batch, out in zip(batches, trained):
        torch.testing.assert_close(forward(merged, batch), out, rtol=1e-4, atol=1e-5)


def test_fast_and_dense_paths_agree_in_training():
    outputs, grads = {}, {}
    for path in ("dense", "fft"):
        _, model, batches, _ = wavelet_model("bert", forward_path=path, init="normal", levels=2)
        model.train()
        out = forward(model, batches[0])
        out.square().sum().backward()
        outputs[path] = out.detach()
        grads[path] = [layer.coeffs.grad for layer in model.spectral_layers().values()]
    torch.testing.assert_close(outputs["fft"], outputs["dense"], rtol=1e-4, atol=1e-5)
    for fft, dense in zip(grads["fft"], grads["dense"]):
        torch.testing.assert_close(fft, dense, rtol=1e-3, atol=1e-4)


def test_s2ft_wavelet_samples_locations_from_the_wavelet_energy():
    from s2ft.tuner.planner import plan_for

    # constant on 8 x 8 blocks: three levels leave 2 x 2 approximation coefficients, every detail is zero
    prior = torch.kron(torch.tensor([[1.0, -2.0], [3.0, 0.5]]), torch.ones(8, 8))
    config = S2FTWaveletConfig(target_modules=["x"], n_frequency=3, permute=False, levels=4, gamma=1.5)
    plan = plan_for(prior, "x", config)
    energy = wavelet.energy(prior, 4)
    assert int((energy > 1e-5).sum()) == 4  # 4 of 256 locations hold the prior
    assert bool((energy[plan.rows.long(), plan.cols.long()] > 1e-5).all())  # the plan takes 3 of them


def test_s2ft_wavelet_plan_of_w0_stores_only_coefficients(tmp_path):
    base, model, batches, loss_fn = wavelet_model(
        "bert", S2FTWaveletConfig, plan_from="base", locations_from="base"
    )
    model.calibrate([])
    adam_steps(model, batches, loss_fn)
    trained = forward(model, batches[0]).detach()
    model.save_pretrained(tmp_path / "a")
    state = model.adapter_state_dict()
    assert all(k.endswith((".coeffs", "fingerprints")) or "modules_to_save" in k for k in state), sorted(
        state
    )
    loaded = SpectralModel.from_pretrained(wavelet_model("bert", S2FTWaveletConfig)[0], str(tmp_path / "a"))
    assert torch.equal(forward(loaded.eval(), batches[0]), trained)


def test_mixed_batches_of_fourier_and_wavelet_adapters_equal_each_example_alone():
    from s2ft import FourierFTConfig as Fourier

    factory, targets, saves = MODELS["bert"]
    model = get_spectral_model(
        factory(), WaveletConfig(target_modules=targets, n_frequency=20, init="normal")
    )
    model.add_adapter("fourier", Fourier(target_modules=targets, n_frequency=20, init="normal"))
    model.add_adapter("deep", WaveletConfig(target_modules=targets, n_frequency=20, init="normal", levels=3))
    model.eval()
    batch = make_batches("bert", batch_size=3)[0]
    names = ["default", "fourier", "deep"]
    mixed = forward_with(model, batch, names)
    for i, name in enumerate(names):
        model.set_adapter(name)
        alone = forward(model, {k: v[i : i + 1] for k, v in batch.items()})
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-4, atol=1e-5)


def forward_with(model, batch, names):
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, adapter_names=names)
    return out.logits if hasattr(out, "logits") else out


# ---------------------------------------------------------------------------------------------- bad input
def test_an_unsupported_family_and_impossible_levels_are_refused_and_change_nothing():
    with pytest.raises(ValueError, match="wavelet_family='sym2' is not supported"):
        WaveletConfig(target_modules=["query"], wavelet_family="sym2")
    with pytest.raises(ValueError, match="levels must be an integer from 1 to 8"):
        S2FTWaveletConfig(target_modules=["query"], levels=0)
    factory, targets, _ = MODELS["bert"]
    model = factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = {tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith(("query", "value"))}
    most = min(wavelet.max_levels(s) for shape in shapes for s in shape)
    assert most < wavelet.MAX_LEVELS
    for config_class in (WaveletConfig, S2FTWaveletConfig):
        with pytest.raises(ValueError, match=f"levels={most + 1} is more than an adapted layer"):
            get_spectral_model(model, config_class(target_modules=targets, levels=most + 1))
        assert type(model) is type(factory()) and all(
            torch.equal(v, before[k]) for k, v in model.state_dict().items()
        )
    with pytest.raises(ValueError, match="no mirror pairs"):
        S2FTWaveletConfig(target_modules=["query"], locations="prior-half")


def test_a_wavelet_config_is_not_read_as_a_fourier_one_nor_the_reverse():
    from s2ft.config import S2FTConfig

    wave = S2FTWaveletConfig(target_modules=["query"], levels=2).to_dict()
    fourier = FourierFTConfig(target_modules=["query"]).to_dict()
    with pytest.raises(ValueError, match="this is a 's2ft-wavelet' adapter config, not a 's2ft' one"):
        S2FTConfig.from_dict(wave)
    with pytest.raises(ValueError, match="this is a 'fourierft' adapter config, not a 'wavelet' one"):
        WaveletConfig.from_dict(fourier)
    with pytest.raises(
        ValueError, match=r"unknown fields for a 's2ft' config: \['levels', 'wavelet_family'\]"
    ):
        FourierFTConfig.from_dict({**wave, "method": "s2ft"})
    assert FourierFTConfig.from_dict(wave).basis == "haar2"  # read by its method


# ---------------------------------------------------------------------------------------------- registration
def test_methods_and_variants_are_registered():
    assert {"wavelet", "s2ft-wavelet"} <= set(METHODS) and {"wavelet", "s2ft-wavelet"} <= set(CONFIGS)
    assert {"wavelet", "s2ft-wavelet", "s2ft-wavelet-w0"} <= set(VARIANTS)
    assert planning_method().name == "s2ft"


# ---------------------------------------------------------------------------------------------- PEFT export
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_wavelet_adapter_exports_to_peft_waveft_with_the_same_outputs(kind, tmp_path):
    import peft

    from s2ft.tuner.peft_formats import save_peft_waveft

    base, model, batches, loss_fn = wavelet_model(kind, scaling=300.0, seed=11)
    adam_steps(model, batches, loss_fn)
    save_peft_waveft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert type(loaded.peft_config["default"]).__name__ == "WaveFTConfig"
    for batch in batches:
        torch.testing.assert_close(forward(loaded, batch), forward(model, batch), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kind,config_class,overrides,match",
    [
        ("bert", S2FTWaveletConfig, {}, "'s2ft-wavelet' adapter has no Hugging Face PEFT WaveFT form"),
        ("bert", WaveletConfig, {"levels": 2}, "PEFT's WaveFT has one wavelet level"),
        ("convnet", WaveletConfig, {}, "PEFT's WaveFT adapts nn.Linear and Conv1D only"),
    ],
)
def test_what_peft_waveft_cannot_hold_is_refused_and_nothing_written(
    kind, config_class, overrides, match, tmp_path
):
    from s2ft.tuner.peft_formats import save_peft_waveft

    _, model, batches, loss_fn = wavelet_model(kind, config_class, **overrides)
    with pytest.raises(ValueError, match=match):
        save_peft_waveft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
