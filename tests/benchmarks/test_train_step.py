"""benchmarks/train_step.py --wavelet: the wavelet methods' models beside LoRA r = 8 and FourierFT, on the paths
they name, each the base model before training (zero coefficients) but for PEFT's FourierFT (random init)."""

from __future__ import annotations

import torch

from s2ft.config import S2FTWaveletConfig, WaveletConfig
from s2ft.tuner.layers import SpectralLayer
from tests.helpers import load_benchmark, make_batches, tiny_bert


def test_wavelet_models_are_the_wavelet_methods_on_each_path():
    train_step = load_benchmark("train_step")
    base = tiny_bert()
    models = train_step.models("text-classification", base, ["classifier"], wavelet=True)
    paths = ("auto", "dense", "fft")
    expected = ["lora_r8", "peft_fourierft", "fourierft_auto"]
    expected += [f"{name}_{path}" for path in paths for name in ("wavelet", "s2ft_wavelet")]
    assert list(models) == expected
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    for path in paths:
        for name, kind in (("wavelet", WaveletConfig), ("s2ft_wavelet", S2FTWaveletConfig)):
            model = models[f"{name}_{path}"]
            if name.startswith("s2ft"):  # as step_table does
                model.calibrate(make_batches("bert", 2))
            layers = [m for m in model.modules() if isinstance(m, SpectralLayer)]
            assert len(layers) == 4  # query and value of 2 layers
            assert type(model.spectral_config) is kind
            for layer in layers:
                assert next(iter(layer.adapters.values())).forward_path == path
            with torch.no_grad():
                torch.testing.assert_close(model(input_ids=ids).logits, reference)
    # the default set is unchanged
    plain = train_step.models("text-classification", base, ["classifier"])
    assert list(plain) == [
        "lora_r8",
        "peft_fourierft",
        "fourierft_auto",
        "s2ft_auto",
        "s2ft_dense",
        "s2ft_fft",
    ]
