"""Sketched priors (``S2FTConfig(prior_rank=k)``): the low-rank sketch against float64 references, plans from the
factors equal to the dense prior's plans when the prior has rank <= k, one pass in O((d_out + d_in)·k) memory per
layer, and bad input refused with nothing changed."""

from __future__ import annotations

import pytest
import torch

from s2ft import S2FTConfig, get_spectral_model
from s2ft.analysis.measures import analyze_model
from s2ft.ops.locations import power_spectrum
from s2ft.ops.sketch import LowRank, corange_width, low_rank_from_sketches, sketch_matrices
from s2ft.tuner.calibration import (
    SketchedAdamPrior,
    SketchedGradientPrior,
    compute_prior,
    prior_memory,
    sketch_dtype_of,
)
from s2ft.tuner.planner import layer_generator, plan_layer
from tests.helpers import Stack, make_batches, tiny_bert
from tests.helpers import stack_loss_fn as loss_fn

SEARCHES = ("greedy", "multistart", "2opt", "2opt-cyclic")


def low_rank_matrix(rows: int, cols: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, cols, generator=g, dtype=torch.float64
    )


def sketched(parts: list[torch.Tensor], k: int, row_scale=None, col_scale=None, oversample=None) -> LowRank:
    """The sketch of ``Σ parts`` accumulated part by part, as calibration does batch by batch."""
    rows, cols = parts[0].shape
    omega, psi = sketch_matrices(rows, cols, k, torch.Generator().manual_seed(5), torch.float64, oversample)
    y = sum(p @ omega for p in parts)
    w = sum(psi @ p for p in parts)
    return low_rank_from_sketches(y, w, psi, row_scale, col_scale)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_sketch_of_a_sum_is_exact_at_rank_at_most_k_float64(rank):
    parts = [low_rank_matrix(40, 24, 1, seed) for seed in range(rank)]  # rank(Σ parts) = rank
    total = sum(parts)
    approx = sketched(parts, 8)
    torch.testing.assert_close(approx.dense(), total, rtol=1e-10, atol=1e-10)
    assert approx.kept_energy(total) == pytest.approx(1.0, abs=1e-12)
    # orthonormal factors, non-increasing singular values
    torch.testing.assert_close(approx.u.T @ approx.u, torch.eye(8, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(approx.v.T @ approx.v, torch.eye(8, dtype=torch.float64), atol=1e-10, rtol=0)
    assert bool((approx.s[:-1] >= approx.s[1:]).all())


@pytest.mark.parametrize("oversample", [0, 3, 9])
def test_sketch_is_exact_at_rank_at_most_k_whatever_the_oversampling_float64(oversample):
    """The co-range width l = k + p only needs l >= k for the exact case: p = 0 too gives Σ parts back."""
    parts = [low_rank_matrix(40, 24, 1, seed) for seed in range(6)]
    total = sum(parts)
    approx = sketched(parts, 8, oversample=oversample)
    torch.testing.assert_close(approx.dense(), total, rtol=1e-9, atol=1e-9)


def test_corange_width():
    # the default oversampling: Tropp et al.'s 2k + 1 up to k = 16, then at least 17, then k // 2
    assert [corange_width(k, 10**6) for k in (1, 4, 16, 17, 34, 64, 256)] == [3, 9, 33, 34, 51, 96, 384]
    assert corange_width(64, 10**6, oversample=65) == 129  # Tropp et al.'s 2k + 1
    assert corange_width(64, 10**6, oversample=0) == 64
    assert corange_width(64, 70) == 70  # at most the matrix's rows
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="oversampling must be an integer >= 0"):
            corange_width(8, 100, bad)
    omega, psi = sketch_matrices(50, 30, 6, torch.Generator().manual_seed(0), oversample=2)
    assert omega.shape == (30, 6) and psi.shape == (8, 50)


def test_scaled_sketch_is_the_scaled_matrix_float64():
    """``diag(r) A diag(c)`` from ``A``'s sketches, zeros in ``r`` on the rows where ``A`` is zero."""
    a = low_rank_matrix(30, 20, 4)
    a[[3, 7]] = 0
    r = torch.rand(30, dtype=torch.float64) + 0.5
    r[[3, 7]] = 0
    c = torch.rand(20, dtype=torch.float64) + 0.5
    approx = sketched([a], 6, r, c)
    torch.testing.assert_close(approx.dense(), r[:, None] * a * c[None, :], rtol=1e-10, atol=1e-10)


def test_sketch_of_a_full_rank_matrix_keeps_its_leading_energy():
    """At rank k < rank(A), on a decaying spectrum, the sketch keeps at least the energy of the best rank-k/2
    approximation (a rank-k sketch is a rank-k/2 one oversampled by k/2, Halko, Martinsson and Tropp 2011), and no
    more than the whole."""
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64)).Q
    s = 0.5 ** torch.arange(48, dtype=torch.float64)
    a = (u[:, :48] * s) @ v.T
    approx = sketched([a], 8)
    half = float(s[:4].square().sum() / s.square().sum())
    assert approx.kept_energy(a) >= half
    assert approx.kept_energy(a) <= 1.0 + 1e-12


