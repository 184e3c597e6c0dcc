"""TRL's trainers on s2ft models: SFTTrainer (fused LM-head loss, packing, assistant-only and completion-only loss,
adapter-only checkpoints, resuming) and DPOTrainer, on a tiny random Llama with a small word-level tokenizer."""

from __future__ import annotations

import math
import os

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from s2ft import FourierFTConfig, S2FTConfig, SpectralModel, get_spectral_model  # noqa: E402

# ChatML with generation markers around the assistant's turns, so TRL can mask everything else
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ["user", "assistant", "hi", "hello", "there", "yes", "no", "good", "bad", "say", "more"]
TARGETS = ["q_proj", "v_proj"]


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of 48 tokens with a ChatML template (the tests' vocabulary stays small)."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", *WORDS, *map(str, range(32))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    tok.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def chat_data(n: int = 16) -> Dataset:
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"hi {i} say {'yes' if i % 2 else 'no'}"},
                    {"role": "assistant", "content": f"hello there {i} {'yes' if i % 2 else 'no'} good"},
                ]
            }
            for i in range(n)
        ]
    )


def spectral(method: str, tok: PreTrainedTokenizerFast, seed: int = 0) -> SpectralModel:
    """A tiny Llama with an adapter on q_proj, v_proj; S2FT calibrated on four batches of the chat data."""
    model = tiny_llama(len(tok), seed)
    if method == "fourierft":
        return get_spectral_model(
            model, FourierFTConfig(target_modules=TARGETS, n_frequency=20, scaling=10.0)
        )
    wrapped = get_spectral_model(model, S2FTConfig(target_modules=TARGETS, n_frequency=20, scaling=10.0))
    texts = [tok.apply_chat_template(example["messages"], tokenize=False) for example in chat_data(16)]
    batches = []
    for first in range(0, 16, 4):
        ids = tok(texts[first : first + 4], return_tensors="pt", padding=True)
        labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
        batches.append({**ids, "labels": labels})
    wrapped.calibrate(batches)
    return wrapped


def sft_args(output_dir, **options) -> trl.SFTConfig:
    base = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    return trl.SFTConfig(**{**base, **options})


def coefficients(model: SpectralModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(".coeffs")}


def frozen(model: SpectralModel) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone() for k, v in model.get_base_model().state_dict().items() if ".adapters." not in k
    }


def test_base_model_is_the_backbone_as_transformers_names_it():
    model = get_spectral_model(tiny_llama(48), FourierFTConfig(target_modules=TARGETS, n_frequency=4))
    assert model.base_model is model.get_base_model().model  # the LlamaModel TRL runs for its fused loss
    assert model.get_base_model() is model.model and isinstance(model.model, LlamaForCausalLM)
    toy = get_spectral_model(
        torch.nn.Sequential(torch.nn.Linear(4, 4)), FourierFTConfig(target_modules=["0"], n_frequency=4)
    )
    assert toy.base_model is toy.get_base_model()  # no backbone: the wrapped model, as transformers does


def test_older_state_dicts_and_pickles_load():
    """s2ft kept the wrapped model under ``base_model``: its Trainer checkpoints and pickles still load."""
    config = FourierFTConfig(target_modules=TARGETS, n_frequency=4)
    trained = get_spectral_model(tiny_llama(48), config)
    for param in trained.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param)
    old = {"base_model." + k.removeprefix("model."): v for k, v in trained.state_dict().items()}
    fresh = get_spectral_model(tiny_llama(48), config)
    fresh.load_state_dict(old)
    assert all(torch.equal(v, coefficients(trained)[k]) for k, v in coefficients(fresh).items())
    state = trained.__dict__.copy()
    state["_modules"] = {"base_model": state["_modules"]["model"]}
    revived = type(trained).__new__(type(trained))
    revived.__setstate__(state)
    assert revived.get_base_model() is trained.model and revived.spectral_layers()


def test_disable_adapter_runs_the_base_model():
    base = tiny_llama(48)
    ids = torch.randint(0, 48, (2, 6))
    expected = base(input_ids=ids).logits
    model = get_spectral_model(base, FourierFTConfig(target_modules=TARGETS, n_frequency=4, scaling=10.0))
    for param in model.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param)
    assert not torch.allclose(model(input_ids=ids).logits, expected)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert not torch.allclose(model(input_ids=ids).logits, expected)


