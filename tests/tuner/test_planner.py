"""The shared planner: a layer's plan depends on its own prior, seed and name only, and ``analyze`` reports the
very permutations and locations that ``calibrate`` installs."""

from __future__ import annotations

import pytest
import torch

from s2ft import S2FTConfig, get_spectral_model
from s2ft.analysis.measures import analyze_model, energy_at
from s2ft.tuner.calibration import compute_prior
from s2ft.tuner.planner import layer_generator
from tests.helpers import make_batches, tiny_bert


def calibrated(targets, **options):
    model = get_spectral_model(tiny_bert(), S2FTConfig(target_modules=targets, n_frequency=40, **options))
    model.calibrate(make_batches("bert"))
    return model


def plan_of(layer):
    return [t.clone() for t in (layer.rows, layer.cols, layer.perm_rows, layer.perm_cols)]


def test_a_layers_plan_does_not_depend_on_the_other_targets():
    both = calibrated(["query", "value"]).spectral_layers()
    alone = calibrated(["query"]).spectral_layers()
    assert set(alone) < set(both)
    for name, layer in alone.items():
        for a, b in zip(plan_of(layer), plan_of(both[name])):
            assert torch.equal(a, b)


def test_layers_of_one_shape_get_different_plans():
    layers = list(calibrated(["query"]).spectral_layers().values())
    assert not torch.equal(layers[0].perm_rows, layers[1].perm_rows)


def test_layer_generator_is_seeded_by_seed_and_name():
    draw = lambda seed, name: torch.rand(4, generator=layer_generator(seed, name))  # noqa: E731
    assert torch.equal(draw(1, "a"), draw(1, "a"))
    assert not torch.equal(draw(1, "a"), draw(1, "b")) and not torch.equal(draw(1, "a"), draw(2, "a"))


@pytest.mark.parametrize(
    "options", [{}, {"locations": "prior-half"}, {"permute": False}, {"permutation": "2opt", "gamma": 0.5}]
)
def test_analyze_reports_the_locations_calibrate_installs(tmp_path, options):
    model = calibrated(["query", "value"], **options)
    layers = model.spectral_layers()
    config = model.spectral_config
    priors = compute_prior(model.get_base_model(), layers, make_batches("bert"), kind=config.prior)
    analysis = analyze_model(model, make_batches("bert"), output_dir=tmp_path, heatmaps=0)
    for name, layer in layers.items():
        prior = priors[name]
        permuted = prior if layer.perm_rows is None else prior[layer.perm_rows][:, layer.perm_cols]
        installed = energy_at(permuted, layer.rows, layer.cols)
        assert analysis["prior"][name]["location_energy"]["s2ft"] == pytest.approx(installed, rel=1e-6)
    assert analysis["settings"]["locations"] == options.get("locations", "prior")
    assert analysis["settings"]["permute"] == options.get("permute", True)
