"""S2FT's plan for one matrix: row and column orders of its prior, then locations sampled from the permuted spectrum;
and the plan installed on an adapter's layers, from calibration's prior or from the adapter's own trained ``ΔW``.

One planner for calibration (:meth:`s2ft.SpectralModel.calibrate`, :func:`calibrate_adapter`), re-planning
(:func:`replan_adapter`) and analysis (``s2ft analyze``), so the report shows the very permutations and locations
that calibration installs. Each matrix's plan draws from its own
generator, seeded by ``(seed, module name)``: a layer's plan does not depend on which other layers are targeted,
nor on their order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from s2ft.ops.locations import fourierft_locations, power_spectrum, sample_locations
from s2ft.ops.permutation import path_length, search_order
from s2ft.tuner.calibration import LossFn, compute_prior
from s2ft.tuner.layers import SpectralLayer

PLANNED_BASIS = "fourier"  # the basis (s2ft.ops.bases) whose spectrum plan_layer samples from


@dataclass
class LayerPlan:
    """What calibration decides for one matrix: ``perm_rows`` ``(d_out,)``, ``perm_cols`` ``(d_in,)`` (None: identity),
    ``rows``/``cols`` ``(n,)``, and the path lengths before and after ordering (for reports)."""

    rows: torch.Tensor
    cols: torch.Tensor
    perm_rows: torch.Tensor | None
    perm_cols: torch.Tensor | None
    path_length_before: float
    path_length_after: float


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by ``(seed, name)`` through SHA-256: the same on every machine and process."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def plan_layer(
    prior: torch.Tensor,
    n: int,
    gamma: float,
    generator: torch.Generator,
    search: str = "greedy",
    permute: bool = True,
    locations: str = "prior",
    seed: int = 0,
) -> LayerPlan:
    """Order the prior's rows and columns, then sample ``n`` locations ``∝ |DFT2(permuted prior)|^gamma``.

    ``prior`` is ``(d_out, d_in)``. ``permute=False`` keeps identity orders. ``locations``: ``"prior"`` samples
    from the whole spectrum (the paper), ``"prior-half"`` from one location of each mirror pair (no two
    coefficients on the same basis function; see :func:`s2ft.ops.locations.sample_locations`), ``"uniform"`` takes
    FourierFT's locations for ``seed``.
    """
    before = path_length(prior) + path_length(prior.T)
    perm_rows = perm_cols = None
    permuted = prior
    if permute:
        perm_rows = search_order(prior, search, generator)
        perm_cols = search_order(prior.T, search, generator)
        permuted = prior[perm_rows][:, perm_cols]
    after = path_length(permuted) + path_length(permuted.T)
    if locations == "uniform":
        rows, cols = fourierft_locations(prior.shape[0], prior.shape[1], n, seed)
    else:
        half = locations == "prior-half"
        rows, cols = sample_locations(power_spectrum(permuted), n, gamma, generator, half=half)
    return LayerPlan(rows, cols, perm_rows, perm_cols, before, after)


def plan_for(prior: torch.Tensor, name: str, config) -> LayerPlan:
    """The plan of module ``name`` under an :class:`s2ft.S2FTConfig`: what calibration installs there.

    The plan samples from the prior's 2-D DFT power spectrum, so it is the plan of a Fourier-basis adapter; a
    planned config in another basis is refused rather than given locations of the wrong spectrum."""
    if config.basis != PLANNED_BASIS:
        raise ValueError(
            f"S2FT's planner samples locations from the DFT power spectrum (basis {PLANNED_BASIS!r}); a "
            f"{config.method!r} adapter lives in basis {config.basis!r}, which has no planner"
        )
    return plan_layer(
        prior,
        config.n_frequency,
        config.gamma,
        layer_generator(config.seed, name),
        search=config.permutation,
        permute=config.permute,
        locations=config.locations,
        seed=config.seed,
    )


def calibrate_adapter(
    model: nn.Module,
    layers: Mapping[str, SpectralLayer],
    adapter_name: str,
    config: Any,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    progress: bool = False,
    force: bool = False,
) -> dict[str, dict[str, float]]:
    """Plan adapter ``adapter_name`` on ``layers`` (its layers in ``model``, by module name) from the prior of
    ``config`` (an :class:`s2ft.S2FTConfig`) over ``batches``, every adapter of ``model`` off meanwhile, and install
    the plans; :meth:`s2ft.SpectralModel.calibrate` says the rest. Returns per-layer path lengths."""
    adapters = {n: layer.adapters[adapter_name] for n, layer in layers.items()}
    trained = [n for n, a in adapters.items() if a.is_ready and bool(a.coeffs.detach().any())]
    if trained and not force:
        raise RuntimeError(
            f"{len(trained)} layers of adapter {adapter_name!r} already hold trained coefficients (e.g. "
            f"{trained[0]}); calibrating again would move them to new locations, where they mean nothing. Pass "
            "force=True to re-plan and reset the coefficients to zero"
        )
    others = [m for m in model.modules() if isinstance(m, SpectralLayer) and not m.disabled]
    try:
        for layer in others:  # the prior is the base model's gradient: every adapter off
            layer.disabled = True
        priors = compute_prior(
            model,
            layers,
            batches,
            loss_fn,
            config.calibration_batches,
            progress,
            kind=config.prior,
            lr=config.prior_lr,
        )
    finally:
        for layer in others:
            layer.disabled = False
    plans = {n: plan_for(prior, n, config) for n, prior in priors.items()}
    for n, plan in plans.items():
        adapters[n].set_locations(plan.rows, plan.cols, plan.perm_rows, plan.perm_cols)
        if force:
            with torch.no_grad():
                adapters[n].coeffs.zero_()
    return {
        n: {"path_length_before": p.path_length_before, "path_length_after": p.path_length_after}
        for n, p in plans.items()
    }


@torch.no_grad()
def replan_adapter(
    layers: Mapping[str, SpectralLayer],
    adapter_name: str,
    config: Any,
    priors: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """Plan adapter ``adapter_name`` on ``layers`` again from ``priors`` (``(d_out, d_in)`` per module name) or
    its own ``ΔW``, and project its ``ΔW`` onto the new plans with the adapter's basis, in float64;
    :meth:`s2ft.SpectralModel.replan` says the rest. Every prior is checked before any layer changes. Returns
    per-layer ``energy_kept``."""
    adapters = {n: layer.adapters[adapter_name] for n, layer in layers.items()}
    if priors is not None:
        missing = sorted(set(adapters) - set(priors))
        if missing:
            raise ValueError(
                f"priors lacks {len(missing)} layers of adapter {adapter_name!r}, e.g. {missing[0]!r}"
            )
        for n, adapter in adapters.items():
            if tuple(priors[n].shape) != (adapter.d_out, adapter.d_in):
                raise ValueError(
                    f"the prior of {n!r} is {tuple(priors[n].shape)}, its layer needs "
                    f"{(adapter.d_out, adapter.d_in)}"
                )
    elif not any(bool(a.coeffs.any()) for a in adapters.values()):
        raise ValueError(
            f"adapter {adapter_name!r} has no trained ΔW to plan from (its coefficients are all zero): train it "
            "first, or pass priors"
        )
    report = {}
    for n, adapter in adapters.items():
        basis, shape = adapter.basis, (adapter.d_out, adapter.d_in, adapter.scaling)
        # float64: the projection is exact to rounding where it should be
        delta = basis.delta_weight(
            adapter.coeffs.double(), adapter.rows, adapter.cols, *shape, adapter.perm_rows, adapter.perm_cols
        )
        prior = priors[n] if priors is not None else delta
        plan = plan_for(prior.detach().float().to(delta.device), n, config)
        coeffs = basis.project(delta, plan.rows, plan.cols, adapter.scaling, plan.perm_rows, plan.perm_cols)
        projected = basis.delta_weight(coeffs, plan.rows, plan.cols, *shape, plan.perm_rows, plan.perm_cols)
        total = float(delta.square().sum())
        adapter.set_locations(plan.rows, plan.cols, plan.perm_rows, plan.perm_cols)
        adapter.coeffs.copy_(coeffs)
        report[n] = {"energy_kept": float(projected.square().sum()) / total if total > 0 else 1.0}
    return report
