"""PEFT's FourierFT files both ways, and the LoRA export, against the installed peft."""

from __future__ import annotations

import json
import subprocess
import sys

import peft
import pytest
import torch

from s2ft import FourierFTConfig, S2FTConfig, get_spectral_model
from s2ft.tuner.peft_formats import (
    export_lora,
    fourierft_to_peft,
    load_peft_fourierft,
    lora_factors,
    read_peft_fourierft,
    save_peft_fourierft,
)
from tests.helpers import ROOT, tiny_bert, tiny_gpt2

IDS = torch.randint(64, (2, 10), generator=torch.Generator().manual_seed(1))


def trained_fourierft(factory=tiny_bert, targets=("query", "value"), save=("classifier",)):
    model = get_spectral_model(
        factory(),
        FourierFTConfig(target_modules=list(targets), modules_to_save=list(save) or None, n_frequency=24),
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.coeffs.normal_()
        for copy in model._trained_copies().values():
            for p in copy.trained_module.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_fourierft_export_loads_in_peft_without_s2ft(tmp_path):
    model = trained_fourierft()
    save_peft_fourierft(model, tmp_path / "peft")
    torch.save(IDS, tmp_path / "ids.pt")
    script = f"""
import sys, torch
sys.modules["s2ft"] = None
sys.path.insert(0, {ROOT!r})
from tests.helpers import tiny_bert
import peft
model = peft.PeftModel.from_pretrained(tiny_bert(), {str(tmp_path / "peft")!r}).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), logits(model), atol=1e-5, rtol=1e-5)


def test_peft_fourierft_folder_loads_into_s2ft(tmp_path):
    torch.manual_seed(0)
    config = peft.FourierFTConfig(
        n_frequency=24, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    reference = peft.get_peft_model(tiny_bert(), config)  # PEFT draws the coefficients N(0, 1)
    reference.save_pretrained(tmp_path / "peft")
    loaded = load_peft_fourierft(tiny_bert(), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded), logits(reference.eval()), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters())
    s2ft_config, state = read_peft_fourierft(tmp_path / "peft")
    assert s2ft_config.seed == 777 and s2ft_config.n_frequency == 24
    assert {k for k in state if k.endswith(".coeffs")} == {f"{n}.coeffs" for n in loaded.spectral_layers()}


def test_s2ft_export_in_peft_format_is_refused():
    model = get_spectral_model(tiny_bert(), S2FTConfig(target_modules=["query"], n_frequency=8))
    with pytest.raises(ValueError, match="no Hugging Face PEFT format.*merge.*LoRA"):
        fourierft_to_peft(model)


def test_other_peft_types_are_refused(tmp_path):
    peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"])).save_pretrained(
        tmp_path / "l"
    )
    with pytest.raises(ValueError, match="PEFT LORA adapter.*FOURIERFT adapters only"):
        load_peft_fourierft(tiny_bert(), tmp_path / "l")


@pytest.mark.parametrize("rank", [1, 3, 0.9])
def test_lora_factors_match_a_float64_svd(rank):
    delta = torch.randn(12, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b, error = lora_factors(delta, rank)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = a.shape[0]
    if rank < 1:  # the smallest rank keeping 90% of the energy
        share = torch.cumsum(s**2, 0) / (s**2).sum()
        assert share[r - 1] >= 0.9 and (r == 1 or share[r - 2] < 0.9)
    else:
        assert r == rank
    best = (u[:, :r] * s[:r]) @ vh[:r]
    torch.testing.assert_close((b @ a).double(), best, atol=1e-5, rtol=1e-5)
    assert error == pytest.approx(float(torch.linalg.norm(delta - best) / torch.linalg.norm(delta)), rel=1e-6)


@pytest.mark.parametrize(
    "factory, targets, save", [(tiny_bert, ("query", "value"), ("classifier",)), (tiny_gpt2, ("c_attn",), ())]
)
def test_lora_export_loads_in_peft(tmp_path, factory, targets, save):
    model = trained_fourierft(factory, targets, save)
    full = min(min(layer.d_out, layer.d_in) for layer in model.spectral_layers().values())
    report = export_lora(model, tmp_path / "lora", full)
    assert all(r["relative_error"] < 1e-6 for r in report.values())
    loaded = peft.PeftModel.from_pretrained(factory(), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-4, rtol=1e-4)
    # a low rank: the reported error is the real one
    report = export_lora(model, tmp_path / "low", 2)
    name, layer = next(iter(model.spectral_layers().items()))
    a, b, _ = lora_factors(layer.delta_weight(), 2)
    delta = layer.delta_weight().detach()
    assert report[name]["relative_error"] == pytest.approx(
        float(torch.linalg.norm(delta - b @ a) / torch.linalg.norm(delta)), rel=1e-4
    )
    config = json.loads((tmp_path / "low" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 2
