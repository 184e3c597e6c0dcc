"""S2FT's plan for one matrix: row and column orders of its prior, then locations sampled from the permuted spectrum;
and the plan installed on an adapter's layers, from calibration's prior or from the adapter's own trained ``ΔW``.

One planner for calibration (:meth:`s2ft.SpectralModel.calibrate`, :func:`calibrate_adapter`), re-planning
(:func:`replan_adapter`) and analysis (``s2ft analyze``), so the report shows the very permutations and locations
that calibration installs. Each matrix's plan draws from its own
generator, seeded by ``(seed, module name)``: a layer's plan does not depend on which other layers are targeted,
nor on their order.

With ``plan_from="base"`` the permutations (and with ``locations_from="base"`` the locations too) are those of the
base weights ``W0`` rather than of the prior: :func:`base_fingerprints` records ``W0`` and the plans in a few bytes
when saving, and :func:`recompute_base_plans` plans again from ``W0`` when loading, refusing another base model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from s2ft.ops.bases import get_basis
from s2ft.ops.locations import (
    fourierft_locations,
    power_spectrum,
    sample_locations,
    sample_locations_in_blocks,
)
from s2ft.ops.permutation import path_length, search_order
from s2ft.ops.point_search import search_order_points
from s2ft.ops.sketch import LowRank
from s2ft.tuner.calibration import LossFn, iter_priors
from s2ft.tuner.distributed import copy_into, full
from s2ft.tuner.kinds import kind_of
from s2ft.tuner.layers import SpectralLayer
from s2ft.tuner.walk import outer_modules

PLANNED_BASIS = "fourier"  # the basis (s2ft.ops.bases) whose spectrum plan_layer samples from
DIGEST_BYTES = 8  # of SHA-256, per module's W0 and for all the base-derived plans of an adapter
# A rank-k prior's rows (or columns) are ordered with their dense (m, m) float64 distance matrix up to this many
# (8 MiB; 16 MiB for 2-opt's padded copy), from their k coordinates above: at 1,536 rows of rank 64 (1 thread)
# the greedy search takes 0.08 s dense and 0.12 s from the points, at 4,096 rows 1.15 s and 0.52 s (134 MB dense),
# at 11,008 rows (Llama-2-7B's MLP) 3.9 s from the points where the dense matrix would be 970 MB (0.7-0.8 s since
# the float32 points of a float32 sketch are searched in float32, benchmarks/results/cpu/sketch_planning_time.md).
DENSE_SEARCH_MAX_POINTS = 1024
# A rank-k prior's permuted spectrum is sampled whole up to this many entries (a few float32 copies of 4 MiB),
# by blocks of rows above (s2ft.ops.locations.sample_locations_in_blocks: one block and O(n) candidates).
DENSE_SPECTRUM_MAX_ENTRIES = 2**20


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
    prior: torch.Tensor | LowRank,
    n: int,
    gamma: float,
    generator: torch.Generator,
    search: str = "greedy",
    permute: bool = True,
    locations: str = "prior",
    seed: int = 0,
    order_from: torch.Tensor | None = None,
    basis: Any = None,
) -> LayerPlan:
    """Order the prior's rows and columns, then sample ``n`` locations ``∝ |DFT2(permuted prior)|^gamma``.

    ``prior`` is ``(d_out, d_in)``, dense or a rank-``k`` :class:`s2ft.ops.sketch.LowRank` (planned from its factors,
    :func:`_plan_low_rank`); ``order_from`` (same shape), if given, is ordered instead (the base weights,
    ``plan_from="base"``). ``permute=False`` keeps identity orders. ``locations``: ``"prior"`` samples
    from the whole spectrum (the paper), ``"prior-half"`` from one location of each mirror pair (no two
    coefficients on the same basis function; see :func:`s2ft.ops.locations.sample_locations`), ``"uniform"`` takes
    FourierFT's locations for ``seed``. ``basis`` (an object of :data:`s2ft.ops.bases.BASES` with an ``energy``,
    e.g. the Haar bases) samples from its coefficients' magnitudes and draws uniform locations its own way instead.
    """
    if isinstance(prior, LowRank):
        return _plan_low_rank(prior, n, gamma, generator, search, permute, locations, seed, order_from, basis)
    before = path_length(prior) + path_length(prior.T)
    perm_rows = perm_cols = None
    permuted = prior
    if permute:
        perm_rows, perm_cols = orders(prior if order_from is None else order_from, search, generator)
        perm_rows, perm_cols = perm_rows.to(prior.device), perm_cols.to(prior.device)
        permuted = prior[perm_rows][:, perm_cols]
    after = path_length(permuted) + path_length(permuted.T)
    if locations == "uniform":
        draw = fourierft_locations if basis is None else basis.seeded_locations
        rows, cols = draw(prior.shape[0], prior.shape[1], n, seed)
    else:
        half = locations == "prior-half"
        energy = power_spectrum(permuted) if basis is None else basis.energy(permuted)
        rows, cols = sample_locations(energy, n, gamma, generator, half=half)
    return LayerPlan(rows, cols, perm_rows, perm_cols, before, after)


def _plan_low_rank(
    prior: LowRank,
    n: int,
    gamma: float,
    generator: torch.Generator,
    search: str,
    permute: bool,
    locations: str,
    seed: int,
    order_from: torch.Tensor | None,
    basis: Any = None,
) -> LayerPlan:
    """:func:`plan_layer` of a rank-``k`` prior from its factors: the rows and columns are ordered by their ``k``
    coordinates (:meth:`LowRank.row_points`, :meth:`LowRank.col_points`, as far apart as the matrix's rows and
    columns), and the spectrum is that of the permuted factors (:meth:`LowRank.permuted_power_spectrum`). The
    generator is drawn in the same order as for a dense prior, so a distance-based search (all but ``"svd"``, whose
    power iteration starts from a vector of the points' width) gives the dense prior's plan when the prior is
    exactly of rank ``k``."""
    row_points, col_points = prior.row_points(), prior.col_points()
    before = path_length(row_points) + path_length(col_points)
    perm_rows = perm_cols = None
    if permute:
        if order_from is None:
            perm_rows = order_points(row_points, search, generator)
            perm_cols = order_points(col_points, search, generator)
        else:
            perm_rows, perm_cols = orders(order_from, search, generator)
        perm_rows, perm_cols = perm_rows.to(prior.device), perm_cols.to(prior.device)
        after = path_length(row_points[perm_rows]) + path_length(col_points[perm_cols])
    else:
        after = before
    if locations == "uniform":
        draw = fourierft_locations if basis is None else basis.seeded_locations
        rows, cols = draw(prior.shape[0], prior.shape[1], n, seed)
    elif (
        basis is None and prior.shape.numel() > DENSE_SPECTRUM_MAX_ENTRIES
    ):  # by rows: no (d_out, d_in) tensor
        power_rows = prior.permuted_power_rows(perm_rows, perm_cols)
        rows, cols = sample_locations_in_blocks(
            power_rows, prior.shape[0], prior.shape[1], n, gamma, generator, half=locations == "prior-half"
        )
        rows, cols = rows.to(prior.device), cols.to(prior.device)
    elif basis is None:
        power = prior.permuted_power_spectrum(perm_rows, perm_cols)
        rows, cols = sample_locations(power, n, gamma, generator, half=locations == "prior-half")
    else:  # another basis' energy (the Haar bases): of the permuted product, one layer's dense transient
        permuted = prior.dense()
        if perm_rows is not None and perm_cols is not None:
            permuted = permuted[perm_rows][:, perm_cols]
        rows, cols = sample_locations(
            basis.energy(permuted), n, gamma, generator, half=locations == "prior-half"
        )
    return LayerPlan(rows, cols, perm_rows, perm_cols, before, after)


def order_points(points: torch.Tensor, search: str, generator: torch.Generator) -> torch.Tensor:
    """The order of the rows of ``points`` ``(m, k)`` by ``search``: with their dense distance matrix
    (:func:`s2ft.ops.permutation.search_order`) up to :data:`DENSE_SEARCH_MAX_POINTS` rows, where it is as fast
    and its ``m²`` numbers are few, and from the points' coordinates above (:mod:`s2ft.ops.point_search`,
    ``O(m·(k + K))`` memory: the same order, to rounding)."""
    if points.shape[0] <= DENSE_SEARCH_MAX_POINTS:
        return search_order(points, search, generator)
    return search_order_points(points, search, generator)


def orders(
    matrix: torch.Tensor, search: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The row order ``(d_out,)`` and then the column order ``(d_in,)`` of ``matrix`` by ``search``."""
    return search_order(matrix, search, generator), search_order(matrix.T, search, generator)


