"""Test metric against adapter bytes, over ``s2ft compare`` runs gathered from several results folders: one table,
one plot, and every method against FourierFT's curve at equal bytes, seed by seed.

    python benchmarks/per_byte.py runs/sweep-lm/runs docs/results/causal-lm/compare/results.json:fourierft \
        --output docs/results/causal-lm/per-byte

A source is a folder of compare's run folders, ``<variant>[-n<n>|-r<rank>]-seed<seed>`` with the ``metrics.json``
that ``s2ft finetune`` writes, or a ``results.json`` that ``s2ft compare`` wrote (its ``runs``, as committed under
``docs/results``); ``SOURCE:VARIANT,VARIANT`` takes only those variants from it. A run counts once (the same label
and seed from two sources is refused). At equal
bytes: for each seed, FourierFT's test metric at a point's file size is interpolated linearly in log bytes between
FourierFT's two nearest budgets of that seed (a point outside FourierFT's range of bytes is reported, not
extrapolated); the point minus that value is the paired difference (runs of one seed share the split, the data
order and the warm head).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import sys
from typing import Any

from s2ft.io import atomic_write_text
from s2ft.jobs.args import FinetuneArgs
from s2ft.jobs.compare import markdown_table, plot, summarize, variant_label
from s2ft.methods import VARIANTS
from s2ft.tasks import get_task

_RUN = re.compile(r"^(?P<variant>.+?)(-[nr]\d+)?-seed(?P<seed>\d+)$")
BASELINE = "fourierft"


def _source(spec: str) -> tuple[str, set[str] | None]:
    """``PATH`` or ``PATH:VARIANT,VARIANT`` (a path may itself hold a colon only when a variant list follows)."""
    path, sep, chosen = spec.rpartition(":")
    if not sep or os.path.exists(spec):
        return spec, None
    variants = set(chosen.split(","))
    unknown = sorted(variants - set(VARIANTS))
    if unknown:
        raise SystemExit(f"{spec}: unknown variants {unknown}; among: {', '.join(VARIANTS)}")
    return path, variants


def _runs_of(path: str) -> list[dict[str, Any]]:
    """(variant, label, metrics) of every finished run a source holds."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        if not isinstance(stored, dict) or not isinstance(stored.get("runs"), list):
            raise SystemExit(f"{path}: not a results.json of s2ft compare (no 'runs' list)")
        return [{**r, "path": path} for r in stored["runs"]]
    if not os.path.isdir(path):
        raise SystemExit(f"{path}: no such folder or results.json")
    fields = {f.name for f in dataclasses.fields(FinetuneArgs)}
    found = []
    for name in sorted(os.listdir(path)):
        match = _RUN.match(name)
        metrics_path = os.path.join(path, name, "metrics.json")
        if match is None or match["variant"] not in VARIANTS or not os.path.isfile(metrics_path):
            continue
        with open(metrics_path, encoding="utf-8") as f:
            metrics = json.load(f)
        args = FinetuneArgs(**{k: v for k, v in metrics["args"].items() if k in fields})
        label = variant_label(args, match["variant"])
        found.append({**metrics, "variant": match["variant"], "label": label, "path": metrics_path})
    return found


def collect(sources: list[str]) -> list[dict[str, Any]]:
    """Every finished run in ``sources`` (folders of run folders or compare results.json files), with its
    variant and label (compare's)."""
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for spec in sources:
        path, chosen = _source(spec)
        for run in _runs_of(path):
            if run["variant"] not in VARIANTS or (chosen is not None and run["variant"] not in chosen):
                continue
            key = (run["label"], run["seed"])
            if key in runs:
                raise SystemExit(
                    f"{run['label']}, seed {run['seed']} is in two sources: {runs[key]['path']} and {run['path']}"
                )
            runs[key] = run
    if not runs:
        raise SystemExit(f"no finished compare runs in {', '.join(sources)}")
    return list(runs.values())


