"""``s2ft evaluate``: the task's metric for a finetune output on one split of its data (or of another data set)."""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Any

from s2ft.jobs.args import FinetuneArgs
from s2ft.jobs.runs import load_trained
from s2ft.jobs.splits import held_out
from s2ft.jobs.training import make_trainer
from s2ft.tasks import RunError, get_task

SPLITS = ("train", "validation", "test")


def run_evaluate(
    path: str, split: str = "test", dataset: str | None = None, quiet: bool = False
) -> dict[str, Any]:
    if split not in SPLITS:
        raise RunError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    model, processor, run = load_trained(path)
    task = get_task(run["task"])
    saved = {
        k: v
        for k, v in run.get("args", {}).items()
        if k in {f.name for f in dataclasses.fields(FinetuneArgs)}
    }
    args = dataclasses.replace(FinetuneArgs(**saved), dataset=dataset or run["dataset"], quiet=quiet)
    args = args.resolved()
    data = task.align(task.load_data(args), run.get("info", {}))
    chosen = getattr(data, split) if split == "train" else held_out(getattr(data, split), args)
    prepared = task.prepare(chosen, processor, args, split)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(model, task.collator(processor), args, tmp)
        metrics = task.evaluate(trainer, prepared)
    return {"adapter": path, "dataset": data.name, "split": split, "examples": len(prepared), **metrics}