def test_permuted_power_spectrum_from_the_factors_float64():
    a = low_rank_matrix(24, 18, 3)
    approx = sketched([a], 5)
    g = torch.Generator().manual_seed(1)
    pr, pc = torch.randperm(24, generator=g), torch.randperm(18, generator=g)
    torch.testing.assert_close(
        approx.permuted_power_spectrum(pr, pc), power_spectrum(a[pr][:, pc]), rtol=1e-9, atol=1e-9
    )


def _same_plans(prior, approx, seed, search, locations):
    """The plans of the dense ``prior`` and of its factors ``approx`` for one seed, asserted equal."""
    dense = plan_layer(prior, 60, 1.5, layer_generator(seed, "m"), search=search, locations=locations)
    low = plan_layer(approx, 60, 1.5, layer_generator(seed, "m"), search=search, locations=locations)
    for a, b in zip(
        (dense.perm_rows, dense.perm_cols, dense.rows, dense.cols),
        (low.perm_rows, low.perm_cols, low.rows, low.cols),
    ):
        assert torch.equal(a, b), (search, seed)
    return dense, low


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("locations", ["prior", "prior-half"])
def test_plan_from_the_factors_equals_the_dense_plan_at_rank_at_most_k_float64(search, locations):
    """One short batch's prior has rank <= k: planned from the sketch's factors it gives the dense prior's plan."""
    prior = low_rank_matrix(48, 36, 5, seed=4)
    approx = sketched([prior], 16)
    for seed in (0, 1, 2):
        dense, low = _same_plans(prior, approx, seed, search, locations)
        assert low.path_length_before == pytest.approx(dense.path_length_before, rel=1e-9)
        assert low.path_length_after == pytest.approx(dense.path_length_after, rel=1e-9)
    again = plan_layer(approx, 60, 1.5, layer_generator(0, "m"), search=search, locations=locations)
    first = plan_layer(approx, 60, 1.5, layer_generator(0, "m"), search=search, locations=locations)
    assert torch.equal(again.rows, first.rows) and torch.equal(again.perm_rows, first.perm_rows)


@pytest.mark.parametrize("locations", ["prior", "uniform"])
def test_plan_from_the_factors_in_a_haar_basis_equals_the_dense_plan_float64(locations):
    """A wavelet adapter's (s2ft-wavelet) sketched prior is planned in its own basis' energy, as the dense one is."""
    from s2ft.ops.bases import get_basis

    basis = get_basis("haar2")
    prior = low_rank_matrix(48, 36, 5, seed=4)
    approx = sketched([prior], 16)
    dense = plan_layer(prior, 60, 1.5, layer_generator(0, "m"), locations=locations, basis=basis)
    low = plan_layer(approx, 60, 1.5, layer_generator(0, "m"), locations=locations, basis=basis)
    fourier = plan_layer(approx, 60, 1.5, layer_generator(0, "m"), locations=locations)
    for a, b in zip(
        (dense.perm_rows, dense.perm_cols, dense.rows, dense.cols),
        (low.perm_rows, low.perm_cols, low.rows, low.cols),
    ):
        assert torch.equal(a, b)
    assert not (torch.equal(low.rows, fourier.rows) and torch.equal(low.cols, fourier.cols))


def short_batch() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One batch of two tokens: a layer's gradient has rank <= 2 per call (<= 4 for the layer called twice)."""
    g = torch.Generator().manual_seed(2)
    return [
        (torch.randn(1, 2, 32, generator=g, dtype=torch.float64), torch.randint(0, 5, (1, 2), generator=g))
    ]


def batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(2, 7, 32, generator=g, dtype=torch.float64), torch.randint(0, 5, (2, 7), generator=g))
        for _ in range(count)
    ]


def wrapped(depth: int = 3, **options):
    config = S2FTConfig(target_modules=r"layers\.\d+", n_frequency=30, scaling=10.0, **options)
    return get_spectral_model(Stack(depth), config)


def factored_adam(grads: list[torch.Tensor]) -> torch.Tensor:
    """The sketched Adam prior's matrix, naively in float64, from the batches' gradient priors ``-g_b``:
    ``-Σ_b g_b / sqrt(V)`` elementwise with Adafactor's ``V_ij = R_i C_j / Σ R``, ``R`` and ``C`` the row and
    column sums of ``Σ_b g_b²`` (0 where ``V`` is)."""
    total = sum(g.double() for g in grads)
    squares = sum(g.double().square() for g in grads)
    second = torch.outer(squares.sum(1), squares.sum(0)) / squares.sum()
    out = torch.zeros_like(total)
    for i in range(total.shape[0]):
        for j in range(total.shape[1]):
            if second[i, j] > 0:
                out[i, j] = total[i, j] / second[i, j].sqrt()
    return out


