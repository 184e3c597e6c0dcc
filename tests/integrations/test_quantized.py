"""Quantized base layers (bitsandbytes Linear4bit nf4/fp4 and Linear8bitLt): every spectral method trains beside them,
calibration takes their prior from activations, merging needs dequantize=True; other quantized layers refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import s2ft.methods  # noqa: F401  (registers every method's adapter config)
from s2ft import FourierFTConfig, S2FTConfig, get_spectral_model
from s2ft.config import CONFIGS
from s2ft.tuner.calibration import compute_prior
from s2ft.tuner.kinds import dequantize_modules, kind_of

bnb = pytest.importorskip("bitsandbytes")


def quantized(linear: nn.Linear, kind: str) -> nn.Module:
    """``linear`` as a bitsandbytes layer: "nf4"/"fp4" (Linear4bit) or "int8" (Linear8bitLt)."""
    bias = linear.bias is not None
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(
            linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False
        )
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias, compute_dtype=torch.float32, quant_type=kind
        )
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=kind)
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


class Tiny(nn.Module):
    """Two quantized layers and a float head: ``(batch, seq, 64) -> (batch, seq, 8)``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = quantized(nn.Linear(64, 96), kind)
        self.down = quantized(nn.Linear(96, 64), kind)
        self.head = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))) + x)


KINDS = ["nf4", "fp4", "int8"]


def batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(2, 5, 64, generator=g), torch.randint(0, 8, (2, 5), generator=g)) for _ in range(count)
    ]


def loss_fn(outputs: torch.Tensor, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs.reshape(-1, 8), batch[1].reshape(-1))


def fourierft(**kw) -> FourierFTConfig:
    return FourierFTConfig(target_modules=["up", "down"], n_frequency=40, scaling=50.0, **kw)


def s2ft_config(**kw) -> S2FTConfig:
    return S2FTConfig(target_modules=["up", "down"], n_frequency=40, scaling=50.0, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_wraps_trains_only_coefficients(kind, method):
    model = Tiny(kind)
    x = batches(1)[0][0]
    with torch.no_grad():
        base = model(x)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    spectral = get_spectral_model(
        model, CONFIGS[method](target_modules=["up", "down"], n_frequency=40, scaling=50.0)
    )
    layer = spectral.spectral_layers()["up"]
    assert (layer.d_out, layer.d_in) == (96, 64)  # from the features, not the packed weight
    if spectral.spectral_config.planned:
        spectral.calibrate(batches(), loss_fn=loss_fn)
    with torch.no_grad():
        assert torch.equal(spectral(x), base)  # zeros init: exactly the quantized base output
    trained = [p for p in spectral.parameters() if p.requires_grad]
    names = [n for n, p in spectral.named_parameters() if p.requires_grad]
    assert len(names) == 2 and all(n.endswith(".adapters.default.coeffs") for n in names)
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    loss_fn(spectral(x), batches(1)[0]).backward()
    optimizer.step()
    for name, p in spectral.named_parameters():
        if name.endswith(".coeffs"):
            assert p.detach().abs().sum() > 0
    for name, p in model.named_parameters():
        original = name.replace(".base_layer", "")
        if original in frozen:
            assert torch.equal(p.detach(), frozen[original]), name
    with torch.no_grad():
        assert not torch.equal(spectral(x), base)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_refused_and_dequantized_merge(kind):
    spectral = get_spectral_model(Tiny(kind), fourierft())
    with torch.no_grad():
        for layer in spectral.spectral_layers().values():
            layer.coeffs.normal_()
    x = batches(1)[0][0]
    with torch.no_grad():
        unmerged = spectral(x)
    before = {n: p.detach().clone() for n, p in spectral.named_parameters()}
    for call in (spectral.merge, spectral.merge_and_unload):
        with pytest.raises(RuntimeError, match=r"merge_and_unload\(dequantize=True\).*serving unmerged"):
            call()
    assert all(torch.equal(p.detach(), before[n]) for n, p in spectral.named_parameters())
    assert not any(layer.merged for layer in spectral.spectral_layers().values())
    merged = spectral.merge_and_unload(dequantize=True)
    assert type(merged.up) is nn.Linear and type(merged.down) is nn.Linear
    assert merged.up.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)


def test_dequantized_weight_is_what_the_layer_computes():
    for kind in KINDS:
        layer = quantized(nn.Linear(64, 32), kind)
        x = torch.randn(7, 64)
        float_layer = kind_of(layer).float_linear(layer)
        torch.testing.assert_close(float_layer(x), layer(x), rtol=1e-5, atol=1e-5)


def test_trajectory_prior_refused_before_anything_changes():
    spectral = get_spectral_model(Tiny("nf4"), s2ft_config(prior="trajectory"))
    with pytest.raises(
        ValueError, match="trajectory prior.*'up'.*Linear4bit.*prior='gradient' or prior='adam'"
    ):
        spectral.calibrate(batches(), loss_fn=loss_fn)
    assert not any(a.is_ready for a in spectral.spectral_layers().values())


