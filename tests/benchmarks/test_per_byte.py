"""benchmarks/per_byte.py: runs gathered from several folders, and each method against FourierFT's curve at equal
bytes (interpolated in log bytes, per seed)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from s2ft.jobs.args import FinetuneArgs
from tests.helpers import load_benchmark


def write_run(folder, name, variant_method, seed, value, nbytes, budget, task="text-classification"):
    method = variant_method
    options = {"lora_r": budget} if method == "lora" else {"n_frequency": budget}
    args = dataclasses.asdict(FinetuneArgs(task=task, method=method, seed=seed, **options).resolved())
    key = "perplexity" if task == "causal-lm" else "accuracy"
    run = folder / name
    run.mkdir(parents=True)
    metrics = {
        "task": task,
        "seed": seed,
        f"test_{key}": value,
        f"val_{key}": value,
        "trainable_params": budget,
        "adapter_bytes": nbytes,
        "train_seconds": 1.0,
        "calibration_seconds": 0.0,
        "args": args,
    }
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_interpolation_in_log_bytes_and_outside_range():
    script = load_benchmark("per_byte")
    curve = [(1000, 0.5), (100, 0.3)]
    assert script.at_bytes(curve, int(math.sqrt(100 * 1000))) == pytest.approx(0.4, abs=1e-4)
    assert script.at_bytes(curve, 100) == pytest.approx(0.3)
    assert script.at_bytes(curve, 99) is None and script.at_bytes(curve, 1001) is None


def test_folders_gathered_and_paired_at_equal_bytes(tmp_path, capsys):
    script = load_benchmark("per_byte")
    a, b = tmp_path / "a", tmp_path / "b"
    for seed, (low, high) in enumerate([(0.30, 0.50), (0.32, 0.48)]):
        write_run(a, f"fourierft-n100-seed{seed}", "fourierft", seed, low, 100, 100)
        write_run(b, f"fourierft-n1000-seed{seed}", "fourierft", seed, high, 1000, 1000)
    # S2FT at the geometric middle: FourierFT there is the mean of its two budgets, 0.40 on both seeds
    write_run(b, "s2ft-adam-seed0", "s2ft", 0, 0.45, 316, 300)
    write_run(b, "s2ft-adam-seed1", "s2ft", 1, 0.38, 316, 300)
    write_run(a, "lora-r8-seed0", "lora", 0, 0.9, 5000, 8)  # beyond FourierFT's bytes: reported, not paired
    assert script.main([str(a), str(b), "--output", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    pairs = {p["label"]: p for p in results["equal_bytes_against_fourierft"]}
    s2ft = next(p for label, p in pairs.items() if label.startswith("S2FT"))
    assert s2ft["differences"]["0"] == pytest.approx(0.05, abs=2e-3)
    assert s2ft["differences"]["1"] == pytest.approx(-0.02, abs=2e-3)
    assert s2ft["better_on"] == 1
    lora = next(p for label, p in pairs.items() if label.startswith("LoRA"))
    assert lora["differences"] == {} and lora["outside_seeds"] == [0]
    assert (tmp_path / "out" / "accuracy_vs_bytes.png").stat().st_size > 0
    assert "outside FourierFT's 100–1,000 bytes" in capsys.readouterr().out


def test_lower_perplexity_is_better_and_duplicates_refused(tmp_path):
    script = load_benchmark("per_byte")
    a = tmp_path / "a"
    write_run(a, "fourierft-n100-seed0", "fourierft", 0, 50.0, 100, 100, task="causal-lm")
    write_run(a, "fourierft-n1000-seed0", "fourierft", 0, 40.0, 1000, 1000, task="causal-lm")
    write_run(a, "s2ft-seed0", "s2ft", 0, 44.0, 316, 300, task="causal-lm")
    rows = script.equal_bytes(script.collect([str(a)]), "perplexity", higher_is_better=False)
    assert rows[0]["differences"][0] == pytest.approx(-1.0, abs=0.02) and rows[0]["better_on"] == 1
    b = tmp_path / "b"
    write_run(b, "s2ft-seed0", "s2ft", 0, 45.0, 316, 300, task="causal-lm")
    with pytest.raises(SystemExit, match="in two sources"):
        script.collect([str(a), str(b)])


def test_committed_results_json_as_a_source_with_chosen_variants(tmp_path):
    script = load_benchmark("per_byte")
    a = tmp_path / "a"
    write_run(a, "fourierft-n100-seed0", "fourierft", 0, 0.30, 100, 100)
    write_run(a, "fourierft-n1000-seed0", "fourierft", 0, 0.50, 1000, 1000)
    write_run(a, "s2ft-seed0", "s2ft", 0, 0.45, 316, 300)
    assert script.main([str(a), "--output", str(tmp_path / "first")]) == 0
    committed = tmp_path / "first" / "results.json"
    # the committed runs stand in for the folder's; taking only FourierFT from them leaves S2FT to the folder
    b = tmp_path / "b"
    write_run(b, "s2ft-seed0", "s2ft", 0, 0.41, 316, 300)
    runs = script.collect([f"{committed}:fourierft", str(b)])
    assert sorted(r["variant"] for r in runs) == ["fourierft", "fourierft", "s2ft"]
    rows = script.equal_bytes(runs, "accuracy", higher_is_better=True)
    assert rows[0]["differences"][0] == pytest.approx(0.01, abs=2e-3)
    with pytest.raises(SystemExit, match="in two sources"):
        script.collect([str(committed), str(b)])
    with pytest.raises(SystemExit, match="unknown variants"):
        script.collect([f"{committed}:fourierft,nosuch"])
    (tmp_path / "other.json").write_text("[]")
    with pytest.raises(SystemExit, match="not a results.json"):
        script.collect([str(tmp_path / "other.json")])
