"""``prior_rank="auto"`` (S2FTConfig's default): in one pass, the layers at least ``AUTO_SKETCH_MIN_WIDTH`` wide on
both sides get the rank-``AUTO_PRIOR_RANK`` sketch and the others their exact prior, each equal to what the explicit
setting gives that layer; the trajectory prior stays exact; the jobs' flag and the analysis follow."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from s2ft import S2FTConfig, get_spectral_model
from s2ft.config import AUTO_PRIOR_RANK, AUTO_SKETCH_MIN_WIDTH
from s2ft.ops.sketch import LowRank
from s2ft.tuner.calibration import compute_prior, layer_prior_ranks

WIDE = AUTO_SKETCH_MIN_WIDTH


class WideAndNarrow(nn.Module):
    """A layer exactly ``AUTO_SKETCH_MIN_WIDTH`` wide on both sides, one a little narrower on its output side,
    and a narrow head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wide = nn.Linear(WIDE, WIDE)
        self.narrower = nn.Linear(WIDE, WIDE - 1)
        self.head = nn.Linear(WIDE - 1, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(torch.tanh(self.narrower(torch.tanh(self.wide(x)))))


def loss_fn(outputs: torch.Tensor, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs.reshape(-1, 3), batch[1].reshape(-1))


def batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(2, 5, WIDE, generator=g), torch.randint(0, 3, (2, 5), generator=g)) for _ in range(count)
    ]


def wrapped(**options) -> object:
    config = S2FTConfig(target_modules=["wide", "narrower", "head"], n_frequency=20, **options)
    return get_spectral_model(WideAndNarrow(), config)


def test_auto_is_the_default_and_sketches_only_the_wide_layers():
    assert S2FTConfig(target_modules=["q"]).prior_rank == "auto"
    layers = wrapped().spectral_layers()
    assert layer_prior_ranks(layers, "auto", "adam") == {
        "wide": AUTO_PRIOR_RANK,
        "narrower": None,
        "head": None,
    }
    assert layer_prior_ranks(layers, "auto", "trajectory") == dict.fromkeys(layers)  # no sketched form
    assert layer_prior_ranks(layers, 8, "gradient") == dict.fromkeys(layers, 8)
    assert layer_prior_ranks(layers, None, "gradient") == dict.fromkeys(layers)


@pytest.mark.parametrize("kind", ["gradient", "adam"])
def test_auto_gives_each_layer_what_its_own_setting_gives_in_one_pass(kind):
    """The wide layer's sketch equals the one ``prior_rank=AUTO_PRIOR_RANK`` gives it (same test matrices, same
    sums), the narrow layers' priors equal the exact ones; the model runs once per batch."""
    spectral = wrapped()
    model, layers, data = spectral.model, spectral.spectral_layers(), batches()
    auto = compute_prior(model, layers, data, loss_fn, kind=kind, rank="auto")
    assert model.calls == len(data)  # one pass
    exact = compute_prior(model, layers, data, loss_fn, kind=kind, rank=None)
    sketch = compute_prior(model, layers, data, loss_fn, kind=kind, rank=AUTO_PRIOR_RANK)
    assert isinstance(auto["wide"], LowRank) and auto["wide"].rank == AUTO_PRIOR_RANK
    for part in ("u", "s", "v"):
        torch.testing.assert_close(getattr(auto["wide"], part), getattr(sketch["wide"], part))
    for name in ("narrower", "head"):
        assert not isinstance(auto[name], LowRank)
        torch.testing.assert_close(auto[name], exact[name])


def test_auto_calibration_plans_the_wide_layer_from_its_sketch():
    """``calibrate()`` under the default installs, on the wide layer, the plan of ``prior_rank=AUTO_PRIOR_RANK``
    and, on the narrow ones, the plan of the exact prior."""
    plans = {}
    for rank in ("auto", AUTO_PRIOR_RANK, None):
        spectral = wrapped(prior_rank=rank)
        spectral.calibrate(batches(), loss_fn=loss_fn)
        plans[rank] = {
            name: (layer.rows.clone(), layer.cols.clone())
            for name, layer in spectral.spectral_layers().items()
        }
    for name, (rows, cols) in plans["auto"].items():
        expected = plans[AUTO_PRIOR_RANK if name == "wide" else None][name]
        assert torch.equal(rows, expected[0]) and torch.equal(cols, expected[1]), name


def test_trajectory_prior_under_auto_is_exact():
    spectral = wrapped()
    layers = spectral.spectral_layers()
    auto = compute_prior(spectral.model, layers, batches(1), loss_fn, kind="trajectory", rank="auto")
    exact = compute_prior(spectral.model, layers, batches(1), loss_fn, kind="trajectory", rank=None)
    for name in layers:
        assert not isinstance(auto[name], LowRank)
        torch.testing.assert_close(auto[name], exact[name])


@pytest.mark.parametrize("rank", ["Auto", "exact", "64", 0])
def test_other_words_refused(rank):
    with pytest.raises(ValueError, match="prior_rank must be a positive integer.*'auto'"):
        S2FTConfig(target_modules=["q"], prior_rank=rank)


def test_job_flag_takes_auto_exact_and_a_number():
    from s2ft.cli import build_parser
    from s2ft.jobs.args import FinetuneArgs
    from s2ft.methods import get_method

    assert FinetuneArgs().resolved().prior_rank == "auto"
    for text, expected in (("auto", "auto"), ("exact", None), ("16", 16)):
        parsed = build_parser().parse_args(["finetune", "--prior-rank", text])
        assert parsed.prior_rank == expected
        args = FinetuneArgs(prior_rank=expected).resolved()
        assert get_method("s2ft").config(args, []).prior_rank == expected
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--prior-rank", "sixteen"])
