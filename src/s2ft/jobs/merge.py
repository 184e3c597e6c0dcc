"""``s2ft merge``: a finetune output merged into its base model, saved as a plain transformers model."""

from __future__ import annotations

import os

from s2ft.jobs.output import RUN_FILE, staged_output
from s2ft.jobs.runs import load_trained
from s2ft.methods import get_method
from s2ft.tasks import RunError, get_task


def run_merge(path: str, output: str, overwrite: bool = False) -> str:
    """Merge the adapter into the base model and save the model (and its processor) to ``output``."""
    _refuse_overlap(path, output)
    model, processor, run = load_trained(path)
    task, method = get_task(run["task"]), get_method(run["method"])
    merged = method.merge(model)
    with staged_output(output, overwrite, True, kind="merged") as work_dir:
        task.save_model(merged, work_dir)
        task.save_processor(processor, work_dir)
    return output


def _refuse_overlap(path: str, output: str) -> None:
    """Refuse an ``output`` that is the run being merged, lies inside it, or contains it: replacing it would
    destroy the run."""
    run_dir = os.path.realpath(path)
    if not os.path.isfile(os.path.join(run_dir, RUN_FILE)):
        run_dir = os.path.dirname(run_dir)  # the adapter/ folder of a run was given
    target = os.path.realpath(output) if output else ""
    inside = target == run_dir or target.startswith(run_dir + os.sep) or run_dir.startswith(target + os.sep)
    if target and inside:
        raise RunError(
            f"--output {output} overlaps the run it merges ({run_dir}); choose a folder outside it"
        )
