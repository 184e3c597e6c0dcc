"""WaveFT through Hugging Face PEFT, as a baseline: ``n`` random sparse coefficients in the wavelet domain."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from s2ft.errors import RunError
from s2ft.methods.lora import LoRA
from s2ft.methods.spectral import N_FREQUENCY


class WaveFT(LoRA):
    """PEFT's ``WaveFTConfig`` with the job's ``n_frequency`` per matrix and its seed; loaded and merged through
    PEFT like LoRA. Its ``scaling`` is PEFT's default (25), not the spectral methods' (a different basis)."""

    name = "waveft"
    label = "WaveFT (PEFT)"
    # chosen on validation (n = 1000, seed 0): text accuracy 1e-3 0.349, 3e-3 0.382, 1e-2 0.224, 3e-2 0.199;
    # causal-LM perplexity 1e-3 45.03, 3e-3 44.14, 1e-2 58.10, 3e-2 670
    default_lr = 3e-3
    options = (N_FREQUENCY,)
    budget = "n_frequency"
    budget_symbol = "n"

    def run_label(self, args: Any) -> str:
        return f"WaveFT, n = {args.n_frequency} (PEFT)"

    def wrap(self, model: torch.nn.Module, args: Any, head: Sequence[str]) -> torch.nn.Module:
        import peft

        config = peft.WaveFTConfig(
            n_frequency=args.n_frequency,
            random_loc_seed=args.seed,
            target_modules=args.targets if isinstance(args.targets, str) else list(args.targets),
            modules_to_save=list(head) or None,
        )
        try:
            return peft.get_peft_model(model, config)
        except (ValueError, TypeError) as e:
            raise RunError(f"WaveFT: {e}") from None