def plan_for(
    prior: torch.Tensor | LowRank | None, name: str, config, base: torch.Tensor | None = None
) -> LayerPlan:
    """The plan of module ``name`` under an :class:`s2ft.S2FTConfig`: what calibration installs there.

    With ``config.plan_from == "base"`` the rows and columns of ``base`` (``W0``, ``(d_out, d_in)``) are ordered
    instead of the prior's, and with ``locations_from == "base"`` the locations are sampled from ``base``'s
    permuted spectrum (``prior`` is then not needed). The plan samples from a 2-D DFT power spectrum for a
    Fourier-basis adapter and from the basis' ``energy`` for a basis that has one (the Haar bases); a planned
    config in another basis is refused rather than given locations of the wrong spectrum."""
    basis = get_basis(config.basis)
    if config.basis == PLANNED_BASIS:
        basis = None
    elif not hasattr(basis, "energy"):
        raise ValueError(
            f"S2FT's planner samples locations from a basis' energy (the DFT power spectrum, or a basis' "
            f"energy()); a {config.method!r} adapter lives in basis {config.basis!r}, which has no planner"
        )
    order_from = None
    if config.plan_from_base:
        if base is None:
            raise ValueError(
                f"the plan of {name!r} follows from its base weights (plan_from='base'): pass base=W0"
            )
        order_from = base.detach().float()
        if config.locations_from == "base":
            prior = order_from
    if prior is None:
        raise ValueError(f"the plan of {name!r} samples its locations from its prior: pass prior")
    return plan_layer(
        prior,
        config.n_frequency,
        config.gamma,
        layer_generator(config.seed, name),
        search=config.permutation,
        permute=config.permute,
        locations=config.locations,
        seed=config.seed,
        order_from=order_from,
        basis=basis,
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
    needs_prior = getattr(config, "needs_prior", True)  # False: the whole plan follows from W0, no batches
    others = (
        [m for _, m in outer_modules(model) if isinstance(m, SpectralLayer) and not m.disabled]
        if needs_prior
        else []
    )
    priors = (
        iter_priors(
            model,
            layers,
            batches,
            loss_fn,
            config.calibration_batches,
            progress,
            kind=config.prior,
            lr=config.prior_lr,
            group_size=getattr(config, "calibration_group_size", None),
            rank=getattr(config, "prior_rank", None),
            seed=config.seed,
        )
        if needs_prior
        else ((n, None) for n in layers)
    )
    plans = {}
    try:
        for layer in others:  # the prior is the base model's gradient: every adapter off
            layer.disabled = True
        # each prior is planned as it comes and dropped: at most one group's priors are held
        for n, prior in priors:
            plans[n] = plan_for(prior, n, config, _base(layers[n], config))
            del prior  # before the next group's sums are made
    finally:
        for layer in others:
            layer.disabled = False
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
            full(adapter.coeffs).double(),
            adapter.rows,
            adapter.cols,
            *shape,
            adapter.perm_rows,
            adapter.perm_cols,
        )
        prior = priors[n] if priors is not None else delta
        plan = plan_for(prior.detach().float().to(delta.device), n, config, _base(layers[n], config))
        coeffs = basis.project(delta, plan.rows, plan.cols, adapter.scaling, plan.perm_rows, plan.perm_cols)
        projected = basis.delta_weight(coeffs, plan.rows, plan.cols, *shape, plan.perm_rows, plan.perm_cols)
        total = float(delta.square().sum())
        adapter.set_locations(plan.rows, plan.cols, plan.perm_rows, plan.perm_cols)
        copy_into(adapter.coeffs, coeffs)  # sharded (FSDP): each rank keeps its slice
        report[n] = {"energy_kept": float(projected.square().sum()) / total if total > 0 else 1.0}
    return report


