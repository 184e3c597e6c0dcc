"""The dense path fused into the base GEMM (``F.linear(x, W + ΔW)``) computes what the separate branch computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from s2ft import DCTConfig, FourierFTConfig, S2FTConfig, get_spectral_model


def models(config_class, dtype):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).to(dtype)
    options = {"target_modules": ["0", "2"], "n_frequency": 20, "forward_path": "dense"}
    if config_class is not S2FTConfig:
        options["init"] = "normal"
    fused = get_spectral_model(base, config_class(**options))
    if config_class is S2FTConfig:
        fused.calibrate(
            [(torch.randn(8, 12, dtype=dtype), torch.randn(8, 6, dtype=dtype))],
            lambda out, b: ((out - b[1]) ** 2).mean(),
        )
        with torch.no_grad():
            for layer in fused.spectral_layers().values():
                layer.coeffs.normal_()
    separate = copy.deepcopy(fused)
    for layer in separate.spectral_layers().values():
        layer._fusion_path = lambda *args: None
    return fused, separate


def step(model, x):
    out = model(x)
    out.square().sum().backward()
    return out, [layer.coeffs.grad for layer in model.spectral_layers().values()]


@pytest.mark.parametrize("config_class", [FourierFTConfig, S2FTConfig, DCTConfig])
def test_fused_dense_path_equals_the_separate_branch_in_float64(config_class):
    fused, separate = models(config_class, torch.float64)
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    layer = fused.spectral_layers()["0"]
    assert layer._fusable(layer.adapters["default"], x)
    out, grads = step(fused, x)
    grad_x = x.grad.clone()
    x.grad = None
    expected, expected_grads = step(separate, x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-12, atol=1e-12)


def test_fusion_only_where_it_keeps_the_numbers():
    """Not for a 16-bit weight (ΔW would be rounded to its precision), not under autocast, not on the FFT path,
    not without autograd, not with several active adapters."""
    fused, _ = models(FourierFTConfig, torch.float32)
    layer = fused.spectral_layers()["0"]
    adapter = layer.adapters["default"]
    x = torch.randn(4, 12)
    assert layer._fusable(adapter, x)
    with torch.no_grad():
        assert not layer._fusable(adapter, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer._fusable(adapter, x)
    adapter.forward_path = "fft"
    assert not layer._fusable(adapter, x)
    adapter.forward_path = "dense"
    half, _ = models(FourierFTConfig, torch.bfloat16)
    layer16 = half.spectral_layers()["0"]
    assert not layer16._fusable(layer16.adapters["default"], x.bfloat16())


def test_auto_in_training_takes_the_path_of_the_fused_cost_model(monkeypatch):
    """Where the dense path would fuse, ``auto`` weighs the fused dense path against the FFT path (a choice that
    depends on the tokens), and when the FFT path wins the branch runs on it: never on the separate dense path,
    which the unfused rule would pick at this shape."""
    import s2ft.ops.apply as apply_module
    from s2ft.ops.apply import choose_path

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # both rules depend on the threads
    assert choose_path(384, 384, 1000, 128, "cpu", fused=True) == "fft"
    assert choose_path(384, 384, 1000, 2048, "cpu", fused=True) == "dense"
    assert choose_path(384, 384, 1000, 128, "cpu") == "dense"  # the unfused rule
    assert choose_path(192, 576, 1000, 2048, "cpu", fused=True) == "dense"
    assert choose_path(2048, 2048, 1000, 128, "cpu", fused=True) == "fft"

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(384, 384))
    weight, bias = base[0].weight.detach().clone(), base[0].bias.detach().clone()
    model = get_spectral_model(base, FourierFTConfig(target_modules=["0"], n_frequency=1000, init="normal"))
    layer = model.spectral_layers()["0"]
    x = torch.randn(128, 384, requires_grad=True)
    expected_out = (x @ (weight + layer.delta_weight().detach()).T + bias).detach()

    def no_dense(*args, **kwargs):
        raise AssertionError("the separate dense branch ran")

    monkeypatch.setattr(apply_module, "delta_weight", no_dense)
    assert not layer._fusable(layer.adapters["default"], x)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-4)
    assert layer.coeffs.grad is not None and x.grad is not None
