"""The options of a job (``s2ft finetune``, and the runs of ``compare`` and ``analyze``), each declared once.

Every option is one :class:`s2ft.options.Option`: those every job has in :data:`JOB_OPTIONS` (below), a task's own
in :attr:`s2ft.tasks.Task.options` (``--text-column``, ``--quantize``), a method's own in
:attr:`s2ft.methods.Method.options` (``--n-frequency``, ``--prior``). From them come :class:`JobArgs` (the job
options and the tasks'), :class:`FinetuneArgs` (and the methods'), whose fields ``run.json`` records, the flags of
the command line (:func:`s2ft.cli.build_parser`) and the checks of :meth:`FinetuneArgs.resolved`.

Fields left ``None`` take the task's default (:attr:`s2ft.tasks.Task.defaults`), then the option's ``fallback``,
when :meth:`FinetuneArgs.resolved` is called at the start of a job. A task's or method's option that does not apply
to the job's task or method is refused when given (:func:`refuse_inapplicable`), and recorded as ``None``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from s2ft.methods import DEFAULT_METHOD, METHODS, get_method, owners
from s2ft.methods import options as method_options
from s2ft.options import Option, finite_non_negative, non_negative, positive
from s2ft.tasks import DEFAULT_TASK, TASKS, RunError, get_task, task_options, task_owners

# The learning-rate schedules of --lr-schedule (transformers' names).
LR_SCHEDULES = ("linear", "cosine", "constant")


def _warmup_ratio(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and 0 <= value < 1
    return None if ok else "must be a number in [0, 1)"


def _module_names(value: Any) -> str | None:
    return None if isinstance(value, str) or len(value) else "needs at least one module name"


_LRS = ", ".join(f"{m.name} {m.default_lr:g}" for m in METHODS.values())

# The options every job has, in the order of the command line's help.
JOB_OPTIONS: tuple[Option, ...] = (
    Option(
        "method",
        str,
        DEFAULT_METHOD,
        "the fine-tuning method",
        choices=tuple(METHODS),
        commands=("finetune",),
    ),
    Option(
        "lr",
        float,
        None,
        f"learning rate of the trained weights ({_LRS})",
        check=finite_non_negative,
        commands=("finetune",),
        per_task=False,  # the task's rate for the method, else the method's default_lr (FinetuneArgs.resolved)
    ),
    Option(
        "seed", int, 0, "the seed of every random draw", check=non_negative, commands=("finetune", "analyze")
    ),
    Option(
        "output",
        str,
        None,
        "run folder: metrics.json, run.json, log.txt, adapter/",
        fallback="runs/default",
        commands=("finetune",),
    ),
    Option("overwrite", bool, False, "replace a run s2ft wrote earlier in --output", commands=("finetune",)),
    Option(
        "compile",
        bool,
        False,
        "torch.compile the model in training (the Trainer's torch_compile; inductor)",
        commands=("finetune",),
    ),
    Option("task", str, DEFAULT_TASK, "the task family", choices=tuple(TASKS)),
    Option("model", str, None, "; ".join(f"{n}: {t.model_help}" for n, t in TASKS.items())),
    Option("dataset", str, None, "; ".join(f"{n}: {t.dataset_help}" for n, t in TASKS.items())),
    Option("targets", str, None, "module names (exact or .suffix) to adapt", nargs="+", check=_module_names),
    Option(
        "head_warmup_steps",
        int,
        None,
        "train the new head alone this many steps first",
        fallback=0,
        check=non_negative,
    ),
    Option("epochs", float, None, "", fallback=1.0),
    Option("max_steps", int, -1, "overrides --epochs when > 0"),
    Option(
        "lr_schedule",
        str,
        "linear",
        "the learning rate's decay after the warm-up",
        choices=LR_SCHEDULES,
    ),
    Option(
        "warmup_ratio",
        float,
        0.0,
        "a linear warm-up of the learning rate over this fraction of the steps",
        check=_warmup_ratio,
    ),
    Option("head_lr", float, None, "learning rate of a new head", fallback=2e-3, check=finite_non_negative),
    Option("batch_size", int, None, "per process", fallback=16, check=positive),
    Option("max_length", int, None, "tokens per example", fallback=64, check=positive),
    Option("max_train_samples", int, None, "0: the whole training split", fallback=0, check=non_negative),
    Option(
        "eval_samples", int, None, "validation/test examples scored, 0: all", fallback=0, check=non_negative
    ),
    Option("quiet", bool, False, "no progress bars or console log"),
    # A folder of warmed heads to reuse across runs that share every warm-up option (``s2ft compare``'s own).
    Option("head_warmup_cache", str, None, "", commands=()),
)


def all_options() -> dict[str, Option]:
    """Every option of a job by name: :data:`JOB_OPTIONS`, then the tasks', then the methods'."""
    found: dict[str, Option] = {o.name: o for o in JOB_OPTIONS}
    for option in (*task_options().values(), *method_options().values()):
        if found.setdefault(option.name, option) is not option:
            raise RuntimeError(f"two declarations of an option named {option.name!r}")
    return found


def refuse_inapplicable(names: Iterable[str], task: str, methods: Sequence[str], method_context: str) -> None:
    """Refuse (:class:`RunError`) the first of the options ``names`` (given by the user) that is a task's option
    ``task`` does not take, or a method's option none of ``methods`` takes. ``method_context`` says which method
    the job runs (``"--method is 'fourierft'"``)."""
    tasks, methods_ = task_options(), method_options()
    for name in names:
        if name in tasks and not any(o.name == name for o in get_task(task).options):
            takers = [t.name for t in task_owners(name)]
            noun = "task" if len(takers) == 1 else "tasks"
            raise RunError(
                f"{tasks[name].flag} is for the {', '.join(takers)} {noun}; --task is {task!r} "
                f"(leave {tasks[name].flag} out, or choose --task {takers[0]})"
            )
        if name in methods_ and not any(any(o.name == name for o in get_method(m).options) for m in methods):
            owning = owners(name)
            labels = " and ".join(m.label for m in owning)
            raise RunError(
                f"{methods_[name].flag} is for {labels}; {method_context} (leave {methods_[name].flag} out"
                + (
                    f", or choose --method {owning[0].name})"
                    if method_context.startswith("--method")
                    else ")"
                )
            )


def applies(name: str, task: str, method: str) -> bool:
    """Whether the option ``name`` applies to a job of ``task`` and ``method`` (every job option does)."""
    if name in task_options():
        return any(o.name == name for o in get_task(task).options)
    if name in method_options():
        return any(o.name == name for o in get_method(method).options)
    return True


def applicable(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded job's options (``run.json``'s ``args``) without those that do not apply to its task and method
    (older versions recorded them, with any value the user gave, though they did nothing)."""
    task, method = recorded.get("task", DEFAULT_TASK), recorded.get("method", DEFAULT_METHOD)
    if task not in TASKS or method not in METHODS:
        return dict(recorded)
    return {k: v for k, v in recorded.items() if applies(k, task, method)}


