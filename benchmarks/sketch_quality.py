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

``--variants`` instead builds dense priors from the batches' gradients one by one, float64 (``adam``; ``adam-factored``:
the Adafactor-factored second moment, what the sketch factors, no rank truncation; ``adam-factored-l1``: the
normaliser factored from the sums of ``|g_b|``; ``adam-factored-rms``; ``sign-sum``; ``gradient``), beside the
library's exact and sketched Adam and gradient priors at ``--ranks`` on the same batches (``--l1-sketch``: also the
sketch with the ``|g_b|`` normaliser), and reports each plan's ``ΔW`` caught:

    python benchmarks/sketch_quality.py --variants adam adam-factored adam-factored-l1 gradient --l1-sketch \
        --ranks 16 64 256 --seeds 0 1 2 --full-finetune-steps 30

Prints a Markdown table; ``--json PATH`` also writes the per-seed figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import time

import torch


def _setup(task_name: str, seed: int, full_steps: int, prior: str | None) -> dict:
    """The job's model (head warmed), its calibration batches, its adapted layers and, with ``full_steps``, the
    ``ΔW`` of a short full fine-tune, as ``s2ft finetune`` / ``s2ft analyze`` make them."""
    from transformers import set_seed

    from s2ft.jobs.analyze import full_finetune_delta
    from s2ft.jobs.args import FinetuneArgs
    from s2ft.jobs.splits import calibration_batches, training_subset, with_targets
    from s2ft.jobs.training import warm_up_head
    from s2ft.methods import planning_method
    from s2ft.tasks import get_task
    from s2ft.tuner.model import matches

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
    return {
        "config": config,
        "batches": calibration_batches(train, collator, task, args, 0, 1),
        "layers": spectral.spectral_layers(),
        "base": spectral.get_base_model(),
        "deltas": deltas,
    }


def _caught(matrix: torch.Tensor, plan) -> float:
    from s2ft.analysis.measures import energy_at

    permuted = matrix[plan.perm_rows.cpu()][:, plan.perm_cols.cpu()]
    return energy_at(permuted, plan.rows, plan.cols)


def _sketch_options(k: int, oversample: str, dtype: str, squares: str = "default") -> dict:
    """The sketched strategy's keywords for a variant: ``oversample`` "default", "2k+1" (Tropp et al.'s width, the
    library's before issue 31's memory work) or an integer ``p``; ``dtype`` "auto" (by the layer), "float32",
    "bfloat16"; ``squares`` (the Adam prior's row and column sums) "default", "exact" or "sketch"."""
    options: dict = {}
    if squares != "default":
        options["squares"] = squares
    if oversample == "2k+1":
        options["oversample"] = k + 1
    elif oversample != "default":
        options["oversample"] = int(oversample)
    if dtype != "auto":
        options["sketch_dtype"] = getattr(torch, dtype)
    return options


@contextlib.contextmanager
def _sketch_variant(options: dict):
    """Calibration's sketched strategies with ``options`` (keywords of their constructors) meanwhile."""
    import s2ft.tuner.calibration as calibration

    saved = dict(calibration.SKETCHED_STRATEGIES)
    try:
        for kind, strategy in saved.items():

            def init(self, layers, _strategy=strategy, **kw):
                _strategy.__init__(self, layers, **{**kw, **options})

            calibration.SKETCHED_STRATEGIES[kind] = type(strategy.__name__, (strategy,), {"__init__": init})
        yield
    finally:
        calibration.SKETCHED_STRATEGIES.update(saved)


def _variant_key(k: int, oversample: str, dtype: str, squares: str = "default") -> str:
    key = str(k) if (oversample, dtype) == ("default", "auto") else f"{k} p={oversample} {dtype}"
    return key if squares == "default" else f"{key} squares={squares}"


