"""Many named adapters on one base model: the PEFT-style lifecycle, mixed-adapter batches, folders and errors."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from s2ft import FourierFTConfig, S2FTConfig, SpectralModel, get_spectral_model
from s2ft.tuner.layers import BASE, SpectralLayer, TrainedCopy
from s2ft.tuner.walk import outer_modules
from tests.helpers import MODELS, make_batches, mlp_loss, tiny_bert, tiny_llama

KINDS = ["mlp", "bert", "gpt2", "llama"]


def two_adapters(kind: str, path: str = "auto"):
    """(base, model with "default" FourierFT and "other" S2FT, both with random coefficients, batches)."""
    factory, targets, saves = MODELS[kind]
    base = factory()
    model = get_spectral_model(
        copy.deepcopy(base),
        FourierFTConfig(
            target_modules=targets, modules_to_save=saves, n_frequency=24, init="normal", forward_path=path
        ),
    )
    model.add_adapter(
        "other",
        S2FTConfig(target_modules=targets, modules_to_save=saves, n_frequency=24, seed=3, forward_path=path),
    )
    batches = make_batches(kind)
    model.calibrate(batches, mlp_loss if kind == "mlp" else None, adapter_name="other")
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.adapters["other"].coeffs.normal_()
        for saved in model._trained_copies().values():
            for module in saved.copies.values():
                for p in module.parameters():
                    p.add_(0.1 * torch.randn_like(p))
    return base, model.eval(), batches


def output(model, batch, **kwargs):
    with torch.no_grad():
        if isinstance(batch, tuple):
            return model(batch[0], **kwargs)
        return model(input_ids=batch["input_ids"], **kwargs).logits


@pytest.mark.parametrize("kind", KINDS)
def test_named_adapter_lifecycle(kind):
    base, model, batches = two_adapters(kind)
    batch = batches[0]
    assert model.active_adapters == ["default"] and list(model.peft_config) == ["default", "other"]
    assert isinstance(model.peft_config["other"], S2FTConfig) and model.get_base_model() is model.model
    first = output(model, batch)
    model.set_adapter("other")
    second = output(model, batch)
    assert not torch.allclose(first, second)
    # only the active adapter trains
    assert all(
        not layer.adapters["default"].coeffs.requires_grad for layer in model.spectral_layers().values()
    )
    assert all(layer.adapters["other"].coeffs.requires_grad for layer in model.spectral_layers().values())
    # one adapter alone == a model wrapped with it alone
    model.set_adapter("default")
    torch.testing.assert_close(output(model, batch), first)
    with model.disable_adapters():
        torch.testing.assert_close(output(model, batch), output(base.eval(), batch))
    # merging the active adapter gives its outputs
    model.merge()
    torch.testing.assert_close(output(model, batch), first, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        model.delete_adapter("default")
    model.unmerge()
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"] and model.active_adapters == ["other"]
    torch.testing.assert_close(output(model, batch), second)
    with pytest.raises(ValueError, match="last adapter"):
        model.delete_adapter("other")


@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
def test_several_active_adapters_add_their_delta(kind):
    base, model, batches = two_adapters(kind)
    for layer in model.spectral_layers().values():
        layer.adapters["default"].forward_path = "dense"
    model.set_adapter(["default", "other"])
    both = output(model, batches[0])
    for layer in model.spectral_layers().values():
        expected = layer.adapters["default"].delta_weight() + layer.adapters["other"].delta_weight()
        module = copy.deepcopy(layer.base_layer)
        layer.merge(["default", "other"])
        torch.testing.assert_close(
            layer.base_layer.weight, module.weight + layer.kind.to_weight(module, expected)
        )
        layer.unmerge()
    if kind == "gpt2":  # no modules_to_save: the merged model is the sum
        model.merge(["default", "other"])
        torch.testing.assert_close(output(model, batches[0]), both, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["dense", "fft"])
def test_mixed_batch_equals_each_example_alone(kind, path):
    base, model, batches = two_adapters(kind, path)
    batch = batches[0]
    names = ["other", BASE, "default", "other"]
    mixed = output(model, batch, adapter_names=names)
    for i, name in enumerate(names):
        one = (
            (batch[0][i : i + 1], batch[1][i : i + 1])
            if isinstance(batch, tuple)
            else {"input_ids": batch["input_ids"][i : i + 1]}
        )
        if name == BASE:
            with model.disable_adapters():
                alone = output(model, one)
        else:
            model.set_adapter(name)
            alone = output(model, one)
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_mixed_generate_equals_each_prompt_alone():
    _, model, _ = two_adapters("llama")
    prompts = torch.randint(64, (3, 5), generator=torch.Generator().manual_seed(4))
    names = ["default", "other", BASE]
    mixed = model.generate(input_ids=prompts, adapter_names=names, max_new_tokens=4, do_sample=False)
    for i, name in enumerate(names):
        if name == BASE:
            with model.disable_adapters():
                alone = model.generate(input_ids=prompts[i : i + 1], max_new_tokens=4, do_sample=False)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=prompts[i : i + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(mixed[i : i + 1], alone)


def test_save_layout_and_reload(tmp_path):
    base, model, batches = two_adapters("bert")
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = output(model, batches[0])
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (
        tmp_path / "other" / "adapter_config.json"
    ).is_file()
    loaded = SpectralModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    assert loaded.active_adapters == ["default"]
    torch.testing.assert_close(output(loaded.eval(), batches[0]), expected["default"])
    loaded.set_adapter("other")
    torch.testing.assert_close(output(loaded, batches[0]), expected["other"])
    assert loaded.num_trainable_parameters() == 0  # loaded for inference


def test_peft_format_save_for_fourierft_and_refusal_for_s2ft(tmp_path):
    base, model, batches = two_adapters("bert")
    model.save_pretrained(tmp_path / "peft", selected_adapters=["default"], format="peft")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    model.set_adapter("default")
    torch.testing.assert_close(
        reference(input_ids=batches[0]["input_ids"]).logits, output(model, batches[0]), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="no Hugging Face PEFT format"):
        model.save_pretrained(tmp_path / "s2ft", selected_adapters=["other"], format="peft")
    assert not (tmp_path / "s2ft").exists()
    # and a PEFT folder loads as a named adapter next to the others
    model.load_adapter(tmp_path / "peft", "from_peft")
    model.set_adapter("from_peft")
    torch.testing.assert_close(
        output(model, batches[0]), reference(input_ids=batches[0]["input_ids"]).logits, atol=1e-5, rtol=1e-5
    )


def test_bad_adapter_operations_change_nothing(tmp_path):
    _, model, batches = two_adapters("bert")
    before = output(model, batches[0])
    config = FourierFTConfig(target_modules=["query"], n_frequency=8)
    with pytest.raises(ValueError, match="already has an adapter named 'other'"):
        model.add_adapter("other", config)
    with pytest.raises(ValueError, match="reserved"):
        model.add_adapter(BASE, config)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.set_adapter("nope")
    model.add_adapter("fresh", S2FTConfig(target_modules=["query"], n_frequency=8))
    with pytest.raises(RuntimeError, match="calibrate"):
        model.set_adapter("fresh")
    with pytest.raises(ValueError, match="2 names for a batch of 4"):
        output(model, batches[0], adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="unknown adapter names"):
        output(model, batches[0], adapter_names=["x"] * 4)
    model.merge()
    with pytest.raises(RuntimeError, match="while adapters are merged"):
        output(model, batches[0], adapter_names=["default"] * 4)
    model.unmerge()
    peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"])).save_pretrained(
        tmp_path / "lora"
    )
    with pytest.raises(ValueError, match="PEFT LORA adapter"):
        model.load_adapter(tmp_path / "lora", "lora")
    assert "lora" not in model.peft_config
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(output(model, batches[0]), before)


def test_all_linear_and_tied_weights_warn():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    model = get_spectral_model(
        copy.deepcopy(llama), FourierFTConfig(target_modules="all-linear", n_frequency=8)
    )
    names = set(model.spectral_layers())
    assert (
        "lm_head" not in names
        and any(n.endswith("q_proj") for n in names)
        and any(n.endswith("down_proj") for n in names)
    )
    with pytest.warns(UserWarning, match="lm_head's weight is tied to model.embed_tokens.weight"):
        get_spectral_model(copy.deepcopy(llama), FourierFTConfig(target_modules=["lm_head"], n_frequency=8))
    assert tiny_llama() is not None


def test_trainer_checkpoints_hold_only_the_adapters_and_resume(tmp_path):
    """A tied-embedding Llama (as SmolLM2): the full state dict would not save with safetensors."""
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    model = get_spectral_model(llama, FourierFTConfig(target_modules=["q_proj", "v_proj"], n_frequency=8))
    ids = torch.randint(64, (16, 8), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    def run(steps, resume=None):
        args = TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            max_steps=steps,
            save_strategy="steps",
            save_steps=2,
            learning_rate=0.05,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        Trainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume)

    run(2)
    saved = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert saved and all(".adapters." in k for k in saved)
    assert len(saved) == 2 * 2 * 2  # 2 layers x q/v x (coeffs, flat locations)
    coeffs = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(saved[k], coeffs[k]) for k in saved)
    run(4, resume=str(tmp_path / "checkpoint-2"))
    assert (tmp_path / "checkpoint-4").is_dir()


def test_served_delta_follows_the_coefficients():
    """Without autograd the layer uses a cached dense ΔW; any change to the coefficients or the plan rebuilds it."""
    _, model, batches = two_adapters("gpt2")
    first = output(model, batches[0])
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.adapters["default"].coeffs.mul_(2.0)
    doubled = output(model, batches[0])
    assert not torch.allclose(first, doubled)
    with torch.enable_grad():  # the autograd path computes ΔW afresh: the same outputs
        again = model(input_ids=batches[0]["input_ids"]).logits.detach()
    torch.testing.assert_close(again, doubled, atol=1e-5, rtol=1e-5)
    layer = next(iter(model.spectral_layers().values()))
    adapter = layer.adapters["default"]
    adapter.set_locations(adapter.rows.flip(0), adapter.cols, None, None)
    assert not torch.equal(output(model, batches[0]), doubled)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_coefficients_stored_in_16_bits(tmp_path, dtype):
    base, model, batches = two_adapters("bert")
    model.save_pretrained(tmp_path / "16", selected_adapters=["default"], coefficient_dtype=dtype)
    model.save_pretrained(tmp_path / "32", selected_adapters=["default"])
    small = (tmp_path / "16" / "adapter_model.safetensors").stat().st_size
    large = (tmp_path / "32" / "adapter_model.safetensors").stat().st_size
    saved = 4 * 24 * 2  # 4 matrices x 24 coefficients x 2 bytes
    assert saved - 8 <= large - small <= saved  # the header is padded to a multiple of 8 bytes
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "16" / "adapter_model.safetensors")
    assert {v.dtype for k, v in stored.items() if k.endswith(".coeffs")} == {dtype}
    loaded = SpectralModel.from_pretrained(copy.deepcopy(base), tmp_path / "16")
    for name, layer in loaded.spectral_layers().items():
        expected = model.spectral_layers()[name].adapters["default"].coeffs.detach().to(dtype).float()
        assert layer.coeffs.dtype == torch.float32 and torch.equal(layer.coeffs, expected)
    with pytest.raises(ValueError, match="coefficient_dtype"):
        model.save_pretrained(tmp_path / "8", coefficient_dtype=torch.int8)


def test_walks_over_the_model_do_not_grow_with_the_adapters():
    """``outer_modules`` is ``named_modules`` without the per-adapter subtrees, in the same order, and visits as
    many modules with 20 adapters as with one (loading and serving walk the model on every call)."""
    factory, targets, saves = MODELS["bert"]
    options = {"target_modules": targets, "modules_to_save": saves, "n_frequency": 8}
    model = get_spectral_model(factory(), FourierFTConfig(**options))
    one = [name for name, _ in outer_modules(model)]
    for i in range(19):
        model.add_adapter(f"a{i}", FourierFTConfig(seed=i, **options))
    walked = list(outer_modules(model))
    assert [name for name, _ in walked] == one
    inside = [
        prefix + "." + key
        for prefix, module in model.named_modules()
        for key in (
            ("adapters",)
            if isinstance(module, SpectralLayer)
            else ("copies",)
            if isinstance(module, TrainedCopy)
            else ()
        )
    ]
    expected = [
        (n, m) for n, m in model.named_modules() if not any(n == p or n.startswith(p + ".") for p in inside)
    ]
    assert [(n, id(m)) for n, m in walked] == [(n, id(m)) for n, m in expected]
    assert len(list(model.named_modules())) > len(walked) + 19 * 2  # the adapters are there, unvisited