@pytest.mark.parametrize("prior", ["gradient", "adam"])
@pytest.mark.parametrize("rank", [None, 8])  # 8: the sketched prior (prior_rank)
def test_quantized_prior_is_the_dequantized_float_layers_prior(prior, rank):
    """The activation prior of a quantized layer equals the weight-gradient prior of the float layer computing
    the same (its dequantized weight)."""

    spectral = get_spectral_model(Tiny("nf4"), s2ft_config())
    twin = copy.deepcopy(spectral)
    dequantize_modules(twin.model)
    for layer in twin.spectral_layers().values():
        layer.kind = kind_of(layer.base_layer)
    hooked = compute_prior(
        spectral.model, spectral.spectral_layers(), batches(), loss_fn, kind=prior, rank=rank
    )
    reference = compute_prior(
        twin.model, twin.spectral_layers(), batches(), loss_fn, kind=prior, rank=rank, from_activations=False
    )
    for name in hooked:
        if rank is not None:  # sketched from activations against sketched from the float weights' gradients:
            # the same sums to float32 rounding, which the reconstruction carries at the scale of the whole matrix
            got, expected = hooked[name].dense(), reference[name].dense()
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
            continue
        torch.testing.assert_close(hooked[name], reference[name], rtol=1e-4, atol=1e-6)


class QuantLinear(nn.Module):
    """A stand-in for GPTQ's layer: packed int32 weights."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 64, 96
        self.register_buffer("qweight", torch.zeros(8, 96, dtype=torch.int32))

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], 96)


class IntWeightLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 96, 64
        self.weight = nn.Parameter(torch.zeros(64, 96, dtype=torch.int8), requires_grad=False)

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], 64)


@pytest.mark.parametrize("targets", [["up", "down"], "all-linear"])
def test_other_quantized_layers_refused_model_unchanged(targets):
    model = Tiny("nf4")
    model.up, model.down = QuantLinear(), IntWeightLinear()
    modules = dict(model.named_modules())
    with pytest.raises(
        TypeError,
        match=r"quantized layers of a kind s2ft cannot adapt: up \(QuantLinear\), "
        r"down \(IntWeightLinear\).*Linear4bit, bitsandbytes' Linear8bitLt and torchao's quantized",
    ):
        get_spectral_model(model, FourierFTConfig(target_modules=targets, n_frequency=40))
    assert dict(model.named_modules()) == modules
    assert all(p.requires_grad for p in model.head.parameters())


def _llama_4bit(evaluated: bool) -> nn.Module:
    """A Llama of 4-bit layers wide enough for bitsandbytes' AVX512-BF16 CPU repacking (as from_pretrained leaves
    them: repacking allowed), run once in eval mode without gradients when ``evaluated``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from s2ft.tasks.quantize import quantize_linears

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    quantize_linears(model, "4bit")
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = bnb.functional.has_avx512bf16()
    if evaluated:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    return model


def _packed(model: nn.Module) -> list[bool]:
    return [
        bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    ]


def test_4bit_layers_evaluated_on_the_cpu_still_pass_gradients():
    """bitsandbytes repacks an evaluated Linear4bit for a CPU kernel that takes no gradient (rounding its scales to
    bfloat16); a wrapped model undoes the repacking on every 4-bit layer (targeted or not), so its calibration
    prior and its training gradients are those of the same model with its layers dequantized to float."""
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here, nothing to undo")
    model = _llama_4bit(evaluated=True)
    assert all(_packed(model))  # what the user's model looks like after an evaluation
    spectral = get_spectral_model(model, S2FTConfig(target_modules=["q_proj", "v_proj"], n_frequency=10))
    assert not any(_packed(spectral))
    twin = copy.deepcopy(spectral)
    assert dequantize_modules(twin.model)  # the float model the quantized one computes
    g = torch.Generator().manual_seed(1)
    data = [
        {"input_ids": (ids := torch.randint(0, 64, (2, 8), generator=g)), "labels": ids} for _ in range(2)
    ]
    quantized_prior = compute_prior(spectral.model, spectral.spectral_layers(), data)
    float_prior = compute_prior(twin.model, twin.spectral_layers(), data)
    grads = []
    for m in (spectral, twin):
        m.calibrate(data)
        m.train()
        for layer in m.spectral_layers().values():
            with torch.no_grad():
                layer.adapters["default"].coeffs.fill_(0.01)
        m(**data[0]).loss.backward()
        grads.append({n: layer.adapters["default"].coeffs.grad for n, layer in m.spectral_layers().items()})
    for name, prior in float_prior.items():
        torch.testing.assert_close(quantized_prior[name], prior, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-8)
