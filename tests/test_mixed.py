"""``MixedBank.apply`` against each token's adapter applied alone (float64 ``delta_weight``), and its memory."""

from __future__ import annotations

import pytest
import torch

import s2ft.ops.mixed as mixed
from s2ft.ops.apply import delta_weight
from s2ft.ops.locations import fourierft_locations
from s2ft.ops.mixed import MixedBank, Spectral, tile_width

SHAPES = [(8, 8), (7, 9), (12, 5), (6, 11), (9, 9)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def s2ft_adapter(d_out, d_in, n, g):
    """Random distinct locations, float64 coefficients, random permutations."""
    flat = torch.randperm(d_out * d_in, generator=g)[:n]
    coeffs = torch.randn(n, generator=g, dtype=torch.float64)
    scaling = 0.5 + torch.rand(1, generator=g).item() * 3
    perms = torch.randperm(d_out, generator=g), torch.randperm(d_in, generator=g)
    return Spectral(coeffs, flat // d_in, flat % d_in, scaling, *perms)


def fourierft_adapter(d_out, d_in, n, g, seed=777):
    """PEFT's seeded locations (shared by every adapter of this seed and n), no permutations."""
    rows, cols = fourierft_locations(d_out, d_in, n, seed)
    return Spectral(torch.randn(n, generator=g, dtype=torch.float64), rows, cols, 150.0)


def zoo(d_out, d_in, count, seed=0):
    """``count`` adapters alternating S2FT and FourierFT, with different n (FourierFT: two seeds, two n)."""
    g = torch.Generator().manual_seed(seed)
    size = d_out * d_in
    adapters = []
    for a in range(count):
        if a % 2 == 0:
            adapters.append(s2ft_adapter(d_out, d_in, 1 + (3 * a) % (size - 1), g))
        else:
            n = size // 3 if a % 4 == 1 else size // 2
            adapters.append(fourierft_adapter(d_out, d_in, n, g, seed=777 + a % 3))
    return adapters


def reference(adapters, x, which, d_out, d_in):
    """Float64: token t times its adapter's dense ΔW, built alone; zeros for -1."""
    deltas = [
        delta_weight(a.coeffs.double(), a.rows, a.cols, d_out, d_in, a.scaling, a.perm_rows, a.perm_cols)
        for a in adapters
    ]
    out = torch.zeros(x.shape[0], d_out, dtype=torch.float64)
    for t, a in enumerate(which.tolist()):
        if a >= 0:
            out[t] = deltas[a] @ x[t].double()
    return out


def check(adapters, x, which, d_out, d_in):
    y = MixedBank.pack(adapters, d_out, d_in).apply(x, which)
    assert y.dtype == torch.float32 and y.shape == (x.shape[0], d_out)
    expected = reference(adapters, x, which, d_out, d_in)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(y.double(), expected, atol=2e-6 * scale, rtol=1e-5)
    assert torch.all(y[which < 0] == 0)
    return y


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 13])
def test_mixed_batch_equals_each_token_alone(shape, count):
    d_out, d_in = shape
    adapters = zoo(d_out, d_in, count, seed=count + d_out)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(57, d_in, generator=g)
    which = torch.randint(-1, count, (57,), generator=g)
    which[:3] = -1  # some base-only rows whatever the draw
    check(adapters, x, which, d_out, d_in)


@pytest.mark.parametrize("width", [1, 2, 4, 64])
def test_any_tile_width_gives_the_same_result(monkeypatch, width):
    """Skewed groups (one adapter with most tokens): the layout must not change the result."""
    d_out, d_in = 10, 7
    adapters = zoo(d_out, d_in, 6, seed=3)
    g = torch.Generator().manual_seed(2)
    which = torch.cat([torch.full((40,), 2), torch.randint(-1, 6, (25,), generator=g)])
    which = which[torch.randperm(which.numel(), generator=g)]
    x = torch.randn(which.numel(), d_in, generator=g)
    monkeypatch.setattr(mixed, "tile_width", lambda counts, slot_cost, tile_cost: width)
    check(adapters, x, which, d_out, d_in)


def test_many_adapters_one_token_each():
    d_out, d_in = 9, 8
    adapters = zoo(d_out, d_in, 120, seed=5)
    g = torch.Generator().manual_seed(4)
    which = torch.randperm(120, generator=g)[:100]
    check(adapters, torch.randn(100, d_in, generator=g), which, d_out, d_in)


