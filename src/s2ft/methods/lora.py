"""LoRA through Hugging Face PEFT, as a baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from s2ft.methods.base import Method
from s2ft.tasks.base import RunError


class LoRA(Method):
    name = "lora"
    label = "LoRA (PEFT)"
    default_lr = 5e-4

    def wrap(self, model: torch.nn.Module, args: Any, head: Sequence[str]) -> torch.nn.Module:
        import peft

        config = peft.LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            target_modules=args.targets if isinstance(args.targets, str) else list(args.targets),
            modules_to_save=list(head) or None,
        )
        try:
            return peft.get_peft_model(model, config)
        except ValueError as e:
            raise RunError(f"LoRA: {e}") from None

    def load(self, base: torch.nn.Module, directory: str) -> torch.nn.Module:
        import peft

        return peft.PeftModel.from_pretrained(base, directory)
