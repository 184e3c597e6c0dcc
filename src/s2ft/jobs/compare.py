"""``s2ft compare``: several methods on the same task, split and seeds; a table and a plot of the task's metric
against trainable parameters and adapter bytes.

Each run lives in ``OUTPUT/runs/<variant>[-n<n>|-r<rank>]-seed<seed>`` and is reused by a later invocation only
when it finished (``metrics.json``) with the very same options; otherwise it is run again. A run is claimed with a
lock file first, so several ``compare`` processes (or machines on a shared folder) can work through one results
folder together: each takes the runs nobody holds, then waits for the others'. The head warm-up, identical for
every variant of a seed, runs once per seed (``OUTPUT/warmup``).

``budgets`` sweeps the number of coefficients of the spectral and WaveFT variants, ``lora_ranks`` LoRA's rank:
one curve per variant in the plots of the metric against trainable parameters and against adapter bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import statistics
import time
from typing import Any

from s2ft.io import atomic_write_text
from s2ft.jobs.args import FinetuneArgs, all_options, applicable, for_method, refuse_inapplicable
from s2ft.jobs.finetune import run_finetune
from s2ft.jobs.output import results_folder
from s2ft.methods import VARIANTS, paired_baseline
from s2ft.tasks import RunError, Task, get_task

# Options that do not change a run's result; a finished run is reused whatever they were.
_NOT_COMPARED = ("output", "overwrite", "quiet", "head_warmup_cache")


def variant_args(
    base: FinetuneArgs, variant: str, seed: int, output: str, budget: int | None = None
) -> FinetuneArgs:
    """The resolved options of one run of ``variant``; ``budget`` is its method's budget (n, LoRA's rank), or the
    base's.

    ``base`` is what the user gave: options left ``None`` (the learning rate above all) are resolved for the
    variant's own method, not for the base's."""
    if variant not in VARIANTS:
        raise RunError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    method = VARIANTS[variant].method
    base = for_method(
        base, method.name
    )  # the other methods' options given for their variants: not this one's
    overrides = dict(VARIANTS[variant].overrides, method=method.name)
    if budget is not None and method.budget is not None:
        base = dataclasses.replace(base, **{method.budget: budget})
    if method.budget is not None and overrides.get(method.budget) == "half":
        overrides[method.budget] = max(1, getattr(base.resolved(), method.budget) // 2)
    return dataclasses.replace(base, **overrides, seed=seed, output=output, overwrite=True).resolved()


def budgets_of(variant: str, budgets: list[int] | None, lora_ranks: list[int] | None) -> list[int | None]:
    """The sweep of one variant: ``budgets`` (n) or ``lora_ranks``, by its method's budget; ``[None]`` (the base
    options) if none."""
    sweeps = {"n_frequency": budgets, "lora_r": lora_ranks}
    return list(sweeps.get(VARIANTS[variant].method.budget) or [None])


def run_name(variant: str, budget: int | None, seed: int) -> str:
    if budget is None:
        return f"{variant}-seed{seed}"
    return f"{variant}-{VARIANTS[variant].method.budget_symbol}{budget}-seed{seed}"


def variant_label(args: FinetuneArgs, variant: str) -> str:
    """A table and legend label that names the variant's budget (``S2FT, n = 500``, ``LoRA r = 8 (PEFT)``) and
    what sets the variant apart (``S2FT, n = 500, random locations``)."""
    label = VARIANTS[variant].method.run_label(args)
    extra = VARIANTS[variant].label
    return f"{label}, {extra}" if extra else label


def _comparable(args: dict[str, Any]) -> dict[str, Any]:
    """The options that decide a run's result: those that apply to its task and method, but :data:`_NOT_COMPARED`."""
    return {k: v for k, v in applicable(args).items() if k not in _NOT_COMPARED}


