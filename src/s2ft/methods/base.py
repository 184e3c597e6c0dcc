"""What a fine-tuning method supplies to the jobs: wrap a model, plan it, save, load and merge it.

A job never asks which method it runs: it calls these steps. Each method is one module and one line in
:data:`s2ft.methods.METHODS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch


class Method:
    """One fine-tuning method. ``wrap`` returns the model to train; the other steps take that model."""

    name: ClassVar[str]
    label: ClassVar[str]  # for tables and legends
    default_lr: ClassVar[float]  # of the trained weights that are not a new head
    # True: the run saves the whole model (and its processor), and evaluate/merge load that folder as the base.
    saves_whole_model: ClassVar[bool] = False

    def wrap(self, model: torch.nn.Module, args: Any, head: Sequence[str]) -> torch.nn.Module:
        raise NotImplementedError

    def plan(
        self, model: torch.nn.Module, batches: Callable[[], list[Any]], args: Any, progress: bool
    ) -> dict[str, Any] | None:
        """Anything the method decides from data before training (S2FT's calibration). ``batches()`` gives this
        process's calibration batches. Returns what to report, or None when the method plans nothing."""
        return None

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
