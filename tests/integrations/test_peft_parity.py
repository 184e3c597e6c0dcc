"""Parity with Hugging Face PEFT's FourierFT: same locations and outputs for the same seed and coefficients."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from s2ft import FourierFTConfig, S2FTConfig, get_spectral_model
from tests.helpers import MODELS, forward, make_batches


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_fourierft_matches_peft(kind):
    factory, targets, _ = MODELS[kind]
    base = factory()
    n, scaling, seed = 50, 150.0, 123
    ours = get_spectral_model(
        copy.deepcopy(base),
        FourierFTConfig(target_modules=targets, n_frequency=n, scaling=scaling, seed=seed),
    )
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.FourierFTConfig(
            target_modules=targets,
            n_frequency=n,
            scaling=scaling,
            random_loc_seed=seed,
            init_weights=False,
            fan_in_fan_out=kind == "gpt2",
        ),
    )
    peft_layers = {
        name.removeprefix("base_model.model."): m
        for name, m in theirs.named_modules()
        if isinstance(m, peft.tuners.fourierft.layer.FourierFTLayer)
    }
    layers = ours.spectral_layers()
    assert set(layers) == set(peft_layers)
    g = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        theirs_layer = peft_layers[name]
        assert torch.equal(layer.rows, theirs_layer.indices["default"][0])
        assert torch.equal(layer.cols, theirs_layer.indices["default"][1])
        coeffs = torch.randn(n, generator=g)
        with torch.no_grad():
            layer.coeffs.copy_(coeffs)
            theirs_layer.fourierft_spectrum["default"].copy_(coeffs)
        torch.testing.assert_close(
            layer.delta_weight(), theirs_layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5
        )
    batch = make_batches(kind)[0]
    torch.testing.assert_close(forward(ours, batch), forward(theirs, batch), atol=1e-5, rtol=1e-5)


def test_normal_init_matches_peft_for_the_same_torch_seed():
    base = MODELS["bert"][0]()
    torch.manual_seed(5)
    ours = get_spectral_model(copy.deepcopy(base), FourierFTConfig(target_modules=["query"], init="normal"))
    torch.manual_seed(5)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.FourierFTConfig(target_modules=["query"], init_weights=False)
    )
    ours_coeffs = [layer.coeffs for layer in ours.spectral_layers().values()]
    theirs_coeffs = [p for n, p in theirs.named_parameters() if "fourierft_spectrum" in n]
    assert len(ours_coeffs) == len(theirs_coeffs) == 2
    for a, b in zip(ours_coeffs, theirs_coeffs):
        assert torch.equal(a, b)


def test_s2ft_with_identity_permutations_equals_fourierft():
    factory, targets, _ = MODELS["llama"]
    base = factory()
    fourier = get_spectral_model(copy.deepcopy(base), FourierFTConfig(target_modules=targets, n_frequency=30))
    s2ft = get_spectral_model(copy.deepcopy(base), S2FTConfig(target_modules=targets, n_frequency=30))
    g = torch.Generator().manual_seed(0)
    for name, layer in s2ft.spectral_layers().items():
        ref = fourier.spectral_layers()[name]
        layer.set_locations(ref.rows, ref.cols, torch.arange(layer.d_out), torch.arange(layer.d_in))
        coeffs = torch.randn(30, generator=g)
        with torch.no_grad():
            layer.coeffs.copy_(coeffs)
            ref.coeffs.copy_(coeffs)
        torch.testing.assert_close(layer.delta_weight(), ref.delta_weight(), atol=0, rtol=0)
    batch = make_batches("llama")[0]
    torch.testing.assert_close(forward(s2ft, batch), forward(fourier, batch), atol=1e-6, rtol=1e-6)
