"""``s2ft compare``: several methods on the same task, split and seeds; a table and a plot of the task's metric
against trainable parameters and adapter bytes.

Each run lives in ``OUTPUT/runs/<variant>-seed<seed>`` and is reused by a later invocation only when it finished
(``metrics.json``) with the very same options; otherwise it is run again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Any

from s2ft.io import atomic_write_text
from s2ft.jobs.args import FinetuneArgs
from s2ft.jobs.finetune import run_finetune
from s2ft.tasks import RunError, Task, get_task

# variant -> overrides of FinetuneArgs ("n_frequency": "half" means n // 2). The S2FT variants name their location
# sampling, so that each differs from "s2ft" (the paper's recipe) in one thing only.
VARIANTS: dict[str, dict[str, Any]] = {
    "fourierft": {"method": "fourierft"},
    "s2ft": {"method": "s2ft", "locations": "prior"},
    "s2ft-half": {"method": "s2ft", "n_frequency": "half", "locations": "prior"},
    "lora": {"method": "lora"},
    "full": {"method": "full"},
    "s2ft-noperm": {"method": "s2ft", "permute": False, "locations": "prior"},
    "s2ft-uniform": {"method": "s2ft", "locations": "uniform"},
    "s2ft-prior-half": {"method": "s2ft", "locations": "prior-half"},
    "s2ft-2opt-cyclic": {"method": "s2ft", "locations": "prior", "permutation": "2opt-cyclic"},
}
# Options that do not change a run's result; a finished run is reused whatever they were.
_NOT_COMPARED = ("output", "overwrite", "quiet")


def variant_args(base: FinetuneArgs, variant: str, seed: int, output: str) -> FinetuneArgs:
    """The resolved options of one run of ``variant``."""
    if variant not in VARIANTS:
        raise RunError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    base = base.resolved()
    overrides = dict(VARIANTS[variant])
    if overrides.get("n_frequency") == "half":
        overrides["n_frequency"] = max(1, base.n_frequency // 2)
    return dataclasses.replace(base, **overrides, seed=seed, output=output, overwrite=True)


def variant_label(args: FinetuneArgs, variant: str) -> str:
    """A table and legend label that names the variant's budget (``S2FT, n = 500``, ``LoRA r = 8``)."""
    if args.method == "lora":
        return f"LoRA r = {args.lora_r} (PEFT)"
    if args.method == "full":
        return "full fine-tuning"
    name = "FourierFT" if args.method == "fourierft" else "S2FT"
    label = f"{name}, n = {args.n_frequency}"
    extras = {
        "s2ft-noperm": "without permutations",
        "s2ft-uniform": "random locations",
        "s2ft-prior-half": "one location per mirror pair",
        "s2ft-2opt-cyclic": "cyclic 2-opt search",
    }
    return f"{label}, {extras[variant]}" if variant in extras else label


def _comparable(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if k not in _NOT_COMPARED}


def finished_run(run_dir: str, args: FinetuneArgs) -> dict[str, Any] | None:
    """The metrics of a finished run in ``run_dir`` made with the same options as ``args``, else None."""
    try:
        with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return None
    saved = metrics.get("args") if isinstance(metrics, dict) else None
    if not isinstance(saved, dict) or _comparable(saved) != _comparable(dataclasses.asdict(args)):
        return None
    return metrics


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict[str, Any]], variants: list[str], task: Task) -> list[dict[str, Any]]:
    """Mean and spread (sample standard deviation) over seeds of the task's metric, per variant."""
    rows = []
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        test_mean, test_std = _stats([r[f"test_{task.metric}"] for r in mine])
        val_mean, val_std = _stats([r[f"val_{task.metric}"] for r in mine])
        rows.append(
            {
                "variant": variant,
                "label": mine[0]["label"],
                "seeds": len(mine),
                "metric": task.metric,
                "test_mean": test_mean,
                "test_std": test_std,
                "val_mean": val_mean,
                "val_std": val_std,
                "trainable_params": mine[0]["trainable_params"],
                "adapter_bytes": mine[0]["adapter_bytes"],
                "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in mine),
                "calibration_seconds_mean": statistics.fmean(r["calibration_seconds"] for r in mine),
            }
        )
    return rows


def references(runs: list[dict[str, Any]], task: Task) -> dict[str, dict[int, float]]:
    """The task's reference numbers (majority-class rate, base model's perplexity) per seed: the seed chooses
    the split."""
    found: dict[str, dict[int, float]] = {}
    for key in task.reference_keys:
        values = {r["seed"]: r[key] for r in runs if r.get(key) is not None}
        if values:
            found[key] = values
    return found


