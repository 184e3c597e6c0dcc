"""How spectrally sparse a matrix is, and how much a row/column permutation makes it so.

Pure functions over 2-D float tensors (a gradient prior ``ΔŴ`` or a real ``ΔW``), then :func:`analyze_matrix`
for one matrix and :func:`analyze_model` for every adapted matrix of a :class:`s2ft.SpectralModel`, which writes
``analysis.json``, figures and ``report.md``. Energy means ``|DFT2|²``; by Parseval, the energy of the coefficients
left out of a reconstruction is its squared Frobenius error (times ``d_out · d_in``).

Memory: one matrix at a time, nothing of size ``(d_out · d_in)²``. Beyond the matrix, analysing it takes its
permuted copy, its complex spectrum (twice its size, freed at once) or the cumulative energy (float64, as much),
and the permutation search's ``(d, d)`` distances: about five times the matrix's float32 size at the peak.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from s2ft.config import S2FTConfig
from s2ft.io import atomic_write_text
from s2ft.ops.locations import fourierft_locations, mirror_of
from s2ft.ops.permutation import path_length
from s2ft.ops.sketch import LowRank
from s2ft.tuner.calibration import LossFn, compute_prior, layer_prior_ranks
from s2ft.tuner.planner import LayerPlan, base_matrix, layer_generator, plan_for

# Fractions of the coefficients at which energy curves are sampled: 10^-5 .. 1, 10 per decade.
CURVE_FRACTIONS: tuple[float, ...] = tuple(10 ** (k / 10) for k in range(-50, 1))
SOURCES = {"prior": "gradient prior", "full_finetune": "full fine-tuning ΔW"}


# ---------------------------------------------------------------------------------------------- measures
def energy_spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """``|DFT2(matrix)|²`` ``(d_out, d_in)``, float64 for float64 input and float32 otherwise, on the CPU."""
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    spectrum = torch.fft.fft2(matrix.detach().to("cpu", dtype))
    return torch.view_as_real(spectrum).square_().sum(dim=-1)  # re² + im², squared in place


def cumulative_energy(matrix: torch.Tensor) -> np.ndarray:
    """Share of the energy held by the ``k`` largest coefficients, for ``k = 1 .. d_out·d_in``: float64 ``(N,)``.

    Entry ``k - 1`` is that share; the last entry is 1 (up to rounding). An all-zero matrix gives all zeros.
    """
    energy = energy_spectrum(matrix).reshape(-1).numpy()
    energy.sort()  # in place, ascending: no index array
    cumulative = np.cumsum(energy[::-1], dtype=np.float64)
    del energy
    if cumulative[-1] > 0:
        cumulative /= cumulative[-1]
    return cumulative


def energy_compaction(matrix: torch.Tensor, n: int) -> float:
    """Share of the spectral energy of ``matrix`` ``(d_out, d_in)`` held by its ``n`` largest coefficients."""
    energy = energy_spectrum(matrix).reshape(-1)
    _check_count(n, energy.numel())
    total = float(energy.sum(dtype=torch.float64))
    return float(torch.topk(energy, n).values.sum(dtype=torch.float64)) / total if total > 0 else 0.0


def energy_at(matrix: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> float:
    """Share of the spectral energy of ``matrix`` ``(d_out, d_in)`` at the distinct locations ``(rows[k], cols[k])``."""
    energy = energy_spectrum(matrix)
    total = float(energy.sum(dtype=torch.float64))
    held = float(energy[rows.long().cpu(), cols.long().cpu()].sum(dtype=torch.float64))
    return held / total if total > 0 else 0.0


def mirrored_share(rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int) -> float:
    """Share of the locations whose mirror ``(-u, -v)`` is also among them (itself excluded): with real
    coefficients each such pair is one basis function, so half of this share is wasted coefficients."""
    flat = (rows.cpu() * d_in + cols.cpu()).long()
    mirror = mirror_of(d_out, d_in)[flat]
    return float((torch.isin(mirror, flat) & (mirror != flat)).sum()) / max(1, flat.numel())


def fraction_for_error(matrix: torch.Tensor, rel_error: float = 0.1) -> float:
    """Smallest fraction of the coefficients which, kept by magnitude, reconstruct ``matrix`` to ``rel_error``.

    The reconstruction is ``ifft2`` of the spectrum with every other coefficient zeroed; its relative Frobenius
    error is ``sqrt(dropped energy / total energy)`` (Parseval), so no reconstruction is formed.
    """
    if not 0 <= rel_error < 1:
        raise ValueError(f"rel_error must be in [0, 1), got {rel_error}")
    return _fraction_for_error(cumulative_energy(matrix), rel_error)


def energy_curve(matrix: torch.Tensor, fractions: Sequence[float] = CURVE_FRACTIONS) -> list[float]:
    """Share of the energy kept when the largest ``ceil(f · d_out · d_in)`` coefficients are kept, for each ``f``."""
    return _curve(cumulative_energy(matrix), fractions)


def spectrum_image(matrix: torch.Tensor, max_size: int = 256) -> torch.Tensor:
    """``log10`` of the energy spectrum, zero frequency in the centre (fftshift), for a heatmap.

    Larger sides are average-pooled (in energy, before the log) to at most ``max_size``. Returns float32
    ``(min(d_out, max_size), min(d_in, max_size))``.
    """
    energy = torch.fft.fftshift(energy_spectrum(matrix).float())
    size = (min(energy.shape[0], max_size), min(energy.shape[1], max_size))
    if size != tuple(energy.shape):
        energy = torch.nn.functional.adaptive_avg_pool2d(energy[None, None], size)[0, 0]
    return energy.clamp_min(torch.finfo(torch.float32).tiny).log10()


# ---------------------------------------------------------------------------------------------- one matrix
def analyze_matrix(
    matrix: torch.Tensor,
    n: int,
    gamma: float = 1.5,
    seed: int = 0,
    search: str = "greedy",
    rel_error: float = 0.1,
    fractions: Sequence[float] = CURVE_FRACTIONS,
) -> dict[str, Any]:
    """Spectral sparsity of ``matrix`` ``(d_out, d_in)`` before and after S2FT's permutation, against a random one.

    The permutation and the S2FT locations come from :func:`s2ft.tuner.planner.plan_for` (``search``, ``gamma``,
    ``seed``), as calibration computes them; FourierFT's locations are its seeded uniform
    draw. Returns a JSON-ready dict:

    - ``before`` / ``after`` / ``random``: each ``{"energy_compaction"`` (top-``n`` share), ``"fraction_for_error"``
      (for ``rel_error``), ``"curve"`` (energy kept at ``fractions``)``}``;
    - ``path_length``: row plus column open-path lengths, ``before`` / ``after`` / ``random``;
    - ``location_energy``: the share at FourierFT's locations (unpermuted) and at S2FT's (permuted);
    - ``mirrored_locations``: :func:`mirrored_share` of FourierFT's and of S2FT's locations;
    - ``shape``, ``n``, ``search``, and ``plan_seconds`` (the search and the location sampling).
    """
    return _analyze(matrix, "", _plan_config(n, gamma, seed, search), rel_error, fractions)[0]


def _plan_config(
    n: int, gamma: float, seed: int, search: str, permute: bool = True, locations: str = "prior"
) -> Any:
    """The S2FT config that plans a matrix with these settings (its target_modules are never used)."""
    from s2ft.config import S2FTConfig

    return S2FTConfig(
        target_modules=["_"],
        n_frequency=n,
        gamma=gamma,
        seed=seed,
        permutation=search,
        permute=permute,
        locations=locations,
    )


def _analyze(
    matrix: torch.Tensor,
    name: str,
    config: Any,
    rel_error: float,
    fractions: Sequence[float],
    image_size: int | None = None,
    prior_plan: LayerPlan | None = None,
    base_plans: dict[str, LayerPlan] | None = None,
) -> tuple[dict[str, Any], LayerPlan, dict[str, torch.Tensor]]:
    """:func:`analyze_matrix` of module ``name``'s matrix under the S2FT ``config`` (its plan is the one
    :func:`s2ft.tuner.planner.plan_for` gives, the one calibration installs), plus the plan, the before/after
    :func:`spectrum_image` when ``image_size`` is set, and, given the ``prior_plan`` of a prior, how much of
    ``matrix`` that plan's permutation and locations catch; the same for each of ``base_plans``
    (:func:`_base_plans`)."""
    if matrix.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    x = matrix.detach().to("cpu", torch.float64 if matrix.dtype == torch.float64 else torch.float32)
    d_out, d_in = x.shape
    n, seed, search = config.n_frequency, config.seed, config.permutation
    start = time.perf_counter()
    plan = plan_for(x, name, config)
    result: dict[str, Any] = {"shape": [d_out, d_in], "n": n, "search": search}
    result["plan_seconds"] = time.perf_counter() - start
    images = {"before": spectrum_image(x, image_size)} if image_size else {}
    result["before"] = _summary(x, n, rel_error, fractions)
    fourierft = energy_at(x, *fourierft_locations(d_out, d_in, n, seed))

    permuted = x if plan.perm_rows is None else x[plan.perm_rows][:, plan.perm_cols]
    result["after"] = _summary(permuted, n, rel_error, fractions)
    result["location_energy"] = {"fourierft": fourierft, "s2ft": energy_at(permuted, plan.rows, plan.cols)}
    result["mirrored_locations"] = {
        "fourierft": mirrored_share(*fourierft_locations(d_out, d_in, n, seed), d_out, d_in),
        "s2ft": mirrored_share(plan.rows, plan.cols, d_out, d_in),
    }
    if image_size:
        images["after"] = spectrum_image(permuted, image_size)
    del permuted

    generator = layer_generator(seed + 1, name)  # the random baseline's own draws
    result["random"], random_length = _random_baseline(x, generator, n, rel_error, fractions)
    result["path_length"] = {
        "before": plan.path_length_before,
        "after": plan.path_length_after,
        "random": random_length,
    }
    if prior_plan is not None:
        result["prior_plan"] = _under_plan(x, prior_plan, n, rel_error, fractions)
    for kind, base_plan in (base_plans or {}).items():
        result[kind] = _under_plan(x, base_plan, n, rel_error, fractions)
    return result, plan, images


BASE_PLANS = {
    "w0perm_plan": "permutations of W0, locations from the prior",
    "w0_plan": "permutations and locations of W0",
}


def _base_plans(prior: torch.Tensor, name: str, config: Any, base: torch.Tensor) -> dict[str, LayerPlan]:
    """The plans of module ``name`` that follow from its base weights ``base`` (``plan_from="base"``), as S2FT
    installs them: W0's permutations with locations from ``prior``'s permuted spectrum (``w0perm_plan``, stored
    locations) and W0's permutations and locations (``w0_plan``, nothing stored)."""
    if not config.permute:
        return {}
    x = prior.detach().to("cpu", torch.float32)
    return {
        "w0perm_plan": plan_for(x, name, dataclasses.replace(config, plan_from="base"), base),
        "w0_plan": plan_for(
            x, name, dataclasses.replace(config, plan_from="base", locations_from="base"), base
        ),
    }