def finished_run(run_dir: str, args: FinetuneArgs) -> dict[str, Any] | None:
    """The metrics of a finished run in ``run_dir`` made with the same options as ``args``, else None."""
    try:
        with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return None
    saved = metrics.get("args") if isinstance(metrics, dict) else None
    if not isinstance(saved, dict):
        return None
    # an option added since the run was made counts as its default there
    defaults = dataclasses.asdict(FinetuneArgs(task=args.task, method=args.method).resolved())
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    if _comparable(saved) != _comparable(dataclasses.asdict(args)):
        return None
    return metrics


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict[str, Any]], variants: list[str], task: Task) -> list[dict[str, Any]]:
    """Mean and spread (sample standard deviation) over seeds of the task's metric, per variant."""
    rows = []
    for variant in variants:
        labels = list(dict.fromkeys(r["label"] for r in runs if r["variant"] == variant))
        for label in labels:
            mine = [r for r in runs if r["variant"] == variant and r["label"] == label]
            rows.append(_row(variant, label, mine, task))
    return rows


def _row(variant: str, label: str, mine: list[dict[str, Any]], task: Task) -> dict[str, Any]:
    """One summary row: the runs of one variant at one budget, over seeds."""
    test_mean, test_std = _stats([r[f"test_{task.metric}"] for r in mine])
    val_mean, val_std = _stats([r[f"val_{task.metric}"] for r in mine])
    return {
        "variant": variant,
        "label": label,
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


def references(runs: list[dict[str, Any]], task: Task) -> dict[str, dict[int, float]]:
    """The task's reference numbers (majority-class rate, base model's perplexity) per seed: the seed chooses
    the split."""
    found: dict[str, dict[int, float]] = {}
    for key in task.reference_keys:
        values = {r["seed"]: r[key] for r in runs if r.get(key) is not None}
        if values:
            found[key] = values
    return found


def paired(runs: list[dict[str, Any]], variants: list[str], metric: str) -> list[dict[str, Any]]:
    """Each variant minus the paired baseline (FourierFT, :func:`s2ft.methods.paired_baseline`) at the same budget,
    seed by seed (the same split, data order and warm head): the fairer comparison when the spread over seeds comes
    mostly from the split. Only variants whose method has the baseline's budget (n) take part; empty without
    baseline runs."""
    key = f"test_{metric}"
    baseline = paired_baseline()
    size = baseline.budget
    reference = {
        (r["args"][size], r["seed"]): r[key] for r in runs if r["variant"] == baseline.name and "args" in r
    }
    rows = []
    for variant in variants:
        if variant == baseline.name or VARIANTS[variant].method.budget != size:
            continue
        mine = [r for r in runs if r["variant"] == variant and "args" in r]
        for label in dict.fromkeys(r["label"] for r in mine):
            pairs = [
                (r["seed"], r[key] - reference[(r["args"][size], r["seed"])])
                for r in mine
                if r["label"] == label and (r["args"][size], r["seed"]) in reference
            ]
            if pairs:
                rows.append({"label": label, "differences": dict(sorted(pairs))})
    return rows


def paired_table(rows: list[dict[str, Any]], metric: str, higher_is_better: bool) -> str:
    if not rows:
        return ""
    baseline = paired_baseline()
    lines = [
        f"\n### Minus {baseline.label} at the same {baseline.budget_symbol}, per seed (test {metric})\n",
        "| variant | per seed | mean | better on |",
        "|---|---|---|---|",
    ]
    for row in rows:
        diffs = row["differences"]
        better = sum((d > 0) if higher_is_better else (d < 0) for d in diffs.values())
        shown = ", ".join(f"{d:+.4f} (seed {seed})" for seed, d in diffs.items())
        lines.append(
            f"| {row['label']} | {shown} | {statistics.fmean(diffs.values()):+.4f} | {better} of {len(diffs)} |"
        )
    return "\n".join(lines) + "\n"


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
    """The metric against trainable parameters and against adapter bytes (log x): one curve per variant through
    its budgets (a point when it has one), mean ± sd over seeds."""
    from s2ft.analysis.plots import new_figure, save_figure

    figure = new_figure(11, 4.4)
    axes = figure.subplots(1, 2, sharey=True)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["variant"], []).append(r)
    for ax, key, xlabel in (
        (axes[0], "trainable_params", "trainable parameters (log)"),
        (axes[1], "adapter_bytes", "adapter file bytes (log)"),
    ):
        for mine in groups.values():
            mine = sorted(mine, key=lambda r: r[key])
            label = mine[0]["label"] if len(mine) == 1 else variant_family(mine[0]["label"])
            ax.errorbar(
                [r[key] for r in mine],
                [r["test_mean"] for r in mine],
                yerr=[r["test_std"] for r in mine],
                fmt="o-" if len(mine) > 1 else "o",
                capsize=3,
                label=label,
            )
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    better = "higher" if higher_is_better else "lower"
    axes[0].set_ylabel(f"test {metric} ({better} is better; mean ± sd over seeds)")
    axes[1].legend(fontsize=8, loc="best")
    figure.suptitle(f"Test {metric} against adapter size")
    save_figure(figure, path)


