"""A finetune output read back: its run record (``run.json``) and the trained model rebuilt from it."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import SafetensorError

from s2ft.errors import RunError
from s2ft.jobs.output import ADAPTER_DIR, RUN_FILE


def read_run(path: str) -> tuple[dict[str, Any], str]:
    """(run.json, adapter folder) for a run folder or its adapter folder."""
    for run_dir in (path, os.path.dirname(os.path.abspath(path))):
        run_file = os.path.join(run_dir, RUN_FILE)
        if os.path.isfile(run_file):
            try:
                with open(run_file, encoding="utf-8") as f:
                    run = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise RunError(
                    f"{run_file} is unreadable or corrupt ({e}); run s2ft finetune again"
                ) from None
            missing = [k for k in ("task", "model", "method") if not isinstance(run, dict) or k not in run]
            if missing:
                raise RunError(f"{run_file} lacks {', '.join(missing)}; it was not written by this s2ft")
            return run, os.path.join(run_dir, ADAPTER_DIR)
    raise RunError(f"{path} is not an s2ft finetune output (no {RUN_FILE} in it or its parent folder)")


def load_trained(path: str) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Rebuild the trained model of a finetune output: (model, processor, run record)."""
    from s2ft.methods import get_method
    from s2ft.tasks import get_task

    run, adapter = read_run(path)
    task, method = get_task(run["task"]), get_method(run["method"])
    quantize = run.get("args", {}).get("quantize")
    loaded = task.load_model(
        adapter if method.saves_whole_model else run["model"], run.get("info", {}), quantize=quantize
    )
    try:
        trained = method.load(loaded.model, adapter)
    except (ValueError, OSError, SafetensorError) as e:  # s2ft's own errors are ValueErrors (S2FT, DataError)
        if isinstance(e, RunError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(
            f"cannot load the adapter in {adapter}: {first}; it is damaged or not of this run's model "
            f"({run['model']}): run s2ft finetune again, or restore the run folder"
        ) from None
    return trained, loaded.processor, run
