"""The ``s2ft`` command line. It only parses arguments and calls the jobs (:mod:`s2ft.jobs`)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from typing import Any

from s2ft.errors import names_jobs_extra
from s2ft.io import storage_problem
from s2ft.jobs.args import COMMON_DEFAULTS, LR_SCHEDULES, FinetuneArgs
from s2ft.methods import METHODS, Option, owners
from s2ft.methods import options as method_options
from s2ft.tasks import TASKS, RunError
from s2ft.tasks.quantize import QUANTIZE

_DEFAULTS = FinetuneArgs()


def _per_task(field: str, fallback: Any = None) -> str:
    """``default per task: text-classification: 1000; causal-lm: 300; ...`` for a task-dependent option."""
    values = []
    for name, task in TASKS.items():
        value = task.defaults.get(field, COMMON_DEFAULTS.get(field, fallback))
        shown = " ".join(map(str, value)) if isinstance(value, list) else value
        values.append(f"{name}: {shown}")
    return "default per task: " + "; ".join(values)


def _add_job_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``finetune``, ``compare`` and ``analyze``: task, model, data, training, and the methods'
    own options."""
    d = _DEFAULTS
    p.add_argument(
        "--task", default=d.task, choices=list(TASKS), help="the task family (default: %(default)s)"
    )
    p.add_argument(
        "--model",
        default=None,
        help="; ".join(f"{n}: {t.model_help}" for n, t in TASKS.items()) + ". " + _per_task("model"),
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="; ".join(f"{n}: {t.dataset_help}" for n, t in TASKS.items()) + ". " + _per_task("dataset"),
    )
    p.add_argument("--text-column", default=d.text_column)
    p.add_argument("--label-column", default=d.label_column)
    p.add_argument("--image-column", default=d.image_column, help="image-classification: the image column")
    p.add_argument(
        "--targets",
        nargs="+",
        default=None,
        help=f"module names (exact or .suffix) to adapt; {_per_task('targets')}",
    )
    p.add_argument(
        "--head-warmup-steps",
        type=int,
        default=None,
        help=f"train the new head alone this many steps first; {_per_task('head_warmup_steps')}",
    )
    p.add_argument("--epochs", type=float, default=None, help=_per_task("epochs"))
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="overrides --epochs when > 0")
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=d.lr_schedule,
        help="the learning rate's decay after the warm-up (default: %(default)s)",
    )
    p.add_argument(
        "--warmup-ratio",
        type=float,
        default=d.warmup_ratio,
        help="a linear warm-up of the learning rate over this fraction of the steps (default: %(default)s)",
    )
    p.add_argument(
        "--head-lr", type=float, default=None, help=f"learning rate of a new head; {_per_task('head_lr')}"
    )
    p.add_argument("--batch-size", type=int, default=None, help=f"per process; {_per_task('batch_size')}")
    p.add_argument(
        "--max-length", type=int, default=None, help=f"tokens per example; {_per_task('max_length')}"
    )
    p.add_argument(
        "--max-train-samples",
        type=int,
        default=None,
        help=f"0: the whole training split; {_per_task('max_train_samples')}",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help=f"validation/test examples scored, 0: all; {_per_task('eval_samples')}",
    )
    p.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default=None,
        help="load the base model's linear layers (not the output layer) in 4 bits (nf4) or 8 bits with "
        "bitsandbytes, QLoRA-style, or with torchao's weight-only int8 or int4 (groups of 32); causal-lm only",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or console log")
    _add_method_options(p)


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """The methods' own options (:attr:`s2ft.methods.Method.options`), one group per set of methods sharing them."""
    groups: dict[tuple[str, ...], list[Option]] = {}
    for option in method_options().values():
        groups.setdefault(tuple(m.name for m in owners(option.name)), []).append(option)
    for names, group_options in groups.items():
        group = p.add_argument_group(f"options of {', '.join(names)}")
        for option in group_options:
            help_text = option.help
            if option.default is None and option.fallback is not None and not callable(option.fallback):
                help_text += f"; {_per_task(option.name, option.fallback)}"
            elif option.default is not None:
                help_text += " (default: %(default)s)"
            kind: dict[str, Any] = (
                {"action": argparse.BooleanOptionalAction}
                if option.type is bool
                else {"type": option.type, "choices": option.choices}
            )
            group.add_argument(option.flag, default=option.default, help=help_text, **kind)