def _random_baseline(
    x: torch.Tensor, generator: torch.Generator, n: int, rel_error: float, fractions: Sequence[float]
) -> tuple[dict[str, Any], float]:
    """The summary and the row plus column path length of ``x`` under a random row and column permutation."""
    shuffled = x[torch.randperm(x.shape[0], generator=generator)][
        :, torch.randperm(x.shape[1], generator=generator)
    ]
    return _summary(shuffled, n, rel_error, fractions), path_length(shuffled) + path_length(shuffled.T)


def _under_plan(
    x: torch.Tensor, plan: LayerPlan, n: int, rel_error: float, fractions: Sequence[float]
) -> dict[str, Any]:
    """``x`` permuted by another matrix's plan (a real ΔW by its prior's): the usual summary, plus the share of its
    energy at that plan's locations, the ones S2FT would train."""
    if (plan.perm_rows is not None and plan.perm_cols is not None) and (
        plan.perm_rows.numel() != x.shape[0] or plan.perm_cols.numel() != x.shape[1]
    ):
        raise ValueError(f"the prior's plan does not fit a {tuple(x.shape)} matrix")
    permuted = x if plan.perm_rows is None else x[plan.perm_rows][:, plan.perm_cols]
    summary = _summary(permuted, n, rel_error, fractions)
    summary["s2ft_location_energy"] = energy_at(permuted, plan.rows, plan.cols)
    return summary


