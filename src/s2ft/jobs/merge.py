"""``s2ft merge``: a finetune output merged into its base model, saved as a plain transformers model."""

from __future__ import annotations

from s2ft.jobs.common import load_trained, staged_output
from s2ft.methods import get_method
from s2ft.tasks import get_task


def run_merge(path: str, output: str, overwrite: bool = False) -> str:
    """Merge the adapter into the base model and save the model (and its processor) to ``output``."""
    model, processor, run = load_trained(path)
    task, method = get_task(run["task"]), get_method(run["method"])
    merged = method.merge(model)
    with staged_output(output, overwrite, True) as work_dir:
        task.save_model(merged, work_dir)
        task.save_processor(processor, work_dir)
    return output