def _budgeted(field: str) -> str:
    """The methods whose budget (the option ``s2ft compare`` sweeps) is ``field``: ``"s2ft, fourierft"``."""
    return ", ".join(m.name for m in METHODS.values() if m.budget == field)


def _job_args(ns: argparse.Namespace) -> FinetuneArgs:
    names = {f.name for f in dataclasses.fields(FinetuneArgs)}
    return FinetuneArgs(**{k: v for k, v in vars(ns).items() if k in names})


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on a task (default: S2FT on MiniLM-L6, Austen novels)",
        description="Fine-tune a pretrained model. With no arguments: S2FT on MiniLM-L6's query and value "
        "weights, classifying sentences by which of Jane Austen's six novels they come from. "
        "--task causal-lm and --task image-classification have defaults of their own.",
    )
    p.add_argument("--method", default=_DEFAULTS.method, choices=list(METHODS))
    lrs = ", ".join(f"{m.name} {m.default_lr:g}" for m in METHODS.values())
    p.add_argument("--lr", type=float, default=None, help=f"learning rate of the trained weights ({lrs})")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("--compile", action="store_true", help="torch.compile the model in training (inductor)")
    p.add_argument(
        "--output",
        default=None,
        help=f"run folder: metrics.json, run.json, log.txt, adapter/; {_per_task('output')}",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run s2ft wrote earlier in --output")
    _add_job_options(p)
    p.set_defaults(handler=_finetune)


def _finetune(ns: argparse.Namespace) -> None:
    from s2ft.jobs.finetune import run_finetune

    args = _job_args(ns)
    metrics = run_finetune(args)
    if not args.quiet:
        shown = (
            "task",
            "method",
            "trainable_params",
            "adapter_bytes",
            "calibration_seconds",
            "train_seconds",
        )
        scores = [k for k in metrics if k.startswith(("val_", "test_", "base_"))]
        print(json.dumps({k: metrics.get(k) for k in (*shown, *scores)}, indent=2))
        print(f"saved to {args.resolved().output}")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    from s2ft.jobs.compare import VARIANTS

    p = sub.add_parser(
        "compare",
        help="several methods on the same task, split and seeds: results.json, results.md, a plot",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        metavar="VARIANT",
        help=f"among: {', '.join(VARIANTS)} (default: all)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--budgets",
        nargs="+",
        type=int,
        default=None,
        metavar="N",
        help=f"sweep n_frequency of the variants of {_budgeted('n_frequency')} (e.g. 100 300 1000 3000)",
    )
    p.add_argument(
        "--lora-ranks",
        nargs="+",
        type=int,
        default=None,
        metavar="R",
        help=f"sweep the rank of the variants of {_budgeted('lora_r')} (e.g. 1 2 4 8)",
    )
    p.add_argument(
        "--output",
        default=None,
        help="results folder (default: runs/compare-TASK): a new or empty folder, or an earlier comparison's, "
        "whose finished runs with the same options are reused; several compare processes may share it (each "
        "run is claimed with a lock file)",
    )
    _add_job_options(p)
    p.set_defaults(handler=_compare)


def _compare(ns: argparse.Namespace) -> None:
    from s2ft.jobs.compare import markdown_table, references, run_compare
    from s2ft.tasks import get_task

    task = get_task(ns.task)
    ns.output = ns.output or f"runs/compare-{task.name}"
    try:
        results = run_compare(
            _job_args(ns),
            ns.variants,
            ns.seeds,
            ns.output,
            progress=not ns.quiet,
            budgets=ns.budgets,
            lora_ranks=ns.lora_ranks,
        )
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"finished runs and their tables are kept in {ns.output}") from None
    print(markdown_table(results["summary"], references(results["runs"], task), task.metric))
    print(f"results in {ns.output}")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="the task's metric for a finetune output on a split")
    p.add_argument("--adapter", required=True, help="a finetune --output folder (or its adapter/ folder)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--dataset", default=None, help="another data set of the same task (default: the run's)")
    p.add_argument(
        "--task", default=None, choices=list(TASKS), help="optional: the run's task, checked against the run"
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_evaluate)