def _summary(x: torch.Tensor, n: int, rel_error: float, fractions: Sequence[float]) -> dict[str, Any]:
    cumulative = cumulative_energy(x)
    _check_count(n, cumulative.size)
    return {
        "energy_compaction": float(cumulative[n - 1]),
        "fraction_for_error": _fraction_for_error(cumulative, rel_error),
        "curve": _curve(cumulative, fractions),
    }


def _fraction_for_error(cumulative: np.ndarray, rel_error: float) -> float:
    """The smallest ``k / N`` with ``1 - cumulative[k - 1] <= rel_error²`` (the dropped share); 0 for a zero matrix."""
    if cumulative[-1] == 0:
        return 0.0
    count = int(np.searchsorted(cumulative, 1.0 - rel_error**2 - 1e-12, side="left")) + 1
    return min(count, cumulative.size) / cumulative.size


def _curve(cumulative: np.ndarray, fractions: Sequence[float]) -> list[float]:
    counts = np.clip(np.ceil(np.asarray(fractions, dtype=np.float64) * cumulative.size), 0, cumulative.size)
    padded = np.concatenate([[0.0], cumulative])  # padded[k]: the share of the k largest
    return padded[counts.astype(np.int64)].tolist()


def _check_count(n: int, size: int) -> None:
    if not 0 < n <= size:
        raise ValueError(f"n={n} must be between 1 and the number of coefficients ({size})")


