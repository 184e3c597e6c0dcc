"""Task families: one module each, one line each in :data:`TASKS`."""

from __future__ import annotations

from s2ft.errors import RunError
from s2ft.options import Option
from s2ft.tasks.base import Loaded, Task, TaskData
from s2ft.tasks.causal_lm import CausalLM
from s2ft.tasks.image_classification import ImageClassification
from s2ft.tasks.text_classification import TextClassification

TASKS: dict[str, Task] = {
    task.name: task for task in (TextClassification(), CausalLM(), ImageClassification())
}
DEFAULT_TASK = TextClassification.name


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise RunError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def task_options() -> dict[str, Option]:
    """Every task's own options by name, in the order the tasks declare them (a shared option once)."""
    found: dict[str, Option] = {}
    for task in TASKS.values():
        for option in task.options:
            if found.setdefault(option.name, option) is not option:
                raise RuntimeError(f"two tasks declare different options named {option.name!r}")
    return found


def task_owners(name: str) -> list[Task]:
    """The tasks that declare the option ``name``."""
    return [t for t in TASKS.values() if any(o.name == name for o in t.options)]


__all__ = [
    "DEFAULT_TASK",
    "TASKS",
    "Loaded",
    "RunError",
    "Task",
    "TaskData",
    "get_task",
    "task_options",
    "task_owners",
]