@pytest.mark.parametrize("squares", ["exact", "sketch"])
@pytest.mark.parametrize("hooks", [False, True])
def test_sketched_priors_equal_the_exact_ones_at_rank_at_most_k_float64(hooks, squares, monkeypatch):
    """At rank <= k the gradient sketch is the exact prior, and the Adam sketch the factored Adam prior of the
    exact one (its squares' sums exact, or estimated from the sketches: their naive reference)."""
    import s2ft.tuner.calibration as calibration

    monkeypatch.setattr(calibration, "SKETCH_SQUARES", squares)
    spectral = wrapped()
    layers = spectral.spectral_layers()
    exact = compute_prior(spectral.model, layers, short_batch(), loss_fn, from_activations=hooks)
    sketch = compute_prior(spectral.model, layers, short_batch(), loss_fn, from_activations=hooks, rank=8)
    adam = compute_prior(
        spectral.model, layers, short_batch(), loss_fn, kind="adam", from_activations=hooks, rank=8
    )
    strategy = SketchedAdamPrior(layers, rank=8, seed=0)  # the same test matrices (seeded by shape)
    for name in layers:
        assert isinstance(sketch[name], LowRank) and sketch[name].dtype == torch.float64
        torch.testing.assert_close(sketch[name].dense(), exact[name].double(), rtol=0, atol=1e-6)
        if squares == "exact":
            reference = factored_adam([exact[name]])
        else:
            reference = sketched_squares_adam([exact[name]], strategy.omega[name], strategy.psi[name])
        torch.testing.assert_close(adam[name].dense(), reference, rtol=0, atol=1e-5)


def test_sketched_adam_prior_at_full_rank_is_the_factored_second_moment_over_several_batches_float64(
    monkeypatch,
):
    """Over several batches (the prior's rank above one batch's), the sketched Adam prior with exact squares,
    clamped to full rank, is ``-Σ g_b`` divided elementwise by the square root of Adafactor's factored second
    moment, whose row and column sums are those of ``Σ g_b²`` (of each batch's squares, not of the sum's)."""
    import s2ft.tuner.calibration as calibration

    monkeypatch.setattr(calibration, "SKETCH_SQUARES", "exact")
    spectral = wrapped()
    layers = spectral.spectral_layers()
    data = batches(4)
    # -g_b in float64 (the exact priors are float32): the gradient sketch at full rank, exact
    per_batch = [
        {n: p.dense() for n, p in compute_prior(spectral.model, layers, [b], loss_fn, rank=1000).items()}
        for b in data
    ]
    sketch = compute_prior(spectral.model, layers, data, loss_fn, kind="adam", rank=1000)
    for name in layers:
        reference = factored_adam([p[name] for p in per_batch])
        assert torch.linalg.matrix_rank(reference) > 8  # not the one-batch case above
        torch.testing.assert_close(sketch[name].dense(), reference, rtol=1e-9, atol=1e-9)


def test_sketch_from_activations_equals_sketch_from_weight_gradients_float64():
    """Over several batches (rank above k), the hooks' δᵀ(xΩ) and (Ψδᵀ)x sketch the same matrix as the weights'
    gradients do: the same rank-k factors."""
    spectral = wrapped()
    layers = spectral.spectral_layers()
    for kind in ("gradient", "adam"):
        by_weights = compute_prior(
            spectral.model, layers, batches(), loss_fn, kind=kind, from_activations=False, rank=4
        )
        by_hooks = compute_prior(
            spectral.model, layers, batches(), loss_fn, kind=kind, from_activations=True, rank=4
        )
        for name in layers:
            torch.testing.assert_close(
                by_hooks[name].dense(), by_weights[name].dense(), rtol=1e-9, atol=1e-11
            )


def test_calibrate_with_a_rank_gives_the_exact_priors_plans_at_rank_at_most_k():
    plans = {}
    for rank in (None, 8):
        spectral = wrapped(prior="gradient", prior_rank=rank)
        spectral.calibrate(short_batch(), loss_fn)
        plans[rank] = {
            n: (a.rows, a.cols, a.perm_rows, a.perm_cols)
            for n, layer in spectral.spectral_layers().items()
            for a in [layer.adapters["default"]]
        }
    for name, plan in plans[None].items():
        assert all(torch.equal(a, b) for a, b in zip(plan, plans[8][name])), name


