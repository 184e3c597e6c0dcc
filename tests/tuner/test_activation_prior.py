"""The prior of a weight without gradients from activations (-Σ δᵀx via hooks), and calibration in groups of layers:
float64 references against the weight-gradient prior, identical priors whatever the grouping, memory bounded by the
group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from s2ft import S2FTConfig, get_spectral_model
from s2ft.tuner.calibration import compute_prior, iter_priors, prior_memory
from s2ft.tuner.kinds import kind_of
from s2ft.tuner.planner import plan_for
from tests.helpers import Stack, tiny_llama
from tests.helpers import stack_loss_fn as loss_fn


def batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [
        (torch.randn(2, 7, 32, generator=g, dtype=torch.float64), torch.randint(0, 5, (2, 7), generator=g))
        for _ in range(count)
    ]


def wrapped(depth: int = 6):
    config = S2FTConfig(target_modules=r"layers\.\d+", n_frequency=30, scaling=10.0)
    return get_spectral_model(Stack(depth), config)


def test_weight_gradient_is_the_weights_gradient_float64():
    """δᵀx summed over every token of a (batch, seq, d) input is ∂L/∂W, to float64 rounding."""
    layer = nn.Linear(32, 24).double()
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    out = layer(x)
    out.retain_grad()
    (out.sin() * torch.linspace(-1, 1, 24, dtype=torch.float64)).sum().backward()
    got = kind_of(layer).weight_gradient(layer, x, out.grad)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, layer.weight.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("prior", ["gradient", "adam"])
def test_activation_prior_equals_weight_gradient_prior(prior):
    spectral = wrapped()
    layers = spectral.spectral_layers()
    by_weights = compute_prior(spectral.model, layers, batches(), loss_fn, kind=prior, from_activations=False)
    by_hooks = compute_prior(spectral.model, layers, batches(), loss_fn, kind=prior, from_activations=True)
    assert set(by_hooks) == set(layers)
    for name in layers:
        assert by_hooks[name].dtype == torch.float32
        torch.testing.assert_close(by_hooks[name], by_weights[name], rtol=1e-6, atol=1e-7)


def test_activation_prior_leaves_the_model_unchanged():
    spectral = wrapped()
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in spectral.named_parameters()}
    compute_prior(spectral.model, spectral.spectral_layers(), batches(), loss_fn, from_activations=True)
    for name, p in spectral.named_parameters():
        assert (
            torch.equal(p.detach(), before[name][0]) and p.requires_grad == before[name][1] and p.grad is None
        )
    for module in spectral.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("prior", ["gradient", "adam", "trajectory"])
@pytest.mark.parametrize("hooks", [False, True])
def test_priors_and_plans_identical_whatever_the_group_size(prior, hooks):
    spectral = wrapped()
    layers = spectral.spectral_layers()
    if prior == "trajectory":  # it steps all the layers together: no groups, no activation priors
        size, match = (None, "takes no gradient") if hooks else (2, "cannot be computed in groups")
        with pytest.raises(ValueError, match=match):
            iter_priors(
                spectral.model,
                layers,
                batches(),
                loss_fn,
                kind=prior,
                group_size=size,
                from_activations=hooks,
            )
        return
    config = spectral.peft_config["default"]
    results = {}
    for size in (None, 1, 2, 4):
        one_pass = iter(batches())  # a one-pass iterator: the groups must see the same batches all the same
        priors = dict(
            iter_priors(
                spectral.model, layers, one_pass, loss_fn, kind=prior, group_size=size, from_activations=hooks
            )
        )
        results[size] = priors
    for size, priors in results.items():
        assert list(priors) == list(layers)
        for name in layers:
            assert torch.equal(priors[name], results[None][name]), (size, name)
            a, b = plan_for(priors[name], name, config), plan_for(results[None][name], name, config)
            assert torch.equal(a.rows, b.rows) and torch.equal(a.cols, b.cols)
            assert torch.equal(a.perm_rows, b.perm_rows) and torch.equal(a.perm_cols, b.perm_cols)


@pytest.mark.parametrize("prior", ["gradient", "adam"])
@pytest.mark.parametrize("hooks", [False, True])
def test_prior_memory_bounded_by_the_group(prior, hooks):
    """Planning and dropping each prior as it comes, the prior-sized tensors held at once grow with the group
    size, not with the number of layers."""
    layer_bytes = 32 * 32 * 4  # one float32 prior
    peaks = {}
    for depth in (3, 6):
        spectral = wrapped(depth)
        layers = spectral.spectral_layers()
        for size in (1, 2, None):
            with prior_memory() as memory:
                for _, prior_tensor in iter_priors(
                    spectral.model,
                    layers,
                    batches(),
                    loss_fn,
                    kind=prior,
                    group_size=size,
                    from_activations=hooks,
                ):
                    del prior_tensor  # planned and forgotten
                peaks[depth, size] = memory.peak
            assert memory.live == 0
    # per layer: its float32 sum, (adam) squares and one batch's g_b, and a float64 gradient (the weight's, or
    # one call's δᵀx)
    per_layer = (3 if prior == "adam" else 1) * layer_bytes + 2 * layer_bytes
    for size in (1, 2):
        assert peaks[3, size] == peaks[6, size]  # independent of the number of layers
        assert peaks[6, size] <= size * per_layer
    assert peaks[6, None] > peaks[3, None] > peaks[3, 1]  # all at once: grows with the layers


def test_group_size_checked():
    spectral = wrapped(2)
    with pytest.raises(ValueError, match="group size must be a positive integer"):
        iter_priors(spectral.model, spectral.spectral_layers(), batches(), loss_fn, group_size=0)


def _plans(spectral) -> dict[str, tuple[torch.Tensor, ...]]:
    return {
        n: (a.rows, a.cols, a.perm_rows, a.perm_cols)
        for n, layer in spectral.spectral_layers().items()
        for a in [layer.adapters["default"]]
    }


@pytest.mark.parametrize("prior", ["gradient", "adam"])
def test_calibrate_in_groups_same_plans_bounded_memory(prior):
    """``S2FTConfig(calibration_group_size=k)``: ``calibrate`` plans each prior as it comes, so the prior memory is
    one group's whatever the number of layers, and the plans are those of one pass over all layers."""
    plans, peaks = {}, {}
    for size in (None, 2):
        for depth in (3, 6):
            config = S2FTConfig(
                target_modules=r"layers\.\d+",
                n_frequency=30,
                scaling=10.0,
                prior=prior,
                calibration_group_size=size,
            )
            spectral = get_spectral_model(Stack(depth), config)
            with prior_memory() as memory:
                spectral.calibrate(batches(), loss_fn)
            peaks[size, depth] = memory.peak
            plans[size, depth] = _plans(spectral)
    for depth in (3, 6):
        for name, plan in plans[None, depth].items():
            assert all(torch.equal(a, b) for a, b in zip(plan, plans[2, depth][name]))
    assert peaks[2, 3] == peaks[2, 6] < peaks[None, 6]


