"""ΔW against a naive float64 reference, and the location draws."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from s2ft.ops.locations import (
    fourierft_locations,
    mirror_of,
    power_spectrum,
    sample_locations,
    smallest_int_dtype,
)
from s2ft.tuner.layers import SpectralLayer
from tests.helpers import naive_fourier_delta


@pytest.mark.parametrize("shape", [(8, 8), (6, 10), (12, 5)])
@pytest.mark.parametrize("permuted", [False, True])
def test_delta_weight_matches_naive_dft(shape, permuted):
    d_out, d_in = shape
    g = torch.Generator().manual_seed(sum(shape))
    layer = SpectralLayer(nn.Linear(d_in, d_out), n_frequency=7, scaling=3.0)
    rows, cols = fourierft_locations(d_out, d_in, 7, seed=1)
    perms = (
        (torch.randperm(d_out, generator=g), torch.randperm(d_in, generator=g)) if permuted else (None, None)
    )
    layer.set_locations(rows, cols, *perms)
    with torch.no_grad():
        layer.coeffs.copy_(torch.randn(7, generator=g))
    expected = naive_fourier_delta(layer.coeffs.detach().double(), rows, cols, d_out, d_in, 3.0, *perms)
    torch.testing.assert_close(layer.delta_weight().double(), expected, atol=1e-6, rtol=1e-5)
    x = torch.randn(4, d_in, generator=g)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ expected.float().T, atol=1e-5, rtol=1e-5)


def test_fourierft_locations_are_pefts_recipe_and_distinct():
    rows, cols = fourierft_locations(24, 40, 100, seed=777)
    flat = torch.randperm(24 * 40, generator=torch.Generator().manual_seed(777))[:100]
    assert torch.equal(rows, flat // 40) and torch.equal(cols, flat % 40)
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 100


def test_sample_locations_distinct_deterministic_and_weighted():
    power = torch.zeros(16, 20)
    power[3, 4] = 100.0
    power[:8, :5] = torch.rand(8, 5) + 0.1  # 40 positive entries, the rest zero
    power[3, 4] = 100.0
    r1, c1 = sample_locations(power, 30, 1.5, torch.Generator().manual_seed(0))
    r2, c2 = sample_locations(power, 30, 1.5, torch.Generator().manual_seed(0))
    assert torch.equal(r1, r2) and torch.equal(c1, c2)
    pairs = set(zip(r1.tolist(), c1.tolist()))
    assert len(pairs) == 30
    assert all(power[r, c] > 0 for r, c in pairs)  # zero weight is never drawn while positive weight remains
    # the dominant entry is drawn first: its key E/w is smaller than any other's with overwhelming probability
    assert (int(r1[0]), int(c1[0])) == (3, 4)
    # with n larger than the positive support, the zero-weight entries fill the rest
    rows, cols = sample_locations(power, 50, 1.5, torch.Generator().manual_seed(0))
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 50


def test_sample_locations_frequencies_follow_power_to_gamma():
    power = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    counts = torch.zeros(4)
    g = torch.Generator().manual_seed(0)
    for _ in range(4000):
        _, cols = sample_locations(power, 1, 1.0, g)
        counts[cols] += 1
    torch.testing.assert_close(counts / counts.sum(), power[0] / power.sum(), atol=0.025, rtol=0)


def test_mirror_locations_carry_the_same_basis_function():
    d_out, d_in = 6, 5
    mirror = mirror_of(d_out, d_in)
    assert torch.equal(mirror[mirror], torch.arange(d_out * d_in))  # an involution
    for flat in range(d_out * d_in):
        spectrum = torch.zeros(d_out * d_in, dtype=torch.complex128)
        spectrum[flat] = 1.0
        other = torch.zeros_like(spectrum)
        other[mirror[flat]] = 1.0
        torch.testing.assert_close(
            torch.fft.ifft2(spectrum.view(d_out, d_in)).real, torch.fft.ifft2(other.view(d_out, d_in)).real
        )


@pytest.mark.parametrize("shape", [(8, 8), (7, 10)])
def test_sample_locations_half_takes_one_of_each_mirror_pair(shape):
    d_out, d_in = shape
    prior = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(0))
    power = power_spectrum(prior)  # symmetric: the mirror pairs have equal weight
    mirror = mirror_of(d_out, d_in)
    canonical = int((mirror >= torch.arange(d_out * d_in)).sum())
    for n in (canonical // 2, canonical):
        rows, cols = sample_locations(power, n, 1.5, torch.Generator().manual_seed(1), half=True)
        flat = rows * d_in + cols
        assert len(set(flat.tolist())) == n
        assert bool((mirror[flat] >= flat).all())  # canonical members only: no pair twice
    # beyond the canonical half, the mirrored locations fill the rest, all distinct
    rows, cols = sample_locations(power, canonical + 3, 1.5, torch.Generator().manual_seed(1), half=True)
    assert len(set((rows * d_in + cols).tolist())) == canonical + 3
    # the whole-spectrum draw of a strongly peaked spectrum takes both members of the top pair
    peaked = power.pow(8)
    rows, cols = sample_locations(peaked, 4, 1.5, torch.Generator().manual_seed(1))
    flat = set((rows * d_in + cols).tolist())
    assert any(int(mirror[f]) in flat and int(mirror[f]) != f for f in flat)


def test_sample_locations_rejects_bad_input():
    with pytest.raises(ValueError, match="gamma"):
        sample_locations(torch.ones(4, 4), 3, 0.0)
    with pytest.raises(ValueError, match="n_frequency"):
        sample_locations(torch.ones(4, 4), 17, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        sample_locations(-torch.ones(4, 4), 3, 1.0)


def test_power_spectrum_is_dft_magnitude():
    m = torch.randn(5, 7, dtype=torch.float64)
    k = torch.arange(5.0, dtype=torch.float64)
    l_ = torch.arange(7.0, dtype=torch.float64)
    a = torch.exp(-2j * math.pi * torch.outer(k, k) / 5)
    b = torch.exp(-2j * math.pi * torch.outer(l_, l_) / 7)
    torch.testing.assert_close(power_spectrum(m), (a @ m.to(a.dtype) @ b.T).abs())


def test_smallest_int_dtype():
    assert smallest_int_dtype(255) == torch.uint8
    assert smallest_int_dtype(256) == torch.int16
    assert smallest_int_dtype(4095) == torch.int16
    assert smallest_int_dtype(40000) == torch.int32


def test_former_names_still_import():
    import s2ft
    from s2ft.tuner import calibration, layers

    assert s2ft.SpectralLinear is s2ft.SpectralLayer is layers.SpectralLinear is layers.SpectralLayer
    assert calibration.gradient_prior is calibration.compute_prior
