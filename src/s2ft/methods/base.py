"""What a fine-tuning method supplies to the jobs: its options, wrap a model, plan it, save, load and merge it.

A job never asks which method it runs: it calls these steps and reads these declarations. Each method is one
module and one line in :data:`s2ft.methods.METHODS`; its options become fields of the jobs' arguments
(:class:`s2ft.jobs.args.FinetuneArgs`) and a group of command-line flags, its variants rows of ``s2ft compare``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from s2ft.options import Option, finite_non_negative, finite_positive, positive

__all__ = ["Method", "Option", "Variant", "finite_non_negative", "finite_positive", "positive"]


@dataclass(frozen=True)
class Variant:
    """One kind of run of ``s2ft compare``: a method with some of its options set."""

    method: Method
    # FinetuneArgs fields; the value "half" of the method's budget field means half the base's budget.
    overrides: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # added to the run's label in tables and legends ("random locations")
    ablation: bool = False  # listed after every method's main variants


class Method:
    """One fine-tuning method. ``wrap`` returns the model to train; the other steps take that model."""

    name: ClassVar[str]
    label: ClassVar[str]  # for tables and legends
    default_lr: ClassVar[float]  # of the trained weights that are not a new head
    # True: the run saves the whole model (and its processor), and evaluate/merge load that folder as the base.
    saves_whole_model: ClassVar[bool] = False
    # True: every weight is trained, each at the job's learning rate (the head warm-up runs as this method).
    trains_everything: ClassVar[bool] = False
    # True: the method decides its adapter from data before training (``plan``); ``s2ft analyze`` measures it.
    plans: ClassVar[bool] = False
    # The options of this method, beyond the options every job has.
    options: ClassVar[tuple[Option, ...]] = ()
    # The option that sizes the adapter (swept by ``s2ft compare``), and its symbol in labels and run names.
    budget: ClassVar[str | None] = None
    budget_symbol: ClassVar[str] = "n"
    # True: ``s2ft compare`` reports every other variant of the same budget minus this method, seed by seed.
    paired_baseline: ClassVar[bool] = False
    # Formats a trained model exports to beyond the merged model ("lora": ``s2ft export-lora``).
    exports: ClassVar[tuple[str, ...]] = ()

    def variants(self) -> dict[str, Variant]:
        """The variants of ``s2ft compare`` this method contributes, by name: the method as it is."""
        return {self.name: Variant(self)}

    def run_label(self, args: Any) -> str:
        """The label of one run, naming its budget (``S2FT, n = 500``, ``LoRA r = 8 (PEFT)``)."""
        return self.label

    def wrap(self, model: torch.nn.Module, args: Any, head: Sequence[str]) -> torch.nn.Module:
        raise NotImplementedError

    def plan(
        self, model: torch.nn.Module, batches: Callable[[], list[Any]], args: Any, progress: bool
    ) -> dict[str, Any] | None:
        """Anything the method decides from data before training (S2FT's calibration). ``batches()`` gives this
        process's calibration batches. Returns what to report, or None when the method plans nothing."""
        return None

    def callbacks(self, model: torch.nn.Module, args: Any) -> list[Any]:
        """Trainer callbacks the method adds to training (S2FT's re-planning). A callback with a ``metrics()``
        method adds what it returns to the run's metrics after training."""
        return []

    def is_head(self, parameter_name: str) -> bool:
        """Whether a trainable parameter belongs to a new head (trained at ``head_lr``)."""
        return ".copies." in parameter_name or "modules_to_save" in parameter_name

    def save(self, model: torch.nn.Module, directory: str, task: Any) -> None:
        """Save what the run keeps: the adapter (or, for full fine-tuning, the model through ``task``)."""
        model.save_pretrained(directory)

    def stored_bytes(self, model: torch.nn.Module, directory: str) -> int:
        """Bytes of the stored weights file(s) in ``directory``: what a user keeps per task."""
        return sum(
            os.path.getsize(os.path.join(directory, f))
            for f in os.listdir(directory)
            if f.endswith(".safetensors")
        )

    def stored_parts(self, model: torch.nn.Module) -> dict[str, int]:
        """Bytes of each part of the stored adapter (coefficients, locations, ...); empty when not itemized."""
        return {}

    def load(self, base: torch.nn.Module, directory: str) -> torch.nn.Module:
        """The trained model from ``base`` (the task's freshly loaded pretrained model) and the saved ``directory``."""
        raise NotImplementedError

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        """A plain model of the base class with the adaptation merged in."""
        return model.merge_and_unload()
