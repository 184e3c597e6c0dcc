"""What every job shares: the run folder (staged, then renamed), logging, the Trainer, and the run record.

Training goes through the transformers Trainer, and so Accelerate: one process, or several under
``accelerate launch`` (DDP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback

from s2ft.jobs.args import FinetuneArgs
from s2ft.tasks import RunError, Task

logger = logging.getLogger("s2ft")

RUN_FILE = "run.json"
ADAPTER_DIR = "adapter"


# ---------------------------------------------------------------------------------------------- output folder
MARKER = ".s2ft-output"  # written into every folder a job creates; --overwrite replaces only such folders


def is_s2ft_output(folder: str) -> bool:
    """Whether ``folder`` holds something an s2ft job wrote: its marker, or (runs of earlier versions) a
    ``run.json`` with a method."""
    if os.path.isfile(os.path.join(folder, MARKER)):
        return True
    try:
        with open(os.path.join(folder, RUN_FILE), encoding="utf-8") as f:
            return isinstance(json.load(f).get("method"), str)
    except (OSError, ValueError, AttributeError):
        return False


def check_output(output: str, overwrite: bool) -> str:
    """``output`` as an absolute path, after checking that a job may write it; raises :class:`RunError` otherwise.

    Allowed: a new path, an empty folder, or, with ``overwrite``, a folder an s2ft job wrote. Never a file, an
    empty name, or a folder of anything else (a source tree, a data set): s2ft deletes only what it wrote.
    """
    if not isinstance(output, str) or not output.strip():
        raise RunError("--output is empty; name a folder for the results")
    path = os.path.abspath(output)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(f"--output {output} is a file, not a folder; choose a folder")
    if os.path.isdir(path) and os.listdir(path):
        if not is_s2ft_output(path):
            raise RunError(
                f"{output} is not empty and holds nothing s2ft wrote; s2ft replaces only its own outputs, "
                "so choose a new or empty folder"
            )
        if not overwrite:
            raise RunError(
                f"{output} already holds an s2ft output; pass --overwrite to replace it, or choose another --output"
            )
    return path


@contextlib.contextmanager
def staged_output(output: str, overwrite: bool, is_main: bool, kind: str = "run") -> Iterator[str]:
    """A staging folder that becomes ``output`` only when the job succeeds.

    Ctrl-C or an error leaves nothing half-written, and an existing output is replaced only then (and only with
    ``overwrite``, and only if s2ft wrote it: :func:`check_output`, checked before the job starts). The staging
    and the set-aside folders are new folders of unique hidden names beside ``output``, created by this process,
    so nothing a user made is ever deleted. Other processes of a distributed job get a private temporary folder
    (only the main process writes outputs).
    """
    path = check_output(output, overwrite)
    if not is_main:
        with tempfile.TemporaryDirectory(prefix="s2ft-rank-") as private:
            yield private
        return
    parent, name = os.path.split(path)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".s2ft-staging", dir=parent)
    except OSError as e:
        raise RunError(f"cannot write into {parent}: {e.strerror or e}; choose another --output") from None
    try:
        yield staging
        with open(os.path.join(staging, MARKER), "w", encoding="utf-8") as f:
            json.dump({"kind": kind}, f)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(path):
        try:  # still ours: nothing else took the name while the job ran
            check_output(output, overwrite)
        except RunError as e:
            raise RunError(f"{e}. This job's results are kept in {staging}") from None
        trash = tempfile.mkdtemp(prefix=f".{name}.", suffix=".s2ft-old", dir=parent)
        os.replace(path, trash)  # onto the new empty folder: POSIX rename allows it
        os.replace(staging, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, path)


@contextlib.contextmanager
def log_to(path: str | None, quiet: bool) -> Iterator[None]:
    """Log s2ft's and transformers' messages to ``path``, and to the console unless ``quiet``."""
    import transformers

    handlers: list[logging.Handler] = []
    if path is not None:
        handlers.append(logging.FileHandler(path))
    if not quiet:
        handlers.append(logging.StreamHandler())
    formatter = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S")
    loggers = [logger, logging.getLogger("transformers")]
    levels = [lg.level for lg in loggers]
    for handler in handlers:
        handler.setFormatter(formatter)
        for lg in loggers:
            lg.addHandler(handler)
    logger.setLevel(logging.INFO)
    verbosity = transformers.logging.get_verbosity()
    if quiet:  # no load reports or progress bars on the console
        import datasets

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    else:
        transformers.logging.set_verbosity_warning()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if quiet:
            import datasets

            transformers.utils.logging.enable_progress_bar()
            datasets.enable_progress_bars()
        for handler in handlers:
            for lg in loggers:
                lg.removeHandler(handler)
            handler.close()
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


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


# ---------------------------------------------------------------------------------------------- data
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


# ---------------------------------------------------------------------------------------------- the Trainer
class _LogToFile(TrainerCallback):
    """The Trainer's periodic logs (loss, learning rate) into the run's log."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and state.is_world_process_zero:
            logger.info("step %d/%d: %s", state.global_step, state.max_steps, json.dumps(logs))