# ---------------------------------------------------------------------------------------------- a model
def analyze_model(
    spectral_model: Any,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    n: int | None = None,
    gamma: float | None = None,
    seed: int | None = None,
    search: str | None = None,
    full_finetune_delta: dict[str, torch.Tensor] | None = None,
    output_dir: str | os.PathLike = "analysis",
    rel_error: float = 0.1,
    max_batches: int | None = None,
    layers_per_pass: int | None = None,
    heatmaps: int = 3,
    progress: bool = False,
) -> dict[str, Any]:
    """Analyse the gradient prior of every adapted matrix of ``spectral_model`` and, optionally, real ``ΔW``'s.

    ``spectral_model`` is a :class:`s2ft.SpectralModel` (either method); ``n``, ``gamma``, ``seed`` and ``search``
    default to its config's (``n_frequency``, ``gamma``, ``seed``, ``permutation``; for a FourierFT model,
    :class:`s2ft.S2FTConfig`'s defaults). The prior is :func:`s2ft.tuner.calibration.compute_prior` over
    ``batches`` (at most ``max_batches``), of the config's kind (``prior``, ``prior_lr``; for a FourierFT model,
    S2FTConfig's defaults).
    ``full_finetune_delta`` maps names to real ``ΔW`` ``(d_out, d_in)`` (``nn.Linear``'s convention), e.g. from a
    short full fine-tune; a name that is also an adapted module's is, in addition, permuted by its prior's plan
    (``prior_plan``: how much of the real update S2FT's prior-chosen locations catch).

    Memory: the priors of ``layers_per_pass`` layers at a time (None: all at once), each analysed and freed in
    turn; with a number, ``batches`` must be re-iterable (a list or a DataLoader), it is run once per pass.

    Writes into ``output_dir``: ``analysis.json`` (the returned dict), ``spectrum_<source>.png`` (log-power
    heatmaps before and after the permutation for ``heatmaps`` representative matrices),
    ``energy_curve_<source>.png`` and ``report.md``.
    """

    settings = _settings(spectral_model.spectral_config, n, gamma, seed, search, rel_error)
    config = _plan_config(
        settings["n"],
        settings["gamma"],
        settings["seed"],
        settings["search"],
        settings["permute"],
        settings["locations"],
    )
    layers = spectral_model.spectral_layers()
    shown = set(_representatives(list(layers), heatmaps))
    analysis: dict[str, Any] = {"settings": settings, "fractions": list(CURVE_FRACTIONS), "prior": {}}
    images: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {"prior": []}
    plans: dict[str, LayerPlan] = {}
    base_plans: dict[str, dict[str, LayerPlan]] = {}
    for name, prior, sketch in _priors(
        spectral_model, layers, batches, loss_fn, max_batches, layers_per_pass, progress, settings
    ):
        size = 256 if name in shown else None
        analysis["prior"][name], plans[name], image = _analyze(
            prior, name, config, rel_error, CURVE_FRACTIONS, image_size=size
        )
        if (
            sketch is not None
        ):  # prior_rank: what the sketch keeps, and its plan (the one calibration installs)
            analysis["prior"][name]["sketch"], plans[name] = _sketch_report(prior, sketch, name, config)
        if full_finetune_delta and name in full_finetune_delta:
            base_plans[name] = _base_plans(prior, name, config, base_matrix(layers[name].base_layer))
        if image:
            images["prior"].append((name, image["before"], image["after"]))
    if full_finetune_delta:
        analysis["full_finetune"], images["full_finetune"] = {}, []
        shown_deltas = set(_representatives(list(full_finetune_delta), heatmaps))
        for name, delta in full_finetune_delta.items():
            size = 256 if name in shown_deltas else None
            analysis["full_finetune"][name], _, image = _analyze(
                delta,
                name,
                config,
                rel_error,
                CURVE_FRACTIONS,
                image_size=size,
                prior_plan=plans.get(name),
                base_plans=base_plans.get(name),
            )
            if image:
                images["full_finetune"].append((name, image["before"], image["after"]))
    analysis["summary"] = {source: summarize(analysis[source]) for source in SOURCES if source in analysis}
    _write(analysis, images, output_dir)
    return analysis