def measure(
    task_name: str,
    seed: int,
    ranks: list[int],
    full_steps: int,
    prior: str | None = None,
    oversamples: tuple[str, ...] = ("default",),
    dtypes: tuple[str, ...] = ("auto",),
    squares: tuple[str, ...] = ("default",),
) -> dict:
    from s2ft.tuner.calibration import compute_prior
    from s2ft.tuner.planner import plan_for

    job = _setup(task_name, seed, full_steps, prior)
    config, batches, layers, base, deltas = (
        job[k] for k in ("config", "batches", "layers", "base", "deltas")
    )
    start = time.perf_counter()
    exact = compute_prior(base, layers, batches, kind=config.prior, lr=config.prior_lr)
    seconds = {"exact": time.perf_counter() - start}
    plans = {n: plan_for(p.float(), n, config) for n, p in exact.items()}
    caught = _caught

    out: dict = {"seed": seed, "prior": config.prior, "layers": len(layers), "exact": {}, "ranks": {}}
    out["exact"]["loc"] = [caught(exact[n].float(), plans[n]) for n in layers]
    if deltas:
        out["exact"]["delta"] = [caught(deltas[n], plans[n]) for n in layers if n in deltas]
    variants = [(k, o, d, q) for k in ranks for o in oversamples for d in dtypes for q in squares]
    for k, oversample, dtype, square in variants:
        key = _variant_key(k, oversample, dtype, square)
        start = time.perf_counter()
        with _sketch_variant(_sketch_options(k, oversample, dtype, square)):
            sketch = compute_prior(base, layers, batches, kind=config.prior, rank=k, seed=config.seed)
        seconds[key] = time.perf_counter() - start
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
        out["ranks"][key] = row
    out["seconds"] = seconds
    return out


# Dense priors built from the batches' gradients g_b (float64), for --variants: which part of the sketched Adam
# prior (the Adafactor factoring of its second moment, or the rank) loses what.
def _adam(grads: list[torch.Tensor]) -> torch.Tensor:
    total, squares = sum(grads), sum(g * g for g in grads)
    return torch.where(squares == 0, 0.0, total / squares.sqrt().clamp_min(1e-300))


def _adam_factored(grads: list[torch.Tensor]) -> torch.Tensor:
    """``sqrt(ΣR) · diag(R^-1/2) G diag(C^-1/2)``: SketchedAdamPrior's matrix before the rank truncation."""
    total, squares = sum(grads), sum(g * g for g in grads)
    rows, cols = squares.sum(1), squares.sum(0)
    r = torch.where(rows > 0, (rows.sum() / rows.clamp_min(1e-300)).sqrt(), 0.0)
    c = torch.where(cols > 0, cols.clamp_min(1e-300).rsqrt(), 0.0)
    return r[:, None] * total * c[None, :]


def _adam_factored_sqrt(grads: list[torch.Tensor]) -> torch.Tensor:
    """The RMS ``sqrt(V)`` factored instead of ``V`` (rank 1 of the elementwise RMS, row and column sums of
    ``sqrt(Σ g²)``; needs the dense ``Σ g²``: a reference, not streamable)."""
    total, squares = sum(grads), sum(g * g for g in grads)
    rms = squares.sqrt()
    rows, cols = rms.sum(1), rms.sum(0)
    scale = torch.outer(rows, cols) / rms.sum()
    return torch.where(scale == 0, 0.0, total / scale.clamp_min(1e-300))


def _adam_factored_l1(grads: list[torch.Tensor]) -> torch.Tensor:
    """The RMS replaced by the mean absolute gradient ``Σ_b |g_b|``, factored from its row and column sums (linear
    in ``|g_b|``, so streamable in ``O(d_out + d_in)``)."""
    total, absolute = sum(grads), sum(g.abs() for g in grads)
    rows, cols = absolute.sum(1), absolute.sum(0)
    scale = torch.outer(rows, cols) / absolute.sum()
    return torch.where(scale == 0, 0.0, total / scale.clamp_min(1e-300))