def markdown_table(rows: list[dict[str, Any]], refs: dict[str, dict[int, float]], metric: str) -> str:
    """The summary rows as a markdown table, with the reference numbers per seed below it."""
    lines = [
        f"| method | test {metric} | validation {metric} | seeds | trainable params | adapter bytes "
        "| train s | calibration s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['test_mean']:.4f} ± {r['test_std']:.4f} "
            f"| {r['val_mean']:.4f} ± {r['val_std']:.4f} | {r['seeds']} | {r['trainable_params']:,} "
            f"| {r['adapter_bytes']:,} | {r['train_seconds_mean']:.0f} | {r['calibration_seconds_mean']:.1f} |"
        )
    note = "\nMean ± sample standard deviation over the seeds of each row." if rows else ""
    for key, values in refs.items():
        shown = ", ".join(f"{v:.4f} (seed {seed})" for seed, v in sorted(values.items()))
        note += f" {key.replace('_', ' ').capitalize()} on the test split: {shown}."
    note += " Trainable parameters include any new head."
    return "\n".join(lines) + "\n" + note + "\n"


def plot(rows: list[dict[str, Any]], path: str, metric: str, higher_is_better: bool) -> None:
    """The metric against trainable parameters and against adapter bytes (log x), one point per variant."""
    from s2ft.analysis.plots import new_figure, save_figure

    figure = new_figure(11, 4.2)
    axes = figure.subplots(1, 2, sharey=True)
    for ax, key, xlabel in (
        (axes[0], "trainable_params", "trainable parameters (log)"),
        (axes[1], "adapter_bytes", "adapter file bytes (log)"),
    ):
        for r in rows:
            ax.errorbar(r[key], r["test_mean"], yerr=r["test_std"], fmt="o", capsize=4, label=r["label"])
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    better = "higher" if higher_is_better else "lower"
    axes[0].set_ylabel(f"test {metric} ({better} is better; mean ± sd over seeds)")
    axes[1].legend(fontsize=8, loc="best")
    figure.suptitle(f"Test {metric} against adapter size")
    save_figure(figure, path)


def write_results(
    base: FinetuneArgs,
    variants: list[str],
    seeds: list[int],
    runs: list[dict[str, Any]],
    output: str,
    seconds: float,
) -> dict[str, Any]:
    task = get_task(base.task)
    rows = summarize(runs, variants, task)
    refs = references(runs, task)
    results = {
        "task": {
            "task": task.name,
            "model": base.model,
            "dataset": base.dataset,
            "n_frequency": base.n_frequency,
            "metric": task.metric,
            "higher_is_better": task.higher_is_better,
        },
        "seeds": seeds,
        "summary": rows,
        "runs": [{k: v for k, v in r.items() if k != "args"} for r in runs],
        "wall_seconds_this_invocation": round(seconds, 1),
    }
    atomic_write_text(os.path.join(output, "results.json"), json.dumps(results, indent=2) + "\n")
    atomic_write_text(os.path.join(output, "results.md"), markdown_table(rows, refs, task.metric))
    plot(rows, os.path.join(output, f"{task.metric}_vs_size.png"), task.metric, task.higher_is_better)
    return results


def run_compare(
    base: FinetuneArgs, variants: list[str], seeds: list[int], output: str, progress: bool = True
) -> dict[str, Any]:
    """Run every variant for every seed (a finished run with the same options is reused), then summarize."""
    base = base.resolved()
    for variant in variants:
        variant_args(base, variant, 0, output)  # validate every name before the first long run
    os.makedirs(output, exist_ok=True)
    runs, start = [], time.perf_counter()
    results: dict[str, Any] = {}
    for seed in seeds:
        for variant in variants:
            run_dir = os.path.join(output, "runs", f"{variant}-seed{seed}")
            args = variant_args(base, variant, seed, run_dir)
            metrics = finished_run(run_dir, args)
            if metrics is None:
                if progress:
                    print(f"[compare] {variant} seed {seed} -> {run_dir}", flush=True)
                metrics = run_finetune(args)
            runs.append({"variant": variant, "label": variant_label(args, variant), **metrics})
            # written after every run, so an interrupted comparison still reports what it finished
            results = write_results(base, variants, seeds, runs, output, time.perf_counter() - start)
    return results