def test_calibration_group_size_validated():
    with pytest.raises(ValueError, match="calibration_group_size must be a positive integer"):
        S2FTConfig(target_modules=["q"], calibration_group_size=0)
    with pytest.raises(ValueError, match="trajectory prior .* cannot be calibrated in groups"):
        S2FTConfig(target_modules=["q"], prior="trajectory", calibration_group_size=4)
    config = S2FTConfig(target_modules=["q"], calibration_group_size=4)
    assert S2FTConfig.from_dict(config.to_dict()).calibration_group_size == 4


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("hooks", [False, True])
def test_calibration_keeps_gradient_checkpointing(reentrant, hooks):
    """With transformers' gradient checkpointing on, calibration checkpoints too (each layer's forward runs again
    in the backward pass) and gets the very priors of a run without it, float64; every module's mode is as before."""
    targets = ["q_proj", "v_proj"]
    g = torch.Generator().manual_seed(1)
    data = [
        {"input_ids": (ids := torch.randint(0, 64, (2, 8), generator=g)), "labels": ids} for _ in range(2)
    ]
    priors, calls = {}, {}
    for checkpointing in (False, True):
        model = tiny_llama().double()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        spectral = get_spectral_model(model, S2FTConfig(target_modules=targets, n_frequency=10))
        modes = {n: m.training for n, m in spectral.named_modules()}
        layers = spectral.spectral_layers()
        counter = []
        first = next(iter(layers.values())).base_layer
        handle = first.register_forward_hook(lambda *args, c=counter: c.append(1))
        priors[checkpointing] = compute_prior(spectral.model, layers, data, from_activations=hooks)
        handle.remove()
        calls[checkpointing] = len(counter)
        assert {n: m.training for n, m in spectral.named_modules()} == modes
    assert calls == {False: 2, True: 4}  # two batches; checkpointing runs each layer's forward twice
    for name, prior in priors[False].items():
        torch.testing.assert_close(priors[True][name], prior, rtol=1e-12, atol=1e-14)
