"""``s2ft export-lora``: a finetune output's spectral adapter as a Hugging Face PEFT LoRA adapter (truncated SVD of
each ΔW), for serving stacks that load only LoRA."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from s2ft.io import atomic_write_text
from s2ft.jobs.output import check_output, refuse_overlap, staged_output
from s2ft.jobs.runs import load_trained
from s2ft.tasks import RunError


def parse_rank(text: str) -> float:
    """``"8"`` -> 8 (a rank); ``"0.9"`` -> 0.9 (the share of each ΔW's energy to keep)."""
    try:
        value = float(text)
    except ValueError:
        raise RunError(f"--rank {text!r} is neither a rank (e.g. 8) nor an energy share (e.g. 0.9)") from None
    if not (math.isfinite(value) and value > 0 and (value < 1 or value == int(value))):
        raise RunError(f"--rank must be a positive integer or a share in (0, 1), got {text}")
    return value


def run_export_lora(path: str, rank: float, output: str, overwrite: bool = False) -> dict[str, Any]:
    """Write the LoRA adapter and ``lora_export.json`` (per-layer rank and relative error) to ``output``."""
    from s2ft.tuner.model import SpectralModel
    from s2ft.tuner.peft_formats import export_lora

    parse_rank(str(rank))  # a Python caller's rank checked as the command line's
    refuse_overlap(path, output, "exports")
    check_output(output, overwrite, "lora-export")  # before the model is loaded; checked again when written
    model, _, run = load_trained(path)
    if not isinstance(model, SpectralModel):
        raise RunError(f"{path} holds a {run['method']!r} run; export-lora takes an s2ft or fourierft run")
    with staged_output(output, overwrite, True, kind="lora-export") as work_dir:
        layers = export_lora(model, work_dir, rank)
        errors = [r["relative_error"] for r in layers.values()]
        report = {
            "source": os.path.abspath(path),
            "rank": rank,
            "mean_relative_error": sum(errors) / len(errors),
            "max_relative_error": max(errors),
            "layers": layers,
        }
        atomic_write_text(os.path.join(work_dir, "lora_export.json"), json.dumps(report, indent=2) + "\n")
    return report