# ---------------------------------------------------------------------------------------------- base-derived plans
def _base(layer: SpectralLayer, config: Any) -> torch.Tensor | None:
    """``W0`` ``(d_out, d_in)`` in float32 on the CPU when ``config``'s plan comes from it, else None."""
    return base_matrix(layer.base_layer) if getattr(config, "plan_from_base", False) else None


def base_matrix(module: nn.Module) -> torch.Tensor:
    """A layer's weight in the ``(d_out, d_in)`` matrix view, float32, whole (a sharded or partitioned one gathered),
    on the CPU: what base-derived plans and fingerprints are computed from, the same wherever it is loaded."""
    matrix = kind_of(module).matrix(module, full(module.weight).detach())
    return matrix.to("cpu", torch.float32).contiguous()


def _digest(*tensors: torch.Tensor) -> bytes:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()[:DIGEST_BYTES]


def _plan_digest(plans: Mapping[str, Mapping[str, torch.Tensor | None]], config: Any) -> bytes:
    """The digest of the base-derived parts of ``plans`` (int64 tensors by key, per module), in name order."""
    keys = ("perm_rows", "perm_cols") + (("rows", "cols") if config.locations_from == "base" else ())
    parts = [t.long() for n in sorted(plans) for k in keys if (t := plans[n].get(k)) is not None]
    return _digest(*parts)


