"""``s2ft analyze``: spectra of each adapted matrix's gradient prior (and of a short full fine-tune's ΔW) before
and after S2FT's permutations, for the job's model and task; writes analysis.json, figures and report.md."""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from typing import Any

import torch

from s2ft.jobs.args import FinetuneArgs
from s2ft.jobs.output import staged_output
from s2ft.jobs.splits import calibration_batches, training_subset, with_targets
from s2ft.jobs.training import make_trainer, warm_up_head
from s2ft.methods import full_method, planning_method
from s2ft.tasks import get_task


def full_finetune_delta(
    model: torch.nn.Module, collator: Any, args: FinetuneArgs, train: Any, names: list[str], steps: int
) -> dict[str, torch.Tensor]:
    """``ΔW`` ``(d_out, d_in)`` of a short full fine-tune (``steps`` optimizer steps) of a copy of ``model``, for
    the named layers, each in its layer kind's matrix view."""
    from s2ft.tuner.layers import weight_matrix

    tuned = copy.deepcopy(model).requires_grad_(True)
    before = {name: weight_matrix(tuned.get_submodule(name)).detach().float().clone() for name in names}
    full_args = dataclasses.replace(args, method=full_method().name, max_steps=steps, quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        make_trainer(tuned, collator, full_args, tmp, train).train()
    return {name: weight_matrix(tuned.get_submodule(name)).detach().float() - before[name] for name in names}


def run_analyze(
    args: FinetuneArgs, output: str, full_finetune_steps: int = 0, layers_per_pass: int | None = None
) -> dict[str, Any]:
    """Analyse every targeted matrix of the job's model (the plan of :func:`s2ft.methods.planning_method`, S2FT's,
    whatever ``args.method``) into ``output``: a new or empty folder, or an earlier analysis, which is replaced
    when the new one is complete (:func:`s2ft.jobs.output.staged_output`)."""
    args = args.resolved()
    with staged_output(output, True, True, kind="analysis") as work_dir:
        return _analyze(args, work_dir, full_finetune_steps, layers_per_pass)


def _analyze(
    args: FinetuneArgs, output: str, full_finetune_steps: int, layers_per_pass: int | None
) -> dict[str, Any]:
    from transformers import set_seed

    from s2ft.analysis.measures import analyze_model

    task = get_task(args.task)
    set_seed(args.seed)
    data = task.load_data(args)
    loaded = task.load_model(args.model, data.info, quantize=args.quantize)
    model, processor, head = loaded.model, loaded.processor, loaded.head
    args = with_targets(task, args, model)
    train = task.prepare(training_subset(data.train, args), processor, args, "train")
    collator = task.collator(processor)
    if args.head_warmup_steps > 0 and head:  # as finetune does: the prior (and ΔW) start from a warm head
        with tempfile.TemporaryDirectory() as tmp:
            warm_up_head(model, collator, dataclasses.replace(args, quiet=True), tmp, train, head)
    deltas = None
    if full_finetune_steps > 0:
        from s2ft.tuner.model import matches

        names = [n for n, m in model.named_modules() if m is not model and matches(n, args.targets)]
        deltas = full_finetune_delta(model, collator, args, train, names, full_finetune_steps)
    method = planning_method()
    spectral = method.wrap(model, dataclasses.replace(args, method=method.name), head)
    batches = calibration_batches(train, collator, task, args, 0, 1)
    return analyze_model(
        spectral,
        batches,
        full_finetune_delta=deltas,
        output_dir=output,
        layers_per_pass=layers_per_pass,
        progress=not args.quiet,
    )
