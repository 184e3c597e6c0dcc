"""s2ft's own methods, S2FT and FourierFT: a spectral adapter on the targeted layers."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from s2ft.config import LOCATIONS, PLAN_SOURCES, PRIORS, FourierFTConfig, S2FTConfig
from s2ft.errors import RunError
from s2ft.methods.base import Method, Option, Variant, finite_non_negative, finite_positive, positive
from s2ft.methods.full import Full
from s2ft.ops.permutation import SEARCHES

N_FREQUENCY = Option(
    "n_frequency", int, None, "coefficients per adapted matrix", fallback=1000, check=positive
)
SCALING = Option(
    "scaling",
    float,
    None,
    "alpha, the scale of ΔW: ΔW = alpha * Re(IDFT2(F)) (dct: in the same units)",
    fallback=150.0,
    check=finite_non_negative,
)


class Spectral(Method):
    """A native spectral adapter (:mod:`s2ft.tuner`), configured by ``config_class`` from the job's options."""

    config_class: ClassVar[type[FourierFTConfig]] = FourierFTConfig
    # Spectral coefficients take large steps: under Adam, scaling and learning rate trade almost one for one,
    # and this pairs with scaling=150 (Austen task, MiniLM-L6).
    default_lr = 5e-2
    options: ClassVar[tuple[Option, ...]] = (N_FREQUENCY, SCALING)
    budget = "n_frequency"
    exports = ("lora",)

    def config(self, args: Any, head: Sequence[str]) -> FourierFTConfig:
        """The adapter config of a job: its targets, head and seed, and every option the config has a field for."""
        fields = {f.name for f in dataclasses.fields(self.config_class)}
        return self.config_class(
            target_modules=args.targets if isinstance(args.targets, str) else list(args.targets),
            modules_to_save=list(head) or None,
            seed=args.seed,
            **{o.name: getattr(args, o.name) for o in self.options if o.name in fields},
        )

    def run_label(self, args: Any) -> str:
        return f"{self.label}, n = {args.n_frequency}"

    def wrap(self, model: torch.nn.Module, args: Any, head: Sequence[str]) -> torch.nn.Module:
        from s2ft import get_spectral_model

        try:
            return get_spectral_model(model, self.config(args, head))
        except (ValueError, TypeError) as e:
            raise RunError(str(e)) from None

    def stored_bytes(self, model: torch.nn.Module, directory: str) -> int:
        return model.adapter_nbytes()

    def stored_parts(
        self, model: torch.nn.Module, coefficient_dtype: torch.dtype = torch.float32
    ) -> dict[str, int]:
        """Bytes by part of the adapter file as it is written (:func:`s2ft.tuner.adapter_io.file_parts`):
        coefficients, locations, permutations, ``modules_to_save``, the base weights' fingerprints (only when the
        plan follows from them), and the header; they add up to :meth:`s2ft.SpectralModel.adapter_nbytes`."""
        from s2ft.tuner.adapter_io import file_parts

        return file_parts(model.adapter_state_dict(None, coefficient_dtype), model._metadata())

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        """The base class with ``ΔW`` merged; a quantized base (``--quantize``) comes back dequantized to float."""
        return model.merge_and_unload(dequantize=True)

    def load(self, base: torch.nn.Module, directory: str) -> torch.nn.Module:
        from s2ft import SpectralModel

        return SpectralModel.from_pretrained(base, directory)


class FourierFT(Spectral):
    name = "fourierft"
    label = "FourierFT"
    paired_baseline = True


def _fraction_of_steps(value: float) -> str | None:
    return None if value == 0 or 0 < value < 1 else "must be 0 (never) or a fraction of the steps in (0, 1)"


def prior_rank_arg(text: str) -> int | str | None:
    """``--prior-rank``: ``auto``, ``exact`` (None: the exact prior) or a number."""
    if text in ("auto", "exact"):
        return None if text == "exact" else "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected auto, exact or a positive integer, got {text!r}"
        ) from None


def _positive_rank(value: Any) -> str | None:
    return None if value == "auto" else positive(value)


def _full_finetuning_lr(task_defaults: dict[str, Any]) -> float:
    return task_defaults.get("lr", {}).get(Full.name, Full.default_lr)


