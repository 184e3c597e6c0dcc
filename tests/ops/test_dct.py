"""The DCT basis (s2ft.ops.dct) against a float64 naive reference: the explicit cosine sums."""

from __future__ import annotations

import math

import pytest
import torch

from s2ft.ops import apply as fourier
from s2ft.ops import dct
from s2ft.ops.bases import get_basis


def naive_c(k: int, j: int, size: int) -> float:
    """``C_L[k, j]`` from the definition, one cosine at a time in Python floats."""
    scale = math.sqrt((1 if k == 0 else 2) / size)
    return scale * math.cos(math.pi * (2 * j + 1) * k / (2 * size))


def naive_delta(coeffs, rows, cols, d_out, d_in, scaling, perm_rows=None, perm_cols=None) -> torch.Tensor:
    """``ΔW[perm_rows[i], perm_cols[j]] = scaling/sqrt(2MN) Σ_k c_k C_M[u_k, i] C_N[v_k, j]``, entry by entry."""
    sigma = scaling / math.sqrt(2 * d_out * d_in)
    bar = [
        [
            sigma
            * sum(
                float(c) * naive_c(int(u), i, d_out) * naive_c(int(v), j, d_in)
                for c, u, v in zip(coeffs, rows, cols)
            )
            for j in range(d_in)
        ]
        for i in range(d_out)
    ]
    delta = torch.zeros(d_out, d_in, dtype=torch.float64)
    for i in range(d_out):
        for j in range(d_in):
            pi = int(perm_rows[i]) if perm_rows is not None else i
            pj = int(perm_cols[j]) if perm_cols is not None else j
            delta[pi, pj] = bar[i][j]
    return delta


def layer(d_out, d_in, n, seed=0, permuted=False):
    g = torch.Generator().manual_seed(seed)
    rows, cols = dct.seeded_locations(d_out, d_in, n, seed)
    coeffs = torch.randn(n, generator=g, dtype=torch.float64)
    perms = (
        (torch.randperm(d_out, generator=g), torch.randperm(d_in, generator=g)) if permuted else (None, None)
    )
    return coeffs, rows, cols, perms


