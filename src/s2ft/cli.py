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
from s2ft.jobs.args import JOB_OPTIONS, FinetuneArgs, refuse_inapplicable
from s2ft.methods import METHODS, VARIANTS, Option, owners, planning_method
from s2ft.methods import options as method_options
from s2ft.tasks import TASKS, RunError, task_options, task_owners

_GIVEN = "_given_options"  # the namespace attribute listing the job options the user gave


def _per_task(field: str, fallback: Any = None) -> str:
    """``default per task: text-classification: 1000; causal-lm: 300; ...`` for a task-dependent option."""
    values = []
    for name, task in TASKS.items():
        value = task.defaults.get(field, fallback)
        shown = " ".join(map(str, value)) if isinstance(value, list) else value
        values.append(f"{name}: {shown}")
    return "default per task: " + "; ".join(values)


def _note_given(namespace: argparse.Namespace, dest: str) -> None:
    setattr(namespace, _GIVEN, {*getattr(namespace, _GIVEN, ()), dest})


class _Store(argparse.Action):
    """argparse's ``store``, noting that the option was given."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, values)
        _note_given(namespace, self.dest)


class _StoreTrue(argparse.Action):
    """argparse's ``store_true``, noting that the option was given."""

    def __init__(self, option_strings: list[str], dest: str, default: Any = False, help: str | None = None):
        super().__init__(option_strings, dest, nargs=0, const=True, default=default, help=help)

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, True)
        _note_given(namespace, self.dest)


class _Switch(argparse.BooleanOptionalAction):
    """``--x/--no-x``, noting that the option was given."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None) -> None:
        super().__call__(parser, namespace, values, option)
        _note_given(namespace, self.dest)


def add_option(parser: Any, option: Option) -> None:
    """The flag of one declared option (:class:`s2ft.options.Option`): its type, choices, default and help (with
    each task's default when it depends on the task)."""
    help_text = option.help
    task_set = any(option.name in t.defaults for t in TASKS.values())
    if option.default is None and option.per_task and (option.fallback is not None or task_set):
        if not callable(option.fallback):
            per_task = _per_task(option.name, option.fallback)
            help_text = f"{help_text}; {per_task}" if help_text else per_task
    elif option.default is not None and option.default is not False:
        help_text += " (default: %(default)s)"
    if option.type is bool:
        action = _Switch if option.default else _StoreTrue
        parser.add_argument(option.flag, action=action, default=option.default, help=help_text)
        return
    parser.add_argument(
        option.flag,
        action=_Store,
        type=option.type,
        choices=option.choices,
        nargs=option.nargs,
        metavar=option.metavar,
        default=option.default,
        help=help_text,
    )


def _add_job_options(p: argparse.ArgumentParser, command: str) -> None:
    """The options of the runs of ``command`` (finetune, compare, analyze), from their declarations: those every
    job has, then each task's and each method's own, one group per set of tasks or methods sharing them."""
    for option in JOB_OPTIONS:
        if command in option.commands:
            add_option(p, option)
    groups: dict[str, list[Option]] = {}
    for option in task_options().values():
        names = ", ".join(t.name for t in task_owners(option.name))
        groups.setdefault(f"options of the {names} task{'s' if ',' in names else ''}", []).append(option)
    for option in method_options().values():
        groups.setdefault(f"options of {', '.join(m.name for m in owners(option.name))}", []).append(option)
    for title, group_options in groups.items():
        group = p.add_argument_group(title)
        for option in group_options:
            if command in option.commands:
                add_option(group, option)


def _given(ns: argparse.Namespace) -> list[str]:
    """The job options the user gave on the command line (not those left at their defaults)."""
    return sorted(getattr(ns, _GIVEN, ()))


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
    _add_job_options(p, "finetune")
    p.set_defaults(handler=_finetune)


def _finetune(ns: argparse.Namespace) -> None:
    from s2ft.jobs.finetune import run_finetune

    args = _job_args(ns)
    refuse_inapplicable(_given(ns), args.task, [args.method], f"--method is {args.method!r}")
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
    _add_job_options(p, "compare")
    p.set_defaults(handler=_compare)


def _compare(ns: argparse.Namespace) -> None:
    from s2ft.jobs.compare import markdown_table, references, run_compare
    from s2ft.tasks import get_task

    task = get_task(ns.task)
    methods = [VARIANTS[v].method.name for v in ns.variants]
    refuse_inapplicable(_given(ns), task.name, methods, "none of --variants runs it")
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
    from s2ft.jobs.logs import log_to

    with log_to(None, ns.quiet):  # --quiet: no load reports or progress bars
        metrics = run_evaluate(ns.adapter, ns.split, ns.dataset, ns.quiet, ns.task)
    print(json.dumps(metrics, indent=2))


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
    _add_job_options(p, "analyze")
    p.set_defaults(handler=_analyze)


def _analyze(ns: argparse.Namespace) -> None:
    from s2ft.jobs.analyze import run_analyze
    from s2ft.jobs.logs import log_to

    args = _job_args(ns)
    planner = planning_method()
    refuse_inapplicable(_given(ns), args.task, [planner.name], f"analyze measures {planner.label}'s plan")
    with log_to(None, args.quiet):  # --quiet: no load reports or progress bars
        analysis = run_analyze(args, ns.output, ns.full_finetune_steps, ns.layers_per_pass)
    if not args.quiet:
        print(json.dumps(analysis["summary"], indent=2))
    print(f"report: {ns.output}/report.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2ft", description="Spectral parameter-efficient fine-tuning.")
    # no abbreviations: compare has no --lr, and "--lr 5e-3" must not be read as --lr-schedule
    commands = functools.partial(argparse.ArgumentParser, allow_abbrev=False)
    # argparse calls parser_class like a class; typeshed asks for the class itself, not a partial of it
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=commands)  # type: ignore[call-overload]
    for add in (_add_finetune, _add_evaluate, _add_merge, _add_export_lora, _add_compare, _add_analyze):
        add(sub)
    return parser


def _backends(ns: argparse.Namespace) -> set[str]:
    """The optional backends the job uses (:func:`s2ft.jobs.noise.backends_of`): its ``--quantize``, or that of
    the run it reads."""
    from s2ft.jobs.noise import backends_of

    quantize = getattr(ns, "quantize", None)
    if quantize is None and getattr(ns, "adapter", None):
        from s2ft.jobs.runs import read_run

        try:
            quantize = read_run(ns.adapter)[0].get("args", {}).get("quantize")
        except (RunError, AttributeError):
            quantize = None  # the job itself says what is wrong with the run
    return backends_of(quantize if isinstance(quantize, str) else None)


@names_jobs_extra  # a job's missing dependency: one line naming pip install "s2ft[jobs]"
def main(argv: list[str] | None = None) -> int:
    from s2ft.jobs.noise import unused_backends_quiet

    ns = build_parser().parse_args(argv)
    try:
        with unused_backends_quiet(_backends(ns)):  # no notices of backends the job does not use
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