S2FT_OPTIONS = (
    Option("gamma", float, 1.5, "sample locations ∝ |DFT2|^gamma", check=finite_non_negative),
    Option(
        "calibration_batches",
        int,
        None,
        "batches for the gradient prior",
        fallback=16,
        check=positive,
    ),
    Option(
        "calibration_group_size",
        int,
        None,
        "plan this many layers per calibration pass over the batches, so the prior memory is one group's "
        "(default: all layers in one pass)",
        check=positive,
    ),
    Option("permutation", str, "greedy", "the row/column ordering search", choices=SEARCHES),
    Option("permute", bool, True, "permute rows and columns (--no-permute: an ablation without them)"),
    Option("locations", str, "prior", "where the coefficients go", choices=LOCATIONS),
    Option(
        "prior",
        str,
        "adam",
        "what the plan is made from: the Adam-normalized summed gradient (the default: clearly better on the "
        "causal LM, worse in few-shot image training), the summed gradient (the paper), or a short Adam "
        "trajectory over the calibration batches",
        choices=PRIORS,
    ),
    Option(
        "prior_rank",
        prior_rank_arg,
        "auto",
        "sketch the prior: 'auto' sketches at rank 64 the layers at least 1,024 wide on both sides "
        "and keeps the exact prior of the others (every default job's layers); a number k sketches every layer at "
        "rank k (clamped to min(d_out, d_in)); 'exact' never sketches. A sketch takes one pass over the "
        "calibration batches holding O((d_out + d_in) * k) numbers per layer, and the plan is made from its "
        "rank-k factors (gradient and adam priors)",
        check=_positive_rank,
        metavar="{auto,exact,K}",
    ),
    Option(
        "prior_lr",
        float,
        None,
        "the trajectory prior's learning rate (default: the task's full fine-tuning learning rate)",
        fallback=_full_finetuning_lr,
        check=finite_positive,
    ),
    Option(
        "plan_from",
        str,
        "prior",
        "where the permutations come from: the prior (stored in the file) or the base weights W0 and the seed "
        "(recomputed when loading; the file holds W0's fingerprint)",
        choices=PLAN_SOURCES,
    ),
    Option(
        "locations_from",
        str,
        "prior",
        "where the locations come from: the prior's permuted spectrum (stored) or W0's (needs --plan-from "
        "base; not stored: the file holds the coefficients only)",
        choices=PLAN_SOURCES,
    ),
    Option(
        "replan_at",
        float,
        0.0,
        "after this fraction of the training steps, plan again from the trained ΔW and project the adapter onto "
        "the new plan (0: never)",
        check=_fraction_of_steps,
    ),
)

# S2FT's ablations in ``s2ft compare``: each differs from "s2ft" (the paper's recipe: gradient prior, locations
# from its spectrum) in one thing only; every variant names its prior and location sampling, so that a changed
# default (the Adam-normalized prior since issue 19) does not change what a variant measures.
_ABLATIONS: dict[str, tuple[dict[str, Any], str]] = {
    "noperm": ({"permute": False, "locations": "prior"}, "without permutations"),
    "uniform": ({"locations": "uniform"}, "random locations"),
    "prior-half": ({"locations": "prior-half"}, "one location per mirror pair"),
    "2opt-cyclic": ({"locations": "prior", "permutation": "2opt-cyclic"}, "cyclic 2-opt search"),
    "adam": ({"locations": "prior", "prior": "adam"}, "Adam-normalized prior"),
    "trajectory": ({"locations": "prior", "prior": "trajectory"}, "trajectory prior"),
    "replan": ({"locations": "prior", "replan_at": 0.2}, "re-planned after 20% of the steps"),
    "w0perm": ({"locations": "prior", "plan_from": "base"}, "permutations of W0 (not stored)"),
    "w0": (
        {"locations": "prior", "plan_from": "base", "locations_from": "base"},
        "plan of W0 (nothing stored)",
    ),
}


class S2FT(Spectral):
    name = "s2ft"
    label = "S2FT"
    config_class = S2FTConfig
    plans = True
    options = (N_FREQUENCY, SCALING, *S2FT_OPTIONS)

    def variants(self) -> dict[str, Variant]:
        return {
            "s2ft": Variant(self, {"locations": "prior", "prior": "gradient"}),
            "s2ft-half": Variant(self, {"n_frequency": "half", "locations": "prior", "prior": "gradient"}),
            **{
                f"s2ft-{name}": Variant(self, {"prior": "gradient", **overrides}, label, ablation=True)
                for name, (overrides, label) in _ABLATIONS.items()
            },
        }

    def plan(
        self, model: torch.nn.Module, batches: Callable[[], list[Any]], args: Any, progress: bool
    ) -> dict[str, Any]:
        # A plan of the base weights alone needs no batches (none are made)
        needed = args.plan_from == "prior" or args.locations_from == "prior"
        return model.calibrate(batches() if needed else [], progress=progress)

    def callbacks(self, model: torch.nn.Module, args: Any) -> list[Any]:
        if not args.replan_at:
            return []
        from s2ft.tuner.callbacks import ReplanCallback

        class Replan(ReplanCallback):
            def metrics(self) -> dict[str, Any]:
                return {"replan_step": self.step, "replan_energy_kept": self.energy_kept}

        return [Replan(model, args.replan_at)]