@pytest.mark.parametrize("method", ["fourierft", "s2ft"])
def test_sft_trains_adapters_with_the_fused_loss_and_checkpoints_only_them(method, tmp_path):
    tok = tokenizer()
    model = spectral(method, tok)
    before, base = coefficients(model), frozen(model)
    args = sft_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=chat_data(), processing_class=tok)
    trainer.train()
    assert trainer.model is model
    after = coefficients(model)
    assert all(not torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(v, base[k]) for k, v in frozen(model).items())
    # the fused LM head (TRL's default loss) computes the model's own loss, through the adapters
    batch = tok(["<|im_start|> user hi 3 <|im_end|>"], return_tensors="pt")
    fused = model(**batch, labels=batch["input_ids"], fused_lm_head=True).loss
    torch.testing.assert_close(fused, model(**batch, labels=batch["input_ids"]).loss, rtol=1e-5, atol=1e-5)
    with safe_open(tmp_path / "checkpoint-2" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(".adapters.default." in k for k in keys)
    assert {k for k in keys if k.endswith(".coeffs")} == set(after)


@pytest.mark.parametrize("method", ["fourierft", "s2ft"])
def test_sft_resumes_from_a_checkpoint_to_the_same_coefficients(method, tmp_path):
    tok = tokenizer()
    straight = spectral(method, tok)
    args = sft_args(tmp_path / "a", save_strategy="steps", save_steps=2)
    trl.SFTTrainer(model=straight, args=args, train_dataset=chat_data(), processing_class=tok).train()
    resumed = spectral(method, tok)
    args = sft_args(tmp_path / "b", save_strategy="no")
    trainer = trl.SFTTrainer(model=resumed, args=args, train_dataset=chat_data(), processing_class=tok)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    expected, got = coefficients(straight), coefficients(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_sft_assistant_only_loss_masks_all_but_the_assistant(tmp_path):
    tok = tokenizer()
    model = spectral("fourierft", tok)
    args = sft_args(tmp_path, max_steps=2, assistant_only_loss=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=chat_data(), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    answer = tok.convert_tokens_to_ids(["hello", "there", "good", "<|im_end|>"])
    prompt = tok.convert_tokens_to_ids(["<|im_start|>", "user", "hi", "say", "assistant"])
    trained = batch["labels"][batch["labels"] != -100]
    assert set(answer) <= set(trained.tolist()) and not set(prompt) & set(trained.tolist())
    before = coefficients(model)
    trainer.train()
    assert all(not torch.equal(v, before[k]) for k, v in coefficients(model).items())


def test_sft_completion_only_loss_on_prompt_completion_data(tmp_path):
    tok = tokenizer()
    data = Dataset.from_list([{"prompt": f"hi {i} say", "completion": f" hello {i} good"} for i in range(16)])
    model = spectral("fourierft", tok)
    trainer = trl.SFTTrainer(
        model=model, args=sft_args(tmp_path, max_steps=2), train_dataset=data, processing_class=tok
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trained = set(batch["labels"][batch["labels"] != -100].tolist())
    assert trained and not trained & set(tok.convert_tokens_to_ids(["hi", "say"]))
    before = coefficients(model)
    trainer.train()
    assert all(not torch.equal(v, before[k]) for k, v in coefficients(model).items())


def test_sft_packing_is_padding_free(tmp_path):
    tok = tokenizer()
    model = spectral("fourierft", tok)
    args = sft_args(tmp_path, max_steps=2, packing=True, max_length=64)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=chat_data(), processing_class=tok)
    assert trainer.padding_free
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch  # sequences flattened, no padding
    before = coefficients(model)
    trainer.train()
    assert all(not torch.equal(v, before[k]) for k, v in coefficients(model).items())
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


def preference_data(n: int = 8) -> Dataset:
    return Dataset.from_list(
        [{"prompt": f"hi {i} say", "chosen": f" yes {i} good", "rejected": f" no {i} bad"} for i in range(n)]
    )


def dpo_args(output_dir, **options) -> trl.DPOConfig:
    base = dict(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    return trl.DPOConfig(**{**base, **options})


def test_dpo_precomputed_reference_is_the_model_before_training(tmp_path):
    """With ``precompute_ref_log_probs``, the reference is the s2ft model before its first step (zero ``ΔW``:
    the base model) and no second model is kept: the first step's loss is log 2 (policy = reference)."""
    tok = tokenizer()
    model = spectral("fourierft", tok)
    before = coefficients(model)
    args = dpo_args(tmp_path, precompute_ref_log_probs=True)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=preference_data(), processing_class=tok)
    assert trainer.ref_model is None
    trainer.train()
    first = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(not torch.equal(v, before[k]) for k, v in coefficients(model).items())


def test_dpo_default_reference_is_a_second_copy_of_the_base(tmp_path):
    """Without ``ref_model``, TRL loads the reference again from ``config._name_or_path``: the base model (one
    more copy in memory), not the s2ft model under ``disable_adapter``, which TRL only uses for PEFT models."""
    tok = tokenizer()
    tiny_llama(len(tok)).save_pretrained(tmp_path / "base")
    model = get_spectral_model(
        LlamaForCausalLM.from_pretrained(tmp_path / "base"),
        FourierFTConfig(target_modules=TARGETS, n_frequency=20, scaling=10.0),
    )
    trainer = trl.DPOTrainer(
        model=model, args=dpo_args(tmp_path / "out"), train_dataset=preference_data(), processing_class=tok
    )
    assert type(trainer.ref_model) is LlamaForCausalLM
    reference = trainer.ref_model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in frozen(model).items() if k in reference)
    trainer.train()
    first = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert os.path.isdir(tmp_path / "out")