@pytest.mark.parametrize("size", [1, 2, 5, 8, 13])
def test_transforms_match_the_matrix_from_its_definition(size):
    matrix = dct.dct_matrix(size)
    naive = torch.tensor(
        [[naive_c(k, j, size) for j in range(size)] for k in range(size)], dtype=torch.float64
    )
    torch.testing.assert_close(matrix, naive, rtol=0, atol=1e-14)
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-13)
    x = torch.randn(3, 4, size, dtype=torch.float64)
    torch.testing.assert_close(dct.dct(x), x @ naive.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(dct.idct(x), x @ naive, rtol=0, atol=1e-12)
    torch.testing.assert_close(dct.idct(dct.dct(x)), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape, n", [((6, 10), 7), ((7, 5), 35), ((1, 4), 3)])
@pytest.mark.parametrize("permuted", [False, True])
def test_delta_weight_is_the_explicit_cosine_sum(shape, n, permuted):
    coeffs, rows, cols, (pr, pc) = layer(*shape, n, permuted=permuted)
    expected = naive_delta(coeffs, rows, cols, *shape, 3.0, pr, pc)
    torch.testing.assert_close(
        dct.delta_weight(coeffs, rows, cols, *shape, 3.0, pr, pc), expected, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("path", ["dense", "fft", "auto"])
@pytest.mark.parametrize("permuted", [False, True])
def test_apply_paths_give_delta_x_and_its_gradients(path, permuted):
    d_out, d_in = 9, 12
    coeffs, rows, cols, (pr, pc) = layer(d_out, d_in, 20, seed=1, permuted=permuted)
    coeffs.requires_grad_(True)
    x = torch.randn(2, 5, d_in, dtype=torch.float64, requires_grad=True)
    y = dct.apply(x, coeffs, rows, cols, d_out, d_in, 2.0, pr, pc, path=path)
    delta = naive_delta(coeffs.detach(), rows, cols, d_out, d_in, 2.0, pr, pc)
    torch.testing.assert_close(y, x.detach() @ delta.T, rtol=0, atol=1e-12)
    upstream = torch.randn_like(y)
    grad_x, grad_c = torch.autograd.grad(y, (x, coeffs), upstream)
    torch.testing.assert_close(grad_x, upstream @ delta, rtol=0, atol=1e-12)
    # ∂/∂c_k of Σ g·(ΔW x) is σ Σ_tokens g[perm_rows]ᵀ (C_M[u_k] ⊗ C_N[v_k]) x[perm_cols]
    sigma = 2.0 / math.sqrt(2 * d_out * d_in)
    basis_out, basis_in = dct.dct_matrix(d_out), dct.dct_matrix(d_in)
    g = upstream.reshape(-1, d_out)[:, pr] if pr is not None else upstream.reshape(-1, d_out)
    xs = x.detach().reshape(-1, d_in)[:, pc] if pc is not None else x.detach().reshape(-1, d_in)
    expected = sigma * ((g @ basis_out.T)[:, rows] * (xs @ basis_in.T)[:, cols]).sum(0)
    torch.testing.assert_close(grad_c, expected, rtol=0, atol=1e-12)


def test_float32_paths_agree_and_gradcheck_in_float64():
    d_out, d_in = 40, 24
    coeffs, rows, cols, _ = layer(d_out, d_in, 30, seed=2)
    x = torch.randn(16, d_in)
    dense = dct.apply(x, coeffs.float(), rows, cols, d_out, d_in, 150.0, path="dense")
    fft = dct.apply(x, coeffs.float(), rows, cols, d_out, d_in, 150.0, path="fft")
    assert dense.dtype == fft.dtype == torch.float32
    torch.testing.assert_close(fft, dense, rtol=1e-5, atol=1e-5)
    small = torch.randn(3, d_in, dtype=torch.float64, requires_grad=True)
    c = coeffs.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: dct.apply(a, b, rows, cols, d_out, d_in, 5.0, path="fft"), (small, c)
    )
    empty = dct.apply(torch.zeros(0, d_in), coeffs.float(), rows, cols, d_out, d_in, 1.0, path="fft")
    assert empty.shape == (0, d_out)
    with pytest.raises(ValueError, match="unknown path"):
        dct.apply(x, coeffs.float(), rows, cols, d_out, d_in, 1.0, path="wavelet")


def test_project_is_exact_in_the_span_and_the_least_squares_solution_outside():
    d_out, d_in = 8, 6
    coeffs, rows, cols, (pr, pc) = layer(d_out, d_in, 11, seed=3, permuted=True)
    delta = dct.delta_weight(coeffs, rows, cols, d_out, d_in, 7.0, pr, pc)
    torch.testing.assert_close(dct.project(delta, rows, cols, 7.0, pr, pc), coeffs, rtol=0, atol=1e-12)
    target = torch.randn(d_out, d_in, dtype=torch.float64)
    basis = torch.stack(
        [naive_delta([1.0], [u], [v], d_out, d_in, 7.0, pr, pc).flatten() for u, v in zip(rows, cols)], dim=1
    )
    expected = torch.linalg.lstsq(basis, target.flatten()[:, None]).solution.flatten()
    torch.testing.assert_close(dct.project(target, rows, cols, 7.0, pr, pc), expected, rtol=0, atol=1e-12)
    # a repeated location shares its coefficient (the minimum-norm solution) and reproduces the projection
    twice_rows, twice_cols = torch.cat([rows, rows[:1]]), torch.cat([cols, cols[:1]])
    shared = dct.project(delta, twice_rows, twice_cols, 7.0, pr, pc)
    assert shared[0] == shared[-1] == pytest.approx(coeffs[0].item() / 2)
    rebuilt = dct.delta_weight(shared, twice_rows, twice_cols, d_out, d_in, 7.0, pr, pc)
    torch.testing.assert_close(rebuilt, delta, rtol=0, atol=1e-12)


def test_seeded_locations_are_distinct_repeatable_and_fourierfts():
    rows, cols = dct.seeded_locations(30, 20, 500, 777)
    assert rows.dtype == cols.dtype == torch.int64 and rows.device.type == "cpu"
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 500
    assert int(rows.max()) < 30 and int(cols.max()) < 20
    again = dct.seeded_locations(30, 20, 500, 777)
    assert torch.equal(rows, again[0]) and torch.equal(cols, again[1])
    assert not torch.equal(rows, dct.seeded_locations(30, 20, 500, 778)[0])
    assert all(
        torch.equal(a, b)
        for a, b in zip((rows, cols), get_basis("fourier").seeded_locations(30, 20, 500, 777))
    )
    with pytest.raises(ValueError):
        dct.seeded_locations(3, 3, 10, 0)


def test_scaling_is_in_fourierfts_units():
    """One coefficient's ΔW has the same Frobenius norm in both bases (a location that is not its own mirror)."""
    one = torch.ones(1, dtype=torch.float64)
    u, v = torch.tensor([3]), torch.tensor([5])
    for d_out, d_in in ((16, 12), (384, 384), (192, 576)):
        cosine = fourier.delta_weight(one, u, v, d_out, d_in, 150.0).norm()
        torch.testing.assert_close(dct.delta_weight(one, u, v, d_out, d_in, 150.0).norm(), cosine)


def test_the_basis_registry_serves_the_dct():
    basis = get_basis("dct")
    coeffs, rows, cols, _ = layer(5, 7, 9)
    x = torch.randn(4, 7, dtype=torch.float64)
    delta = basis.delta_weight(coeffs, rows, cols, 5, 7, 2.0)
    torch.testing.assert_close(basis.apply(x, coeffs, rows, cols, 5, 7, 2.0, path="fft"), x @ delta.T)
    torch.testing.assert_close(basis.project(delta, rows, cols, 2.0), coeffs)
    assert (
        dct.choose_path(384, 384, 1000, 512, "cpu") == "dense"
        and dct.choose_path(4096, 4096, 1000, 512, "cpu") == "fft"
    )
