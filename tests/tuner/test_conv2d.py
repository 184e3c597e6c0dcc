"""Conv2d adapters: against a float64 reference for every conv form and both paths, the matrix view, and the
gradient prior in that view. (The lifecycle table of tests/test_model.py runs on the conv models too.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s2ft import FourierFTConfig, S2FTConfig, get_spectral_model
from s2ft.tuner.calibration import compute_prior
from s2ft.tuner.layers import layer_shape, weight_matrix
from tests.helpers import MODELS, make_batches, mlp_loss, tiny_convnet

CONVS = {
    "3x3": nn.Conv2d(4, 6, 3, padding=1),
    "pointwise": nn.Conv2d(8, 6, 1),
    "strided": nn.Conv2d(4, 6, (3, 2), stride=2, dilation=(1, 2)),
    "grouped": nn.Conv2d(6, 8, 3, padding=1, groups=2),
    "depthwise": nn.Conv2d(6, 6, 5, padding=2, groups=6),
    "reflect": nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
}


def naive_delta(layer, scaling: float) -> torch.Tensor:
    """``ΔW`` by the definition in float64: ``scaling * Re(ifft2(F))`` with rows and columns permuted."""
    spectrum = torch.zeros(layer.d_out, layer.d_in, dtype=torch.complex128)
    spectrum[layer.rows, layer.cols] = layer.coeffs.detach().double().to(torch.complex128)
    delta = torch.fft.ifft2(spectrum).real * scaling
    if layer.perm_rows is not None:
        delta = delta[torch.argsort(layer.perm_rows)][:, torch.argsort(layer.perm_cols)]
    return delta


class One(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("form", sorted(CONVS))
@pytest.mark.parametrize("path", ["dense", "fft"])
@pytest.mark.parametrize("permuted", [False, True])
def test_conv_adapter_matches_float64_reference(form, path, permuted):
    torch.manual_seed(0)
    conv = copy.deepcopy(CONVS[form])
    d_out, d_in = layer_shape(conv)
    assert (d_out, d_in) == (
        conv.out_channels,
        conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1],
    )
    n = min(20, d_out * d_in)
    model = get_spectral_model(
        One(conv).eval(),
        FourierFTConfig(target_modules=["conv"], n_frequency=n, scaling=3.0, forward_path=path),
    )
    layer = model.spectral_layers()["conv"]
    with torch.no_grad():
        layer.coeffs.normal_()
    if permuted:
        layer.set_locations(layer.rows, layer.cols, torch.randperm(d_out), torch.randperm(d_in))
    x = torch.randn(2, conv.in_channels, 9, 10)
    delta = naive_delta(layer, 3.0).reshape(conv.weight.shape)
    reference = conv.double()._conv_forward(x.double(), conv.weight.double() + delta, conv.bias.double())
    conv.float()
    torch.testing.assert_close(model(x).double(), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight().double(), naive_delta(layer, 3.0), atol=1e-6, rtol=1e-5)
    # merged: the plain convolution with W0 + ΔW
    expected = model(x)
    model.merge()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    model.unmerge()


def test_weight_matrix_is_a_view_of_the_weight_and_grad():
    conv = nn.Conv2d(6, 8, 3, groups=2)
    conv(torch.randn(1, 6, 5, 5)).sum().backward()
    assert torch.equal(weight_matrix(conv), conv.weight.reshape(8, 27))
    assert torch.equal(weight_matrix(conv, grad=True), conv.weight.grad.reshape(8, 27))
    assert weight_matrix(conv).data_ptr() == conv.weight.data_ptr()


@pytest.mark.parametrize("kind", ["convnet", "resnet"])
def test_prior_is_minus_the_summed_gradient_in_the_matrix_view(kind):
    factory, targets, saves = MODELS[kind]
    base = factory()
    model = get_spectral_model(
        copy.deepcopy(base), S2FTConfig(target_modules=targets, modules_to_save=saves, n_frequency=40)
    )
    batches = make_batches(kind, count=3)
    loss_fn = mlp_loss if kind == "convnet" else None
    priors = compute_prior(model.get_base_model(), model.spectral_layers(), batches, loss_fn)
    base.eval()
    for batch in batches:
        loss = mlp_loss(base(batch[0]), batch) if kind == "convnet" else base(**batch).loss
        loss.backward()
    for name, prior in priors.items():
        conv = base.get_submodule(name)
        torch.testing.assert_close(
            prior, -conv.weight.grad.reshape(conv.weight.shape[0], -1), atol=1e-6, rtol=1e-5
        )


@pytest.mark.parametrize("kind", ["convnet", "resnet"])
def test_conv_calibration_is_deterministic(kind):
    factory, targets, saves = MODELS[kind]
    plans = []
    for _ in range(2):
        model = get_spectral_model(
            factory(), S2FTConfig(target_modules=targets, modules_to_save=saves, n_frequency=40)
        )
        model.calibrate(make_batches(kind), mlp_loss if kind == "convnet" else None)
        plans.append(
            {n: (a.rows, a.cols, a.perm_rows, a.perm_cols) for n, a in model.spectral_layers().items()}
        )
    assert plans[0].keys() == plans[1].keys() and len(plans[0]) >= 4
    for name in plans[0]:
        assert all(torch.equal(a, b) for a, b in zip(plans[0][name], plans[1][name]))


def test_unsupported_layers_are_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(2, 2, 1)

    with pytest.raises(TypeError, match="Conv3d.*Linear, torch.nn.Conv2d, transformers' Conv1D"):
        get_spectral_model(Net(), FourierFTConfig(target_modules=["conv"], n_frequency=2))


def test_convnet_trains_with_the_fft_path():
    model = get_spectral_model(
        tiny_convnet(), S2FTConfig(target_modules=["pointwise"], n_frequency=30, forward_path="fft")
    )
    batches = make_batches("convnet")
    model.calibrate(batches, mlp_loss)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(batches[0][0]), batches[0][1])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_square_conv1d_is_seen_transposed():
    """GPT-2's Conv1D stores (d_in, d_out): the matrix view is the transpose even when the two are equal (a shape
    comparison cannot tell), and ΔW merges back transposed."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 6)
    assert torch.equal(weight_matrix(conv), conv.weight.T)
    x = torch.randn(3, 6)
    torch.testing.assert_close(conv(x), x @ weight_matrix(conv).T + conv.bias)
    model = get_spectral_model(
        One(conv).eval(), FourierFTConfig(target_modules=["conv"], n_frequency=10, init="normal")
    )
    expected = model.conv(x)
    delta = model.spectral_layers()["conv"].delta_weight().detach()
    torch.testing.assert_close(
        expected, x @ (weight_matrix(conv) + delta).T + conv.bias, atol=1e-5, rtol=1e-5
    )


