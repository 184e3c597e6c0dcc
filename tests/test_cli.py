"""``s2ft finetune / evaluate / merge`` end to end on a tiny local model and a tiny dataset file."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from s2ft.cli import main
from s2ft.tasks import RunError

WORDS = {
    "sea": ["wave", "ship", "salt", "tide", "harbour", "sail", "anchor", "gull"],
    "land": ["hill", "field", "stone", "road", "farm", "wheat", "fence", "barn"],
    "sky": ["cloud", "star", "moon", "wind", "rain", "storm", "sun", "dawn"],
}


def write_tiny_model(folder, dropout: float = 0.1) -> str:
    """A 2-layer random BERT with a word-level tokenizer, saved like any local model folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "of"]
    vocab += sorted(w for words in WORDS.values() for w in words)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizerFast(os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    return str(folder)


def write_dataset(path, count: int = 240, labels=tuple(WORDS)) -> str:
    rng = random.Random(0)
    rows = []
    for i in range(count):
        topic = labels[i % len(labels)]
        words = [rng.choice(WORDS[topic]) for _ in range(rng.randint(4, 9))]
        rows.append({"text": " ".join(["the", *words]) + f" {i}", "label": topic})
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_dataset(root / "data.jsonl")


def taken(method: str, *flags: str) -> list[str]:
    """``flags`` (``"--n-frequency", "64", ...``, pairs) but those of options ``method`` does not take (which
    finetune refuses)."""
    from s2ft.methods import METHODS

    names = {o.flag for o in METHODS[method].options} if method in METHODS else set()
    pairs = zip(flags[::2], flags[1::2])
    return [item for flag, value in pairs if flag in names for item in (flag, value)]


def finetune(tiny, output, *extra) -> int:
    model, data = tiny
    method = extra[extra.index("--method") + 1] if "--method" in extra else "s2ft"
    argv = ["finetune", "--model", model, "--dataset", data, "--output", str(output), "--quiet"]
    argv += taken(method, "--n-frequency", "64", "--calibration-batches", "4")
    argv += ["--epochs", "2", "--batch-size", "8"]
    argv += ["--head-warmup-steps", "2"]  # the default, 100, is sized for the real task
    return main([*argv, *extra])


@pytest.mark.parametrize("method", ["s2ft", "fourierft", "dct", "lora", "full"])
def test_finetune_writes_a_complete_run(tiny, tmp_path, method):
    out = tmp_path / "run"
    assert finetune(tiny, out, "--method", method) == 0
    assert sorted(os.listdir(out)) == [".s2ft-output", "adapter", "log.txt", "metrics.json", "run.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "method",
        "model",
        "dataset",
        "trainable_params",
        "adapter_bytes",
        "calibration_seconds",
        "train_seconds",
        "peak_memory_mb",
        "val_accuracy",
        "test_accuracy",
        "seed",
    ):
        assert key in metrics, key
    assert metrics["method"] == method
    assert (metrics["calibration_seconds"] > 0) == (method == "s2ft")
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    if method in ("s2ft", "fourierft", "dct"):
        assert metrics["adapter_bytes"] == os.path.getsize(out / "adapter" / "adapter_model.safetensors")
        parts = metrics["adapter_bytes_parts"]
        assert sum(parts.values()) == metrics["adapter_bytes"] and parts["coefficients"] == 4 * 64 * 4
        assert (parts["permutations"] > 0) == (method == "s2ft") and (parts["locations"] > 0) == (
            method == "s2ft"
        )
        # 4 matrices x 64 coefficients + the 3-class head (3x32 + 3)
        assert metrics["trainable_params"] == 4 * 64 + 99
    assert "train" in (out / "log.txt").read_text()


def test_evaluate_and_merge_reproduce_the_run(tiny, tmp_path):
    out, merged = tmp_path / "run", tmp_path / "merged"
    assert finetune(tiny, out, "--method", "s2ft", "--lr", "0.2") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    from s2ft.jobs.evaluate import run_evaluate

    assert run_evaluate(str(out), "test", quiet=True)["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert run_evaluate(str(out / "adapter"), "validation", quiet=True)["accuracy"] == pytest.approx(
        metrics["val_accuracy"]
    )
    assert main(["merge", "--adapter", str(out), "--output", str(merged)]) == 0
    # The merged model loads and predicts with transformers alone: s2ft is made unimportable in that process.
    script = f"""
import sys, json, torch
sys.modules["s2ft"] = None
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained({str(merged)!r}).eval()
tok = AutoTokenizer.from_pretrained({str(merged)!r})
batch = tok(["the wave ship salt", "the cloud star moon rain"], return_tensors="pt", padding=True)
with torch.no_grad():
    print(json.dumps(model(**batch).logits.tolist()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    logits = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    from s2ft.jobs.runs import load_trained

    model, tok, _ = load_trained(str(out))
    batch = tok(["the wave ship salt", "the cloud star moon rain"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model.eval()(**batch).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_existing_output_is_refused_without_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(tiny, out, "--method", "fourierft", "--max-steps", "1") == 0
    before = sorted(os.listdir(out))
    assert finetune(tiny, out, "--method", "fourierft", "--max-steps", "1") == 2
    assert "already holds an s2ft output" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before
    assert finetune(tiny, out, "--method", "fourierft", "--max-steps", "2", "--overwrite") == 0
    assert json.loads((out / "metrics.json").read_text())["args"]["max_steps"] == 2
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no staging or set-aside folder left behind


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"sentence": "a", "label": "x"}], "text"),
        ([{"text": "a", "topic": "x"}], "label"),
        ([], "empty|no examples"),
    ],
)
def test_bad_datasets_are_refused(tiny, tmp_path, capsys, rows, message):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert finetune((tiny[0], str(data)), out) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists() and [p for p in os.listdir(tmp_path) if "s2ft" in p] == []


def test_unknown_method_and_unmatched_targets(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        finetune(tiny, tmp_path / "a", "--method", "adalora")
    assert "invalid choice" in capsys.readouterr().err
    assert finetune(tiny, tmp_path / "b", "--targets", "q_proj") == 2
    assert "matched no module" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert finetune(tiny, tmp_path / "c", "--lr", "-0.1") == 2
    assert "--lr must be a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_interrupt_leaves_no_half_written_adapter(tiny, tmp_path, monkeypatch, capsys):
    import transformers

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.Trainer, "train", interrupted)
    out = tmp_path / "run"
    assert finetune(tiny, out, "--method", "s2ft") == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and [p for p in os.listdir(tmp_path) if "s2ft" in p] == []


def test_compare_end_to_end(tiny, tmp_path, monkeypatch):
    from s2ft.jobs.compare import VARIANTS

    model, data = tiny
    out = tmp_path / "compare"
    argv = [
        "compare",
        "--model",
        model,
        "--dataset",
        data,
        "--output",
        str(out),
        "--quiet",
        "--seeds",
        "0",
        "1",
    ]
    argv += ["--n-frequency", "64", "--calibration-batches", "2", "--max-steps", "3", "--batch-size", "8"]
    argv += ["--head-warmup-steps", "2"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in results["summary"]] == list(VARIANTS)
    assert len(results["runs"]) == 2 * len(VARIANTS)
    by = {r["variant"]: r for r in results["summary"]}
    assert by["s2ft-half"]["trainable_params"] == by["s2ft"]["trainable_params"] - 4 * 32
    assert by["s2ft"]["adapter_bytes"] > by["fourierft"]["adapter_bytes"]  # the permutations are stored too
    assert by["full"]["trainable_params"] > by["lora"]["trainable_params"] > by["s2ft"]["trainable_params"]
    table = (out / "results.md").read_text()
    assert all(r["label"] in table for r in results["summary"])
    assert (
        "S2FT, n = 32" in table and "LoRA r = 8" in table and "DCT, n = 64" in table
    )  # labels name the budget
    assert "(seed 0)" in table and "(seed 1)" in table  # each seed has its own split
    png = (out / "accuracy_vs_size.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # a second invocation reuses the finished runs
    monkeypatch.setattr(
        "s2ft.jobs.compare.run_finetune", lambda args: (_ for _ in ()).throw(AssertionError("reran"))
    )
    assert main(argv) == 0


def test_compare_fourierft_s2ft_and_dct(tiny, tmp_path):
    """The comparison the DCT method was added for: its runs beside FourierFT's and S2FT's, paired with FourierFT."""
    model, data = tiny
    out = tmp_path / "compare"
    argv = ["compare", "--model", model, "--dataset", data, "--output", str(out), "--quiet", "--seeds", "0"]
    argv += ["--variants", "fourierft", "s2ft", "dct", "--n-frequency", "64", "--calibration-batches", "2"]
    argv += ["--max-steps", "3", "--batch-size", "8", "--head-warmup-steps", "2"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    by = {r["variant"]: r for r in results["summary"]}
    assert list(by) == ["fourierft", "s2ft", "dct"] and by["dct"]["label"] == "DCT, n = 64"
    assert by["dct"]["trainable_params"] == by["fourierft"]["trainable_params"]
    assert by["dct"]["calibration_seconds_mean"] == 0 < by["s2ft"]["calibration_seconds_mean"]
    paired = {p["label"]: p["differences"] for p in results["paired_with_fourierft"]}
    assert set(paired) == {"S2FT, n = 64", "DCT, n = 64"}
    run = {r["variant"]: r for r in results["runs"]}
    assert paired["DCT, n = 64"]["0"] == pytest.approx(
        run["dct"]["test_accuracy"] - run["fourierft"]["test_accuracy"]
    )
    config = json.loads((out / "runs" / "dct-seed0" / "adapter" / "adapter_config.json").read_text())
    assert config["method"] == "dct" and config["n_frequency"] == 64
    assert "| DCT, n = 64 |" in (out / "results.md").read_text()


def test_analyze_end_to_end(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "analysis"
    argv = ["analyze", "--model", model, "--dataset", data, "--output", str(out), "--quiet"]
    argv += [
        "--n-frequency",
        "64",
        "--calibration-batches",
        "2",
        "--batch-size",
        "8",
        "--full-finetune-steps",
        "2",
    ]
    assert main(argv) == 0
    analysis = json.loads((out / "analysis.json").read_text())
    assert set(analysis["prior"]) == {
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")
    }
    assert "full_finetune" in analysis
    report = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs and all(name in report for name in pngs)
    for name in pngs:
        data_bytes = (out / name).read_bytes()
        assert data_bytes[:8] == b"\x89PNG\r\n\x1a\n" and len(data_bytes) > 5_000
    # a warmed-up head changes the gradient the prior is made of
    warm = tmp_path / "warm"
    assert main([*argv[:6], str(warm), *argv[7:], "--head-warmup-steps", "3"]) == 0
    warmed = json.loads((warm / "analysis.json").read_text())
    name = "bert.encoder.layer.0.attention.self.query"
    assert warmed["prior"][name]["before"] != analysis["prior"][name]["before"]


def test_head_warmup_trains_only_the_head(tiny, tmp_path):
    from s2ft.jobs.args import FinetuneArgs
    from s2ft.jobs.training import warm_up_head
    from s2ft.tasks import get_task

    model_dir, data = tiny
    task = get_task("text-classification")
    loaded = task.load_model(model_dir, {"label_names": list(WORDS)})
    model, tokenizer, head = loaded.model, loaded.processor, loaded.head
    assert head == ["classifier"]
    model.requires_grad_(True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = FinetuneArgs(
        model=model_dir, dataset=data, head_warmup_steps=3, batch_size=8, quiet=True
    ).resolved()
    train = task.prepare(task.load_data(args).train, tokenizer, args, "train")
    warm_up_head(model, task.collator(tokenizer), args, str(tmp_path), train, head)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed == {"classifier.weight", "classifier.bias"}
    assert all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_and_warmup_reach_the_trainer(tmp_path, schedule):
    from s2ft.jobs.args import FinetuneArgs
    from s2ft.jobs.training import make_trainer

    model = torch.nn.Linear(2, 2)
    args = FinetuneArgs(lr=0.1, lr_schedule=schedule, warmup_ratio=0.1, quiet=True).resolved()
    trainer = make_trainer(model, None, args, str(tmp_path), groups=[{"params": list(model.parameters())}])
    trainer.args.learning_rate = 0.1
    trainer.optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = trainer.create_scheduler(num_training_steps=100, optimizer=trainer.optimizer)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        scheduler.step()
    # a linear warm-up over 10 of the 100 steps, then the schedule's decay from the peak over the other 90
    decay = {
        "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t)),
        "linear": lambda t: 1 - t,
        "constant": lambda t: 1.0,
    }[schedule]
    expected = [0.1 * s / 10 if s < 10 else 0.1 * decay((s - 10) / 90) for s in range(100)]
    assert lrs == pytest.approx(expected, abs=1e-9)
    with pytest.raises(RunError, match="--warmup-ratio must be a number in"):
        FinetuneArgs(warmup_ratio=1.0).resolved()
    with pytest.raises(RunError, match="--lr-schedule must be one of"):
        FinetuneArgs(lr_schedule="step").resolved()


def test_finetune_with_head_warmup(tiny, tmp_path):
    assert finetune(tiny, tmp_path / "run", "--head-warmup-steps", "2") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["head_warmup_seconds"] > 0 and metrics["args"]["head_warmup_steps"] == 2
    assert finetune(tiny, tmp_path / "bad", "--head-warmup-steps", "-1") == 2


def test_options_are_not_abbreviated(capsys):
    """compare has no --lr: it must be refused, not read as --lr-schedule (an abbreviation)."""
    from s2ft.cli import main

    with pytest.raises(SystemExit):
        main(["compare", "--lr", "constant"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --lr" in err