def base_fingerprints(layers: Mapping[str, SpectralLayer], adapter_name: str, config: Any) -> torch.Tensor:
    """What a file stores of a plan derived from ``W0``: ``uint8`` ``(8 * (len(layers) + 1),)``, the digest of
    each module's ``W0`` in name order, then that of the adapter's base-derived permutations (and locations), so
    that loading refuses another base model and notices a plan recomputed differently."""
    merged = sorted(n for n, layer in layers.items() if layer.merged)
    if merged:
        raise RuntimeError(
            f"{merged[0]} holds a merged adapter, so its weight is not W0: unmerge() before saving an adapter "
            "whose plan comes from the base weights"
        )
    digests = [_digest(base_matrix(layers[n].base_layer)) for n in sorted(layers)]
    plans = {
        n: {k: getattr(layer.adapters[adapter_name], k) for k in ("perm_rows", "perm_cols", "rows", "cols")}
        for n, layer in layers.items()
    }
    return torch.frombuffer(bytearray(b"".join(digests) + _plan_digest(plans, config)), dtype=torch.uint8)


def recompute_base_plans(
    state: dict[str, torch.Tensor], config: Any, modules: Mapping[str, nn.Module], fingerprints: str
) -> dict[str, torch.Tensor]:
    """``state`` (a checked adapter file's tensors) with the plans derived from the base weights of ``modules``
    (the target layers, by name) added: int64 ``perm_rows``/``perm_cols``, and ``rows``/``cols`` when
    ``locations_from == "base"``, bit for bit those the adapter was trained with. Raises ``ValueError`` if a
    module's ``W0`` is not the one the adapter was trained on, or if the plans come out different."""
    names = sorted(modules)
    stored = state.get(fingerprints)
    if stored is None or stored.dtype != torch.uint8 or stored.numel() != DIGEST_BYTES * (len(names) + 1):
        raise ValueError(
            f"adapter file: its plan follows from the base weights, but {fingerprints} (their fingerprints) is "
            "missing or of the wrong size"
        )
    blob = bytes(stored.tolist())
    state = dict(state)
    plans = {}
    for i, name in enumerate(names):
        base = base_matrix(modules[name])
        if _digest(base) != blob[i * DIGEST_BYTES : (i + 1) * DIGEST_BYTES]:
            raise ValueError(
                f"this adapter was trained on other base weights: {name}'s weight differs from the one its plan "
                "was computed from (its plan follows from the base model, plan_from='base'); load it on the base "
                "model it was trained on (unmerged, in the same dtype)"
            )
        generator = layer_generator(config.seed, name)
        if config.locations_from == "base":
            plan = plan_for(None, name, config, base)
            found = {
                "perm_rows": plan.perm_rows,
                "perm_cols": plan.perm_cols,
                "rows": plan.rows,
                "cols": plan.cols,
            }
        else:
            perms = orders(base, config.permutation, generator) if config.permute else (None, None)
            found = dict(zip(("perm_rows", "perm_cols"), perms))
        plans[name] = found
        state.update({f"{name}.{k}": v for k, v in found.items() if v is not None})
    if _plan_digest(plans, config) != blob[-DIGEST_BYTES:]:
        raise ValueError(
            "the plan recomputed from the base weights differs from the one the adapter was trained with "
            "(the base weights match: a different torch version or device may order them differently)"
        )
    return state
