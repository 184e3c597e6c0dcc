"""The options of a job (``s2ft finetune``, and the runs of ``compare`` and ``analyze``).

:class:`JobArgs` holds the options every job has; :class:`FinetuneArgs` adds each method's own options
(:attr:`s2ft.methods.Method.options`) as fields of the same names. Fields left ``None`` take the task's default
(:attr:`s2ft.tasks.Task.defaults`), then :data:`COMMON_DEFAULTS` (a method's option: its fallback), when
:meth:`JobArgs.resolved` is called at the start of a job.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from s2ft.methods import DEFAULT_METHOD, get_method, options, owners
from s2ft.tasks import DEFAULT_TASK, TASKS, RunError, get_task
from s2ft.tasks.quantize import QUANTIZE

# The learning-rate schedules of --lr-schedule (transformers' names).
LR_SCHEDULES = ("linear", "cosine", "constant")

# Defaults of the task-dependent fields that a task does not set.
COMMON_DEFAULTS: dict[str, Any] = {
    "max_length": 64,
    "batch_size": 16,
    "max_train_samples": 0,
    "head_warmup_steps": 0,
    "head_lr": 2e-3,
    "epochs": 1.0,
    "eval_samples": 0,
    "output": "runs/default",
}


@dataclass
class JobArgs:
    """Options of ``s2ft finetune`` that every method has; ``None`` means the task's default."""

    task: str = DEFAULT_TASK
    model: str | None = None  # a local folder, a hub id, or the task's built-in default
    dataset: str | None = None  # a built-in data set, a local file or folder, or a datasets name
    method: str = DEFAULT_METHOD
    targets: list[str] | None = None
    head_warmup_steps: int | None = None  # train the new head alone this many steps first
    epochs: float | None = None
    max_steps: int = -1
    # The learning rate's schedule after a linear warm-up over warmup_ratio of the steps (the head warm-up
    # keeps its own: linear decay, no warm-up).
    lr_schedule: str = "linear"
    warmup_ratio: float = 0.0
    lr: float | None = None  # None: the method's default learning rate
    head_lr: float | None = None
    batch_size: int | None = None
    max_length: int | None = None
    max_train_samples: int | None = None  # 0: the whole training split
    eval_samples: int | None = None  # examples of validation and test scored (0: all)
    seed: int = 0
    compile: bool = False  # torch.compile the model in training (the Trainer's torch_compile)
    output: str | None = None  # the task's default run folder
    overwrite: bool = False
    quiet: bool = False
    text_column: str = "text"
    label_column: str = "label"
    image_column: str = "image"
    # A folder of warmed heads to reuse across runs that share every warm-up option (``s2ft compare``).
    head_warmup_cache: str | None = None
    # Load the base model's linear layers in 4 or 8 bits (bitsandbytes; tasks with ``quantizable``), QLoRA-style.
    quantize: str | None = None

    def resolved(self) -> JobArgs:
        """A copy with every ``None`` filled from the task's defaults, then :data:`COMMON_DEFAULTS`; validated."""
        task = get_task(self.task)
        declared = options()
        filled = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # lr: the task's learning rate for this method, else (None) the method's own default
            if value is None and f.name == "lr":
                value = task.defaults.get("lr", {}).get(self.method)
            elif value is None and f.name in declared:
                value = declared[f.name].resolve(task.defaults)
            elif value is None:
                value = task.defaults.get(f.name, COMMON_DEFAULTS.get(f.name))
            filled[f.name] = value
        args = type(self)(**filled)
        args.validate()
        return args

    def validate(self) -> None:
        method = get_method(self.method)
        for name in ("batch_size", "max_length"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise RunError(f"--{name.replace('_', '-')} must be positive, got {value}")
        for name in ("head_warmup_steps", "max_train_samples", "eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise RunError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.seed < 0:
            raise RunError(f"--seed must be >= 0, got {self.seed}")
        if (self.epochs is not None and self.epochs <= 0) and self.max_steps <= 0:
            raise RunError("give --epochs > 0 or --max-steps > 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise RunError(
                f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1):
            raise RunError(f"--warmup-ratio must be a number in [0, 1), got {self.warmup_ratio!r}")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise RunError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.quantize is not None:
            if self.quantize not in QUANTIZE:
                raise RunError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
            if not get_task(self.task).quantizable:
                quantizable = ", ".join(t.name for t in TASKS.values() if t.quantizable)
                raise RunError(f"--quantize is for the {quantizable} task; --task is {self.task!r}")
        if self.targets is not None and not self.targets and not isinstance(self.targets, str):
            raise RunError("--targets needs at least one module name")
        for option in options().values():
            value = getattr(self, option.name)
            problem = option.problem(value)
            if problem:
                raise RunError(problem)
            if option.exclusive and value != option.default and option not in method.options:
                labels = " and ".join(m.label for m in owners(option.name))
                raise RunError(f"{option.flag} is for {labels}; --method is {self.method!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else get_method(self.method).default_lr


FinetuneArgs = dataclasses.make_dataclass(
    "FinetuneArgs",
    [(o.name, Any, dataclasses.field(default=o.default)) for o in options().values()],
    bases=(JobArgs,),
)
FinetuneArgs.__module__ = __name__
FinetuneArgs.__doc__ = """Options of ``s2ft finetune``: :class:`JobArgs` and every method's options (fields of the
same names: ``n_frequency``, ``gamma``, ``lora_r``, ...); ``None`` means the task's default."""
