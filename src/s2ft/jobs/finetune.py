"""``s2ft finetune``: fine-tune a pretrained model on a task with a method, as a recipe of named phases.

    setup -> describe -> measure_before -> warm_up -> wrap_and_plan -> train -> evaluate -> save -> write_records

Each phase is a short function of one :class:`Run` (the state the phases share), fills in what it makes, and
returns the metrics it measured; :func:`run_finetune` merges them in phase order into ``metrics.json``. The task
(:mod:`s2ft.tasks`) and the method (:mod:`s2ft.methods`) supply every step that depends on them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from s2ft.io import atomic_write_text
from s2ft.jobs.args import FinetuneArgs
from s2ft.jobs.logs import log_to, logger
from s2ft.jobs.output import ADAPTER_DIR, RUN_FILE, staged_output
from s2ft.jobs.splits import calibration_batches, held_out, training_subset, with_targets
from s2ft.jobs.training import (
    cached_head_warmup,
    make_trainer,
    no_accelerator,
    peak_memory_mb,
    training_groups,
)
from s2ft.methods import get_method
from s2ft.tasks import get_task

if TYPE_CHECKING:
    from s2ft.methods import Method
    from s2ft.tasks import Task

SPLIT_PREFIXES = {
    "validation": "val",
    "test": "test",
}  # metrics.json keys: val_accuracy, test_perplexity, ...


@dataclass
class Run:
    """What the phases of one finetune share. ``setup`` fills everything up to ``collator``; ``wrap_and_plan``
    replaces ``model`` by the method's wrapped model and sets ``trainer``."""

    given: (
        FinetuneArgs  # the resolved options before the task's default targets: compare matches runs by these
    )
    args: FinetuneArgs  # the options in force (with the targets)
    task: Task
    method: Method
    processes: Any  # Accelerate's PartialState: this process's index, their number, the main one
    work_dir: str  # the staging folder that becomes --output when the job succeeds
    data: Any  # the task's TaskData: raw splits, name, info
    train_examples: int  # training examples trained on (after --max-train-samples and any the task dropped)
    splits: dict[str, Any]  # "train", "validation", "test", prepared by the task
    model: Any
    processor: Any
    head: list[str]  # the new head modules (trained fully by every method)
    collator: Any
    trainer: Any = None

    @property
    def is_main(self) -> bool:
        return self.processes.is_main_process


def resolve_source(value: str) -> str:
    """A local path made absolute (so the run can be evaluated from another folder); a name kept as given."""
    return os.path.abspath(value) if os.path.exists(value) else value


def run_finetune(args: FinetuneArgs) -> dict[str, Any]:
    """Run the whole job; returns the metrics also written to ``OUTPUT/metrics.json``."""
    from accelerate import PartialState
    from transformers import set_seed

    args = args.resolved()
    processes = PartialState(cpu=no_accelerator())
    with (
        staged_output(args.output, args.overwrite, processes.is_main_process) as work_dir,
        log_to(os.path.join(work_dir, "log.txt") if processes.is_main_process else None, args.quiet),
    ):
        set_seed(args.seed)
        run = setup(args, processes, work_dir)
        metrics = describe(run)
        metrics.update(measure_before(run))
        metrics.update(warm_up(run))
        metrics.update(wrap_and_plan(run))
        metrics.update(train(run))
        metrics.update(evaluate(run))
        if run.is_main:
            metrics.update(save(run))
            write_records(run, metrics)
        processes.wait_for_everyone()
    return metrics


def setup(args: FinetuneArgs, processes: Any, work_dir: str) -> Run:
    """Load the data and the pretrained model, fill in the task's default targets, prepare the splits."""
    task, method = get_task(args.task), get_method(args.method)
    data = task.load_data(args)
    train_raw = training_subset(data.train, args)
    logger.info(
        "task %s (%s): %d train, %d validation, %d test",
        task.name,
        data.name,
        len(train_raw),
        len(data.validation),
        len(data.test),
    )
    loaded = task.load_model(args.model, data.info, quantize=args.quantize)
    given, args = args, with_targets(task, args, loaded.model)
    task.check_args(args, loaded.model)
    raw = {
        "train": train_raw,
        "validation": held_out(data.validation, args),
        "test": held_out(data.test, args),
    }
    splits = {name: task.prepare(split, loaded.processor, args, name) for name, split in raw.items()}
    return Run(
        given=given,
        args=args,
        task=task,
        method=method,
        processes=processes,
        work_dir=work_dir,
        data=data,
        train_examples=len(splits["train"]),
        splits=splits,
        model=loaded.model,
        processor=loaded.processor,
        head=loaded.head,
        collator=task.collator(loaded.processor),
    )


def describe(run: Run) -> dict[str, Any]:
    """What the run is: task, method, model, data, seed, examples and processes."""
    return {
        "task": run.task.name,
        "method": run.args.method,
        "model": run.args.model,
        "dataset": run.data.name,
        "seed": run.args.seed,
        "train_examples": run.train_examples,
        "num_processes": run.processes.num_processes,
    }


