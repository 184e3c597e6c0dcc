"""Figures of :mod:`s2ft.analysis.measures`: log-power spectra before and after the permutation, and energy curves.

matplotlib is imported only when a figure is drawn. Figures are drawn on matplotlib's Agg canvas directly (no pyplot,
no global backend switch), so this works headless and does not disturb an interactive session. Files are written
atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from s2ft.io import atomic_write

CURVE_STYLES = {  # kind -> (label, colour, line style); "{search}" is filled in. Drawn in this order.
    "random": ("random permutation", "tab:orange", "-"),
    "before": ("before permutation", "tab:grey", "--"),
    "after": ("after the {search} permutation", "tab:blue", "-"),
    "prior_plan": ("permuted by its gradient prior's plan", "tab:green", "-"),
}


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on an Agg canvas (inches)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_spectra(
    images: Sequence[tuple[str, torch.Tensor, torch.Tensor]], path: str | os.PathLike, title: str, search: str
) -> None:
    """Heatmaps of ``log10 |DFT2|²`` (fftshifted, as :func:`s2ft.analysis.measures.spectrum_image` gives), one row per
    matrix ``(name, before, after)``: before and after the permutation side by side, on one colour scale per row
    (the 8 decades below the row's maximum)."""
    rows = max(len(images), 1)
    figure = new_figure(9.0, 3.6 * rows + 0.4)
    figure.suptitle(title)
    axes = np.atleast_2d(figure.subplots(rows, 2, squeeze=False))
    if not images:
        for axis in axes.flat:
            axis.set_axis_off()
        axes[0, 0].text(0.5, 0.5, "no matrix", ha="center", va="center")
    for row, (name, before, after) in zip(axes, images):
        top = float(max(before.max(), after.max()))
        for axis, image, label in zip(row, (before, after), ("before permutation", f"after {search}")):
            shown = axis.imshow(
                image.numpy(),
                cmap="magma",
                vmin=top - 8,
                vmax=top,
                aspect="auto",
                interpolation="nearest",
                extent=(-0.5, 0.5, 0.5, -0.5),
            )
            axis.set_title(f"{name}\n{label}", fontsize=8)
            axis.set_xlabel("column frequency v / d_in (centred)")
            axis.set_ylabel("row frequency u / d_out (centred)")
        figure.colorbar(shown, ax=list(row), label="log10 |DFT2|²", shrink=0.9)
    save_figure(figure, path)


def plot_energy_curves(
    fractions: Sequence[float],
    curves: dict[str, Sequence[Sequence[float]]],
    path: str | os.PathLike,
    title: str,
    search: str,
    marks: Sequence[float] = (),
) -> None:
    """Energy kept against the fraction of coefficients kept (log scale): for each kind of ``curves``
    (:data:`CURVE_STYLES`' keys; one curve per matrix) the mean line and a min–max band. ``marks`` draws dotted
    vertical lines, e.g. at ``n / (d_out · d_in)``."""
    figure = new_figure(7.5, 4.8)
    axis = figure.subplots()
    x = np.asarray(fractions, dtype=np.float64)
    for kind, (label, colour, style) in CURVE_STYLES.items():
        if not curves.get(kind):
            continue
        values = np.asarray(curves[kind], dtype=np.float64)  # (matrices, fractions)
        axis.plot(x, values.mean(axis=0), color=colour, linestyle=style, label=label.format(search=search))
        axis.fill_between(x, values.min(axis=0), values.max(axis=0), color=colour, alpha=0.2, linewidth=0)
    for mark in marks:
        axis.axvline(mark, color="black", linestyle=":", linewidth=1)
    if marks:
        axis.plot([], [], color="black", linestyle=":", label="n coefficients")
    axis.set_xscale("log")
    axis.set_xlim(x.min(), x.max())
    axis.set_ylim(0, 1.01)
    axis.set_xlabel("fraction of the coefficients kept (largest first)")
    axis.set_ylabel("share of the spectral energy kept")
    axis.set_title(title, fontsize=10)
    axis.grid(True, which="major", alpha=0.3)
    axis.legend(
        loc="upper left", fontsize=8, title="lines: mean, bands: min–max over matrices", title_fontsize=8
    )
    save_figure(figure, path)


def save_figure(figure: Any, path: str | os.PathLike) -> None:
    """Write ``figure`` as a PNG at ``path``, atomically."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