def _settings(
    config: Any, n: int | None, gamma: float | None, seed: int | None, search: str | None, rel_error: float
) -> dict[str, Any]:
    """The settings of an analysis: those given, else the config's, else (a config without S2FT's options)
    :class:`s2ft.S2FTConfig`'s defaults, the one source of them."""
    defaults = {f.name: f.default for f in dataclasses.fields(S2FTConfig)}

    def setting(name: str) -> Any:
        return getattr(config, name, defaults[name])

    return {
        "n": n if n is not None else config.n_frequency,
        "gamma": gamma if gamma is not None else setting("gamma"),
        "seed": seed if seed is not None else config.seed,
        "search": search if search is not None else setting("permutation"),
        "permute": setting("permute"),
        "locations": setting("locations"),
        "prior": setting("prior"),
        "prior_lr": setting("prior_lr"),
        "rel_error": rel_error,
        # a sketched prior's rank, where the config has one
        **({"prior_rank": config.prior_rank} if getattr(config, "prior_rank", None) is not None else {}),
    }


def _sketch_report(
    prior: torch.Tensor, sketch: LowRank, name: str, config: Any
) -> tuple[dict[str, Any], LayerPlan]:
    """What a sketched prior (``prior_rank``) keeps of the exact ``prior`` ``(d_out, d_in)``: ``energy_kept``, the
    share of the prior's energy inside the sketch's row and column spaces (:meth:`LowRank.kept_energy`; 1 when
    exact); ``location_energy``, the share of the exact prior's spectral energy, permuted by the sketch's plan, at
    the sketch's locations (against the exact plan's ``after``/``location_energy.s2ft``); and the sketch's plan."""
    plan = plan_for(sketch, name, config)
    x = prior.detach().to("cpu", torch.float64 if prior.dtype == torch.float64 else torch.float32)
    rows, cols = plan.perm_rows, plan.perm_cols
    permuted = x if rows is None or cols is None else x[rows.cpu()][:, cols.cpu()]
    report = {
        "rank": float(sketch.rank),
        "energy_kept": sketch.kept_energy(x),
        "location_energy": energy_at(permuted, plan.rows, plan.cols),
    }
    return report, plan


def _representatives(names: list[str], count: int) -> list[str]:
    """Up to ``count`` names spread evenly over ``names`` (first and last included)."""
    if count <= 0 or not names:
        return []
    if count >= len(names):
        return list(names)
    if count == 1:
        return [names[0]]
    return [names[round(i * (len(names) - 1) / (count - 1))] for i in range(count)]