def _sign_sum(grads: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_b sign(g_b)``: linear in a per-batch transform, so a sketch takes it exactly (no factoring)."""
    return sum(torch.sign(g) for g in grads)


def _adam_factored_per_batch(grads: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_b diag(R_b^-1/2) g_b diag(C_b^-1/2) sqrt(ΣR_b)``: each batch normalised by its own Adafactor factors
    (known when the batch ends, so a sketch takes the sum exactly)."""
    return sum(_adam_factored([g]) for g in grads)


def _l1_sketch():
    """The sketched Adam strategy with the normaliser factored from the row and column sums of ``Σ_b |g_b|``
    (``N = A Cᵀ / ΣA``, ``ΔŴ = -ΣA · diag(A⁻¹)(Σ g_b)diag(C⁻¹)``) instead of Adafactor's factored second moment:
    the same memory, tried as a fix (kept out of the library: it helped the text job and hurt the image job)."""
    from s2ft.ops.sketch import low_rank_from_sketches
    from s2ft.tuner.calibration import SketchedGradientPrior, _all_reduce

    class AbsoluteSketch(SketchedGradientPrior):
        per_call = False

        def __init__(self, layers, rank=16, seed=0, **options):
            super().__init__(layers, rank=rank, seed=seed)
            self.rows = {n: self.y[n].new_zeros(layer.d_out) for n, layer in layers.items()}
            self.cols = {n: self.y[n].new_zeros(layer.d_in) for n, layer in layers.items()}

        def add(self, name, grad):
            super().add(name, grad)
            self.rows[name] += grad.abs().sum(1)
            self.cols[name] += grad.abs().sum(0)

        def finish(self):
            self._reduce()
            _all_reduce((*self.rows.values(), *self.cols.values()))
            out = {}
            for n in self.layers:
                rows, cols = self.rows[n].double(), self.cols[n].double()
                r = torch.where(rows > 0, rows.sum() / rows.clamp_min(1e-300), 0.0)
                c = torch.where(cols > 0, 1.0 / cols.clamp_min(1e-300), 0.0)
                out[n] = low_rank_from_sketches(self.y[n], self.w[n], self.psi[n], r, c)
            return out

    return AbsoluteSketch


VARIANTS = {
    "adam": _adam,
    "adam-factored": _adam_factored,
    "adam-factored-rms": _adam_factored_sqrt,
    "adam-factored-per-batch": _adam_factored_per_batch,
    "adam-factored-l1": _adam_factored_l1,
    "sign-sum": _sign_sum,
    "gradient": lambda grads: sum(grads),
}


def measure_variants(
    task_name: str, seed: int, ranks: list[int], full_steps: int, variants: list[str], absolute: bool = False
) -> dict:
    """On one seed's batches: the batches' gradients one by one (the gradient prior of each batch alone), the
    dense priors of ``variants`` from them, and the library's sketched Adam and gradient priors at each k (and the
    library's exact ones, which the dense ``adam`` and ``gradient`` must equal). Per prior: its plan's ``ΔW``
    caught, and its locations shared with the exact Adam prior's plan."""
    from s2ft.tuner.calibration import compute_prior
    from s2ft.tuner.planner import plan_for

    job = _setup(task_name, seed, full_steps, None)
    config, batches, layers, base, deltas = (
        job[k] for k in ("config", "batches", "layers", "base", "deltas")
    )
    batches = list(batches)
    # the gradient prior of one batch is -g_b; the priors below are all odd in g, so -g_b serves as g_b
    per_batch = [compute_prior(base, layers, [b], kind="gradient") for b in batches]
    grads = {n: [p[n].double() for p in per_batch] for n in layers}
    del per_batch
    priors: dict[str, dict] = {v: {n: VARIANTS[v](grads[n]).float() for n in layers} for v in variants}
    library = {
        "adam (library)": compute_prior(base, layers, batches, kind="adam"),
        "gradient (library)": compute_prior(base, layers, batches, kind="gradient"),
    }
    check = {
        v: max(
            float((library[f"{v} (library)"][n] - priors[v][n]).abs().max() / priors[v][n].abs().max())
            for n in layers
        )
        for v in ("adam", "gradient")
        if v in priors
    }
    for kind in ("adam", "gradient"):
        for k in ranks:
            library[f"{kind} sketched k={k}"] = compute_prior(
                base, layers, batches, kind=kind, rank=k, seed=config.seed
            )
    if absolute:  # the |g_b| normaliser, on the same batches and test matrices
        from s2ft.tuner import calibration

        merged = calibration.SKETCHED_STRATEGIES["adam"]
        calibration.SKETCHED_STRATEGIES["adam"] = _l1_sketch()
        try:
            for k in ranks:
                library[f"adam sketched, |g| normaliser, k={k}"] = compute_prior(
                    base, layers, batches, kind="adam", rank=k, seed=config.seed
                )
        finally:
            calibration.SKETCHED_STRATEGIES["adam"] = merged
    priors.update(library)
    reference = {n: plan_for(library["adam (library)"][n], n, config) for n in layers}
    out: dict = {"seed": seed, "layers": len(layers), "check": check, "rows": {}}
    for label, prior in priors.items():
        row: dict = {"delta": [], "same": [], "kept": []}
        for n in layers:
            plan = plan_for(prior[n], n, config)
            mine = set((plan.rows * 100003 + plan.cols).tolist())
            theirs = set((reference[n].rows * 100003 + reference[n].cols).tolist())
            row["same"].append(len(mine & theirs) / len(mine))
            if n in deltas:
                row["delta"].append(_caught(deltas[n], plan))
            if "|g|" in label and "adam-factored-l1" in priors:
                row["kept"].append(prior[n].kept_energy(priors["adam-factored-l1"][n]))
            elif "sketched" in label and label.startswith("adam") and "adam-factored" in priors:
                row["kept"].append(prior[n].kept_energy(priors["adam-factored"][n]))
            elif "sketched" in label and label.startswith("gradient") and "gradient" in priors:
                row["kept"].append(prior[n].kept_energy(priors["gradient"][n]))
        out["rows"][label] = row
    return out


def variants_table(results: list[dict]) -> str:
    lines = [
        "| prior | "
        + " | ".join(f"seed {r['seed']}: ΔW caught (mean, min)" for r in results)
        + " | ΔW caught, mean over seeds | same locations as exact Adam's plan | kept of its dense prior |",
        "|---|" + "---|" * (len(results) + 3),
    ]
    for label in results[0]["rows"]:
        rows = [r["rows"][label] for r in results]
        caught = statistics.mean(statistics.mean(x["delta"]) for x in rows)
        same = statistics.mean(v for x in rows for v in x["same"])
        kept = [v for x in rows for v in x["kept"]]
        cells = [_mean(x["delta"]) for x in rows]
        lines.append(
            f"| {label} | {' | '.join(cells)} | {caught:.4f} | {same:.3f} | "
            f"{f'{statistics.mean(kept):.3f}' if kept else '–'} |"
        )
    return "\n".join(lines)


def _mean(values: list[float]) -> str:
    return "–" if not values else f"{statistics.mean(values):.3f} (min {min(values):.3f})"


def table(results: list[dict], ranks: list) -> str:
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
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=sorted(VARIANTS),
        help="instead: these dense priors from the batches' gradients, beside the library's exact and sketched "
        "Adam and gradient priors at --ranks, on the same batches (needs --full-finetune-steps)",
    )
    parser.add_argument(
        "--l1-sketch",
        action="store_true",
        help="with --variants: also the sketched Adam prior with its normaliser factored from the sums of |g_b| "
        "(instead of Adafactor's factored second moment) at --ranks",
    )
    parser.add_argument(
        "--oversamples",
        nargs="+",
        default=["default"],
        help="the co-range oversampling p of each sketch (l = k + p): default (the library's), 2k+1 (Tropp et "
        "al.'s l = 2k + 1) or an integer",
    )
    parser.add_argument(
        "--sketch-dtypes",
        nargs="+",
        default=["auto"],
        choices=["auto", "float32", "bfloat16"],
        help="the dtype the sketches are held in: auto (the library's, by the layer), float32, bfloat16",
    )
    parser.add_argument(
        "--squares",
        nargs="+",
        default=["default"],
        choices=["default", "exact", "sketch"],
        help="how the sketched Adam prior takes its second moment's row and column sums: default (the "
        "library's), exact (one more product per batch and layer) or sketch (estimated from the sketches)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = []
    if args.variants:
        for seed in args.seeds:
            results.append(
                measure_variants(
                    args.task,
                    seed,
                    args.ranks,
                    args.full_finetune_steps,
                    args.variants,
                    args.l1_sketch,
                )
            )
            print(f"seed {seed}: dense against library {results[-1]['check']}", file=sys.stderr)
        print(variants_table(results))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1, default=str)
        return 0
    for seed in args.seeds:
        results.append(
            measure(
                args.task,
                seed,
                args.ranks,
                args.full_finetune_steps,
                args.prior,
                tuple(args.oversamples),
                tuple(args.sketch_dtypes),
                tuple(args.squares),
            )
        )
        print(f"seed {seed}: calibration seconds {results[-1]['seconds']}", file=sys.stderr)
    keys = [
        _variant_key(k, o, d, q)
        for k in args.ranks
        for o in args.oversamples
        for d in args.sketch_dtypes
        for q in args.squares
    ]
    print(table(results, keys))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
