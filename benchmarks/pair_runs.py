"""Paired differences between two sets of ``s2ft compare`` runs that its own table does not pair: different
budgets (S2FT at n = 500 against FourierFT at n = 1,000) or runs in different folders (equal bytes).

    python benchmarks/pair_runs.py RUNS/s2ft-n500 RUNS/fourierft-n1000 [--seeds 0 1 2]

``A`` and ``B`` are run-folder prefixes: ``A-seed0``, ``A-seed1``, ... (each with the ``metrics.json`` that
``s2ft finetune`` writes). Prints a Markdown row: each side's test metric (mean ± sd), bytes, and ``A - B`` per
seed, with how many seeds ``A`` is better on (lower perplexity, higher accuracy). Runs of a seed share a split.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def load(prefix: str, seeds: list[int]) -> list[dict]:
    runs = []
    for seed in seeds:
        path = f"{prefix}-seed{seed}/metrics.json"
        try:
            with open(path, encoding="utf-8") as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            raise SystemExit(f"cannot read {path}: {e}") from None
    return runs


def metric_of(run: dict) -> tuple[str, float, bool]:
    """(name, test value, higher is better)."""
    if "test_perplexity" in run:
        return "perplexity", float(run["test_perplexity"]), False
    return "accuracy", float(run["test_accuracy"]), True


def summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="run-folder prefix of side A (without -seedN)")
    parser.add_argument("b", help="run-folder prefix of side B")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args(argv)
    a, b = load(args.a, args.seeds), load(args.b, args.seeds)
    names = {metric_of(r)[0] for r in a + b}
    if len(names) != 1:
        raise SystemExit(f"the runs measure different metrics: {sorted(names)}")
    higher = metric_of(a[0])[2]
    va, vb = [metric_of(r)[1] for r in a], [metric_of(r)[1] for r in b]
    diffs = [x - y for x, y in zip(va, vb)]
    better = sum((d > 0) if higher else (d < 0) for d in diffs)
    per_seed = ", ".join(f"{d:+.4f}" for d in diffs)
    bytes_a = sorted({r["adapter_bytes"] for r in a})
    bytes_b = sorted({r["adapter_bytes"] for r in b})
    print("| A | B | A test | B test | A bytes | B bytes | A − B per seed | mean | A better on |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.a} | {args.b} | {summary(va)} | {summary(vb)} | "
        f"{'/'.join(f'{x:,}' for x in bytes_a)} | {'/'.join(f'{x:,}' for x in bytes_b)} | {per_seed} | "
        f"{statistics.mean(diffs):+.4f} | {better} of {len(diffs)} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
