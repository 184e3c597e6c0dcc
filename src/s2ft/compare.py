"""``s2ft compare``: several methods on the same task, split and seeds; a table and a plot of accuracy against
trainable parameters and adapter bytes."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Any

from s2ft.io import atomic_write_text
from s2ft.train import FinetuneArgs, RunError, run_finetune

# variant -> (label, overrides of FinetuneArgs; "n_frequency": "half" means n // 2). The S2FT variants name their
# location sampling, so that each differs from "s2ft" (the paper's recipe) in one thing only.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fourierft": ("FourierFT, n", {"method": "fourierft"}),
    "s2ft": ("S2FT, n", {"method": "s2ft", "locations": "prior"}),
    "s2ft-half": ("S2FT, n/2", {"method": "s2ft", "n_frequency": "half", "locations": "prior"}),
    "lora": ("LoRA (PEFT)", {"method": "lora"}),
    "full": ("full fine-tuning", {"method": "full"}),
    "s2ft-noperm": ("S2FT without permutations", {"method": "s2ft", "permute": False, "locations": "prior"}),
    "s2ft-uniform": ("S2FT with random locations", {"method": "s2ft", "locations": "uniform"}),
    "s2ft-prior-half": ("S2FT, one location per mirror pair", {"method": "s2ft", "locations": "prior-half"}),
    "s2ft-2opt-cyclic": (
        "S2FT, cyclic 2-opt search",
        {"method": "s2ft", "locations": "prior", "permutation": "2opt-cyclic"},
    ),
}


def variant_args(base: FinetuneArgs, variant: str, seed: int, output: str) -> FinetuneArgs:
    if variant not in VARIANTS:
        raise RunError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    overrides = dict(VARIANTS[variant][1])
    if overrides.get("n_frequency") == "half":
        overrides["n_frequency"] = max(1, base.n_frequency // 2)
    return dataclasses.replace(base, **overrides, seed=seed, output=output, overwrite=True)


def summarize(runs: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """Mean and spread (sample standard deviation) over seeds, per variant."""
    rows = []
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        test = [r["test_accuracy"] for r in mine]
        val = [r["val_accuracy"] for r in mine]
        rows.append(
            {
                "variant": variant,
                "label": VARIANTS[variant][0],
                "seeds": len(mine),
                "test_accuracy_mean": statistics.fmean(test),
                "test_accuracy_std": statistics.stdev(test) if len(test) > 1 else 0.0,
                "val_accuracy_mean": statistics.fmean(val),
                "val_accuracy_std": statistics.stdev(val) if len(val) > 1 else 0.0,
                "trainable_params": mine[0]["trainable_params"],
                "adapter_bytes": mine[0]["adapter_bytes"],
                "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in mine),
                "calibration_seconds_mean": statistics.fmean(r["calibration_seconds"] for r in mine),
            }
        )
    return rows


def majority_rates(runs: list[dict[str, Any]]) -> dict[int, float]:
    """The test split's majority-class rate per seed (the seed chooses the split)."""
    return {r["seed"]: r["majority_rate"] for r in runs if r.get("majority_rate") is not None}


def markdown_table(rows: list[dict[str, Any]], majority: dict[int, float]) -> str:
    """The summary rows as a markdown table; ``majority``: the test split's majority-class rate per seed."""
    lines = [
        "| method | test accuracy | validation accuracy | trainable params | adapter bytes | train s | calibration s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['test_accuracy_mean']:.4f} ± {r['test_accuracy_std']:.4f} "
            f"| {r['val_accuracy_mean']:.4f} ± {r['val_accuracy_std']:.4f} | {r['trainable_params']:,} "
            f"| {r['adapter_bytes']:,} | {r['train_seconds_mean']:.0f} | {r['calibration_seconds_mean']:.1f} |"
        )
    note = f"\nMean ± standard deviation over {rows[0]['seeds']} seeds." if rows else ""
    if majority:
        rates = ", ".join(f"{rate:.4f} (seed {seed})" for seed, rate in sorted(majority.items()))
        note += f" Majority-class rate on the test split: {rates}."
    note += " Trainable parameters include the classifier head."
    return "\n".join(lines) + "\n" + note + "\n"


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Accuracy against trainable parameters and against adapter bytes (log x), one point per method."""
    from s2ft.analysis.plots import new_figure, save_figure

    figure = new_figure(11, 4.2)
    axes = figure.subplots(1, 2, sharey=True)
    for ax, key, xlabel in (
        (axes[0], "trainable_params", "trainable parameters (log)"),
        (axes[1], "adapter_bytes", "adapter file bytes (log)"),
    ):
        for r in rows:
            ax.errorbar(
                r[key],
                r["test_accuracy_mean"],
                yerr=r["test_accuracy_std"],
                fmt="o",
                capsize=4,
                label=r["label"],
            )
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean ± sd over seeds)")
    axes[1].legend(fontsize=8, loc="lower right")
    figure.suptitle("Accuracy against adapter size")
    save_figure(figure, path)


def write_results(
    base: FinetuneArgs,
    variants: list[str],
    seeds: list[int],
    runs: list[dict[str, Any]],
    output: str,
    seconds: float,
) -> dict[str, Any]:
    rows = summarize(runs, variants)
    majority = majority_rates(runs)
    results = {
        "task": {"model": base.model, "dataset": base.dataset, "n_frequency": base.n_frequency},
        "seeds": seeds,
        "summary": rows,
        "runs": [{k: v for k, v in r.items() if k != "args"} for r in runs],
        "wall_seconds_this_invocation": round(seconds, 1),
    }
    atomic_write_text(os.path.join(output, "results.json"), json.dumps(results, indent=2) + "\n")
    atomic_write_text(os.path.join(output, "results.md"), markdown_table(rows, majority))
    plot(rows, os.path.join(output, "accuracy_vs_size.png"))
    return results


def run_compare(
    base: FinetuneArgs, variants: list[str], seeds: list[int], output: str, progress: bool = True
) -> dict[str, Any]:
    """Run every variant for every seed (a finished run found in ``output`` is reused), then summarize."""
    for variant in variants:
        variant_args(base, variant, 0, output)  # validate every name before the first long run
    os.makedirs(output, exist_ok=True)
    runs, start = [], time.perf_counter()
    results: dict[str, Any] = {}
    for seed in seeds:
        for variant in variants:
            run_dir = os.path.join(output, "runs", f"{variant}-seed{seed}")
            metrics_file = os.path.join(run_dir, "metrics.json")
            if not os.path.isfile(metrics_file):
                if progress:
                    print(f"[compare] {variant} seed {seed} -> {run_dir}", flush=True)
                run_finetune(variant_args(base, variant, seed, run_dir))
            with open(metrics_file, encoding="utf-8") as f:
                runs.append({"variant": variant, **json.load(f)})
            # written after every run, so an interrupted comparison still reports what it finished
            results = write_results(base, variants, seeds, runs, output, time.perf_counter() - start)
    return results
