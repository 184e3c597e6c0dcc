"""S2FT calibration: the prior is the summed negative gradient, the result is seeded, and nothing else changes."""

from __future__ import annotations

import copy

import pytest
import torch

from s2ft import S2FTConfig, get_spectral_model
from s2ft.ops.permutation import is_permutation
from s2ft.tuner.calibration import compute_prior
from tests.helpers import MODELS, forward, make_batches, mlp_loss


def wrap(kind: str = "bert", **overrides):
    factory, targets, saves = MODELS[kind]
    base = factory()
    config = S2FTConfig(target_modules=targets, modules_to_save=saves, n_frequency=40, **overrides)
    return base, get_spectral_model(copy.deepcopy(base), config)


def test_prior_equals_the_gradient_summed_by_hand():
    base, model = wrap("bert")
    batches = make_batches("bert", count=3)
    layers = model.spectral_layers()
    priors = compute_prior(model.get_base_model(), layers, batches)
    base.eval()
    base.zero_grad()
    for batch in batches:
        base(**batch).loss.backward()
    for name in layers:
        torch.testing.assert_close(priors[name], -base.get_submodule(name).weight.grad, atol=1e-6, rtol=1e-5)


def test_prior_of_conv1d_is_in_linear_convention():
    base, model = wrap("gpt2")
    batches = make_batches("gpt2", count=2)
    priors = compute_prior(model.get_base_model(), model.spectral_layers(), batches)
    for batch in batches:
        base(**batch).loss.backward()
    name = "transformer.h.0.attn.c_attn"
    assert priors[name].shape == (96, 32)
    torch.testing.assert_close(priors[name], -base.get_submodule(name).weight.grad.T, atol=1e-6, rtol=1e-5)


def test_calibration_changes_nothing_of_the_model_and_is_seeded():
    _, model = wrap("bert")
    batches = make_batches("bert")
    params = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    model.train()
    report = model.calibrate(batches)
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n][0]) and p.requires_grad == params[n][1] and p.grad is None
    for name, layer in model.spectral_layers().items():
        assert is_permutation(layer.perm_rows, layer.d_out) and is_permutation(layer.perm_cols, layer.d_in)
        assert len(set(zip(layer.rows.tolist(), layer.cols.tolist()))) == 40
        assert report[name]["path_length_after"] <= report[name]["path_length_before"]
    _, again = wrap("bert")
    again.calibrate(batches)
    _, other_seed = wrap("bert", seed=1)
    other_seed.calibrate(batches)
    differs = False
    for name, layer in model.spectral_layers().items():
        twin = again.spectral_layers()[name]
        for key in ("rows", "cols", "perm_rows", "perm_cols"):
            assert torch.equal(getattr(layer, key), getattr(twin, key))
        differs |= not torch.equal(layer.perm_rows, other_seed.spectral_layers()[name].perm_rows)
    assert differs


def test_calibration_with_loss_fn_and_batch_limit():
    _, model = wrap("mlp", calibration_batches=2)
    batches = make_batches("mlp", count=5)
    layers = model.spectral_layers()
    limited = compute_prior(model.get_base_model(), layers, batches[:2], mlp_loss)
    model.calibrate(iter(batches), mlp_loss)  # a one-shot iterator works too
    _, reference = wrap("mlp")
    reference.calibrate(batches[:2], mlp_loss)
    for name, layer in layers.items():
        assert torch.equal(layer.perm_rows, reference.spectral_layers()[name].perm_rows)
        assert limited[name].abs().sum() > 0


def test_ablations_identity_permutations_and_uniform_locations():
    from s2ft.ops.locations import fourierft_locations

    batches = make_batches("bert")
    _, plain = wrap("bert", permute=False)
    plain.calibrate(batches)
    _, uniform = wrap("bert", locations="uniform")
    uniform.calibrate(batches)
    for layer in plain.spectral_layers().values():
        assert layer.perm_rows is None and layer.perm_cols is None
    for layer in uniform.spectral_layers().values():
        rows, cols = fourierft_locations(layer.d_out, layer.d_in, 40, 777)
        assert torch.equal(layer.rows, rows) and torch.equal(layer.cols, cols)
        assert layer.perm_rows is not None


def test_uncalibrated_forward_raises():
    _, model = wrap("bert")
    with pytest.raises(RuntimeError, match="calibrate"):
        forward(model, make_batches("bert")[0])


def assert_untouched(model):
    assert all(not layer.is_ready for layer in model.spectral_layers().values())
    assert all(p.grad is None for p in model.parameters())


def test_calibration_errors_leave_the_model_as_it_was():
    _, model = wrap("mlp")
    with pytest.raises(ValueError, match="no batches"):
        model.calibrate([], mlp_loss)
    assert_untouched(model)
    with pytest.raises(ValueError, match="no gradient reached"):
        model.calibrate(make_batches("mlp"), lambda out, batch: out.sum() * 0.0)
    assert_untouched(model)
    bad = make_batches("mlp")
    bad[1][0][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        model.calibrate(bad, mlp_loss)
    assert_untouched(model)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        model.calibrate(
            make_batches("mlp"), lambda out, batch: torch.sqrt(out - out.detach()).sum()
        )  # finite loss, inf grad
    assert_untouched(model)
    _, bert = wrap("bert")
    with pytest.raises(ValueError, match="no loss"):
        bert.calibrate([{"input_ids": make_batches("bert")[0]["input_ids"]}])
    assert_untouched(bert)
