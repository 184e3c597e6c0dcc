"""Full fine-tuning: every weight trained, the whole model saved."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from s2ft.methods.base import Method


class Full(Method):
    name = "full"
    label = "full fine-tuning"
    default_lr = 5e-5
    saves_whole_model = True
    trains_everything = True

    def wrap(self, model: torch.nn.Module, args: Any, head: Sequence[str]) -> torch.nn.Module:
        return model

    def is_head(self, parameter_name: str) -> bool:
        return False

    def save(self, model: torch.nn.Module, directory: str, task: Any) -> None:
        task.save_model(model, directory)

    def load(self, base: torch.nn.Module, directory: str) -> torch.nn.Module:
        return base  # ``base`` was loaded from the saved folder itself (saves_whole_model)

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        return model