def for_method(args: Any, method: str) -> Any:
    """``args`` for a run of ``method`` (``s2ft compare``'s variants): the other methods' options back at their
    defaults, so that an option given for some variants (``--gamma`` for S2FT's) is not refused for the others."""
    mine = {o.name for o in get_method(method).options}
    reset = {name: o.default for name, o in method_options().items() if name not in mine}
    return dataclasses.replace(args, method=method, **reset)


class _Options:
    """What the jobs' argument classes do with their fields (every field is a declared :class:`Option`)."""

    def resolved(self) -> Any:
        """A copy with every ``None`` filled from the task's defaults, then the option's fallback; validated. An
        option of a task or method other than the job's is refused when set (:func:`refuse_inapplicable`), and
        becomes ``None``."""
        task, method = get_task(self.task), get_method(self.method)  # type: ignore[attr-defined]
        declared = all_options()
        given = [name for name, o in declared.items() if o.given(getattr(self, name, None))]
        refuse_inapplicable(given, task.name, [method.name], f"--method is {method.name!r}")
        filled = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not applies(f.name, task.name, method.name):
                value = None  # recorded as not applying
            elif value is None and f.name == "lr":  # the task's rate for this method, else the method's own
                value = task.defaults.get("lr", {}).get(method.name)
            elif value is None:
                value = declared[f.name].resolve(task.defaults)
            filled[f.name] = value
        args = type(self)(**filled)
        args.validate()
        return args

    def validate(self) -> None:
        for name, option in all_options().items():
            problem = option.problem(getattr(self, name, None))
            if problem:
                raise RunError(problem)
        method, quantize = get_method(self.method), self.quantize  # type: ignore[attr-defined]
        if quantize is not None and method.trains_everything:
            adapters = ", ".join(m.name for m in METHODS.values() if not m.trains_everything)
            raise RunError(
                f"--quantize {quantize} keeps the base's linear weights quantized and frozen, so --method "
                f"{method.name} would train only the rest (embeddings, norms, head): leave --quantize out to train "
                f"every weight, or choose an adapter method ({adapters})"
            )
        epochs, max_steps = self.epochs, self.max_steps  # type: ignore[attr-defined]
        if (epochs is not None and epochs <= 0) and max_steps <= 0:
            raise RunError("give --epochs > 0 or --max-steps > 0")

    @property
    def learning_rate(self) -> float:
        lr = self.lr  # type: ignore[attr-defined]
        return lr if lr is not None else get_method(self.method).default_lr  # type: ignore[attr-defined]


def _fields(declared: Iterable[Option]) -> list[tuple[str, Any, Any]]:
    return [(o.name, Any, dataclasses.field(default=o.default)) for o in declared]


if TYPE_CHECKING:  # what type checkers see: classes of any attribute (the fields are made below)

    class JobArgs(_Options):
        __dataclass_fields__: ClassVar[dict[str, Any]]

        def __init__(self, **fields: Any) -> None: ...
        def __getattr__(self, name: str) -> Any: ...

    class FinetuneArgs(JobArgs): ...

else:
    JobArgs = dataclasses.make_dataclass(
        "JobArgs", _fields((*JOB_OPTIONS, *task_options().values())), bases=(_Options,)
    )
    JobArgs.__module__ = __name__
    JobArgs.__doc__ = """Options of ``s2ft finetune`` that every method has (:data:`JOB_OPTIONS` and every task's
    own options); ``None`` means the task's default."""
    FinetuneArgs = dataclasses.make_dataclass(
        "FinetuneArgs", _fields(method_options().values()), bases=(JobArgs,)
    )
    FinetuneArgs.__module__ = __name__
    FinetuneArgs.__doc__ = """Options of ``s2ft finetune``: :class:`JobArgs` and every method's options (fields
    of the same names: ``n_frequency``, ``gamma``, ``lora_r``, ...); ``None`` means the task's default."""
