"""``delta_weight`` against an explicit DFT double sum; every ``spectral_apply`` path against the dense one."""

from __future__ import annotations

import pytest
import torch

import s2ft.ops.apply as factorized
from s2ft.ops.apply import PATHS, choose_path, delta_weight, spectral_apply
from tests.helpers import naive_fourier_delta

SHAPES = [(8, 8), (6, 10), (12, 5), (7, 9)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation (and, on a busy machine, waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def problem(d_out, d_in, n, permuted, seed=0, dtype=torch.float64):
    """Random distinct locations, coefficients and (optionally) permutations."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(d_out * d_in, generator=g)[:n]
    perms = (
        (torch.randperm(d_out, generator=g), torch.randperm(d_in, generator=g)) if permuted else (None, None)
    )
    coeffs = torch.randn(n, generator=g, dtype=dtype)
    return coeffs, flat // d_in, flat % d_in, perms


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("permuted", [False, True])
def test_delta_weight_matches_explicit_dft(shape, permuted):
    d_out, d_in = shape
    coeffs, rows, cols, perms = problem(d_out, d_in, 9, permuted)
    expected = naive_fourier_delta(coeffs, rows, cols, d_out, d_in, 2.5, *perms)
    torch.testing.assert_close(delta_weight(coeffs, rows, cols, d_out, d_in, 2.5, *perms), expected)
    single = delta_weight(coeffs.float(), rows, cols, d_out, d_in, 2.5, *perms)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_paths_match_explicit_dft_and_dense_gradients(path, shape, permuted, lead):
    d_out, d_in = shape
    coeffs, rows, cols, perms = problem(d_out, d_in, 11, permuted, seed=sum(shape), dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, d_in, generator=g)
    grad_y = torch.randn(*lead, d_out, generator=g)
    results = {}
    for name in ("dense", path):
        xi, ci = x.clone().requires_grad_(), coeffs.clone().requires_grad_()
        y = spectral_apply(xi, ci, rows, cols, d_out, d_in, 3.0, *perms, path=name)
        assert y.shape == (*lead, d_out) and y.dtype == torch.float32
        results[name] = (y, *torch.autograd.grad(y, (xi, ci), grad_y))
    expected = x.double() @ naive_fourier_delta(coeffs.double(), rows, cols, d_out, d_in, 3.0, *perms).T
    torch.testing.assert_close(results[path][0].double(), expected, atol=1e-5, rtol=1e-5)
    for ours, reference in zip(results[path], results["dense"]):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", PATHS)
def test_low_precision_input_computes_in_float32(dtype, path):
    coeffs, rows, cols, perms = problem(6, 10, 13, True, dtype=torch.float32)
    x = torch.randn(2, 4, 10).to(dtype).requires_grad_()
    c = coeffs.clone().requires_grad_()
    y = spectral_apply(x, c, rows, cols, 6, 10, 3.0, *perms, path=path)
    assert y.dtype == torch.float32
    grad_x, grad_c = torch.autograd.grad(y, (x, c), torch.ones_like(y))
    assert grad_x.dtype == dtype and grad_c.dtype == torch.float32
    x32, c32 = x.detach().float().requires_grad_(), coeffs.clone().requires_grad_()
    y32 = spectral_apply(x32, c32, rows, cols, 6, 10, 3.0, *perms, path="dense")
    torch.testing.assert_close(y, y32, atol=1e-5, rtol=1e-5)
    grad_x32, grad_c32 = torch.autograd.grad(y32, (x32, c32), torch.ones_like(y32))
    torch.testing.assert_close(grad_x, grad_x32.to(dtype))
    torch.testing.assert_close(grad_c, grad_c32, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(8, 8), (6, 10), (7, 9), (5, 4)])
@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("full", [False, True])
def test_fft_path_gradcheck(shape, permuted, full):
    """float64 gradcheck; ``full`` puts a coefficient at every location, so conjugate pairs fold together."""
    d_out, d_in = shape
    n = d_out * d_in if full else 7
    coeffs, rows, cols, perms = problem(d_out, d_in, n, permuted, seed=n)
    x = torch.randn(3, d_in, dtype=torch.float64, requires_grad=True)
    coeffs.requires_grad_()

    def apply(x, c):
        return spectral_apply(x, c, rows, cols, d_out, d_in, 1.7, *perms, path="fft")

    assert torch.autograd.gradcheck(apply, (x, coeffs))


def test_fft_path_chunks_tokens(monkeypatch):
    """Several chunks, the last one ragged, give what a single chunk gives."""
    coeffs, rows, cols, perms = problem(12, 5, 20, True)
    x = torch.randn(23, 5, dtype=torch.float64, requires_grad=True)
    coeffs.requires_grad_()
    grad_y = torch.randn(23, 12, dtype=torch.float64)

    def run():
        y = spectral_apply(x, coeffs, rows, cols, 12, 5, 2.0, *perms, path="fft")
        return (y, *torch.autograd.grad(y, (x, coeffs), grad_y))

    whole = run()
    monkeypatch.setattr(factorized, "_CHUNK_ELEMENTS", (12 * 4, 12 * 4))  # 4 tokens per chunk
    assert [s.stop for s in factorized._plan(rows, cols, 12, 5, *perms).chunks(23)] == [4, 8, 12, 16, 20, 24]
    for ours, reference in zip(run(), whole):
        torch.testing.assert_close(ours, reference)


def test_fft_path_chunk_bounds_are_per_thread(monkeypatch):
    """The chunk bounds scale with the thread count (each thread's share of a chunk stays cache-sized)."""
    _, rows, cols, perms = problem(12, 5, 20, True)
    monkeypatch.setattr(factorized, "_CHUNK_ELEMENTS", (12 * 4, 12 * 4))
    plan = factorized._plan(rows, cols, 12, 5, *perms)
    assert [s.stop for s in plan.chunks(10)] == [4, 8, 12]
    monkeypatch.setattr(factorized, "num_threads", lambda: 2)
    assert [s.stop for s in plan.chunks(10)] == [8, 16]


def test_fft_path_single_input_grads_and_broadcast_gradient():
    coeffs, rows, cols, perms = problem(6, 10, 9, True, dtype=torch.float32)
    x = torch.randn(4, 10)
    c = coeffs.clone().requires_grad_()
    (grad_c,) = torch.autograd.grad(spectral_apply(x, c, rows, cols, 6, 10, 2.0, *perms, path="fft").sum(), c)
    (expected,) = torch.autograd.grad(
        spectral_apply(x, c, rows, cols, 6, 10, 2.0, *perms, path="dense").sum(), c
    )
    torch.testing.assert_close(grad_c, expected, atol=1e-5, rtol=1e-5)
    xg = x.clone().requires_grad_()
    y = spectral_apply(xg, coeffs, rows, cols, 6, 10, 2.0, *perms, path="fft")
    (grad_x,) = torch.autograd.grad(y.sum(), xg)
    delta = delta_weight(coeffs, rows, cols, 6, 10, 2.0, *perms)
    torch.testing.assert_close(grad_x, delta.sum(0).expand(4, 10), atol=1e-5, rtol=1e-5)


def test_plan_cache_follows_index_tensors():
    coeffs, rows, cols, _ = problem(8, 8, 6, False, dtype=torch.float32)
    x = torch.randn(3, 8)
    plan = factorized._plan(rows, cols, 8, 8, None, None)
    assert factorized._plan(rows, cols, 8, 8, None, None) is plan
    assert factorized._plan(rows, cols.clone(), 8, 8, None, None) is not plan
    _, new_rows, new_cols, _ = problem(8, 8, 6, False, seed=5)
    rows.copy_(new_rows)  # in place, as load_state_dict does
    cols.copy_(new_cols)
    assert factorized._plan(rows, cols, 8, 8, None, None) is not plan
    torch.testing.assert_close(
        spectral_apply(x, coeffs, rows, cols, 8, 8, 1.0, path="fft"),
        x @ delta_weight(coeffs, new_rows, new_cols, 8, 8, 1.0).T,
        atol=1e-5,
        rtol=1e-5,
    )


def test_empty_batch_auto_path_and_errors():
    coeffs, rows, cols, perms = problem(6, 10, 5, True, dtype=torch.float32)
    x = torch.randn(0, 3, 10, requires_grad=True)
    y = spectral_apply(x, coeffs, rows, cols, 6, 10, 1.0, *perms, path="fft")
    assert y.shape == (0, 3, 6)
    y.sum().backward()
    x = torch.randn(4, 10)
    torch.testing.assert_close(
        spectral_apply(x, coeffs, rows, cols, 6, 10, 1.0, *perms),
        spectral_apply(x, coeffs, rows, cols, 6, 10, 1.0, *perms, path="dense"),
        atol=1e-5,
        rtol=1e-5,
    )
    assert choose_path(4096, 4096, 1000, 4096, "cpu") == "fft"
    assert choose_path(384, 384, 3000, 8, torch.device("cpu")) == "fft"
    assert choose_path(128, 128, 100, 4096, "cpu") == "dense"
    torch.set_num_threads(2)  # the GEMMs of the dense path gain from threads, the FFT path hardly
    assert choose_path(384, 384, 1000, 512, "cpu") == "dense"
    assert choose_path(1024, 1024, 3000, 512, "cpu") == "fft"
    torch.set_num_threads(1)
    assert choose_path(384, 384, 1000, 512, "cuda") == "dense"
    assert choose_path(4096, 4096, 1000, 4096, "cuda") == "fft"
    with pytest.raises(ValueError, match="unknown path"):
        spectral_apply(x, coeffs, rows, cols, 6, 10, 1.0, path="sparse")
    with pytest.raises(ValueError, match="d_in=6"):
        spectral_apply(x, coeffs, rows, cols, 10, 6, 1.0)
