"""The examples a job uses: a seeded training subset, the held-out examples scored, the calibration batches, and
the task's default targets filled into the options."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from s2ft.jobs.args import FinetuneArgs

if TYPE_CHECKING:
    from s2ft.tasks import Task


def training_subset(train: Any, args: FinetuneArgs) -> Any:
    """At most ``max_train_samples`` of the training split (0: all), a seeded sample."""
    if args.max_train_samples and len(train) > args.max_train_samples:
        return train.shuffle(seed=args.seed).select(range(args.max_train_samples))
    return train


def with_targets(task: Task, args: FinetuneArgs, model: torch.nn.Module) -> FinetuneArgs:
    """``args`` with the task's default targets for ``model`` when ``--targets`` was not given."""
    if args.targets is not None:
        return args
    return dataclasses.replace(args, targets=task.default_targets(model))


def held_out(split: Any, args: FinetuneArgs) -> Any:
    """The first ``eval_samples`` examples of a validation or test split (0: all); splits are already seeded."""
    if args.eval_samples and len(split) > args.eval_samples:
        return split.select(range(args.eval_samples))
    return split


def calibration_batches(
    train: Any, collator: Any, task: Task, args: FinetuneArgs, rank: int, world: int
) -> list[dict]:
    """This process's share of the calibration subset: global batches ``rank, rank + world, ...`` of a seeded
    sample, batched by length (the prior sums batch-mean gradients, so with full batches it does not depend on
    how the examples are grouped, and short batches pad less). Summed over processes, the prior equals one
    process's over all ``calibration_batches`` batches."""
    count = min(len(train), args.calibration_batches * args.batch_size)
    subset = train.shuffle(seed=args.seed).select(range(count))
    examples = sorted((subset[i] for i in range(count)), key=task.length)
    batches = [
        collator(examples[start : start + args.batch_size]) for start in range(0, count, args.batch_size)
    ]
    return batches[rank::world]