def test_empty_and_base_only_batches_and_other_dtypes():
    d_out, d_in = 6, 5
    adapters = zoo(d_out, d_in, 3)
    bank = MixedBank.pack(adapters, d_out, d_in)
    empty = bank.apply(torch.zeros(0, d_in), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, d_out) and empty.dtype == torch.float32
    base_only = bank.apply(torch.randn(4, d_in), torch.full((4,), -1))
    assert torch.equal(base_only, torch.zeros(4, d_out))
    x = torch.randn(8, d_in, dtype=torch.float64)
    which = torch.tensor([0, 1, 2, -1, 2, 1, 0, 0], dtype=torch.int32)
    torch.testing.assert_close(bank.apply(x, which), bank.apply(x.float(), which.long()))
    torch.testing.assert_close(bank.apply(x.bfloat16(), which), bank.apply(x.bfloat16().float(), which))


def test_bad_inputs_are_refused():
    bank = MixedBank.pack(zoo(6, 5, 2), 6, 5)
    with pytest.raises(ValueError, match="which must lie"):
        bank.apply(torch.randn(3, 5), torch.tensor([0, 2, -1]))
    with pytest.raises(ValueError, match="tokens, 5"):
        bank.apply(torch.randn(3, 4), torch.tensor([0, 1, -1]))
    with pytest.raises(ValueError, match="which must be"):
        bank.apply(torch.randn(3, 5), torch.tensor([0, 1]))
    bad = Spectral(torch.zeros(2), torch.tensor([0, 6]), torch.tensor([0, 1]), 1.0)
    with pytest.raises(ValueError, match="outside"):
        MixedBank.pack([bad], 6, 5)
    bad = Spectral(torch.zeros(2), torch.tensor([0, 1]), torch.tensor([0, 1]), 1.0, torch.arange(5))
    with pytest.raises(ValueError, match="perm_rows"):
        MixedBank.pack([bad], 6, 5)


def own_bytes(adapter) -> int:
    """What an adapter itself holds: float32 coefficients, int64 locations and permutations."""
    ints = adapter.rows.numel() + adapter.cols.numel()
    ints += sum(p.numel() for p in (adapter.perm_rows, adapter.perm_cols) if p is not None)
    return 4 * adapter.coeffs.numel() + 8 * ints


def test_nbytes_counts_every_held_tensor_and_stays_within_twice_the_adapters():
    d_out, d_in = 48, 40
    adapters = zoo(d_out, d_in, 9)
    bank = MixedBank.pack(adapters, d_out, d_in)
    held = [value for value in vars(bank).values() if isinstance(value, torch.Tensor)]
    assert len(held) == 11  # the dataclass's tensor fields: nothing else is held
    assert bank.nbytes() == sum(t.untyped_storage().nbytes() for t in held)
    assert bank.nbytes() <= 2 * sum(own_bytes(a) for a in adapters)


def test_shared_locations_and_permutations_are_stored_once():
    """FourierFT adapters of one seed and n share one pattern: each more costs only its values and 4 indices."""
    d_out, d_in, n = 32, 24, 100
    g = torch.Generator().manual_seed(0)
    adapters = [fourierft_adapter(d_out, d_in, n, g) for _ in range(5)]
    banks = [MixedBank.pack(adapters[:k], d_out, d_in) for k in (4, 5)]
    assert banks[1].col_ptr.shape[0] == 1 and banks[1].perm_cols.shape[0] == 0
    nnz = banks[1].values.numel() // 5
    assert banks[1].nbytes() - banks[0].nbytes() == 4 * nnz + 4 * 8
    perm = torch.randperm(d_in, generator=g)
    twins = [Spectral(a.coeffs, a.rows, a.cols, a.scaling, None, perm) for a in adapters[:3]]
    assert MixedBank.pack(twins, d_out, d_in).perm_cols.shape == (1, d_in)


def test_tile_width_balances_padding_and_assembly():
    assert tile_width([2048], slot_cost=1.0, tile_cost=10.0) == 2048  # one adapter: one tile
    assert tile_width([1] * 100, slot_cost=1.0, tile_cost=10.0) == 1  # one token each: no padding
    assert tile_width([32] * 64, slot_cost=1.0, tile_cost=10.0) == 32
    width = tile_width([33, 5, 70], slot_cost=1.0, tile_cost=4.0)
    costs = {b: sum(-(-c // b) * (b + 4.0) for c in (33, 5, 70)) for b in (1, 2, 4, 8, 16, 32, 64, 128)}
    assert costs[width] == min(costs.values())
