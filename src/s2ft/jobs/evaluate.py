"""``s2ft evaluate``: the task's metric for a finetune output on one split of its data (or of another data set)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

from s2ft.jobs.args import FinetuneArgs, applicable
from s2ft.jobs.runs import load_trained, read_run
from s2ft.jobs.splits import held_out
from s2ft.jobs.training import make_trainer
from s2ft.tasks import TASKS, RunError, Task, TaskData, get_task

SPLITS = ("train", "validation", "test")


def run_evaluate(
    path: str, split: str = "test", dataset: str | None = None, quiet: bool = False, task: str | None = None
) -> dict[str, Any]:
    """The run's task metric on ``split`` of its data set, or of ``dataset`` (data of the same task). ``task``,
    when given, must be the run's."""
    if split not in SPLITS:
        raise RunError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    run, _ = read_run(path)
    if task is not None and task != run["task"]:
        raise RunError(
            f"{path} is a {run['task']} run, not {task}; evaluate takes the run's own task (drop --task, or "
            f"pass a {task} run)"
        )
    recorded = run.get("args", {})
    fields = {f.name for f in dataclasses.fields(FinetuneArgs)}
    saved = {k: v for k, v in applicable(recorded).items() if k in fields}
    args = dataclasses.replace(FinetuneArgs(**saved), dataset=dataset or run["dataset"], quiet=quiet)
    args = args.resolved()
    run_task = get_task(run["task"])
    raw = _load_data(run_task, args, path, given=dataset is not None, scored=split)
    model, processor, run = load_trained(path)
    data = run_task.align(raw, run.get("info", {}), scored=split)
    chosen = getattr(data, split) if split == "train" else held_out(getattr(data, split), args)
    prepared = run_task.prepare(chosen, processor, args, split)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(model, run_task.collator(processor), args, tmp)
        metrics = run_task.evaluate(trainer, prepared)
    return {"adapter": path, "dataset": data.name, "split": split, "examples": len(prepared), **metrics}


def _load_data(task: Task, args: FinetuneArgs, path: str, given: bool, scored: str | None = None) -> TaskData:
    """The task's data for ``args.dataset``. When a ``--dataset`` the user gave cannot be read as the run's
    task's data but a local one reads as another task's, the error names both tasks."""
    try:
        return task.load_data(args, scored=scored)
    except RunError as original:
        if not (given and os.path.exists(args.dataset)):
            raise
        error = original
        for other in TASKS.values():
            if other is task:
                continue
            try:  # only to name what the data is; any failure means: not this task's either
                defaults = {o.name: o.default for o in other.options if getattr(args, o.name) is None}
                other.load_data(dataclasses.replace(args, task=other.name, **defaults))
            except Exception:
                continue
            error = RunError(
                f"--dataset {args.dataset} is {other.name} data, but {path} is a {task.name} run; evaluate it "
                f"on {task.name} data ({task.dataset_help})"
            )
            break
        raise error from None
