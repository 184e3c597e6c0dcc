"""S2FT re-planning: the projection onto a plan against naive least squares, outputs kept where it is exact, and
the Trainer callback end to end."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from s2ft import FourierFTConfig, S2FTConfig, get_spectral_model
from s2ft.ops.apply import delta_weight, project_delta
from tests.helpers import MODELS, finetune, forward, make_batches, mlp_loss, write_dataset, write_tiny_model


def cosine_basis(rows, cols, d_out, d_in, scaling):
    """Column k: the flattened ΔW̄ of coefficient k alone, from the formula scaling/(MN) cos(2π(up/M + vq/N))."""
    p = torch.arange(d_out, dtype=torch.float64)[:, None]
    q = torch.arange(d_in, dtype=torch.float64)[None, :]
    columns = [
        scaling / (d_out * d_in) * torch.cos(2 * math.pi * (u * p / d_out + v * q / d_in)).flatten()
        for u, v in zip(rows.tolist(), cols.tolist())
    ]
    return torch.stack(columns, dim=1)


# (0, 0) and (3, 0) are their own mirrors at 6 x 5; (1, 2) and (5, 3) are a mirror pair
ROWS = torch.tensor([0, 3, 1, 5, 2, 4, 1])
COLS = torch.tensor([0, 0, 2, 3, 1, 4, 0])


@pytest.mark.parametrize("permuted", [False, True])
def test_projection_is_the_minimum_norm_least_squares_solution(permuted):
    gen = torch.Generator().manual_seed(0)
    d_out, d_in, scaling = 6, 5, 7.0
    perm_rows = torch.randperm(d_out, generator=gen) if permuted else None
    perm_cols = torch.randperm(d_in, generator=gen) if permuted else None
    target = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    coeffs = project_delta(target, ROWS, COLS, scaling, perm_rows, perm_cols)
    assert coeffs.dtype == torch.float64
    permuted_target = target
    if permuted:
        permuted_target = target[perm_rows][:, perm_cols]
    basis = cosine_basis(ROWS, COLS, d_out, d_in, scaling)
    naive = torch.linalg.lstsq(basis, permuted_target.flatten()[:, None], driver="gelsd").solution[:, 0]
    torch.testing.assert_close(coeffs, naive, atol=1e-10, rtol=1e-10)
    assert coeffs[2] == coeffs[3]  # the mirror pair shares its basis function: half each


def test_projection_of_a_matrix_in_the_span_is_exact():
    gen = torch.Generator().manual_seed(1)
    d_out, d_in, scaling = 8, 6, 3.0
    perm_rows, perm_cols = torch.randperm(d_out, generator=gen), torch.randperm(d_in, generator=gen)
    rows, cols = torch.tensor([0, 4, 1, 2, 7]), torch.tensor([0, 3, 2, 5, 1])  # no mirror pairs
    coeffs = torch.randn(5, generator=gen, dtype=torch.float64)
    delta = delta_weight(coeffs, rows, cols, d_out, d_in, scaling, perm_rows, perm_cols)
    back = project_delta(delta, rows, cols, scaling, perm_rows, perm_cols)
    torch.testing.assert_close(back, coeffs, atol=1e-12, rtol=1e-12)


def trained(kind="bert", **overrides):
    """An S2FT model, calibrated, with random 'trained' coefficients."""
    factory, targets, saves = MODELS[kind]
    config = S2FTConfig(target_modules=targets, modules_to_save=saves, n_frequency=24, **overrides)
    model = get_spectral_model(factory(), config)
    batches = make_batches(kind)
    model.calibrate(batches, mlp_loss if kind == "mlp" else None)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.coeffs.copy_(torch.randn(layer.coeffs.shape, generator=gen) * 0.05)
    model.eval()
    return model, batches


def test_replan_keeps_the_outputs_when_the_projection_is_exact():
    # identity orders and one location per mirror pair: a ΔW planned from itself lands on its own support
    model, batches = trained(permute=False, locations="prior-half")
    before = [forward(model, b).detach() for b in batches]
    coeffs = {n: layer.coeffs for n, layer in model.spectral_layers().items()}
    report = model.replan()
    for n, layer in model.spectral_layers().items():
        assert layer.coeffs is coeffs[n]  # updated in place: an optimizer keeps holding them
        assert report[n]["energy_kept"] == pytest.approx(1.0, abs=1e-6)
    for b, out in zip(batches, before):
        torch.testing.assert_close(forward(model, b), out, atol=1e-5, rtol=1e-5)


def test_replan_with_permutations_moves_the_plan_and_projects():
    model, batches = trained()
    layers = model.spectral_layers()
    old = {
        n: (layer.perm_rows.clone(), layer.delta_weight().detach().double()) for n, layer in layers.items()
    }
    report = model.replan()
    for n, layer in layers.items():
        assert not torch.equal(layer.perm_rows, old[n][0])  # planned from the trained ΔW, not the gradient
        kept = report[n]["energy_kept"]
        assert 0 < kept < 1
        new = layer.delta_weight().detach().double()
        # a projection: the residual is orthogonal to what is kept
        assert float((old[n][1] - new).mul(new).sum()) == pytest.approx(
            0.0, abs=1e-6 * float(old[n][1].square().sum())
        )
        assert float(new.square().sum()) / float(old[n][1].square().sum()) == pytest.approx(kept, rel=1e-4)


def test_replan_from_given_priors_and_its_errors():
    model, batches = trained("mlp")
    layers = model.spectral_layers()
    priors = {n: torch.randn(layer.d_out, layer.d_in) for n, layer in layers.items()}
    model.replan(priors=priors)
    from s2ft.tuner.planner import plan_for

    for n, layer in layers.items():
        plan = plan_for(priors[n], n, model.peft_config["default"])
        assert torch.equal(layer.perm_rows, plan.perm_rows) and torch.equal(layer.rows, plan.rows)
    with pytest.raises(ValueError, match="priors lacks"):
        model.replan(priors={})
    # a wrong shape in the last layer's prior is refused before any layer changes
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(priors)
    last = list(layers)[-1]
    bad[last] = torch.randn(layers[last].d_out + 1, layers[last].d_in)
    with pytest.raises(ValueError, match="its layer needs"):
        model.replan(priors=bad)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    factory, targets, _ = MODELS["mlp"]
    fresh = get_spectral_model(factory(), S2FTConfig(target_modules=targets, n_frequency=8))
    fresh.calibrate(make_batches("mlp"), mlp_loss)
    with pytest.raises(ValueError, match="no trained ΔW"):
        fresh.replan()
    fourier = get_spectral_model(factory(), FourierFTConfig(target_modules=targets, n_frequency=8))
    with pytest.raises(ValueError, match="replan\\(\\) is for S2FT"):
        fourier.replan()
    copy.deepcopy(model)  # still a plain module


def test_finetune_replans_once_and_saves_the_new_plan(tmp_path):
    tiny = write_tiny_model(tmp_path / "model"), write_dataset(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    assert finetune(tiny, out, "--method", "s2ft", "--lr", "0.2", "--replan-at", "0.5") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["replan_step"] >= 1 and 0 < metrics["replan_energy_kept"] <= 1
    from s2ft.jobs.evaluate import run_evaluate

    # the saved adapter holds the new plan: evaluating it reproduces the run's own test score
    assert run_evaluate(str(out), "test", quiet=True)["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert finetune(tiny, tmp_path / "bad", "--method", "fourierft", "--replan-at", "0.5") == 2