def test_rank_above_the_layer_is_clamped_and_exact():
    """A rank above min(d_out, d_in) is clamped to it per layer (documented), where the sketch is the prior."""
    spectral = wrapped()
    layers = spectral.spectral_layers()
    exact = compute_prior(spectral.model, layers, batches(), loss_fn)
    sketch = compute_prior(spectral.model, layers, batches(), loss_fn, rank=1000)
    for name in layers:
        assert sketch[name].rank == 32
        torch.testing.assert_close(sketch[name].dense(), exact[name].double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["gradient", "adam"])
@pytest.mark.parametrize("hooks", [None, True])
def test_sketch_memory_is_of_the_factors_plus_one_layer(kind, hooks):
    """Prior-sized memory of a sketched pass (from activations: with a rank, the default wherever a layer kind
    gives them): the test matrices Ω, Ψ once per shape, each layer its sketches, O((d_out + d_in)·k), and one
    layer's g_b is the only transient."""
    k, width = 2, 32
    width_l = corange_width(k, width)
    shared = 8 * (width * k + width_l * width)  # Ω and Ψ, float64, one shape
    per_layer = 8 * ((width * k + width_l * width) + (2 * width if kind == "adam" else 0))  # sketches
    transient = 2 * width * width * 8  # adam: one layer's g_b and one call's δᵀx (the layer called twice)
    peaks = {}
    for depth in (3, 6):
        spectral = wrapped(depth)
        with prior_memory() as memory:
            priors = compute_prior(
                spectral.model,
                spectral.spectral_layers(),
                batches(),
                loss_fn,
                kind=kind,
                from_activations=hooks,
                rank=k,
            )
        assert all(isinstance(p, LowRank) for p in priors.values())
        peaks[depth] = memory.peak
        assert peaks[depth] <= shared + depth * per_layer + (transient if kind == "adam" else 0)
    assert peaks[6] - peaks[3] == 3 * per_layer  # a layer more: its sketches only


@pytest.mark.parametrize("rank", [0, -3, 1.5, True, "8"])
def test_bad_rank_refused(rank):
    with pytest.raises(ValueError, match="prior_rank must be a positive integer"):
        S2FTConfig(target_modules=["q"], prior_rank=rank)
    spectral = wrapped()
    before = {n: p.detach().clone() for n, p in spectral.named_parameters()}
    with pytest.raises(ValueError, match="prior_rank must be a positive integer"):
        compute_prior(spectral.model, spectral.spectral_layers(), batches(), loss_fn, rank=rank)
    assert all(torch.equal(p, before[n]) for n, p in spectral.named_parameters())


def test_trajectory_prior_with_a_rank_refused():
    with pytest.raises(ValueError, match="trajectory prior has no sketched form"):
        S2FTConfig(target_modules=["q"], prior="trajectory", prior_rank=8)
    spectral = wrapped()
    before = {n: p.detach().clone() for n, p in spectral.named_parameters()}
    with pytest.raises(ValueError, match="trajectory prior has no sketched form"):
        compute_prior(
            spectral.model, spectral.spectral_layers(), batches(), loss_fn, kind="trajectory", rank=8
        )
    assert all(torch.equal(p, before[n]) for n, p in spectral.named_parameters())


def test_prior_rank_round_trips():
    config = S2FTConfig(target_modules=["q"], prior_rank=64)
    assert S2FTConfig.from_dict(config.to_dict()).prior_rank == 64
    for rank in ("auto", None):
        assert (
            S2FTConfig.from_dict(S2FTConfig(target_modules=["q"], prior_rank=rank).to_dict()).prior_rank
            == rank
        )


@pytest.mark.parametrize("rank", [4, 32])
def test_analysis_reports_the_share_of_the_exact_priors_energy_the_sketch_keeps(tmp_path, rank):
    """``s2ft analyze`` with a prior_rank: per layer, the exact prior's energy inside the sketch's spaces (1 at a
    rank of the whole matrix, 32x32 here) and at the sketch's planned locations."""
    config = S2FTConfig(target_modules=["query", "value"], n_frequency=40, prior="gradient", prior_rank=rank)
    model = get_spectral_model(tiny_bert(), config)
    batches = make_batches("bert")
    analysis = analyze_model(model, batches, output_dir=tmp_path, heatmaps=0)
    assert analysis["settings"]["prior_rank"] == rank
    for result in analysis["prior"].values():
        kept = result["sketch"]["energy_kept"]
        assert 0 < kept <= 1 + 1e-6  # float32 factors: orthonormal to rounding
        if rank == 32:
            assert kept == pytest.approx(1.0, abs=1e-5)
            assert result["sketch"]["location_energy"] == pytest.approx(
                result["location_energy"]["s2ft"], rel=1e-3
            )
    assert "sketch.energy_kept" in analysis["summary"]["prior"]
    with pytest.raises(ValueError, match="re-iterable"):
        analyze_model(model, iter(batches), output_dir=tmp_path / "c")