def measure_before(run: Run) -> dict[str, Any]:
    """The task's metrics of the pretrained model before any training (e.g. the base perplexity)."""
    trainer = make_trainer(run.model, run.collator, run.args, run.work_dir)
    return run.task.before_training(trainer, run.processor, run.splits, run.work_dir)


def warm_up(run: Run) -> dict[str, Any]:
    """Train the new head alone first (``--head-warmup-steps``), or reuse a cached warmed head."""
    from transformers import set_seed

    args = run.args
    if not (args.head_warmup_steps > 0 and run.head):
        return {"head_warmup_seconds": 0.0, "head_warmup_reused": False}
    start = time.perf_counter()
    reused = cached_head_warmup(
        run.model, run.collator, args, run.work_dir, run.splits["train"], run.head, run.is_main
    )
    seconds = time.perf_counter() - start
    logger.info(
        "head warm-up: %d steps, %.1f s%s",
        args.head_warmup_steps,
        seconds,
        " (reused from the cache)" if reused else "",
    )
    set_seed(args.seed)  # what follows draws the same numbers whether the warm-up ran or was reused
    return {"head_warmup_seconds": round(seconds, 3), "head_warmup_reused": reused}


def wrap_and_plan(run: Run) -> dict[str, Any]:
    """The method wraps the model, then plans it from calibration batches (S2FT's calibration)."""
    args, processes = run.args, run.processes
    run.model = run.method.wrap(run.model, args, run.head)
    groups = training_groups(run.model, run.method, args)
    run.trainer = make_trainer(run.model, run.collator, args, run.work_dir, run.splits["train"], groups)
    start = time.perf_counter()

    def batches() -> list[dict]:
        return calibration_batches(
            run.splits["train"],
            run.collator,
            run.task,
            args,
            processes.process_index,
            processes.num_processes,
        )

    run.model.to(run.trainer.args.device)
    planned = run.method.plan(run.model, batches, args, progress=not args.quiet and run.is_main)
    seconds = time.perf_counter() - start if planned is not None else 0.0
    if planned is not None:
        logger.info("calibration: %.1f s over %d batches", seconds, args.calibration_batches)
    return {"calibration_seconds": round(seconds, 3)}


def train(run: Run) -> dict[str, Any]:
    """Train the wrapped model with the method's callbacks (S2FT's re-planning, ``--replan-at``); what each
    callback's ``metrics()`` returns is reported."""
    callbacks = run.method.callbacks(run.model, run.args)
    for callback in callbacks:
        run.trainer.add_callback(callback)
    start = time.perf_counter()
    run.trainer.train()
    metrics: dict[str, Any] = {"train_seconds": round(time.perf_counter() - start, 3)}
    for callback in callbacks:
        metrics.update(callback.metrics() if hasattr(callback, "metrics") else {})
    metrics["trainable_params"] = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    return metrics


def evaluate(run: Run) -> dict[str, Any]:
    """The task's metrics on validation and test (``val_accuracy``, ...), its baselines, the peak memory."""
    metrics: dict[str, Any] = {}
    for split, prefix in SPLIT_PREFIXES.items():
        scores = run.task.evaluate(run.trainer, run.splits[split])
        metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
    metrics.update(run.task.baseline(run.data))
    metrics["peak_memory_mb"] = round(peak_memory_mb(run.trainer.args.device), 1)
    return metrics


def save(run: Run) -> dict[str, Any]:
    """The task's extra outputs and the method's adapter (or whole model) into the run folder; its size."""
    run.task.after_training(run.trainer, run.processor, run.splits, run.work_dir)
    adapter_dir = os.path.join(run.work_dir, ADAPTER_DIR)
    run.method.save(run.model, adapter_dir, run.task)
    if run.method.saves_whole_model:
        run.task.save_processor(run.processor, adapter_dir)
    metrics: dict[str, Any] = {"adapter_bytes": run.method.stored_bytes(run.model, adapter_dir)}
    parts = run.method.stored_parts(run.model)
    if parts:
        metrics["adapter_bytes_parts"] = parts
    metrics["args"] = dataclasses.asdict(run.given)
    metrics["targets"] = run.args.targets
    return metrics


def write_records(run: Run, metrics: dict[str, Any]) -> None:
    """``run.json`` (what evaluate and merge rebuild the model from) and ``metrics.json``; the Trainer's
    scratch folder removed."""
    args = run.args
    record = {
        "task": run.task.name,
        "model": resolve_source(args.model),
        "method": args.method,
        "dataset": resolve_source(args.dataset),
        "info": run.data.info,
        "args": dataclasses.asdict(args),
    }
    atomic_write_text(os.path.join(run.work_dir, RUN_FILE), json.dumps(record, indent=2) + "\n")
    atomic_write_text(os.path.join(run.work_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(os.path.join(run.work_dir, "trainer"), ignore_errors=True)
    logger.info("metrics: %s", json.dumps({k: v for k, v in metrics.items() if k != "args"}))
