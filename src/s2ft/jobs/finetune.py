"""``s2ft finetune``: fine-tune a pretrained model on a task with a method, in named phases.

setup (data, model) -> head warm-up -> wrap -> plan (S2FT's calibration) -> train -> evaluate -> save. The task
(:mod:`s2ft.tasks`) and the method (:mod:`s2ft.methods`) supply every step that depends on them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any

from s2ft.io import atomic_write_text
from s2ft.jobs.args import FinetuneArgs
from s2ft.jobs.common import (
    ADAPTER_DIR,
    RUN_FILE,
    calibration_batches,
    held_out,
    log_to,
    logger,
    make_trainer,
    no_accelerator,
    peak_memory_mb,
    staged_output,
    training_subset,
    warm_head,
    with_targets,
)
from s2ft.methods import get_method
from s2ft.tasks import get_task

SPLIT_PREFIXES = {
    "validation": "val",
    "test": "test",
}  # metrics.json keys: val_accuracy, test_perplexity, ...


def resolve_source(value: str) -> str:
    """A local path made absolute (so the run can be evaluated from another folder); a name kept as given."""
    return os.path.abspath(value) if os.path.exists(value) else value


def run_finetune(args: FinetuneArgs) -> dict[str, Any]:
    """Run the whole job; returns the metrics also written to ``OUTPUT/metrics.json``."""
    from accelerate import PartialState
    from transformers import set_seed

    args = args.resolved()
    task, method = get_task(args.task), get_method(args.method)
    state = PartialState(cpu=no_accelerator())
    with (
        staged_output(args.output, args.overwrite, state.is_main_process) as work_dir,
        log_to(os.path.join(work_dir, "log.txt") if state.is_main_process else None, args.quiet),
    ):
        set_seed(args.seed)
        # setup
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
        loaded = task.load_model(args.model, data.info)
        model, processor, head = loaded.model, loaded.processor, loaded.head
        given, args = args, with_targets(task, args, model)  # ``given`` is what compare matches runs by
        task.check_args(args, model)
        splits = {
            name: task.prepare(split, processor, args, name)
            for name, split in (
                ("train", train_raw),
                ("validation", held_out(data.validation, args)),
                ("test", held_out(data.test, args)),
            )
        }
        collator = task.collator(processor)
        metrics: dict[str, Any] = {"task": task.name, "method": args.method, "model": args.model}
        metrics.update({"dataset": data.name, "seed": args.seed})
        before = task.before_training(
            make_trainer(model, collator, args, work_dir), processor, splits, work_dir
        )
        metrics.update(before)
        # head warm-up
        warmup_seconds, reused = 0.0, False
        if args.head_warmup_steps > 0 and head:
            start = time.perf_counter()
            reused = warm_head(model, collator, args, work_dir, splits["train"], head, state.is_main_process)
            warmup_seconds = time.perf_counter() - start
            logger.info(
                "head warm-up: %d steps, %.1f s%s",
                args.head_warmup_steps,
                warmup_seconds,
                " (reused from the cache)" if reused else "",
            )
            set_seed(args.seed)  # what follows draws the same numbers whether the warm-up ran or was reused
        # wrap and plan
        model = method.wrap(model, args, head)
        trainer = make_trainer(model, collator, args, work_dir, splits["train"])
        start = time.perf_counter()

        def batches() -> list[dict]:
            return calibration_batches(
                splits["train"], collator, task, args, state.process_index, state.num_processes
            )

        model.to(trainer.args.device)
        planned = method.plan(model, batches, args, progress=not args.quiet and state.is_main_process)
        calibration_seconds = time.perf_counter() - start if planned is not None else 0.0
        if planned is not None:
            logger.info("calibration: %.1f s over %d batches", calibration_seconds, args.calibration_batches)
        replan = None
        if args.replan_at:
            from s2ft.tuner.callbacks import ReplanCallback

            replan = ReplanCallback(model, args.replan_at)
            trainer.add_callback(replan)
        # train
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        if replan is not None:
            metrics["replan_step"] = replan.step
            metrics["replan_energy_kept"] = replan.energy_kept
        # evaluate
        metrics.update(
            {
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "calibration_seconds": round(calibration_seconds, 3),
                "head_warmup_seconds": round(warmup_seconds, 3),
                "head_warmup_reused": reused,
                "train_seconds": round(train_seconds, 3),
            }
        )
        for split, prefix in SPLIT_PREFIXES.items():
            metrics.update({f"{prefix}_{k}": v for k, v in task.evaluate(trainer, splits[split]).items()})
        metrics.update(task.baseline(data))
        metrics.update(
            {
                "train_examples": len(train_raw),
                "num_processes": state.num_processes,
                "peak_memory_mb": round(peak_memory_mb(trainer.args.device), 1),
            }
        )
        # save
        if state.is_main_process:
            task.after_training(trainer, processor, splits, work_dir)
            adapter_dir = os.path.join(work_dir, ADAPTER_DIR)
            method.save(model, adapter_dir, task)
            if method.saves_whole_model:
                task.save_processor(processor, adapter_dir)
            metrics["adapter_bytes"] = method.stored_bytes(model, adapter_dir)
            parts = method.stored_parts(model)
            if parts:
                metrics["adapter_bytes_parts"] = parts
            metrics["args"] = dataclasses.asdict(given)
            metrics["targets"] = args.targets
            run = {
                "task": task.name,
                "model": resolve_source(args.model),
                "method": args.method,
                "dataset": resolve_source(args.dataset),
                "info": data.info,
                "args": dataclasses.asdict(args),
            }
            atomic_write_text(os.path.join(work_dir, RUN_FILE), json.dumps(run, indent=2) + "\n")
            atomic_write_text(os.path.join(work_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
            shutil.rmtree(os.path.join(work_dir, "trainer"), ignore_errors=True)
            logger.info("metrics: %s", json.dumps({k: v for k, v in metrics.items() if k != "args"}))
        state.wait_for_everyone()
    return metrics