def test_job_flag_prior_rank():
    """``s2ft finetune --prior-rank``: a positive integer reaches the config; 0 is refused by the job's checks, and
    the trajectory prior with a rank by the config the job builds."""
    from s2ft.errors import RunError
    from s2ft.jobs.args import FinetuneArgs
    from s2ft.methods import get_method

    args = FinetuneArgs(prior_rank=16).resolved()
    assert get_method("s2ft").config(args, []).prior_rank == 16
    assert FinetuneArgs().resolved().prior_rank == "auto"
    with pytest.raises(RunError, match="--prior-rank must be positive"):
        FinetuneArgs(prior_rank=0).resolved()
    with pytest.raises(RunError, match="trajectory prior has no sketched form"):
        get_method("s2ft").wrap(
            Stack(2), FinetuneArgs(prior_rank=8, prior="trajectory", targets=["layers.0"]).resolved(), []
        )


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("rank", [None, 4])
def test_adam_prior_under_gradient_checkpointing_same_priors_one_layer_at_a_time(reentrant, rank):
    """Adam priors from activations with gradient checkpointing: the very priors of a run without it (float64),
    and a layer's g_b handed over as soon as its gradient has come, although the forward run again in the backward
    pass hooks outputs no gradient reaches: the prior memory is no more than without checkpointing."""
    from tests.helpers import tiny_llama

    g = torch.Generator().manual_seed(1)
    data = [
        {"input_ids": (ids := torch.randint(0, 64, (2, 8), generator=g)), "labels": ids} for _ in range(2)
    ]
    priors, peaks = {}, {}
    for checkpointing in (False, True):
        model = tiny_llama().double()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        spectral = get_spectral_model(model, S2FTConfig(target_modules=["q_proj", "v_proj"], n_frequency=10))
        with prior_memory() as memory:
            priors[checkpointing] = compute_prior(
                spectral.model,
                spectral.spectral_layers(),
                data,
                kind="adam",
                from_activations=True,
                rank=rank,
            )
        peaks[checkpointing] = memory.peak
    for name, prior in priors[False].items():
        got = priors[True][name]
        if rank is not None:
            prior, got = prior.dense(), got.dense()
        torch.testing.assert_close(got, prior, rtol=1e-9, atol=1e-12)
    assert peaks[True] <= peaks[False]


# ---------------------------------------------------------------------------------------------- cost at scale
@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("locations", ["prior", "prior-half"])
def test_plan_of_a_large_layer_from_the_factors_equals_the_dense_plan_float64(search, locations, monkeypatch):
    """Above the planner's thresholds (lowered here to 0) the rows and columns are ordered from their points and
    the spectrum is sampled by blocks of rows, holding no (d_out, d_in) or (d, d) tensor: still the dense prior's
    plan."""
    import s2ft.ops.point_search as point_search
    import s2ft.tuner.planner as planner

    monkeypatch.setattr(planner, "DENSE_SEARCH_MAX_POINTS", 0)
    monkeypatch.setattr(planner, "DENSE_SPECTRUM_MAX_ENTRIES", 0)
    monkeypatch.setattr(point_search, "BLOCK_ENTRIES", 500)
    monkeypatch.setattr(
        LowRank, "permuted_power_spectrum", lambda *a, **k: pytest.fail("the whole spectrum was built")
    )
    prior = low_rank_matrix(48, 36, 5, seed=4)
    approx = sketched([prior], 16)
    for seed in (0, 1):
        _same_plans(prior, approx, seed, search, locations)


