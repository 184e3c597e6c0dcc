"""Hooks into the Hugging Face ``Trainer`` loop: S2FT's re-planning after a first phase of training."""

from __future__ import annotations

import statistics
from typing import Any

from transformers import TrainerCallback


class ReplanCallback(TrainerCallback):
    """Re-plan an S2FT adapter once during training (:meth:`s2ft.SpectralModel.replan`): after ``at`` of the run's
    optimizer steps (a fraction in ``(0, 1)``) the adapter's trained ``ΔW`` becomes its prior, it gets new
    permutations and locations, its coefficients the projection of ``ΔW`` there, and the optimizer forgets its
    state for them (Adam's moments belonged to the old locations). Training then goes on in the new plan.

    Every process of a distributed run does the same (its ``ΔW`` and the planner are the same on every rank).
    ``report`` holds the per-layer ``energy_kept`` once it ran, ``energy_kept`` their mean.

        trainer.add_callback(ReplanCallback(spectral_model, at=0.2))
    """

    def __init__(self, model: Any, at: float, adapter_name: str | None = None) -> None:
        if not 0 < at < 1:
            raise ValueError(f"re-plan at a fraction of the training steps in (0, 1), got {at!r}")
        self.model, self.at, self.adapter_name = model, float(at), adapter_name
        self.step: int | None = None
        self.report: dict[str, dict[str, float]] | None = None

    @property
    def energy_kept(self) -> float | None:
        if self.report is None:
            return None
        return statistics.fmean(r["energy_kept"] for r in self.report.values())

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = max(1, round(self.at * state.max_steps))

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.report is not None or state.global_step != self.step:
            return
        name = self.adapter_name or self.model.active_adapter
        self.report = self.model.replan(name)
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps the optimizer
        if inner is not None:
            for layer in self.model.spectral_layers().values():
                if name in layer.adapters:
                    inner.state.pop(layer.adapters[name].coeffs, None)
