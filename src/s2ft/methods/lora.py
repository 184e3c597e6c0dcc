"""LoRA through Hugging Face PEFT, as a baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from s2ft.errors import RunError
from s2ft.methods.base import Method, Option, positive


class LoRA(Method):
    name = "lora"
    label = "LoRA (PEFT)"
    # chosen on validation for the default rank 8 (docs/results/learning-rates): text (3 seeds) 1e-2 0.233
    # (collapsed), 5e-3 0.466, 2e-3 0.437; causal LM (seed 0) 1e-2 43.03, 5e-3 41.98 perplexity; images 5e-3 was
    # best at r = 4. Lower ranks take a higher rate (r = 4: 1e-2 on text and the causal LM).
    default_lr = 5e-3
    options = (Option("lora_r", int, 8, "LoRA rank", check=positive),)
    budget = "lora_r"
    budget_symbol = "r"

    def run_label(self, args: Any) -> str:
        return f"LoRA r = {args.lora_r} (PEFT)"

    def wrap(self, model: torch.nn.Module, args: Any, head: Sequence[str]) -> torch.nn.Module:
        import peft

        plain_convolutions(model, args.targets)
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

        plain_convolutions(base, peft.PeftConfig.from_pretrained(directory).target_modules)
        return peft.PeftModel.from_pretrained(base, directory)


def plain_convolutions(model: torch.nn.Module, targets: Any) -> None:
    """Targeted ``nn.Conv2d`` subclasses that compute what ``nn.Conv2d`` computes become ``nn.Conv2d``.

    PEFT's LoRA builds a convolution's factors with the layer's own class, and a subclass whose constructor takes
    other arguments (EfficientNet's ``Conv2dStaticSamePadding`` needs an image size) fails there. A subclass that
    agrees with ``nn.Conv2d.forward`` on a probe input (a 1x1 kernel with no padding) is relabelled as one, which
    changes nothing it computes; one that does not (real padding) is refused with the layer's name.
    """
    from s2ft.tuner.model import matches

    if targets is None:
        return
    targets = targets if isinstance(targets, str) else list(targets)
    for name, module in model.named_modules():
        if (
            type(module) is torch.nn.Conv2d
            or not isinstance(module, torch.nn.Conv2d)
            or not matches(name, targets)
        ):
            continue
        weight = module.weight
        probe = torch.randn(1, module.in_channels, 9, 9, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            same = torch.equal(module(probe), torch.nn.Conv2d.forward(module, probe))
        if not same:
            raise RunError(
                f"LoRA (PEFT) cannot adapt {name!r}: a {type(module).__name__} that does more than nn.Conv2d "
                "(e.g. padding of its own), and PEFT rebuilds such layers with their own class; leave it out of "
                "--targets"
            )
        module.__class__ = torch.nn.Conv2d
