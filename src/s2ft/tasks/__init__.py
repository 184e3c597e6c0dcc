"""Task families: one module each, one line each in :data:`TASKS`."""

from __future__ import annotations

from s2ft.errors import RunError
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


__all__ = ["DEFAULT_TASK", "TASKS", "Loaded", "RunError", "Task", "TaskData", "get_task"]