def _priors(
    spectral_model: Any,
    layers: dict[str, Any],
    batches: Iterable[Any],
    loss_fn: LossFn | None,
    max_batches: int | None,
    layers_per_pass: int | None,
    progress: bool,
    settings: dict[str, Any],
) -> Iterable[tuple[str, torch.Tensor, LowRank | None]]:
    """``(name, prior, sketch)`` for every layer, ``layers_per_pass`` layers' priors held at a time; the prior named
    by ``settings["prior"]``, and, with ``settings["prior_rank"]``, its sketch at that rank (a second pass over the
    batches) where the layer has one (``"auto"``: the wide layers only; else None).

    Every adapter stays switched off meanwhile, also those outside the pass (as they are in one calibration pass).
    A ``"trajectory"`` prior taken a pass at a time moves only that pass's layers: it then differs from the one
    calibration computes over all layers at once.
    """
    names = list(layers)
    step = layers_per_pass or len(names)
    if step <= 0:
        raise ValueError(f"layers_per_pass must be a positive integer or None, got {layers_per_pass}")
    if step < len(names) and iter(batches) is batches:
        raise ValueError(
            "layers_per_pass needs re-iterable batches (a list or a DataLoader), not an iterator"
        )
    ranks = layer_prior_ranks(layers, settings.get("prior_rank"), settings["prior"])
    sketched = any(k is not None for k in ranks.values())  # "auto": none where every layer is narrow
    if sketched and iter(batches) is batches:
        raise ValueError(
            "a sketched prior (prior_rank) is analysed against the exact one, over the batches twice: pass "
            "re-iterable batches (a list or a DataLoader), not an iterator"
        )
    disabled = {name: layer.disabled for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.disabled = True
        for first in range(0, len(names), step):
            chunk = {name: layers[name] for name in names[first : first + step]}
            priors = compute_prior(
                spectral_model.get_base_model(),
                chunk,
                batches,
                loss_fn,
                max_batches,
                progress,
                kind=settings["prior"],
                lr=settings["prior_lr"],
            )
            sketches = (
                compute_prior(
                    spectral_model.get_base_model(),
                    chunk,
                    batches,
                    loss_fn,
                    max_batches,
                    progress,
                    kind=settings["prior"],
                    rank=settings.get("prior_rank"),
                    seed=settings["seed"],
                )
                if sketched
                else {}
            )
            for name in chunk:
                sketch = sketches.pop(name, None)  # "auto": a narrow layer's prior is the exact one
                yield name, priors.pop(name), sketch if isinstance(sketch, LowRank) else None
    finally:
        for name, layer in layers.items():
            layer.disabled = disabled[name]


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, min and max over matrices of each scalar of :func:`analyze_matrix` (curves aside), keyed by a dotted
    path such as ``"after.energy_compaction"``."""
    values: dict[str, list[float]] = {}
    for result in results.values():
        for key, value in _scalars(result):
            values.setdefault(key, []).append(value)
    return {
        key: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)}
        for key, v in values.items()
        if all(math.isfinite(x) for x in v)
    }


def _scalars(result: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, float]]:
    for key, value in result.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}.")
        elif isinstance(value, float) and key != "plan_seconds":
            yield f"{prefix}{key}", value


# ---------------------------------------------------------------------------------------------- outputs
def _write(
    analysis: dict[str, Any],
    images: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]],
    output_dir: str | os.PathLike,
) -> None:
    from s2ft.analysis import plots

    os.makedirs(output_dir, exist_ok=True)
    search = analysis["settings"]["search"]
    figures: dict[str, list[str]] = {}
    for source, label in SOURCES.items():
        if source not in analysis:
            continue
        results = analysis[source]
        figures[source] = [f"spectrum_{source}.png", f"energy_curve_{source}.png"]
        plots.plot_spectra(
            images[source],
            os.path.join(output_dir, figures[source][0]),
            f"Log-power spectrum of the {label}",
            search,
        )
        plots.plot_energy_curves(
            analysis["fractions"],
            {kind: [r[kind]["curve"] for r in results.values() if kind in r] for kind in plots.CURVE_STYLES},
            os.path.join(output_dir, figures[source][1]),
            f"Spectral energy kept by the largest coefficients ({label}, {len(results)} matrices)",
            search,
            marks=sorted({analysis["settings"]["n"] / math.prod(r["shape"]) for r in results.values()}),
        )
    atomic_write_text(os.path.join(output_dir, "analysis.json"), json.dumps(analysis, indent=1) + "\n")
    atomic_write_text(os.path.join(output_dir, "report.md"), _report(analysis, figures))


def _report(analysis: dict[str, Any], figures: dict[str, list[str]]) -> str:
    """``report.md``: the settings, a summary table and a per-matrix table for each source, and the figures."""
    s = analysis["settings"]
    lines = [
        "# Spectral sparsity before and after the S2FT permutation",
        "",
        f"Top-n share: the spectral energy (|DFT2|²) held by the n = {s['n']} largest coefficients. "
        f"Fraction for {s['rel_error']:.0%} error: the smallest fraction of coefficients, kept by magnitude, that "
        f"reconstructs the matrix to that relative Frobenius error. Permutation search: `{s['search']}`; "
        f"S2FT locations sampled ∝ |DFT2|^{s['gamma']}; seed {s['seed']}.",
    ]
    for source, label in SOURCES.items():
        if source not in analysis:
            continue
        lines += ["", f"## {label[0].upper()}{label[1:]}", ""]
        lines += _summary_table(analysis["summary"][source], s["rel_error"])
        lines += ["", *_matrix_table(analysis[source])]
        for figure in figures.get(source, []):
            lines += ["", f"![{figure}]({figure})"]
    return "\n".join(lines) + "\n"


def _summary_table(summary: dict[str, dict[str, float]], rel_error: float) -> list[str]:
    rows = [
        ("top-n share", "energy_compaction"),
        (f"fraction of coefficients for {rel_error:.0%} error", "fraction_for_error"),
    ]
    lines = ["| mean (min–max) over matrices | before | after | random permutation |", "|---|---|---|---|"]
    for label, key in rows:
        cells = [_cell(summary.get(f"{kind}.{key}")) for kind in ("before", "after", "random")]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines.append(
        f"| energy at FourierFT's / S2FT's n locations | {_cell(summary.get('location_energy.fourierft'))} | "
        f"{_cell(summary.get('location_energy.s2ft'))} | |"
    )
    lines.append(
        "| FourierFT's / S2FT's locations whose mirror (-u, -v) is also drawn | "
        f"{_cell(summary.get('mirrored_locations.fourierft'))} | {_cell(summary.get('mirrored_locations.s2ft'))} | |"
    )
    if "prior_plan.energy_compaction" in summary:
        lines.append(
            f"| permuted by the prior's plan: top-n share / at its locations | | "
            f"{_cell(summary['prior_plan.energy_compaction'])} / "
            f"{_cell(summary['prior_plan.s2ft_location_energy'])} | |"
        )
    for kind, label in BASE_PLANS.items():
        if f"{kind}.energy_compaction" in summary:
            lines.append(
                f"| plan from the base weights ({label}): top-n share / at its locations | | "
                f"{_cell(summary[f'{kind}.energy_compaction'])} / "
                f"{_cell(summary[f'{kind}.s2ft_location_energy'])} | |"
            )
    return lines


def _matrix_table(results: dict[str, dict[str, Any]]) -> list[str]:
    with_prior = all("prior_plan" in r for r in results.values())
    extra = " prior's plan: top-n | at its locations |" if with_prior else ""
    lines = [
        "| matrix | shape | top-n before | after | random | FourierFT loc. | S2FT loc. | path after/before |"
        + extra,
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if with_prior else ""),
    ]
    for name, r in results.items():
        ratio = r["path_length"]["after"] / r["path_length"]["before"] if r["path_length"]["before"] else 1.0
        line = (
            f"| `{name}` | {r['shape'][0]}×{r['shape'][1]} | {r['before']['energy_compaction']:.3f} | "
            f"{r['after']['energy_compaction']:.3f} | {r['random']['energy_compaction']:.3f} | "
            f"{r['location_energy']['fourierft']:.3f} | {r['location_energy']['s2ft']:.3f} | {ratio:.3f} |"
        )
        if with_prior:
            plan = r["prior_plan"]
            line += f" {plan['energy_compaction']:.3f} | {plan['s2ft_location_energy']:.3f} |"
        lines.append(line)
    return lines


def _cell(stats: dict[str, float] | None) -> str:
    if stats is None:
        return ""
    return f"{stats['mean']:.3f} ({stats['min']:.3f}–{stats['max']:.3f})"
