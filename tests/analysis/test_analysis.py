"""Spectral analysis: measures against naive float64 references, a planted shuffled smooth matrix, and the full
model analysis writing its JSON, figures and report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from s2ft import S2FTConfig, get_spectral_model
from s2ft.analysis.measures import (
    CURVE_FRACTIONS,
    analyze_matrix,
    analyze_model,
    cumulative_energy,
    energy_at,
    energy_compaction,
    energy_curve,
    fraction_for_error,
    mirrored_share,
    spectrum_image,
)
from tests.helpers import make_batches, tiny_bert

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def planted(d_out: int = 64, d_in: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth matrix (sums of products of smooth functions, doubly centred so that no energy sits in the
    zero-frequency row and column, which shuffling cannot move) plus 1e-3 noise, and that matrix with its rows
    and columns shuffled."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, d_out, dtype=torch.float64)[:, None]
    s = torch.linspace(0, 1, d_in, dtype=torch.float64)[None, :]
    smooth = (
        torch.sin(3 * t) * torch.cos(2 * s) + (t - 0.5) ** 2 * torch.exp(s) + 0.5 * torch.cos(5 * t + 1) * s
    )
    smooth = smooth - smooth.mean(0, keepdim=True) - smooth.mean(1, keepdim=True) + smooth.mean()
    noisy = smooth + 1e-3 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    shuffled = noisy[torch.randperm(d_out, generator=g)][:, torch.randperm(d_in, generator=g)]
    return noisy, shuffled


def naive_energy(matrix: torch.Tensor) -> torch.Tensor:
    return torch.fft.fft2(matrix.double()).abs().pow(2).flatten()


def naive_fraction_for_error(matrix: torch.Tensor, rel_error: float) -> float:
    """Keep the k largest coefficients for k = 1, 2, ...; reconstruct with ifft2; stop at the error."""
    x = matrix.double()
    spectrum = torch.fft.fft2(x)
    order = torch.argsort(spectrum.abs().flatten(), descending=True)
    norm = torch.linalg.matrix_norm(x)
    for k in range(1, x.numel() + 1):
        kept = torch.zeros(x.numel(), dtype=spectrum.dtype)
        kept[order[:k]] = spectrum.flatten()[order[:k]]
        error = torch.linalg.matrix_norm(x - torch.fft.ifft2(kept.view_as(spectrum)))
        if error <= rel_error * norm * (1 + 1e-9):
            return k / x.numel()
    raise AssertionError("unreachable: all coefficients reconstruct exactly")


# ---------------------------------------------------------------------------------------------- measures
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n", [1, 7, 100, 192])
def test_energy_compaction_matches_a_sorted_fft(seed, n):
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(seed)).cumsum(0)
    energy = naive_energy(x)
    expected = float(torch.sort(energy, descending=True).values[:n].sum() / energy.sum())
    assert math.isclose(energy_compaction(x, n), expected, rel_tol=1e-5)
    assert math.isclose(float(cumulative_energy(x)[n - 1]), expected, rel_tol=1e-5)
    assert math.isclose(energy_compaction(x.double(), n), expected, rel_tol=1e-12)


@pytest.mark.parametrize("rel_error", [0.01, 0.05, 0.1, 0.3, 0.9])
@pytest.mark.parametrize("smoothing", [0, 1, 3])
def test_fraction_for_error_matches_explicit_reconstructions(rel_error, smoothing):
    x = torch.randn(12, 10, generator=torch.Generator().manual_seed(smoothing), dtype=torch.float64)
    for _ in range(smoothing):  # smoother matrices need fewer coefficients
        x = x.cumsum(0).cumsum(1)
    assert fraction_for_error(x, rel_error) == pytest.approx(
        naive_fraction_for_error(x, rel_error), abs=1e-12
    )


def test_fraction_for_error_is_smaller_for_smoother_matrices_and_checks_its_argument():
    noise = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    assert fraction_for_error(noise) > 0.8  # a flat spectrum: nearly every coefficient is needed
    assert fraction_for_error(noise.cumsum(0).cumsum(1)) < 0.1
    assert fraction_for_error(torch.zeros(4, 4)) == 0.0
    with pytest.raises(ValueError, match="rel_error"):
        fraction_for_error(noise, 1.5)


def test_energy_at_and_the_energy_curve_agree_with_the_compaction():
    x = torch.randn(20, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64).cumsum(1)
    energy = naive_energy(x).view(20, 24)
    top = torch.topk(energy.flatten(), 30).indices
    assert math.isclose(energy_at(x, top // 24, top % 24), energy_compaction(x, 30), rel_tol=1e-12)
    every = torch.arange(480)
    assert math.isclose(energy_at(x, every // 24, every % 24), 1.0, rel_tol=1e-12)
    curve = energy_curve(x, [0.0, 30 / 480, 0.5, 1.0])
    assert curve[0] == 0.0
    assert math.isclose(curve[1], energy_compaction(x, 30), rel_tol=1e-12)
    assert math.isclose(curve[3], 1.0, rel_tol=1e-12)
    full = energy_curve(x)
    assert len(full) == len(CURVE_FRACTIONS)
    assert all(a <= b for a, b in zip(full, full[1:]))


def test_spectrum_image_is_centred_and_pooled():
    x = torch.ones(8, 6) + 0.01 * torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    image = spectrum_image(x)
    assert image.shape == (8, 6)
    assert tuple((image == image.max()).nonzero()[0].tolist()) == (4, 3)  # the DC term, after fftshift
    assert spectrum_image(torch.randn(300, 40), max_size=64).shape == (64, 40)


# ---------------------------------------------------------------------------------------------- one matrix
def test_planted_shuffled_smooth_matrix_is_compacted_by_the_search_and_not_by_chance():
    _, shuffled = planted()
    result = analyze_matrix(shuffled, n=30, seed=0)
    before, after, random = (result[k]["energy_compaction"] for k in ("before", "after", "random"))
    assert before < 0.2 and random < 0.2
    assert after >= 3 * before
    assert result["after"]["fraction_for_error"] < 0.5 * result["before"]["fraction_for_error"]
    assert result["random"]["fraction_for_error"] > 0.5
    assert result["path_length"]["after"] < 0.5 * result["path_length"]["before"]
    assert result["location_energy"]["s2ft"] > 10 * result["location_energy"]["fourierft"]
    # a compacted spectrum is peaked, so the whole-spectrum draw takes mirror pairs; uniform draws rarely do
    assert result["mirrored_locations"]["s2ft"] > 0.2
    assert result["mirrored_locations"]["fourierft"] < 0.1
    cyclic = analyze_matrix(shuffled, n=30, seed=0, search="2opt-cyclic")
    assert cyclic["after"]["energy_compaction"] > 0.95


def test_analyze_matrix_is_deterministic_and_json_ready():
    _, shuffled = planted(24, 20)
    first, second = analyze_matrix(shuffled, 10, seed=3), analyze_matrix(shuffled, 10, seed=3)
    first.pop("plan_seconds"), second.pop("plan_seconds")
    assert first == second
    assert json.loads(json.dumps(first)) == first
    assert set(first) == {
        "shape",
        "n",
        "search",
        "before",
        "after",
        "random",
        "path_length",
        "location_energy",
        "mirrored_locations",
    }
    with pytest.raises(ValueError, match="2-D"):
        analyze_matrix(torch.randn(3, 4, 5), 4)
    with pytest.raises(ValueError, match="n_frequency"):
        analyze_matrix(torch.randn(3, 4), 13)


def test_mirrored_share_counts_pairs_not_self_mirrors():
    # 6x4: (1, 1) and (5, 3) are mirrors; (0, 0) and (3, 2) are their own mirrors; (2, 1) stands alone
    rows, cols = torch.tensor([1, 5, 0, 3, 2]), torch.tensor([1, 3, 0, 2, 1])
    assert mirrored_share(rows, cols, 6, 4) == pytest.approx(2 / 5)


# ---------------------------------------------------------------------------------------------- a model
def check_png(path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000
    assert matplotlib.image.imread(path).std() > 0


def test_analyze_model_writes_json_figures_and_report(tmp_path):
    model = get_spectral_model(tiny_bert(), S2FTConfig(target_modules=["query", "value"], n_frequency=40))
    names = model.adapted_modules
    real = {
        name: torch.randn(32, 32, generator=torch.Generator().manual_seed(i)) for i, name in enumerate(names)
    }
    analysis = analyze_model(
        model, make_batches("bert"), full_finetune_delta=real, output_dir=tmp_path, heatmaps=2
    )
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved == json.loads(json.dumps(analysis))
    assert set(saved) == {"settings", "fractions", "prior", "full_finetune", "summary"}
    assert saved["settings"] == {
        "n": 40,
        "gamma": 1.5,
        "seed": 777,
        "search": "greedy",
        "permute": True,
        "locations": "prior",
        "prior": "adam",  # the config's (its default)
        "prior_lr": 1e-4,
        "rel_error": 0.1,
        "prior_rank": "auto",  # the config's default: these 32-wide layers keep their exact prior
    }
    assert not any("sketch" in result for result in saved["prior"].values())
    assert list(saved["prior"]) == names and list(saved["full_finetune"]) == names
    assert "prior_plan" in saved["full_finetune"][names[0]]
    summary = saved["summary"]["prior"]
    assert summary["after.energy_compaction"]["mean"] > summary["before.energy_compaction"]["mean"]
    report = (tmp_path / "report.md").read_text()
    for source in ("prior", "full_finetune"):
        for figure in (f"spectrum_{source}.png", f"energy_curve_{source}.png"):
            assert f"]({figure})" in report
            check_png(tmp_path / figure)
    assert names[0] in report


def test_analyze_model_one_layer_per_pass_gives_the_same_priors(tmp_path):
    config = S2FTConfig(target_modules=["query", "value"], n_frequency=40, permutation="2opt-cyclic")
    model = get_spectral_model(tiny_bert(), config)
    batches = make_batches("bert")
    together = analyze_model(model, batches, output_dir=tmp_path / "a", heatmaps=1)
    apart = analyze_model(model, batches, output_dir=tmp_path / "b", heatmaps=1, layers_per_pass=1)
    assert together["settings"]["search"] == "2opt-cyclic"
    for name, result in together["prior"].items():
        assert result["after"]["energy_compaction"] == pytest.approx(
            apart["prior"][name]["after"]["energy_compaction"]
        )
    with pytest.raises(ValueError, match="re-iterable"):
        analyze_model(model, iter(batches), output_dir=tmp_path / "c", layers_per_pass=1)


def test_analyze_model_measures_the_plans_from_the_base_weights(tmp_path):
    """With a real ΔW, the analysis reports how much of it the plans of ``plan_from="base"`` catch, and those plans
    are the ones calibration installs for such a config: the energy at them equals the energy at the installed
    adapter's permutations and locations."""
    from s2ft.analysis.measures import energy_at

    config = S2FTConfig(target_modules=["query", "value"], n_frequency=40)
    model = get_spectral_model(tiny_bert(), config)
    names = model.adapted_modules
    real = {
        name: torch.randn(32, 32, generator=torch.Generator().manual_seed(i)) for i, name in enumerate(names)
    }
    analysis = analyze_model(model, make_batches("bert"), full_finetune_delta=real, output_dir=tmp_path)
    for kind, overrides in (
        ("w0perm_plan", {"plan_from": "base"}),
        ("w0_plan", {"plan_from": "base", "locations_from": "base"}),
    ):
        installed = get_spectral_model(
            tiny_bert(), S2FTConfig(target_modules=["query", "value"], n_frequency=40, **overrides)
        )
        installed.calibrate(make_batches("bert"))
        for name in names:
            adapter = installed.spectral_layers()[name].adapters["default"]
            permuted = real[name][adapter.perm_rows][:, adapter.perm_cols]
            expected = energy_at(permuted, adapter.rows, adapter.cols)
            got = analysis["full_finetune"][name][kind]["s2ft_location_energy"]
            assert got == pytest.approx(expected, rel=1e-6)
        assert f"{kind}.s2ft_location_energy" in analysis["summary"]["full_finetune"]
    report = (tmp_path / "report.md").read_text()
    assert "plan from the base weights (permutations and locations of W0)" in report
