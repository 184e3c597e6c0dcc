"""One declaration per job option: its name, type, default, help, validation, and which commands show it.

Every option of a job (``s2ft finetune``, and the runs of ``compare`` and ``analyze``) is one :class:`Option`:
the jobs' common ones in :data:`s2ft.jobs.args.JOB_OPTIONS`, a task's own in :attr:`s2ft.tasks.Task.options`, a
method's own in :attr:`s2ft.methods.Method.options`. Which tasks and methods take an option follows from who
declares it. From these declarations come the fields of :class:`s2ft.jobs.args.FinetuneArgs` (and so
``run.json``), the command line's flags (:func:`s2ft.cli.build_parser`) and the checks of a job's options.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The commands whose runs take the job options (each shows a flag for an option that names it in ``commands``).
JOB_COMMANDS = ("finetune", "compare", "analyze")


@dataclass(frozen=True)
class Option:
    """One option of a job: a field of the jobs' arguments and the flag ``--<name with dashes>``.

    Methods (and tasks) that share an option (``n_frequency``, ``label_column``) declare the same object.
    """

    name: str
    type: Callable[[str], Any]  # parses the command line: int, float, str, bool, or a parser of its own
    default: Any  # the field's default; None: resolved at the start of a job (``fallback``)
    help: str
    choices: tuple[Any, ...] | None = None
    # For ``default=None``: the value when the task sets none (``task.defaults[name]`` comes first); a constant,
    # or a function of the task's defaults.
    fallback: Any = None
    # The requirement a value breaks ("must be positive"), or None when it is valid; None values are not checked.
    check: Callable[[Any], str | None] | None = None
    # Whether the option changes a warmed head (no option of today's methods does: the warm-up comes first).
    affects_warmup: bool = False
    nargs: str | None = None  # "+": a list of values
    metavar: str | None = None
    # The commands that show the flag (a field that is no flag: none, e.g. compare's head warm-up cache).
    commands: tuple[str, ...] = JOB_COMMANDS
    # For ``default=None``: whether the help lists each task's default ("default per task: ...").
    per_task: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def resolve(self, task_defaults: dict[str, Any]) -> Any:
        """The value of an option left None: the task's default, else the fallback."""
        if self.name in task_defaults:
            return task_defaults[self.name]
        return self.fallback(task_defaults) if callable(self.fallback) else self.fallback

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (``"--gamma must be ..., got -1"``), or None."""
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            return f"{self.flag} must be one of {', '.join(map(str, self.choices))}, got {value!r}"
        broken = self.check(value) if self.check is not None else None
        return f"{self.flag} {broken}, got {value!r}" if broken else None

    def given(self, value: Any) -> bool:
        """Whether ``value`` was set by the user (neither left None nor the declared default)."""
        return value is not None and value != self.default


def positive(value: Any) -> str | None:
    return "must be positive" if value <= 0 else None


def non_negative(value: Any) -> str | None:
    return "must be >= 0" if value < 0 else None


def finite_non_negative(value: Any) -> str | None:
    return None if math.isfinite(value) and value >= 0 else "must be a finite number >= 0"


def finite_positive(value: Any) -> str | None:
    return None if math.isfinite(value) and value > 0 else "must be a finite number > 0"
