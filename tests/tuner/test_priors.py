"""S2FT's priors against hand computations on a planted least-squares layer, and end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from s2ft import S2FTConfig, get_spectral_model
from s2ft.cli import main
from s2ft.tuner.calibration import compute_prior
from tests.helpers import MODELS, make_batches, write_dataset, write_tiny_model


class Planted(nn.Module):
    """``y = W x``; the loss of a batch ``(x, t)`` is ``0.5 * ||W x - t||²``, whose gradient is ``(W x - t) xᵀ``."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x):
        return self.proj(x)


def planted_loss(outputs, batch):
    return 0.5 * ((outputs - batch[1]) ** 2).sum()


def planted(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    batches = [
        (
            torch.randn(4, 6, generator=gen, dtype=torch.float64),
            torch.randn(4, 5, generator=gen, dtype=torch.float64),
        )
        for _ in range(3)
    ]
    config = S2FTConfig(target_modules=["proj"], n_frequency=4)
    model = get_spectral_model(Planted(weight.float()).to(dtype), config)
    cast = [(x.to(dtype), t.to(dtype)) for x, t in batches]
    return weight, batches, model, cast


def hand_gradient(weight, x, t):
    return (x @ weight.T - t).T @ x


def test_gradient_and_adam_priors_by_hand():
    weight, batches, model, cast = planted()
    grads = [hand_gradient(weight, x, t) for x, t in batches]
    total = sum(grads)
    squares = sum(g * g for g in grads)
    layers = model.spectral_layers()
    plain = compute_prior(model.get_base_model(), layers, cast, planted_loss)["proj"]
    adam = compute_prior(model.get_base_model(), layers, cast, planted_loss, kind="adam")["proj"]
    torch.testing.assert_close(plain.double(), -total, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adam.double(), -total / squares.sqrt(), atol=1e-5, rtol=1e-5)
    assert adam.abs().max() <= 3**0.5 + 1e-6  # |Σg| / sqrt(Σg²) <= sqrt(number of batches)


def test_adam_prior_is_zero_where_no_batch_has_a_gradient():
    weight, _, model, _ = planted()
    x = torch.randn(4, 6)
    x[:, 2] = 0  # column 2 of W never sees an input: its gradient is 0 in every batch
    batches = [(x, torch.randn(4, 5))]
    adam = compute_prior(model.get_base_model(), model.spectral_layers(), batches, planted_loss, kind="adam")[
        "proj"
    ]
    assert torch.isfinite(adam).all() and torch.equal(adam[:, 2], torch.zeros(5))
    assert torch.equal(adam[:, [0, 1, 3, 4, 5]].abs(), torch.ones(5, 5))  # one batch: the sign of -g


def test_trajectory_prior_is_adam_run_by_hand_and_restores_the_weights():
    weight, batches, model, cast = planted()
    lr, (b1, b2), eps = 1e-2, (0.9, 0.999), 1e-8
    w, m, v = weight.clone(), torch.zeros_like(weight), torch.zeros_like(weight)
    for step, (x, t) in enumerate(batches, start=1):
        g = hand_gradient(w, x, t)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
    before = model.get_base_model().proj.base_layer.weight.detach().clone()
    prior = compute_prior(
        model.get_base_model(), model.spectral_layers(), cast, planted_loss, kind="trajectory", lr=lr
    )
    torch.testing.assert_close(prior["proj"].double(), w - weight, atol=1e-5, rtol=1e-4)
    # the steps changed the gradients along the way: not just lr * steps * sign of the first gradient
    assert not torch.allclose(
        prior["proj"].double(), -lr * 3 * hand_gradient(weight, *batches[0]).sign(), atol=1e-4
    )
    after = model.get_base_model().proj.base_layer.weight
    assert torch.equal(after, before) and after.grad is None


def test_trajectory_prior_of_conv1d_matches_torch_adam_on_a_copy():
    factory, targets, _ = MODELS["gpt2"]
    base = factory()
    model = get_spectral_model(copy.deepcopy(base), S2FTConfig(target_modules=targets, n_frequency=8))
    batches = make_batches("gpt2", count=3)
    prior = compute_prior(
        model.get_base_model(), model.spectral_layers(), batches, kind="trajectory", lr=1e-3
    )
    base.eval()
    names = list(model.spectral_layers())
    weights = [base.get_submodule(n).weight for n in names]
    start = [w.detach().clone() for w in weights]
    for p in base.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=1e-3)
    for batch in batches:
        optimizer.zero_grad()
        base(**batch).loss.backward()
        optimizer.step()
    for name, w, w0 in zip(names, weights, start):
        torch.testing.assert_close(prior[name], (w - w0).detach().T, atol=1e-6, rtol=1e-4)  # (d_out, d_in)