def _evaluate(ns: argparse.Namespace) -> None:
    from s2ft.jobs.evaluate import run_evaluate

    print(json.dumps(run_evaluate(ns.adapter, ns.split, ns.dataset, ns.quiet, ns.task), indent=2))


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge", help="merge an adapter into its base model; the result needs transformers only"
    )
    p.add_argument("--adapter", required=True, help="a finetune --output folder (or its adapter/ folder)")
    p.add_argument("--output", required=True, help="folder for the merged model and its processor")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_merge)


def _merge(ns: argparse.Namespace) -> None:
    from s2ft.jobs.merge import run_merge

    print(f"merged model saved to {run_merge(ns.adapter, ns.output, ns.overwrite)}")


def _add_export_lora(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-lora",
        help=f"a {'/'.join(m.name for m in METHODS.values() if 'lora' in m.exports)} run's adapter as a PEFT LoRA "
        "adapter (SVD of each ΔW), for LoRA-only serving",
    )
    p.add_argument("--adapter", required=True, help="a finetune --output folder (or its adapter/ folder)")
    p.add_argument(
        "--rank",
        required=True,
        help="the LoRA rank (e.g. 8), or the share of each ΔW's energy to keep (e.g. 0.9)",
    )
    p.add_argument("--output", required=True, help="folder for the PEFT LoRA adapter and lora_export.json")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_export_lora)


def _export_lora(ns: argparse.Namespace) -> None:
    from s2ft.jobs.export_lora import parse_rank, run_export_lora

    report = run_export_lora(ns.adapter, parse_rank(ns.rank), ns.output, ns.overwrite)
    print(json.dumps({k: v for k, v in report.items() if k != "layers"}, indent=2))
    print(f"LoRA adapter saved to {ns.output} (load it with peft.PeftModel.from_pretrained)")


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="spectra of each adapted matrix's gradient prior before and after S2FT's permutations",
        description="For every targeted matrix: the share of spectral energy in the top-n coefficients, at S2FT's "
        "and FourierFT's locations, the fraction needed for a 10%% relative error, and the permutation path "
        "length, before and after the permutations. Writes analysis.json, PNG figures and report.md.",
    )
    p.add_argument(
        "--output",
        default="runs/analysis",
        help="folder for analysis.json, figures and report.md: a new or empty folder, or an earlier analysis "
        "(replaced once the new one is complete)",
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
    from s2ft.jobs.analyze import run_analyze
    from s2ft.jobs.logs import log_to

    args = _job_args(ns)
    with log_to(None, args.quiet):  # --quiet: no load reports or progress bars
        analysis = run_analyze(args, ns.output, ns.full_finetune_steps, ns.layers_per_pass)
    if not args.quiet:
        print(json.dumps(analysis["summary"], indent=2))
    print(f"report: {ns.output}/report.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2ft", description="Spectral parameter-efficient fine-tuning.")
    # no abbreviations: compare has no --lr, and "--lr 5e-3" must not be read as --lr-schedule
    commands = functools.partial(argparse.ArgumentParser, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=commands)
    for add in (_add_finetune, _add_evaluate, _add_merge, _add_export_lora, _add_compare, _add_analyze):
        add(sub)
    return parser


@names_jobs_extra  # a job's missing dependency: one line naming pip install "s2ft[jobs]"
def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        ns.handler(ns)
    except RunError as e:
        print(f"s2ft {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        problem = storage_problem(e)  # a full disk outside a job's staged output (compare's tables)
        if problem is None:
            raise
        print(f"s2ft {ns.command}: error: {problem}; free some space and run again", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        kept = str(e) or "nothing was written"
        print(f"s2ft {ns.command}: interrupted; {kept}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
