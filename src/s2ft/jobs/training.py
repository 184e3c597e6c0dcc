"""Training through the transformers ``Trainer`` (and so Accelerate: one process, or several under
``accelerate launch``, DDP): the Trainer of a job, its optimizer groups, and the head warm-up.

Who is trained at which learning rate:

- **training** (:func:`training_groups`): the parameters the method left trainable, split by ``method.is_head``:
  the adapter's own (spectral coefficients, LoRA factors, or every weight under full fine-tuning) at the
  method's learning rate ``args.learning_rate``, the copies of the task's new heads at ``args.head_lr``;
- **head warm-up** (:func:`head_warmup_groups`): the new head modules alone, all at ``args.head_lr``, on the
  unwrapped model with everything else frozen.

Both use AdamW without weight decay and the Trainer's linear schedule from the group's learning rate to zero.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import PrinterCallback

from s2ft.jobs.args import FinetuneArgs
from s2ft.jobs.logs import LogToFile

if TYPE_CHECKING:
    from s2ft.methods import Method


def no_accelerator() -> bool:
    """True on a CPU-only machine, where Accelerate must be told so to run several processes (gloo)."""
    accelerator = getattr(torch, "accelerator", None)
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on CUDA; peak resident memory of this process elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- optimizer groups
def training_groups(model: torch.nn.Module, method: Method, args: FinetuneArgs) -> list[dict[str, Any]]:
    """AdamW groups of training: the trainable parameters of the wrapped ``model`` (in ``named_parameters``
    order) at ``args.learning_rate``, except those of new heads (``method.is_head``) at ``args.head_lr`` in a
    second group, present only when there are such. Frozen parameters are in no group."""
    adapter: list[torch.nn.Parameter] = []
    head: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if method.is_head(name) else adapter).append(param)
    groups = [{"params": adapter, "lr": args.learning_rate}]
    if head:
        groups.append({"params": head, "lr": args.head_lr})
    return groups


def head_warmup_groups(model: torch.nn.Module, args: FinetuneArgs) -> list[dict[str, Any]]:
    """The AdamW group of the head warm-up: the trainable parameters of the unwrapped ``model`` (only the new
    heads', :func:`warm_up_head` froze the rest) at ``args.head_lr``."""
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": args.head_lr}]


# ---------------------------------------------------------------------------------------------- the Trainer
def make_trainer(
    model: torch.nn.Module,
    collator: Any,
    args: FinetuneArgs,
    work_dir: str,
    train: Any = None,
    groups: list[dict[str, Any]] | None = None,
) -> Any:
    """A Trainer of ``model`` with the job's batch size, schedule and seeds, writing into ``work_dir/trainer``.

    Without ``train`` it only evaluates. With it, it trains with AdamW over ``groups`` (default: the
    :func:`training_groups` of ``args.method``).
    """
    from transformers import Trainer, TrainingArguments

    sampling: dict[str, Any] = {}
    if train is not None and "input_ids" in train.column_names:
        # Batches of similar lengths: little padding, about half the compute on short sentences.
        sampling = {"train_sampling_strategy": "group_by_length"}
        if "train_sampling_strategy" not in inspect.signature(TrainingArguments).parameters:  # transformers<5
            sampling = {"group_by_length": True}
    training_args = TrainingArguments(
        **sampling,
        output_dir=os.path.join(work_dir, "trainer"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(args.batch_size, 16),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        weight_decay=0.0,
        # transformers' "constant" would ignore the warm-up
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(args.lr_schedule, args.lr_schedule),
        warmup_steps=float(args.warmup_ratio),  # a float in [0, 1): a fraction of the steps
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        disable_tqdm=args.quiet,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        use_cpu=no_accelerator(),
        # Losses are per-batch means: DDP's gradient average already gives the global-batch mean, and the
        # Trainer's token-count rescaling (x num_processes) would double the gradient on two processes.
        average_tokens_across_devices=False,
        remove_unused_columns=False,
        torch_compile=getattr(args, "compile", False),
    )
    optimizer = None
    if train is not None:
        if groups is None:
            from s2ft.methods import get_method

            groups = training_groups(model, get_method(args.method), args)
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=collator,
        optimizers=(optimizer, None),
        callbacks=[LogToFile()],
    )
    if args.quiet:
        trainer.remove_callback(PrinterCallback)
    return trainer


# ---------------------------------------------------------------------------------------------- head warm-up
def warm_up_head(
    model: torch.nn.Module, collator: Any, args: FinetuneArgs, work_dir: str, train: Any, head: Sequence[str]
) -> None:
    """Train only the ``head`` modules of the unwrapped ``model`` for ``args.head_warmup_steps`` steps
    (:func:`head_warmup_groups`), the rest frozen. S2FT's gradient prior is then taken through a head that
    already reads the task, not through a random one. ``requires_grad`` flags are restored."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    for name in head:
        model.get_submodule(name).requires_grad_(True)
    warm = dataclasses.replace(
        args, lr=args.head_lr, max_steps=args.head_warmup_steps, lr_schedule="linear", warmup_ratio=0.0
    )
    try:
        make_trainer(model, collator, warm, work_dir, train, head_warmup_groups(model, warm)).train()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


# Options that do not change a warmed head (only what comes after the warm-up); the methods' own options say
# so themselves (s2ft.methods.after_warmup).
AFTER_WARMUP = {
    "method",
    "targets",
    "epochs",
    "max_steps",
    "lr_schedule",
    "warmup_ratio",
    "lr",
    "output",
    "overwrite",
    "quiet",
    "head_warmup_cache",
}


def warmup_cache_key(args: FinetuneArgs) -> str:
    """16 hex digits naming a warmed head: a hash of every option the warm-up depends on (all but
    :data:`AFTER_WARMUP` and the methods' options that do not affect it)."""
    from s2ft.methods import after_warmup

    after = AFTER_WARMUP | after_warmup()
    options = {k: v for k, v in dataclasses.asdict(args).items() if k not in after}
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


def cached_head_warmup(
    model: torch.nn.Module,
    collator: Any,
    args: FinetuneArgs,
    work_dir: str,
    train: Any,
    head: Sequence[str],
    is_main: bool = True,
) -> bool:
    """:func:`warm_up_head`, or the head it made before loaded instead: when ``args.head_warmup_cache`` holds a
    head under this run's :func:`warmup_cache_key`. Returns whether it was reused. ``s2ft compare`` shares one
    warm-up across all variants of a seed this way; the main process stores each new warmed head."""
    cache = None
    if args.head_warmup_cache:
        cache = os.path.join(args.head_warmup_cache, f"head-{warmup_cache_key(args)}.safetensors")
    if cache and os.path.isfile(cache):
        _load_head(model, head, cache)
        return True
    warm_up_head(model, collator, args, work_dir, train, head)
    if cache and is_main:
        _save_head(model, head, cache)
    return False


def _save_head(model: torch.nn.Module, head: Sequence[str], path: str) -> None:
    """The ``head`` modules' state, keyed ``module.tensor``, into a safetensors file (written atomically)."""
    from safetensors.torch import save_file

    from s2ft.io import atomic_write

    state = {
        f"{name}.{k}": v.detach().cpu().contiguous()
        for name in head
        for k, v in model.get_submodule(name).state_dict().items()
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda tmp: save_file(state, tmp))


def _load_head(model: torch.nn.Module, head: Sequence[str], path: str) -> None:
    """The ``head`` modules' state from a file :func:`_save_head` wrote (every tensor must match)."""
    from safetensors.torch import load_file

    state = load_file(path)
    for name in head:
        prefix = f"{name}."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        model.get_submodule(name).load_state_dict(sub, strict=True)
