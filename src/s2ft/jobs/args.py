"""The options of a job (``s2ft finetune``, and the runs of ``compare`` and ``analyze``).

Fields left ``None`` take the task's default (:attr:`s2ft.tasks.Task.defaults`), then :data:`COMMON_DEFAULTS`,
when :meth:`FinetuneArgs.resolved` is called at the start of a job.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from s2ft.tasks import DEFAULT_TASK, RunError, get_task

# Defaults of the task-dependent fields that a task does not set.
COMMON_DEFAULTS: dict[str, Any] = {
    "n_frequency": 1000,
    "scaling": 150.0,
    "max_length": 64,
    "batch_size": 16,
    "max_train_samples": 0,
    "head_warmup_steps": 0,
    "head_lr": 2e-3,
    "epochs": 1.0,
    "calibration_batches": 16,
    "eval_samples": 0,
    "output": "runs/default",
}


@dataclass
class FinetuneArgs:
    """Options of ``s2ft finetune``; ``None`` means the task's default."""

    task: str = DEFAULT_TASK
    model: str | None = None  # a local folder, a hub id, or the task's built-in default
    dataset: str | None = None  # a built-in data set, a local file or folder, or a datasets name
    method: str = "s2ft"
    targets: list[str] | None = None
    n_frequency: int | None = None
    scaling: float | None = None
    gamma: float = 1.5
    permutation: str = "greedy"
    calibration_batches: int | None = None
    head_warmup_steps: int | None = None  # train the new head alone this many steps first
    lora_r: int = 8
    epochs: float | None = None
    max_steps: int = -1
    lr: float | None = None  # None: the method's default learning rate
    head_lr: float | None = None
    batch_size: int | None = None
    max_length: int | None = None
    max_train_samples: int | None = None  # 0: the whole training split
    eval_samples: int | None = None  # examples of validation and test scored (0: all)
    seed: int = 0
    output: str | None = None  # the task's default run folder
    overwrite: bool = False
    quiet: bool = False
    text_column: str = "text"
    label_column: str = "label"
    image_column: str = "image"
    # A folder of warmed heads to reuse across runs that share every warm-up option (``s2ft compare``).
    head_warmup_cache: str | None = None
    # S2FT ablations (used by ``s2ft compare``)
    permute: bool = True
    locations: str = "prior"
    prior: str = "gradient"  # S2FT: what the plan is made from (s2ft.config.PRIORS)
    # the "trajectory" prior's Adam learning rate; None: the task's full fine-tuning lr
    prior_lr: float | None = None
    replan_at: float = 0.0  # S2FT: re-plan from the trained ΔW after this fraction of the steps (0: never)

    def resolved(self) -> FinetuneArgs:
        """A copy with every ``None`` filled from the task's defaults, then :data:`COMMON_DEFAULTS`; validated."""
        task = get_task(self.task)
        filled = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # lr: the task's learning rate for this method, else (None) the method's own default
            if value is None and f.name == "lr":
                value = task.defaults.get("lr", {}).get(self.method)
            elif value is None and f.name == "prior_lr":
                from s2ft.methods import get_method

                value = task.defaults.get("lr", {}).get("full", get_method("full").default_lr)
            elif value is None:
                value = task.defaults.get(f.name, COMMON_DEFAULTS.get(f.name))
            filled[f.name] = value
        args = FinetuneArgs(**filled)
        args.validate()
        return args

    def validate(self) -> None:
        from s2ft.methods import get_method

        get_method(self.method)
        for name in ("batch_size", "calibration_batches", "n_frequency", "lora_r", "max_length"):
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
        from s2ft.config import PRIORS

        if self.prior not in PRIORS:
            raise RunError(f"--prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")
        if self.prior_lr is not None and not (math.isfinite(self.prior_lr) and self.prior_lr > 0):
            raise RunError(f"--prior-lr must be a finite number > 0, got {self.prior_lr}")
        if not (self.replan_at == 0 or 0 < self.replan_at < 1):
            raise RunError(
                f"--replan-at must be 0 (never) or a fraction of the steps in (0, 1), got {self.replan_at}"
            )
        if self.replan_at and self.method != "s2ft":
            raise RunError(f"--replan-at is for S2FT; --method is {self.method!r}")
        for name in ("lr", "head_lr", "scaling", "gamma"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise RunError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.targets is not None and not self.targets and not isinstance(self.targets, str):
            raise RunError("--targets needs at least one module name")

    @property
    def learning_rate(self) -> float:
        from s2ft.methods import get_method

        return self.lr if self.lr is not None else get_method(self.method).default_lr