def variant_family(label: str) -> str:
    """A curve's legend: the label without its budget (``S2FT, n = 300`` -> ``S2FT``, ``LoRA r = 8`` -> ``LoRA``)."""
    parts = [p for p in label.replace(" r = ", ", r = ").split(", ") if not p.startswith(("n = ", "r = "))]
    return ", ".join(parts)


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
    pairs = paired(runs, variants, task.metric)
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
        "paired_with_fourierft": [
            {"label": p["label"], "differences": {str(k): v for k, v in p["differences"].items()}}
            for p in pairs
        ],
        "runs": [{k: v for k, v in r.items() if k != "args"} for r in runs],
        "wall_seconds_this_invocation": round(seconds, 1),
    }
    atomic_write_text(os.path.join(output, "results.json"), json.dumps(results, indent=2) + "\n")
    atomic_write_text(
        os.path.join(output, "results.md"),
        markdown_table(rows, refs, task.metric) + paired_table(pairs, task.metric, task.higher_is_better),
    )
    plot(rows, os.path.join(output, f"{task.metric}_vs_size.png"), task.metric, task.higher_is_better)
    return results


@contextlib.contextmanager
def claimed(run_dir: str, wait: bool):
    """Hold ``run_dir``'s lock file (``<run_dir>.lock``) while the block runs; yields False, without waiting,
    when ``wait`` is False and another process holds it."""
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    with open(run_dir + ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_compare(
    base: FinetuneArgs,
    variants: list[str],
    seeds: list[int],
    output: str,
    progress: bool = True,
    budgets: list[int] | None = None,
    lora_ranks: list[int] | None = None,
) -> dict[str, Any]:
    """Run every variant at every budget for every seed (a finished run with the same options is reused), then
    summarize. Runs another process holds are taken last, after waiting for it."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise RunError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    # what the user gave must apply to some variant; each variant resolves the rest for its own method
    given = [name for name, o in all_options().items() if o.given(getattr(base, name))]
    methods = list(dict.fromkeys(VARIANTS[v].method.name for v in variants))
    refuse_inapplicable(given, base.task, methods, "none of --variants runs it")
    resolved = for_method(base, base.method).resolved()
    if base.head_warmup_cache is None:
        base = dataclasses.replace(base, head_warmup_cache=os.path.join(output, "warmup"))
    planned = []
    for seed in seeds:
        for variant in variants:
            for budget in budgets_of(variant, budgets, lora_ranks):
                run_dir = os.path.join(output, "runs", run_name(variant, budget, seed))
                planned.append((variant, run_dir, variant_args(base, variant, seed, run_dir, budget)))
    results_folder(output, "compare")  # new, empty or a comparison's: refused before anything is written
    done: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    results: dict[str, Any] = {}
    for wait in (False, True):  # first the runs nobody holds, then those another process was running
        for variant, run_dir, args in planned:
            if run_dir in done:
                continue
            with claimed(run_dir, wait) as mine:
                if not mine:
                    continue
                metrics = finished_run(run_dir, args)
                if metrics is None:
                    if progress:
                        print(f"[compare] {os.path.basename(run_dir)} -> {run_dir}", flush=True)
                    metrics = run_finetune(args)
            done[run_dir] = {"variant": variant, "label": variant_label(args, variant), **metrics}
            # written after every run, so an interrupted comparison still reports what it finished
            runs = [done[d] for _, d, _ in planned if d in done]
            results = write_results(resolved, variants, seeds, runs, output, time.perf_counter() - start)
    return results