def parameter_groups(model: torch.nn.Module, args: FinetuneArgs) -> list[dict[str, Any]]:
    """Trained weights at ``lr``, those of new heads (the method's ``is_head``) at ``head_lr``."""
    from s2ft.methods import get_method

    method = get_method(args.method)
    adapter, head = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if method.is_head(name) else adapter).append(param)
    groups = [{"params": adapter, "lr": args.learning_rate}]
    if head:
        groups.append({"params": head, "lr": args.head_lr})
    return groups


def make_trainer(
    model: torch.nn.Module, collator: Any, args: FinetuneArgs, work_dir: str, train: Any = None
) -> Any:
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
        lr_scheduler_type="linear",
        warmup_steps=0,
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
    )
    optimizer = None
    if train is not None:
        optimizer = torch.optim.AdamW(parameter_groups(model, args), weight_decay=0.0)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=collator,
        optimizers=(optimizer, None),
        callbacks=[_LogToFile()],
    )
    if args.quiet:
        trainer.remove_callback(PrinterCallback)
    return trainer


def warm_up_head(
    model: torch.nn.Module, collator: Any, args: FinetuneArgs, work_dir: str, train: Any, head: list[str]
) -> None:
    """Train only the ``head`` modules of the unwrapped ``model`` for ``args.head_warmup_steps`` steps at
    ``head_lr``, the rest frozen. S2FT's gradient prior is then taken through a head that already reads the task,
    not through a random one. ``requires_grad`` flags are restored."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    for name in head:
        model.get_submodule(name).requires_grad_(True)
    warm = dataclasses.replace(args, method="full", lr=args.head_lr, max_steps=args.head_warmup_steps)
    try:
        make_trainer(model, collator, warm, work_dir, train).train()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


# Options that do not change a warmed head (only what comes after the warm-up).
_AFTER_WARMUP = {
    "method",
    "targets",
    "n_frequency",
    "scaling",
    "gamma",
    "permutation",
    "calibration_batches",
    "lora_r",
    "epochs",
    "max_steps",
    "lr",
    "output",
    "overwrite",
    "quiet",
    "permute",
    "locations",
    "head_warmup_cache",
}


def warm_head(
    model: torch.nn.Module,
    collator: Any,
    args: FinetuneArgs,
    work_dir: str,
    train: Any,
    head: list[str],
    is_main: bool = True,
) -> bool:
    """:func:`warm_up_head`, or, when ``args.head_warmup_cache`` holds the head warmed with the same options (a
    hash of every option the warm-up depends on), that head loaded instead. Returns whether it was reused.
    ``s2ft compare`` shares one warm-up across all variants of a seed this way."""
    from safetensors.torch import load_file, save_file

    from s2ft.io import atomic_write

    cache = None
    if args.head_warmup_cache:
        options = {k: v for k, v in dataclasses.asdict(args).items() if k not in _AFTER_WARMUP}
        key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
        cache = os.path.join(args.head_warmup_cache, f"head-{key}.safetensors")
    if cache and os.path.isfile(cache):
        state = load_file(cache)
        for name in head:
            prefix = f"{name}."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            model.get_submodule(name).load_state_dict(sub, strict=True)
        return True
    warm_up_head(model, collator, args, work_dir, train, head)
    if cache and is_main:
        state = {
            f"{name}.{k}": v.detach().cpu().contiguous()
            for name in head
            for k, v in model.get_submodule(name).state_dict().items()
        }
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        atomic_write(cache, lambda tmp: save_file(state, tmp))
    return False


# ---------------------------------------------------------------------------------------------- the run record
def read_run(path: str) -> tuple[dict[str, Any], str]:
    """(run.json, adapter folder) for a run folder or its adapter folder."""
    for run_dir in (path, os.path.dirname(os.path.abspath(path))):
        run_file = os.path.join(run_dir, RUN_FILE)
        if os.path.isfile(run_file):
            try:
                with open(run_file, encoding="utf-8") as f:
                    run = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise RunError(
                    f"{run_file} is unreadable or corrupt ({e}); run s2ft finetune again"
                ) from None
            missing = [k for k in ("task", "model", "method") if not isinstance(run, dict) or k not in run]
            if missing:
                raise RunError(f"{run_file} lacks {', '.join(missing)}; it was not written by this s2ft")
            return run, os.path.join(run_dir, ADAPTER_DIR)
    raise RunError(f"{path} is not an s2ft finetune output (no {RUN_FILE} in it or its parent folder)")


def load_trained(path: str) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Rebuild the trained model of a finetune output: (model, processor, run record)."""
    from s2ft.methods import get_method
    from s2ft.tasks import get_task

    run, adapter = read_run(path)
    task, method = get_task(run["task"]), get_method(run["method"])
    loaded = task.load_model(adapter if method.saves_whole_model else run["model"], run.get("info", {}))
    return method.load(loaded.model, adapter), loaded.processor, run
