"""``--task causal-lm`` end to end on a tiny random Llama with a word-level tokenizer, and its data and errors."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from s2ft.cli import main
from s2ft.errors import RunError

WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "was",
    "she",
    "he",
    "her",
    "his",
    "it",
    "that",
    "had",
    "not",
    "be",
    "with",
    "for",
    "as",
    "you",
]
WORDS += [
    "emma",
    "harriet",
    "elton",
    "knightley",
    "weston",
    "woodhouse",
    "frank",
    "jane",
    "churchill",
    "fairfax",
]
CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def write_tiny_llama(folder) -> str:
    """A 2-layer random Llama and a word-level tokenizer with a chat template, saved like any model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + [".", ","])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT
    os.makedirs(folder, exist_ok=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def write_text(path, count: int = 120) -> str:
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + " ." for _ in range(count)]
    path.write_text("\n\n".join(paragraphs) + "\n")
    return str(path)


def write_instructions(path, count: int = 80) -> str:
    rng = random.Random(1)
    rows = []
    for i in range(count):
        prompt = " ".join(rng.choice(WORDS) for _ in range(5))
        rows.append(
            {"prompt": prompt, "response": "emma and harriet ."}
            if i % 2
            else {"prompt": prompt, "response": "he was not ."}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return (
        write_tiny_llama(root / "model"),
        write_text(root / "corpus.txt"),
        write_instructions(root / "chat.jsonl"),
    )


def finetune(model, data, output, *extra) -> int:
    from tests.helpers import taken

    method = extra[extra.index("--method") + 1] if "--method" in extra else "s2ft"
    argv = ["finetune", "--task", "causal-lm", "--model", model, "--dataset", data, "--output", str(output)]
    argv += ["--quiet", "--max-length", "32", "--batch-size", "8", "--epochs", "2"]
    argv += ["--lr", "0.05", "--eval-samples", "0"]
    argv += taken(method, "--n-frequency", "32", "--calibration-batches", "2", "--scaling", "150")
    return main([*argv, *extra])


@pytest.mark.parametrize("method", ["s2ft", "fourierft", "lora"])
def test_causal_lm_end_to_end(tiny, tmp_path, method):
    model, corpus, _ = tiny
    out = tmp_path / "run"
    lr = ["--lr", "0.01"] if method == "lora" else []
    assert finetune(model, corpus, out, "--method", method, *lr) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "causal-lm"
    for key in ("val_perplexity", "test_perplexity", "base_val_perplexity", "base_test_perplexity"):
        assert metrics[key] > 1.0
    assert metrics["test_perplexity"] < metrics["base_test_perplexity"]  # it learns the corpus's words
    samples = (out / "samples.md").read_text()
    assert samples.count("- before:") == 3 and samples.count("- after:") == 3
    assert not (out / ".samples_before.json").exists()


def test_evaluate_and_merge_reproduce_the_run(tiny, tmp_path):
    from s2ft.jobs.evaluate import run_evaluate
    from s2ft.jobs.runs import load_trained

    model, corpus, _ = tiny
    out, merged = tmp_path / "run", tmp_path / "merged"
    assert finetune(model, corpus, out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert run_evaluate(str(out), "test", quiet=True)["perplexity"] == pytest.approx(
        metrics["test_perplexity"], rel=1e-5
    )
    assert main(["merge", "--adapter", str(out), "--output", str(merged)]) == 0
    prompt = "emma and harriet"
    script = f"""
import sys, json
sys.modules["s2ft"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(merged)!r}).eval()
tok = AutoTokenizer.from_pretrained({str(merged)!r})
ids = tok({prompt!r}, return_tensors="pt")
print(json.dumps(model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0].tolist()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    adapted, tokenizer, _ = load_trained(str(out))
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        expected = (
            adapted.eval().generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0].tolist()
        )
    assert plain == expected


def test_instruction_data_trains_on_the_response_only(tiny):
    from s2ft.jobs.args import FinetuneArgs
    from s2ft.tasks import get_task

    model, _, chat = tiny
    task = get_task("causal-lm")
    loaded = task.load_model(model, {})
    args = FinetuneArgs(task="causal-lm", model=model, dataset=chat, max_length=40).resolved()
    data = task.load_data(args)
    prepared = task.prepare(data.train, loaded.processor, args, "train")
    tokenizer = loaded.processor
    for example, raw in zip(prepared, data.train):
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": raw["prompt"]}], add_generation_prompt=True, tokenize=True
        )
        prompt_ids = (
            prompt_ids["input_ids"]
            if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids")
            else prompt_ids
        )
        n = len(prompt_ids)
        assert example["input_ids"][:n] == list(prompt_ids)
        assert example["labels"][:n] == [-100] * n
        response = tokenizer(raw["response"], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        assert example["labels"][n:] == response == example["input_ids"][n:]


def write_long_prompts(path, long: int, short: int) -> str:
    """``long`` examples whose prompt (40 words) fills --max-length 32, then ``short`` ones of 3 words."""
    rows = [{"prompt": " ".join(["emma"] * 40), "response": "he was not ."}] * long
    rows += [{"prompt": f"the {w} and", "response": "emma and harriet ."} for w in WORDS[:short]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_examples_whose_prompt_fills_max_length_are_dropped_with_a_warning(tiny, tmp_path, caplog):
    from s2ft.jobs.args import FinetuneArgs
    from s2ft.tasks import get_task

    model = tiny[0]
    task = get_task("causal-lm")
    tokenizer = task.load_model(model, {}).processor
    data = write_long_prompts(tmp_path / "long.jsonl", long=7, short=20)
    args = FinetuneArgs(task="causal-lm", model=model, dataset=data, max_length=32).resolved()
    train = task.load_data(args).train
    long = sum(len(prompt.split()) == 40 for prompt in train["prompt"])
    assert 0 < long < len(train)
    with caplog.at_level("WARNING", logger="s2ft"):
        prepared = task.prepare(train, tokenizer, args, "train")
    assert len(prepared) == len(train) - long
    assert all(len(ids) < 32 for ids in prepared["input_ids"])  # the short ones, whole
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"the train split: dropped {long} of {len(train)} examples" in warning
    assert "prompt that fills --max-length 32" in warning
    with pytest.raises(RunError, match=f"all {len(train)} have a prompt that fills --max-length 5"):
        task.prepare(train, tokenizer, dataclasses.replace(args, max_length=5), "train")


def test_a_split_left_empty_by_max_length_is_refused(tiny, tmp_path, capsys):
    data = write_long_prompts(tmp_path / "long.jsonl", long=30, short=0)
    assert finetune(tiny[0], data, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "the train split has no example left to train or score on" in err and "raise --max-length" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_instruction_run(tiny, tmp_path):
    model, _, chat = tiny
    assert finetune(model, chat, tmp_path / "run", "--method", "fourierft") == 0


@pytest.mark.parametrize(
    "rows, message",
    [
        ("", "no text in it"),
        (json.dumps({"prompt": "a b"}) + "\n", "line 1: an instruction example needs a string 'response'"),
        (json.dumps({"title": "x"}) + "\n", "needs 'text', or 'prompt' and 'response'"),
        (json.dumps({"text": 123}) + "\n", "line 1: a text example needs a string 'text', but it holds 123"),
        (
            json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}) + "\n",
            "line 1: message 1 of 'messages' needs a string 'content', and it has none",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}]})
            + "\n",
            "line 1: message 1 of 'messages' needs a string 'content', but it holds 7 (of type int)",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]})
            + "\n",
            "line 1: the assistant's message (the last, which is trained) is empty",
        ),
    ],
)
def test_bad_causal_lm_data(tiny, tmp_path, capsys, rows, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(rows)
    assert finetune(tiny[0], str(data), tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_context_too_long_and_encoder_models_are_refused(tiny, tmp_path, capsys):
    from tests.helpers import write_tiny_model

    model, corpus, _ = tiny
    assert finetune(model, corpus, tmp_path / "a", "--max-length", "100") == 2
    assert "longer than the model's context of 64" in capsys.readouterr().err
    encoder = write_tiny_model(tmp_path / "bert")
    assert finetune(encoder, corpus, tmp_path / "b") == 2
    assert "not a causal language model" in capsys.readouterr().err


def test_compare_and_analyze_on_causal_lm(tiny, tmp_path):
    model, corpus, _ = tiny
    common = ["--task", "causal-lm", "--model", model, "--dataset", corpus, "--quiet", "--n-frequency", "16"]
    common += ["--max-length", "32", "--batch-size", "8", "--max-steps", "2", "--calibration-batches", "2"]
    assert (
        main(
            [
                "compare",
                *common,
                "--output",
                str(tmp_path / "cmp"),
                "--variants",
                "fourierft",
                "s2ft",
                "--seeds",
                "0",
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert results["task"]["metric"] == "perplexity" and results["task"]["higher_is_better"] is False
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert "test perplexity" in table and "Base test perplexity" in table
    assert (tmp_path / "cmp" / "perplexity_vs_size.png").is_file()
    assert main(["analyze", *common, "--output", str(tmp_path / "an")]) == 0
    analysis = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert len(analysis["prior"]) == 4  # q_proj and v_proj of two layers


@pytest.mark.parametrize("bits", ["4bit", "8bit", "torchao-int8", "torchao-int4"])
def test_quantized_base_end_to_end(tiny, tmp_path, bits):
    """--quantize: the base's linear layers are bitsandbytes layers or hold torchao's quantized weights (the LM
    head stays float), S2FT trains on them, evaluate reloads the same quantized base and reproduces the run, and
    merge writes a float model that plain transformers loads and that computes what the adapted model computes on
    its dequantized weights (bitsandbytes' 8-bit layers also round their inputs, so the quantized forward itself
    differs by that rounding)."""
    pytest.importorskip("torchao" if bits.startswith("torchao") else "bitsandbytes")
    from s2ft.jobs.evaluate import run_evaluate
    from s2ft.jobs.runs import load_trained
    from s2ft.tuner.kinds import find_kind

    model, corpus, _ = tiny
    out, merged = tmp_path / "run", tmp_path / "merged"
    assert finetune(model, corpus, out, "--quantize", bits) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_perplexity"] < metrics["base_test_perplexity"]
    adapted, tokenizer, run = load_trained(str(out))
    assert run["args"]["quantize"] == bits
    kinds = {
        type(m.base_layer).__name__ for m in adapted.get_base_model().modules() if hasattr(m, "base_layer")
    }
    expected = {"4bit": ("Linear4bit", "linear4bit"), "8bit": ("Linear8bitLt", "linear8bit")}
    layer_class, kind = expected.get(bits, ("Linear", "torchao"))
    assert kinds == {layer_class}
    layers = [m.base_layer for m in adapted.get_base_model().modules() if hasattr(m, "base_layer")]
    assert {find_kind(m).name for m in layers} == {kind}
    assert find_kind(adapted.get_base_model().lm_head).name == "linear"
    assert run_evaluate(str(out), "test", quiet=True)["perplexity"] == pytest.approx(
        metrics["test_perplexity"], rel=1e-5
    )
    assert main(["merge", "--adapter", str(out), "--output", str(merged)]) == 0
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    assert not any("bitsandbytes" in type(m).__module__ for m in plain.modules())
    assert all(type(p) is torch.nn.Parameter for p in plain.parameters())  # no torchao tensor left
    from s2ft.tuner.kinds import dequantize_modules

    dequantize_modules(adapted.get_base_model(), torch.float32)  # unmerged: ΔW x still beside the layer
    ids = tokenizer("emma and harriet", return_tensors="pt")
    with torch.no_grad():
        expected = adapted.eval()(**ids).logits
        got = plain(**ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_quantize_is_refused_for_other_tasks(capsys):
    assert main(["finetune", "--task", "text-classification", "--quantize", "4bit", "--quiet"]) == 2
    assert "--quantize is for the causal-lm task" in capsys.readouterr().err