def test_trajectory_prior_in_bfloat16_keeps_small_steps_and_restores_bits():
    weight, batches, model32, cast32 = planted(torch.float32)
    _, _, model16, cast16 = planted(torch.bfloat16)
    before = model16.get_base_model().proj.base_layer.weight.detach().clone()
    args = dict(kind="trajectory", lr=1e-4)  # steps far below bfloat16's resolution at these weights
    reference = compute_prior(
        model32.get_base_model(), model32.spectral_layers(), cast32, planted_loss, **args
    )
    low = compute_prior(model16.get_base_model(), model16.spectral_layers(), cast16, planted_loss, **args)
    assert low["proj"].dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(low["proj"].flatten(), reference["proj"].flatten(), dim=0)
    assert cosine > 0.95
    assert torch.equal(model16.get_base_model().proj.base_layer.weight, before)


def test_config_rejects_unknown_priors():
    with pytest.raises(ValueError, match="prior must be one of"):
        S2FTConfig(target_modules=["proj"], prior="hessian")
    with pytest.raises(ValueError, match="prior_lr"):
        S2FTConfig(target_modules=["proj"], prior="trajectory", prior_lr=0.0)
    _, _, model, cast = planted()
    with pytest.raises(ValueError, match="unknown prior"):
        compute_prior(model.get_base_model(), model.spectral_layers(), cast, planted_loss, kind="newton")


@pytest.mark.parametrize("prior", ["adam", "trajectory"])
def test_calibrate_plans_from_the_configured_prior(prior):
    factory, targets, saves = MODELS["bert"]
    base = factory()
    batches = make_batches("bert")
    plans = {}
    for kind in ("gradient", prior):
        config = S2FTConfig(
            target_modules=targets, modules_to_save=saves, n_frequency=40, prior=kind, prior_lr=1e-3
        )
        model = get_spectral_model(copy.deepcopy(base), config)
        model.calibrate(batches)
        plans[kind] = {n: layer.perm_rows.clone() for n, layer in model.spectral_layers().items()}
        expected = compute_prior(
            model.get_base_model(), model.spectral_layers(), batches, kind=kind, lr=1e-3
        )  # what the plan was made from
        from s2ft.tuner.planner import plan_for

        for name, layer in model.spectral_layers().items():
            assert torch.equal(layer.perm_rows, plan_for(expected[name], name, config).perm_rows)
    assert any(not torch.equal(plans["gradient"][n], plans[prior][n]) for n in plans[prior])


def test_compare_runs_the_prior_variants_end_to_end(tmp_path):
    model = write_tiny_model(tmp_path / "model")
    data = write_dataset(tmp_path / "data.jsonl")
    out = tmp_path / "priors"
    argv = ["compare", "--model", model, "--dataset", data, "--output", str(out), "--quiet", "--seeds", "0"]
    argv += ["--variants", "fourierft", "s2ft", "s2ft-adam", "s2ft-trajectory", "--budgets", "8", "16"]
    argv += [
        "--max-steps",
        "1",
        "--batch-size",
        "8",
        "--head-warmup-steps",
        "0",
        "--calibration-batches",
        "2",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in results["summary"]]
    assert labels == [
        "FourierFT, n = 8",
        "FourierFT, n = 16",
        "S2FT, n = 8",
        "S2FT, n = 16",
        "S2FT, n = 8, Adam-normalized prior",
        "S2FT, n = 16, Adam-normalized prior",
        "S2FT, n = 8, trajectory prior",
        "S2FT, n = 16, trajectory prior",
    ]
    saved = json.loads(
        (out / "runs" / "s2ft-trajectory-n8-seed0" / "adapter" / "adapter_config.json").read_text()
    )
    assert saved["prior"] == "trajectory" and saved["prior_lr"] > 0