@pytest.mark.parametrize("shape", [(3, 40, 50), (60, 7, 9)])  # few tokens: Gram matrices; many: rows of g
def test_row_and_column_squares_without_the_gradient_float64(shape, monkeypatch):
    import s2ft.tuner.calibration as calibration

    monkeypatch.setattr(calibration, "SQUARES_BLOCK_ENTRIES", 37)  # many blocks
    tokens, d_out, d_in = shape
    g = torch.Generator().manual_seed(0)
    d = torch.randn(tokens, d_out, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, d_in, generator=g, dtype=torch.float64)
    rows, cols = calibration.row_col_squares(d, x)
    square = (d.T @ x) ** 2
    torch.testing.assert_close(rows, square.sum(dim=1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cols, square.sum(dim=0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [None, 4])
def test_calibration_holds_no_layer_input_across_the_forward_under_checkpointing(rank, monkeypatch):
    """With non-reentrant gradient checkpointing, the layer inputs calibration's hooks keep for the backward pass
    are the graph's saved tensors, dropped after the forward pass as the layers' own activations are (and taken
    again in the backward pass): none is alive when the loss is computed. Without checkpointing they are (the
    check can see them)."""
    import gc
    import weakref

    import s2ft.tuner.calibration as calibration
    from tests.helpers import tiny_llama

    kept: list[weakref.ref] = []
    original = calibration._Tap.forward

    def forward(ctx, output, x, arrive):
        if torch._C._current_graph_task_id() == -1:  # the forward pass, not checkpointing's recomputation
            kept.append(weakref.ref(x))
        return original(ctx, output, x, arrive)

    monkeypatch.setattr(calibration._Tap, "forward", staticmethod(forward))
    alive = {}

    def loss(outputs, batch):
        gc.collect()
        alive[checkpointing] = sum(r() is not None for r in kept)
        return outputs.loss

    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": (ids := torch.randint(0, 64, (2, 8), generator=g)), "labels": ids}]
    for checkpointing in (False, True):
        kept.clear()
        model = tiny_llama()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        spectral = get_spectral_model(model, S2FTConfig(target_modules="all-linear", n_frequency=10))
        layers = spectral.spectral_layers()
        compute_prior(spectral.model, layers, data, loss, kind="adam", rank=rank, from_activations=True)
        assert kept
    assert alive[False] > 0
    assert alive[True] == 0


def test_sketch_dtype_by_layer():
    """float64 kept, 16-bit layers (bfloat16, float16) sketched in bfloat16, float32 otherwise."""
    expected = {
        torch.float64: torch.float64,
        torch.float32: torch.float32,
        torch.bfloat16: torch.bfloat16,
        torch.float16: torch.bfloat16,
    }
    for weight, sketch in expected.items():
        spectral = wrapped(1)
        spectral.model.to(weight)
        layer = next(iter(spectral.spectral_layers().values()))
        assert sketch_dtype_of(layer) == sketch


@pytest.mark.parametrize("strategy", [SketchedGradientPrior, SketchedAdamPrior])
def test_bfloat16_layer_sketches_are_the_float64_sums_to_bfloat16_rounding(strategy):
    """A bfloat16 layer's sketches are held in bfloat16 (half float32's bytes), each batch's share computed in
    float32 and rounded once into them: they are the float64 sketches of -Σ g_b within a rounding of bfloat16 per
    batch (norm-wise), and the prior they give is a float32 LowRank close to the float32-held sketch's."""
    spectral = wrapped(2)
    spectral.model.to(torch.bfloat16)
    layers = spectral.spectral_layers()
    g = torch.Generator().manual_seed(3)
    grads = {n: [torch.randn(32, 32, generator=g) for _ in range(6)] for n in layers}
    held = {}
    sketches = {}
    for dtype in (None, torch.float32):
        with prior_memory() as memory:
            sketch = strategy(layers, rank=4, seed=0, sketch_dtype=dtype)
            held[dtype] = memory.live
            for name in layers:
                for grad in grads[name]:
                    sketch.add(name, grad)
            for name in layers:
                assert sketch.y[name].dtype == (dtype or torch.bfloat16)
                omega, psi = sketch.omega[name].double(), sketch.psi[name].double()
                total = -sum(grad.double() for grad in grads[name])
                for got, want in ((sketch.y[name], total @ omega), (sketch.w[name], psi @ total)):
                    error = float((got.double() - want).norm() / want.norm())
                    assert error <= (6 * 2**-8 if dtype is None else 1e-6)
            sketches[dtype] = sketch.finish()
    assert held[None] < 0.55 * held[torch.float32]  # Adam's row and column sums stay float32
    for name in layers:
        assert sketches[None][name].dtype == torch.float32
        a, b = sketches[None][name].dense(), sketches[torch.float32][name].dense()
        assert float((a - b).norm() / b.norm()) <= 0.05


@pytest.mark.parametrize("squares", ["exact", "sketch"])
@pytest.mark.parametrize("layer_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [3, 200])  # few and many tokens: rows of g in bfloat16 either way
def test_sixteen_bit_products_match_the_float64_sums(layer_dtype, tokens, squares, monkeypatch):
    """On an accelerator a 16-bit layer's sketch products and Adam squares are multiplied in bfloat16 (forced here
    on the CPU): the sketches ``-g Ω``, ``-Ψ g`` and the row and column sums of ``g²`` of ``g = δᵀx`` (exact, or
    estimated from the sketches) stay within a few bfloat16 roundings of the float64 ones (norm-wise), and on the
    CPU the products stay in float32."""
    import s2ft.tuner.calibration as calibration

    spectral = wrapped(1)
    spectral.model.to(layer_dtype)
    layers = spectral.spectral_layers()
    name = next(iter(layers))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, 32, generator=g).to(layer_dtype)
    delta = (1e-3 * torch.randn(tokens, 32, generator=g)).to(layer_dtype)
    assert calibration.product_dtype(x, delta, torch.float32) == torch.float32  # on the CPU
    monkeypatch.setattr(calibration, "SIXTEEN_BIT_PRODUCTS_ON_CPU", True)
    assert calibration.product_dtype(x, delta, torch.float32) == torch.bfloat16
    strategy = SketchedAdamPrior(layers, rank=4, seed=0, squares=squares)
    strategy.add_call(name, x, delta)
    strategy.add_calls(name, [(x, delta)])
    grad = delta.double().T @ x.double()
    omega, psi = strategy.omega[name].double(), strategy.psi[name].double()
    square = grad.square()
    if squares == "exact":
        rows, cols = square.sum(dim=1), square.sum(dim=0)
    else:
        rows = (grad @ omega).square().sum(dim=1) / omega.shape[1]
        cols = (psi @ grad).square().sum(dim=0) / psi.shape[0]
    pairs = (
        (strategy.y[name], -grad @ omega),
        (strategy.w[name], -psi @ grad),
        (strategy.row_sq[name], rows),
        (strategy.col_sq[name], cols),
    )
    for got, want in pairs:
        assert float((got.double() - want).norm() / want.norm()) <= 4 * 2**-8
    assert strategy.row_sq[name].dtype == torch.float32


class Rectangular(torch.nn.Module):
    """A wide-to-narrow layer (d_out 12 < d_in 32, sketched transposed) and its reverse, float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.down = torch.nn.Linear(32, 12)
        self.up = torch.nn.Linear(12, 32)
        self.head = torch.nn.Linear(32, 5)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + torch.tanh(self.up(torch.tanh(self.down(x)))))


@pytest.mark.parametrize("hooks", [False, True])
def test_rectangular_layers_sketched_either_way_are_exact_at_full_rank_float64(hooks, monkeypatch):
    """A layer with d_out < d_in holds Y (d_in, k) and W (l, d_out) (the wide W along the small side), and gives
    back the same (d_out, d_in) priors: at full rank the exact gradient prior and the factored Adam prior (exact
    squares; the sketched squares' case: test_sketched_squares_of_rectangular_layers_sketched_transposed)."""
    import s2ft.tuner.calibration as calibration

    monkeypatch.setattr(calibration, "SKETCH_SQUARES", "exact")
    config = S2FTConfig(target_modules=["down", "up"], n_frequency=30, scaling=10.0)
    spectral = get_spectral_model(Rectangular(), config)
    layers = spectral.spectral_layers()
    strategy = SketchedGradientPrior(layers, rank=6)
    assert strategy.flipped == {"down"}
    assert strategy.y["down"].shape == (32, 6) and strategy.w["down"].shape == (corange_width(6, 32), 12)
    assert strategy.y["up"].shape == (32, 6) and strategy.w["up"].shape == (corange_width(6, 32), 12)
    data = batches(3)
    exact = compute_prior(spectral.model, layers, data, loss_fn, from_activations=hooks)
    sketch = compute_prior(spectral.model, layers, data, loss_fn, from_activations=hooks, rank=1000)
    adam = compute_prior(
        spectral.model, layers, data, loss_fn, kind="adam", from_activations=hooks, rank=1000
    )
    per_batch = [compute_prior(spectral.model, layers, [b], loss_fn, rank=1000) for b in data]
    for name in layers:
        assert sketch[name].shape == exact[name].shape == (layers[name].d_out, layers[name].d_in)
        torch.testing.assert_close(sketch[name].dense(), exact[name].double(), rtol=0, atol=1e-6)
        reference = factored_adam([p[name].dense() for p in per_batch])
        torch.testing.assert_close(adam[name].dense(), reference, rtol=1e-9, atol=1e-9)
    low = compute_prior(spectral.model, layers, data[:1], loss_fn, from_activations=hooks, rank=4)
    assert low["down"].shape == (12, 32) and low["down"].rank == 4


# ------------------------------------------------------------------ the Adam squares estimated from the sketches
def sketched_squares_adam(grads: list[torch.Tensor], omega, psi, flipped: bool = False) -> torch.Tensor:
    """The sketched Adam prior's matrix with ``squares="sketch"``, naively in float64, from the batches' ``-g_b``:
    Adafactor's factors ``R_i = Σ_b ‖(g_b Ω)_i‖² / k`` and ``C_j = Σ_b ‖(Ψ g_b)_{:,j}‖² / l`` (of ``g_bᵀ``,
    roles swapped, for a layer sketched transposed), then ``-Σ g_b / sqrt(R_i C_j / ΣR)`` (0 where that is 0)."""
    k, width = omega.shape[1], psi.shape[0]
    rows = torch.zeros(grads[0].shape[0], dtype=torch.float64)
    cols = torch.zeros(grads[0].shape[1], dtype=torch.float64)
    for g in grads:
        g = g.double()
        m = g.T if flipped else g
        out_sq = [float((m[i] @ omega.double()).square().sum()) / k for i in range(m.shape[0])]
        in_sq = [float((psi.double() @ m[:, j]).square().sum()) / width for j in range(m.shape[1])]
        r, c = (in_sq, out_sq) if flipped else (out_sq, in_sq)
        rows += torch.tensor(r, dtype=torch.float64)
        cols += torch.tensor(c, dtype=torch.float64)
    total = sum(g.double() for g in grads)
    second = torch.outer(rows, cols) / rows.sum()
    return torch.where(second > 0, total / second.clamp_min(1e-300).sqrt(), 0.0)


def _sketched_squares_priors(spectral, data, hooks, monkeypatch):
    """The sketched Adam priors at full rank with ``squares="sketch"``, each checked against the naive reference
    of the batches' ``-g_b`` (full-rank gradient sketches, exact); returns the priors, the per-batch ``-g_b`` and
    a strategy holding the same test matrices (seeded by shape)."""
    import s2ft.tuner.calibration as calibration

    layers = spectral.spectral_layers()
    per_batch = [
        {n: p.dense() for n, p in compute_prior(spectral.model, layers, [b], loss_fn, rank=1000).items()}
        for b in data
    ]
    monkeypatch.setattr(calibration, "SKETCH_SQUARES", "sketch")
    adam = compute_prior(
        spectral.model, layers, data, loss_fn, kind="adam", from_activations=hooks, rank=1000
    )
    strategy = SketchedAdamPrior(layers, rank=1000, seed=0)
    assert strategy.squares == "sketch"
    for name in layers:
        reference = sketched_squares_adam(
            [p[name] for p in per_batch],
            strategy.omega[name],
            strategy.psi[name],
            flipped=name in strategy.flipped,
        )
        torch.testing.assert_close(adam[name].dense(), reference, rtol=1e-9, atol=1e-9)
    return adam, per_batch, strategy


@pytest.mark.parametrize("hooks", [False, True])
def test_sketched_squares_adam_prior_is_the_reference_over_several_batches_float64(hooks, monkeypatch):
    """With ``squares="sketch"`` the Adam prior's row and column sums are each batch's sketches' squared row and
    column norms over k and l: at full rank (where the sketch itself is exact) the prior is the naive reference of
    those sums, from weight gradients and from activations alike; the first layer, called twice per batch, is
    squared once per batch (its calls summed first). It is not the prior with the exact sums."""
    sketch, per_batch, strategy = _sketched_squares_priors(wrapped(), batches(4), hooks, monkeypatch)
    assert not strategy.flipped
    for name, prior in sketch.items():
        exact_squares = factored_adam([p[name] for p in per_batch])
        assert not torch.allclose(prior.dense(), exact_squares, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("hooks", [False, True])
def test_sketched_squares_of_rectangular_layers_sketched_transposed_float64(hooks, monkeypatch):
    """A layer with d_out < d_in is sketched transposed: its row sums come from the co-range sketch and its column
    sums from the range sketch, and the prior is still the reference."""
    config = S2FTConfig(target_modules=["down", "up"], n_frequency=30, scaling=10.0)
    spectral = get_spectral_model(Rectangular(), config)
    _, _, strategy = _sketched_squares_priors(spectral, batches(3), hooks, monkeypatch)
    assert strategy.flipped == {"down"}


def test_sketched_squares_are_unbiased_estimates_of_the_exact_sums():
    """Over many draws of the test matrices, the mean of the estimated row and column sums of ``g²`` is the exact
    sum: the estimate is scaled right (``‖(g Ω)_i‖² / k`` with Gaussian ``Ω``). 400 draws at k = 8 (l = 17): the
    mean's relative standard deviation is sqrt(2/8)/20 = 0.025 per row, sqrt(2/17)/20 = 0.017 per column; the
    bound is 5 of those."""
    spectral = wrapped(1)
    layers = spectral.spectral_layers()
    name = next(iter(layers))
    g = torch.Generator().manual_seed(11)
    grad = torch.randn(32, 32, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 32)[:, None]
    rows, cols = [], []
    for seed in range(400):
        strategy = SketchedAdamPrior(layers, rank=8, seed=seed, squares="sketch")
        strategy.add(name, grad)
        rows.append(strategy.row_sq[name])
        cols.append(strategy.col_sq[name])
    square = grad.square()
    mean_rows, mean_cols = torch.stack(rows).mean(0), torch.stack(cols).mean(0)
    assert float(((mean_rows - square.sum(1)) / square.sum(1)).abs().max()) <= 5 * 0.025
    assert float(((mean_cols - square.sum(0)) / square.sum(0)).abs().max()) <= 5 * 0.017
    # one draw is no exact sum: the estimate has the spread the docstring says (about sqrt(2/8) per row)
    spread = float(((torch.stack(rows) - square.sum(1)) / square.sum(1)).std())
    assert 0.35 <= spread <= 0.65


def test_bad_squares_option_refused():
    spectral = wrapped(1)
    with pytest.raises(ValueError, match="squares must be 'sketch' or 'exact'"):
        SketchedAdamPrior(spectral.spectral_layers(), rank=4, squares="approximate")
