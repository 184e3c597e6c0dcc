"""torchao's weight-only quantized linear layers (int8, and int4 in groups): every spectral method trains beside them,
calibration takes their prior from activations (equal to the dequantized float layer's weight-gradient prior),
merging needs dequantize=True."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import s2ft.methods  # noqa: F401  (registers every method's adapter config)
from s2ft import get_spectral_model
from s2ft.config import CONFIGS as SPECTRAL_CONFIGS
from s2ft.tuner.calibration import compute_prior
from s2ft.tuner.kinds import dequantize_modules, find_kind, kind_of

quantization = pytest.importorskip("torchao.quantization")

CONFIGS = {
    "int8": lambda: quantization.Int8WeightOnlyConfig(),
    "int4": lambda: quantization.IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=quantization.PerGroup(32)
    ),
}


class Tiny(nn.Module):
    """Two torchao-quantized layers and a float head: ``(batch, seq, 64) -> (batch, seq, 8)``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down, self.head = nn.Linear(64, 96), nn.Linear(96, 64), nn.Linear(64, 8)
        quantization.quantize_(self, CONFIGS[kind](), filter_fn=lambda m, name: name in ("up", "down"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))) + x)


def batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(2, 5, 64, generator=g), torch.randint(0, 8, (2, 5), generator=g)) for _ in range(count)
    ]


def loss_fn(outputs: torch.Tensor, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs.reshape(-1, 8), batch[1].reshape(-1))


def config(method: str, **kw):
    return SPECTRAL_CONFIGS[method](target_modules=["up", "down"], n_frequency=40, scaling=50.0, **kw)


@pytest.mark.parametrize("kind", CONFIGS)
def test_the_quantized_layers_are_torchaos_kind_and_the_float_head_is_not(kind):
    model = Tiny(kind)
    assert find_kind(model.up).name == "torchao" and find_kind(model.head).name == "linear"
    float_layer = kind_of(model.up).float_linear(model.up)  # what the quantized layer computes
    x = torch.randn(7, 64)
    torch.testing.assert_close(float_layer(x), model.up(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("method", sorted(SPECTRAL_CONFIGS))
def test_wraps_trains_only_coefficients(kind, method):
    model = Tiny(kind)
    x = batches(1)[0][0]
    with torch.no_grad():
        base = model(x)
    spectral = get_spectral_model(model, config(method))
    layer = spectral.spectral_layers()["up"]
    assert (layer.d_out, layer.d_in) == (96, 64)
    if spectral.spectral_config.planned:
        spectral.calibrate(batches(), loss_fn=loss_fn)
    with torch.no_grad():
        assert torch.equal(spectral(x), base)  # zeros init: exactly the quantized base output
    names = [n for n, p in spectral.named_parameters() if p.requires_grad]
    assert len(names) == 2 and all(n.endswith(".adapters.default.coeffs") for n in names)
    spectral.train()
    loss_fn(spectral(x), batches(1)[0]).backward()
    for name, p in spectral.named_parameters():
        if name.endswith(".coeffs"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        for p in spectral.parameters():
            if p.requires_grad:
                p -= 0.1 * p.grad
        assert not torch.equal(spectral(x), base)


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("prior", ["gradient", "adam"])
@pytest.mark.parametrize("rank", [None, 8])  # 8: the sketched prior (prior_rank)
def test_prior_is_the_dequantized_float_layers_weight_gradient_prior(kind, prior, rank):
    spectral = get_spectral_model(Tiny(kind), config("s2ft"))
    twin = copy.deepcopy(spectral)
    assert dequantize_modules(twin.model, torch.float32) == ["up.base_layer", "down.base_layer"]
    for layer in twin.spectral_layers().values():
        layer.kind = kind_of(layer.base_layer)
        assert layer.kind.name == "linear"
    hooked = compute_prior(
        spectral.model, spectral.spectral_layers(), batches(), loss_fn, kind=prior, rank=rank
    )
    reference = compute_prior(
        twin.model, twin.spectral_layers(), batches(), loss_fn, kind=prior, rank=rank, from_activations=False
    )
    assert set(hooked) == {"up", "down"}
    for name in hooked:
        if rank is not None:  # sketched from activations against sketched from the float weights' gradients:
            # the same sums to float32 rounding, which the reconstruction carries at the scale of the whole matrix
            got, expected = hooked[name].dense(), reference[name].dense()
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
            continue
        torch.testing.assert_close(hooked[name], reference[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", CONFIGS)
def test_merge_refused_and_dequantized_merge(kind):
    spectral = get_spectral_model(Tiny(kind), config("fourierft"))
    with torch.no_grad():
        for layer in spectral.spectral_layers().values():
            layer.coeffs.normal_()
    x = batches(1)[0][0]
    with torch.no_grad():
        unmerged = spectral(x)
    with pytest.raises(RuntimeError, match=r"torchao's quantized torch.nn.Linear.*dequantize=True"):
        spectral.merge_and_unload()
    assert not any(layer.merged for layer in spectral.spectral_layers().values())
    with torch.no_grad():
        assert torch.equal(spectral(x), unmerged)
    merged = spectral.merge_and_unload(dequantize=True)
    assert type(merged.up) is nn.Linear and type(merged.up.weight) is nn.Parameter
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)