class Transposed(nn.Module):
    """A layer s2ft does not know: ``y = x W`` with ``W`` stored ``(d_in, d_out)`` (as Conv1D, but unrelated)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_a_new_layer_kind_is_one_class_and_one_registry_line(monkeypatch, tmp_path):
    import json

    from s2ft.tuner import kinds
    from s2ft.tuner.peft_formats import export_lora

    class TransposedKind(kinds.LayerKind):
        name, label, all_linear, lora_fan_in_fan_out = "transposed", "Transposed", False, True

        def matrix(self, layer, tensor):
            return tensor.T

        def to_weight(self, layer, matrix):
            return matrix.T

    monkeypatch.setitem(kinds.KINDS, Transposed, TransposedKind())

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin, self.tr = nn.Linear(6, 5), Transposed(5, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.tr(self.lin(x))

    base = Net().eval()
    model = get_spectral_model(
        copy.deepcopy(base), FourierFTConfig(target_modules=["tr"], n_frequency=8, init="normal")
    )
    layer = model.spectral_layers()["tr"]
    assert (layer.d_out, layer.d_in) == (4, 5) and layer.kind.name == "transposed"
    delta = naive_delta(layer, 150.0).float()
    x = torch.randn(3, 6)
    expected = base.lin(x) @ (base.tr.weight + delta.T)
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-5)
        model.merge()
        torch.testing.assert_close(layer.base_layer.weight, base.tr.weight + delta.T, atol=1e-5, rtol=1e-5)
        model.unmerge()
    report = export_lora(model, tmp_path, rank=4)
    from safetensors.torch import load_file

    lora = load_file(tmp_path / "adapter_model.safetensors")
    assert report["tr"]["rank"] == 4 and lora["base_model.model.tr.lora_A.weight"].shape == (4, 5)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    everything = get_spectral_model(
        copy.deepcopy(base), FourierFTConfig(target_modules="all-linear", n_frequency=4)
    )
    assert list(everything.spectral_layers()) == ["lin"]  # all_linear = False leaves it out

    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(2, 2, 1)

    with pytest.raises(TypeError, match="Conv3d.*Conv2d, transformers' Conv1D, .*Transposed.* are supported"):
        get_spectral_model(Other(), FourierFTConfig(target_modules=["conv"], n_frequency=2))
