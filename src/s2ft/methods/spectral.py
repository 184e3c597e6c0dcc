"""s2ft's own methods, S2FT and FourierFT: a spectral adapter on the targeted layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from s2ft.config import FourierFTConfig, S2FTConfig
from s2ft.errors import RunError
from s2ft.methods.base import Method


class Spectral(Method):
    config_class: type[FourierFTConfig] = FourierFTConfig
    # Spectral coefficients take large steps: under Adam, scaling and learning rate trade almost one for one,
    # and this pairs with scaling=150 (Austen task, MiniLM-L6).
    default_lr = 5e-2

    def config(self, args: Any, head: Sequence[str]) -> FourierFTConfig:
        """The adapter config of a job."""
        common = dict(
            target_modules=args.targets if isinstance(args.targets, str) else list(args.targets),
            modules_to_save=list(head) or None,
            n_frequency=args.n_frequency,
            scaling=args.scaling,
            seed=args.seed,
        )
        if self.config_class is FourierFTConfig:
            return FourierFTConfig(**common)
        return S2FTConfig(
            **common,
            gamma=args.gamma,
            calibration_batches=args.calibration_batches,
            permutation=args.permutation,
            permute=args.permute,
            locations=args.locations,
            prior=args.prior,
            prior_lr=args.prior_lr,
        )

    def wrap(self, model: torch.nn.Module, args: Any, head: Sequence[str]) -> torch.nn.Module:
        from s2ft import get_spectral_model

        try:
            return get_spectral_model(model, self.config(args, head))
        except (ValueError, TypeError) as e:
            raise RunError(str(e)) from None

    def stored_bytes(self, model: torch.nn.Module, directory: str) -> int:
        return model.adapter_nbytes()

    def stored_parts(self, model: torch.nn.Module) -> dict[str, int]:
        """Tensor bytes by part of the adapter file, and its header (names, shapes, metadata)."""
        parts = {"coefficients": 0, "locations": 0, "permutations": 0, "modules_to_save": 0}
        for key, value in model.adapter_state_dict().items():
            size = value.numel() * value.element_size()
            if key.startswith("modules_to_save."):
                parts["modules_to_save"] += size
            elif key.endswith(".coeffs"):
                parts["coefficients"] += size
            elif key.endswith((".rows", ".cols")):
                parts["locations"] += size
            else:
                parts["permutations"] += size
        parts["header"] = model.adapter_nbytes() - sum(parts.values())
        return parts

    def load(self, base: torch.nn.Module, directory: str) -> torch.nn.Module:
        from s2ft import SpectralModel

        return SpectralModel.from_pretrained(base, directory)


class FourierFT(Spectral):
    name = "fourierft"
    label = "FourierFT"


class S2FT(Spectral):
    name = "s2ft"
    label = "S2FT"
    config_class = S2FTConfig

    def plan(
        self, model: torch.nn.Module, batches: Callable[[], list[Any]], args: Any, progress: bool
    ) -> dict[str, Any]:
        return model.calibrate(batches(), progress=progress)
