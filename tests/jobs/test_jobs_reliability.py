"""The jobs never delete what they did not write and never return a wrong number without a word."""

from __future__ import annotations

import json
import os

import pytest

from s2ft.cli import main
from tests.helpers import WORDS, finetune


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A finished S2FT run of the tiny model."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert finetune(tiny, out, "--method", "s2ft", "--lr", "0.2") == 0
    return out


def run_rows(run_dir) -> list[dict]:
    """The examples of the data file a run was trained on."""
    with open(json.loads((run_dir / "run.json").read_text())["dataset"]) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------- data loss
def test_overwrite_refuses_a_folder_s2ft_did_not_write(tiny, tmp_path, capsys):
    source = tmp_path / "my_project"
    source.mkdir()
    (source / "main.py").write_text("print('mine')\n")
    assert finetune(tiny, source, "--max-steps", "1", "--overwrite") == 2
    assert "holds nothing s2ft wrote" in capsys.readouterr().err
    assert os.listdir(source) == ["main.py"] and (source / "main.py").read_text() == "print('mine')\n"


def test_a_users_partial_folder_is_never_deleted(tiny, tmp_path):
    mine = tmp_path / "run.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert finetune(tiny, tmp_path / "run", "--method", "fourierft", "--max-steps", "1") == 0
    assert (mine / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["run", "run.partial"]


@pytest.mark.parametrize("where", ["run", "adapter", "inside", "parent"])
def test_merge_output_may_not_overlap_the_run(trained, capsys, where):
    targets = {
        "run": trained,
        "adapter": trained / "adapter",
        "inside": trained / "merged",
        "parent": trained.parent,
    }
    before = sorted(os.listdir(trained))
    code = main(["merge", "--adapter", str(trained), "--output", str(targets[where]), "--overwrite"])
    assert code == 2 and "overlaps the run" in capsys.readouterr().err
    assert sorted(os.listdir(trained)) == before


@pytest.mark.parametrize("output", ["", "file"])
def test_bad_output_is_refused_before_the_job_runs(tiny, tmp_path, capsys, monkeypatch, output):
    from s2ft.tasks.text_classification import TextClassification

    def never(*args, **kwargs):
        raise AssertionError("the job ran")

    monkeypatch.setattr(TextClassification, "load_data", never)
    if output == "file":
        output = str(tmp_path / "a_file")
        (tmp_path / "a_file").write_text("x")
    assert finetune(tiny, output, "--max-steps", "1") == 2
    assert "--output" in capsys.readouterr().err


def test_read_only_parent_is_detected_without_root_rights(tiny, tmp_path, capsys, monkeypatch):
    """A folder that may not be written (root ignores chmod here, so a refused creation stands in for it)."""
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    assert finetune(tiny, tmp_path / "run", "--max-steps", "1") == 2
    assert "cannot write into" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- silent wrong answers
def test_evaluate_maps_labels_by_name(trained, tmp_path):
    """Data with two of the three labels: by position, "sea" and "sky" would get the ids of "land" and "sea"."""
    import torch

    from s2ft.jobs.evaluate import run_evaluate
    from s2ft.jobs.runs import load_trained

    rows = run_rows(trained)
    rows = [r for r in rows if r["label"] != "land"][:60]
    for i, row in enumerate(rows):
        row["split"] = "test" if (i // 2) % 2 else "train"  # rows alternate sea, sky
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = run_evaluate(str(trained), "test", dataset=str(subset), quiet=True)

    model, tokenizer, run = load_trained(str(trained))
    names = run["info"]["label_names"]
    assert names == sorted(WORDS)
    test = [r for r in rows if r["split"] == "test"]
    with torch.no_grad():
        batch = tokenizer(
            [r["text"] for r in test], return_tensors="pt", padding=True, truncation=True, max_length=64
        )
        predicted = model.eval()(**batch).logits.argmax(-1).tolist()
    expected = sum(p == names.index(r["label"]) for p, r in zip(predicted, test)) / len(test)
    assert scored["examples"] == len(test)
    assert scored["accuracy"] == pytest.approx(expected)


def test_evaluate_refuses_unknown_labels(trained, tmp_path, capsys):
    rows = run_rows(trained)[:60]
    for row in rows[::2]:
        row["label"] = "desert"
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["evaluate", "--adapter", str(trained), "--dataset", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not trained on" in err and "desert" in err


def test_run_json_records_absolute_paths_and_evaluate_works_elsewhere(trained, tmp_path, monkeypatch):
    from s2ft.jobs.evaluate import run_evaluate

    run = json.loads((trained / "run.json").read_text())
    assert os.path.isabs(run["model"]) and os.path.isabs(run["dataset"])
    monkeypatch.chdir(tmp_path)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert run_evaluate(str(trained), "test", quiet=True)["accuracy"] == pytest.approx(
        metrics["test_accuracy"]
    )


def test_relative_paths_are_resolved_when_the_run_is_made(tiny, tmp_path, monkeypatch):
    model, data = tiny
    monkeypatch.chdir(os.path.dirname(model))
    out = tmp_path / "run"
    argv = ["finetune", "--model", "model", "--dataset", "data.jsonl", "--output", str(out), "--quiet"]
    argv += ["--n-frequency", "16", "--max-steps", "1", "--batch-size", "8", "--head-warmup-steps", "0"]
    assert main([*argv, "--method", "fourierft"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == os.path.abspath(model) and run["dataset"] == os.path.abspath(data)


def test_one_class_data_is_refused(tiny, tmp_path, capsys):
    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps({"text": f"the wave {i}", "label": "sea"}) + "\n" for i in range(40)))
    assert finetune((tiny[0], str(data)), tmp_path / "run") == 2
    assert "only one label" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_corrupt_run_json_is_a_clear_error(trained, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.json").write_text("{not json")
    assert main(["evaluate", "--adapter", str(broken), "--quiet"]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_model_folder_without_a_model_is_a_clear_error(tiny, tmp_path, capsys):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    assert finetune((str(empty), tiny[1]), tmp_path / "run", "--max-steps", "1") == 2
    assert "holds no model" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--seed", "--max-train-samples"])
def test_negative_counts_are_refused(tiny, tmp_path, capsys, option):
    assert finetune(tiny, tmp_path / "run", option, "-1") == 2
    assert f"{option} must be >= 0" in capsys.readouterr().err


def test_adapter_config_records_the_calibration_batches(trained):
    config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert config["calibration_batches"] == 4


def test_compare_reruns_a_run_whose_options_changed(tiny, tmp_path, monkeypatch):
    import s2ft.jobs.compare as compare

    model, data = tiny
    argv = ["compare", "--model", model, "--dataset", data, "--output", str(tmp_path / "cmp"), "--quiet"]
    argv += ["--variants", "fourierft", "--seeds", "0", "--n-frequency", "16", "--max-steps", "1"]
    argv += ["--batch-size", "8", "--head-warmup-steps", "0"]
    assert main(argv) == 0
    ran = []
    real = compare.run_finetune
    monkeypatch.setattr(compare, "run_finetune", lambda args: ran.append(args) or real(args))
    assert main(argv) == 0 and ran == []  # same options: reused
    assert main([*argv[:-1], "1", "--scaling", "20"]) == 0 and len(ran) == 1  # changed: run again
    saved = json.loads((tmp_path / "cmp" / "runs" / "fourierft-seed0" / "metrics.json").read_text())
    assert saved["args"]["scaling"] == 20.0


def test_interrupted_compare_says_what_was_kept(tiny, tmp_path, monkeypatch, capsys):
    import s2ft.jobs.compare as compare

    model, data = tiny
    calls = []

    def second_interrupts(args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(args)

    real = compare.run_finetune
    monkeypatch.setattr(compare, "run_finetune", second_interrupts)
    argv = ["compare", "--model", model, "--dataset", data, "--output", str(tmp_path / "cmp"), "--quiet"]
    argv += ["--variants", "fourierft", "s2ft", "--seeds", "0", "--n-frequency", "16", "--max-steps", "1"]
    argv += ["--batch-size", "8", "--head-warmup-steps", "0", "--calibration-batches", "2"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "nothing was written" not in err and "kept in" in err
    assert (tmp_path / "cmp" / "results.md").is_file()


def test_compare_sweeps_budgets_and_shares_the_warmup(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "sweep"
    argv = ["compare", "--model", model, "--dataset", data, "--output", str(out), "--quiet", "--seeds", "0"]
    argv += ["--variants", "fourierft", "lora", "--budgets", "8", "32", "--lora-ranks", "1", "2"]
    argv += ["--max-steps", "1", "--batch-size", "8", "--head-warmup-steps", "2"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in results["summary"]]
    assert labels == ["FourierFT, n = 8", "FourierFT, n = 32", "LoRA r = 1 (PEFT)", "LoRA r = 2 (PEFT)"]
    params = [r["trainable_params"] for r in results["summary"]]
    assert params[1] - params[0] == 4 * (32 - 8)  # four adapted matrices
    reused = [r["head_warmup_reused"] for r in results["runs"]]
    assert reused == [False, True, True, True]  # one warm-up for the seed, shared by every variant
    heads = list((out / "warmup").iterdir())
    assert len(heads) == 1 and heads[0].suffix == ".safetensors"


def test_two_compare_processes_share_a_folder(tiny, tmp_path, monkeypatch):
    """A run another process holds is skipped at first, then waited for, and run once it is released."""
    import threading

    import s2ft.jobs.compare as compare

    model, data = tiny
    out = tmp_path / "shared"
    base_argv = [
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
    ]
    base_argv += ["--variants", "fourierft", "s2ft", "--n-frequency", "16", "--max-steps", "1"]
    base_argv += ["--batch-size", "8", "--head-warmup-steps", "0", "--calibration-batches", "2"]
    order = []
    real = compare.run_finetune

    def record(args):
        order.append(args.method)
        return real(args)

    monkeypatch.setattr(compare, "run_finetune", record)
    codes = []
    worker = threading.Thread(target=lambda: codes.append(main(base_argv)))
    # another process made the folder and holds fourierft: this one runs s2ft first, then waits for fourierft
    # until it is released
    compare.results_folder(str(out), "compare")
    with compare.claimed(str(out / "runs" / "fourierft-seed0"), wait=True):
        worker.start()
        worker.join(timeout=20)
        assert worker.is_alive() and order == ["s2ft"]
    worker.join(timeout=120)
    assert not worker.is_alive() and codes == [0]
    assert order == ["s2ft", "fourierft"]
    assert (out / "runs" / "fourierft-seed0" / "metrics.json").is_file()


def test_export_lora_cli(trained, tmp_path, capsys):
    import peft
    import torch

    from s2ft.jobs.runs import load_trained

    out = tmp_path / "lora"
    assert main(["export-lora", "--adapter", str(trained), "--rank", "32", "--output", str(out)]) == 0
    report = json.loads((out / "lora_export.json").read_text())
    assert report["max_relative_error"] < 1e-5  # rank 32 = full rank of the 32x32 matrices
    spectral, tokenizer, run = load_trained(str(trained))
    task_model = type(spectral.get_base_model()).from_pretrained(run["model"], num_labels=3)
    lora = peft.PeftModel.from_pretrained(task_model, out).eval()
    batch = tokenizer(["the wave ship salt", "the cloud star"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(
            lora(**batch).logits, spectral.eval()(**batch).logits, atol=1e-4, rtol=1e-4
        )
    assert (
        main(["export-lora", "--adapter", str(trained), "--rank", "1.5", "--output", str(tmp_path / "x")])
        == 2
    )
    assert "positive integer or a share" in capsys.readouterr().err


def test_compare_gives_each_variant_its_own_methods_learning_rate():
    """A task's per-method learning rates reach every variant (LoRA once ran at the spectral rate)."""
    from s2ft.jobs.args import FinetuneArgs
    from s2ft.jobs.compare import variant_args
    from s2ft.methods import get_method
    from s2ft.tasks import get_task

    rates = get_task("image-classification").defaults["lr"]  # a method it does not name takes its default_lr
    base = FinetuneArgs(task="image-classification")
    for variant in ("fourierft", "s2ft", "lora", "waveft", "full"):
        args = variant_args(base, variant, 0, "out")
        assert args.learning_rate == rates.get(args.method, get_method(args.method).default_lr), variant
    assert (
        variant_args(base, "lora", 0, "out").learning_rate
        != variant_args(base, "s2ft", 0, "out").learning_rate
    )
    assert variant_args(base, "lora", 0, "out", budget=4).lora_r == 4
    assert variant_args(base, "s2ft-half", 0, "out", budget=300).n_frequency == 150
    given = FinetuneArgs(task="image-classification", lr=1e-3)  # what the user sets holds for every variant
    assert {variant_args(given, v, 0, "out").lr for v in ("s2ft", "lora", "full")} == {1e-3}


def test_evaluate_scores_a_file_whose_unscored_split_holds_an_unknown_label(trained, tmp_path):
    """The test split is all evaluate reads: a label only in the training rows of the file does not matter."""
    from s2ft.jobs.evaluate import run_evaluate

    rows = run_rows(trained)[:60]
    for i, row in enumerate(rows):
        row["split"] = "test" if i % 2 else "train"
        if not i % 2:
            row["label"] = "desert"  # a label the model never saw, in a split evaluate does not score
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = run_evaluate(str(trained), "test", dataset=str(mixed), quiet=True)
    assert scored["examples"] == 30 and 0.0 <= scored["accuracy"] <= 1.0
