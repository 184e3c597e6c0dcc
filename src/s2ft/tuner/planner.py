"""S2FT's plan for one matrix: row and column orders of its prior, then locations sampled from the permuted spectrum.

One planner for calibration (:meth:`s2ft.SpectralModel.calibrate`) and analysis (``s2ft analyze``), so the report
shows the very permutations and locations that calibration installs. Each matrix's plan draws from its own
generator, seeded by ``(seed, module name)``: a layer's plan does not depend on which other layers are targeted,
nor on their order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from s2ft.ops.locations import fourierft_locations, power_spectrum, sample_locations
from s2ft.ops.permutation import path_length, search_order

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