def at_bytes(curve: list[tuple[int, float]], nbytes: int) -> float | None:
    """The curve's value at ``nbytes``, linear in log bytes between its neighbours; None outside it."""
    curve = sorted(curve)
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= nbytes <= x1:
            if x1 == x0:
                return y0
            t = (math.log(nbytes) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    if curve and curve[0][0] == nbytes:
        return curve[0][1]
    return None


def equal_bytes(runs: list[dict[str, Any]], metric: str, higher_is_better: bool) -> list[dict[str, Any]]:
    """Each non-FourierFT point minus FourierFT's curve at its bytes, per seed."""
    key = f"test_{metric}"
    curves: dict[int, list[tuple[int, float]]] = {}
    for r in runs:
        if r["variant"] == BASELINE:
            curves.setdefault(r["seed"], []).append((r["adapter_bytes"], r[key]))
    rows = []
    for label in dict.fromkeys(r["label"] for r in runs if r["variant"] != BASELINE):
        mine = sorted((r for r in runs if r["label"] == label), key=lambda r: r["seed"])
        diffs, outside = {}, []
        for r in mine:
            reference = at_bytes(curves.get(r["seed"], []), r["adapter_bytes"])
            if reference is None:
                outside.append(r["seed"])
            else:
                diffs[r["seed"]] = r[key] - reference
        better = sum((d > 0) if higher_is_better else (d < 0) for d in diffs.values())
        rows.append(
            {
                "label": label,
                "adapter_bytes": [r["adapter_bytes"] for r in mine],
                "differences": diffs,
                "mean": statistics.fmean(diffs.values()) if diffs else None,
                "better_on": better,
                "outside_seeds": outside,
            }
        )
    return rows


def equal_bytes_table(rows: list[dict[str, Any]], runs: list[dict[str, Any]], metric: str) -> str:
    spans = {}
    for r in runs:
        if r["variant"] == BASELINE:
            lo, hi = spans.get(r["seed"], (r["adapter_bytes"], r["adapter_bytes"]))
            spans[r["seed"]] = (min(lo, r["adapter_bytes"]), max(hi, r["adapter_bytes"]))
    lines = [
        f"\n### Minus FourierFT at the same adapter bytes, per seed (test {metric}; FourierFT interpolated in log "
        "bytes)\n",
        "| method | adapter bytes | per seed | mean | better on |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        sizes = sorted(set(row["adapter_bytes"]))
        size = f"{sizes[0]:,}" if len(sizes) == 1 else f"{sizes[0]:,}–{sizes[-1]:,}"
        if row["differences"]:
            shown = ", ".join(f"{d:+.4f} (seed {s})" for s, d in row["differences"].items())
            cells = f"{shown} | {row['mean']:+.4f} | {row['better_on']} of {len(row['differences'])}"
        else:
            lo = min(s[0] for s in spans.values()) if spans else 0
            hi = max(s[1] for s in spans.values()) if spans else 0
            cells = f"outside FourierFT's {lo:,}–{hi:,} bytes | | "
        lines.append(f"| {row['label']} | {size} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "sources",
        nargs="+",
        help="folders of compare's run folders (OUTPUT/runs) or compare results.json files, each optionally "
        "followed by :VARIANT,VARIANT",
    )
    parser.add_argument("--output", required=True, help="where results.md, results.json and the plot go")
    parser.add_argument("--variants", nargs="+", help="only these variants (default: all found)")
    args = parser.parse_args(argv)
    runs = collect(args.sources)
    if args.variants:
        runs = [r for r in runs if r["variant"] in args.variants]
    tasks = {r["task"] for r in runs}
    if len(tasks) != 1:
        raise SystemExit(f"the runs are of several tasks: {sorted(tasks)}")
    task = get_task(tasks.pop())
    variants = list(dict.fromkeys(v for v in VARIANTS if any(r["variant"] == v for r in runs)))
    runs.sort(key=lambda r: (variants.index(r["variant"]), r["adapter_bytes"], r["seed"]))
    rows = summarize(runs, variants, task)
    rows.sort(key=lambda r: (variants.index(r["variant"]), r["adapter_bytes"]))
    pairs = equal_bytes(runs, task.metric, task.higher_is_better)
    os.makedirs(args.output, exist_ok=True)
    report = markdown_table(rows, {}, task.metric) + equal_bytes_table(pairs, runs, task.metric)
    atomic_write_text(os.path.join(args.output, "results.md"), report)
    results = {
        "task": task.name,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "summary": rows,
        "equal_bytes_against_fourierft": [
            {**p, "differences": {str(k): v for k, v in p["differences"].items()}} for p in pairs
        ],
        "runs": [{k: v for k, v in r.items() if k not in ("args", "path")} for r in runs],
    }
    atomic_write_text(os.path.join(args.output, "results.json"), json.dumps(results, indent=2) + "\n")
    plot(rows, os.path.join(args.output, f"{task.metric}_vs_bytes.png"), task.metric, task.higher_is_better)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
