"""``s2ft merge``: a finetune output merged into its base model, saved as a plain transformers model."""

from __future__ import annotations

from s2ft.jobs.output import check_output, refuse_overlap, staged_output
from s2ft.jobs.runs import load_trained
from s2ft.methods import get_method
from s2ft.tasks import get_task


def run_merge(path: str, output: str, overwrite: bool = False) -> str:
    """Merge the adapter into the base model and save the model (and its processor) to ``output``."""
    refuse_overlap(path, output, "merges")
    check_output(output, overwrite, "merged")  # before the model is loaded; checked again when written
    model, processor, run = load_trained(path)
    task, method = get_task(run["task"]), get_method(run["method"])
    merged = method.merge(model)
    with staged_output(output, overwrite, True, kind="merged") as work_dir:
        task.save_model(merged, work_dir)
        task.save_processor(processor, work_dir)
    return output
