"""How much of the exact prior's plan a sketched prior (``S2FTConfig.prior_rank = k``) keeps, on a default job.

For each seed: the job's model and calibration batches as ``s2ft finetune`` / ``s2ft analyze`` make them (head
warm-up included), the exact prior (the config's kind, Adam by default) and its plan, then for each k the sketched
prior and its plan. Per adapted matrix (mean, min over matrices):

- ``kept``: the share of the exact prior's energy inside the sketch's row and column spaces;
- ``loc``: the share of the exact prior's spectral energy, permuted by the sketch's plan, at the sketch's locations,
  against ``loc exact``, the same at the exact plan (what calibration installs today);
- ``same locations``: the share of the sketch's locations that the exact plan also chose;
- with ``--full-finetune-steps N``: ``ΔW caught``, the share of a short full fine-tune's ``ΔW``'s spectral energy
  at each plan's permutations and locations (``s2ft analyze --full-finetune-steps``'s ``prior_plan``).

    python benchmarks/sketch_quality.py --ranks 16 64 256 --seeds 0 1 2 [--task text-classification] [--prior gradient]

Prints a Markdown table; ``--json PATH`` also writes the per-seed figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time

import torch


def measure(task_name: str, seed: int, ranks: list[int], full_steps: int, prior: str | None = None) -> dict:
    from transformers import set_seed

    from s2ft.analysis.measures import energy_at
    from s2ft.jobs.analyze import full_finetune_delta
    from s2ft.jobs.args import FinetuneArgs
    from s2ft.jobs.splits import calibration_batches, training_subset, with_targets
    from s2ft.jobs.training import warm_up_head
    from s2ft.methods import planning_method
    from s2ft.tasks import get_task
    from s2ft.tuner.calibration import compute_prior
    from s2ft.tuner.model import matches
    from s2ft.tuner.planner import plan_for

    args = FinetuneArgs(task=task_name, seed=seed, quiet=True).resolved()
    task = get_task(args.task)
    set_seed(args.seed)
    data = task.load_data(args)
    loaded = task.load_model(args.model, data.info, quantize=args.quantize)
    model, processor, head = loaded.model, loaded.processor, loaded.head
    args = with_targets(task, args, model)
    train = task.prepare(training_subset(data.train, args), processor, args, "train")
    collator = task.collator(processor)
    if args.head_warmup_steps > 0 and head:
        with tempfile.TemporaryDirectory() as tmp:
            warm_up_head(model, collator, dataclasses.replace(args, quiet=True), tmp, train, head)
    deltas = {}
    if full_steps > 0:
        names = [n for n, m in model.named_modules() if m is not model and matches(n, args.targets)]
        deltas = full_finetune_delta(model, collator, args, train, names, full_steps)
    method = planning_method()
    spectral = method.wrap(model, dataclasses.replace(args, method=method.name), head)
    config = spectral.spectral_config
    if prior is not None:  # another prior than the job's default
        config = dataclasses.replace(config, prior=prior)
    batches = calibration_batches(train, collator, task, args, 0, 1)
    layers = spectral.spectral_layers()
    base = spectral.get_base_model()
    start = time.perf_counter()
    exact = compute_prior(base, layers, batches, kind=config.prior, lr=config.prior_lr)
    seconds = {"exact": time.perf_counter() - start}
    plans = {n: plan_for(p.float(), n, config) for n, p in exact.items()}

    def caught(matrix: torch.Tensor, plan) -> float:
        permuted = matrix[plan.perm_rows.cpu()][:, plan.perm_cols.cpu()]
        return energy_at(permuted, plan.rows, plan.cols)

    out: dict = {"seed": seed, "prior": config.prior, "layers": len(layers), "exact": {}, "ranks": {}}
    out["exact"]["loc"] = [caught(exact[n].float(), plans[n]) for n in layers]
    if deltas:
        out["exact"]["delta"] = [caught(deltas[n], plans[n]) for n in layers if n in deltas]
    for k in ranks:
        start = time.perf_counter()
        sketch = compute_prior(base, layers, batches, kind=config.prior, rank=k, seed=config.seed)
        seconds[k] = time.perf_counter() - start
        row: dict = {"kept": [], "loc": [], "same": [], "delta": []}
        for n in layers:
            plan = plan_for(sketch[n], n, config)
            row["kept"].append(sketch[n].kept_energy(exact[n]))
            row["loc"].append(caught(exact[n].float(), plan))
            mine = set((plan.rows * 100003 + plan.cols).tolist())
            theirs = set((plans[n].rows * 100003 + plans[n].cols).tolist())
            row["same"].append(len(mine & theirs) / len(mine))
            if n in deltas:
                row["delta"].append(caught(deltas[n], plan))
        out["ranks"][k] = row
    out["seconds"] = seconds
    return out


def _mean(values: list[float]) -> str:
    return "–" if not values else f"{statistics.mean(values):.3f} (min {min(values):.3f})"


def table(results: list[dict], ranks: list[int]) -> str:
    lines = [
        "| seed | k | kept (mean, min) | loc, sketch plan | loc, exact plan | same locations | ΔW caught, sketch "
        "plan | ΔW caught, exact plan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for k in ranks:
            row = r["ranks"][k]
            lines.append(
                f"| {r['seed']} | {k} | {_mean(row['kept'])} | {_mean(row['loc'])} | {_mean(r['exact']['loc'])} | "
                f"{_mean(row['same'])} | {_mean(row['delta'])} | {_mean(r['exact'].get('delta', []))} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="text-classification")
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--full-finetune-steps", type=int, default=0)
    parser.add_argument("--prior", default=None, help="the prior (default: the job's, adam)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = []
    for seed in args.seeds:
        results.append(measure(args.task, seed, args.ranks, args.full_finetune_steps, args.prior))
        print(f"seed {seed}: calibration seconds {results[-1]['seconds']}", file=sys.stderr)
    print(table(results, args.ranks))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
