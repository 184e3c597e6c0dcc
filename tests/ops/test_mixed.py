"""``MixedBank.apply`` against each token's adapter applied alone (float64 ``delta_weight``); the bank copies nothing."""

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


def test_the_bank_copies_nothing_and_follows_changes_in_place():
    """A bank references its adapters' tensors: changing coefficients in place changes what it serves."""
    d_out, d_in = 10, 12
    adapters = zoo(d_out, d_in, 4)
    bank = MixedBank.pack(adapters, d_out, d_in)
    assert all(held is given for held, given in zip(bank.adapters, adapters))
    assert not [value for value in bank if isinstance(value, torch.Tensor)]
    g = torch.Generator().manual_seed(3)
    x, which = torch.randn(20, d_in, generator=g), torch.randint(-1, 4, (20,), generator=g)
    adapters[0].coeffs.mul_(-2.0)
    adapters[3].coeffs.normal_(generator=g)
    check(adapters, x, which, d_out, d_in)


def test_locations_that_fold_onto_one_entry_add_up():
    """A location and its mirror ``(M - u, N - v)`` fold onto the same half-spectrum entries; self-mirrored
    locations (row 0 or M/2 with column 0 or N/2) too."""
    d_out, d_in = 8, 6
    rows = torch.tensor([1, 7, 0, 4, 3, 5, 2, 6, 0])  # pairs (1, 2) (7, 4), (3, 1) (5, 5), (2, 4) (6, 2)
    cols = torch.tensor([2, 4, 3, 0, 1, 5, 4, 2, 0])
    g = torch.Generator().manual_seed(5)
    adapters = [
        Spectral(torch.randn(9, generator=g, dtype=torch.float64), rows, cols, 2.0),
        Spectral(
            torch.randn(9, generator=g, dtype=torch.float64), rows, cols, 1.5, torch.randperm(8, generator=g)
        ),
    ]
    x = torch.randn(6, d_in, generator=g)
    check(adapters, x, torch.tensor([0, 1, 1, 0, -1, 0]), d_out, d_in)


def test_compact_index_dtypes_give_the_same_result():
    d_out, d_in = 9, 7
    adapters = zoo(d_out, d_in, 5, seed=8)
    small = [
        a._replace(
            rows=a.rows.short(),
            cols=a.cols.short(),
            perm_rows=None if a.perm_rows is None else a.perm_rows.short(),
            perm_cols=None if a.perm_cols is None else a.perm_cols.int(),
        )
        for a in adapters
    ]
    g = torch.Generator().manual_seed(6)
    x, which = torch.randn(30, d_in, generator=g), torch.randint(-1, 5, (30,), generator=g)
    torch.testing.assert_close(
        MixedBank.pack(small, d_out, d_in).apply(x, which), check(adapters, x, which, d_out, d_in)
    )


def test_tile_width_balances_padding_and_assembly():
    assert tile_width([2048], slot_cost=1.0, tile_cost=10.0) == 2048  # one adapter: one tile
    assert tile_width([1] * 100, slot_cost=1.0, tile_cost=10.0) == 1  # one token each: no padding
    assert tile_width([32] * 64, slot_cost=1.0, tile_cost=10.0) == 32
    width = tile_width([33, 5, 70], slot_cost=1.0, tile_cost=4.0)
    costs = {b: sum(-(-c // b) * (b + 4.0) for c in (33, 5, 70)) for b in (1, 2, 4, 8, 16, 32, 64, 128)}
    assert costs[width] == min(costs.values())


def test_a_memo_serves_a_repeated_batch_from_its_plan(monkeypatch):
    """With a memo, a batch's plan (layout, maps, block-diagonal map) is built once per ``which`` and the maps
    once per set of adapters; the results equal those without a memo, for new inputs too."""
    d_out, d_in = 10, 12
    adapters = zoo(d_out, d_in, 5, seed=9)
    bank = MixedBank.pack(adapters, d_out, d_in)
    built = []
    original = mixed._Maps.build
    monkeypatch.setattr(mixed._Maps, "build", lambda *a: built.append(1) or original(*a))
    g = torch.Generator().manual_seed(7)
    prompt = torch.tensor([0, 0, 0, 3, 3, 3, -1, -1, -1, 4, 4, 4])  # three tokens per example
    step = torch.tensor([0, 3, -1, 4])  # then one
    memo = {}
    for which in (prompt, step, step, step):
        x = torch.randn(which.numel(), d_in, generator=g)
        torch.testing.assert_close(bank.apply(x, which, memo), check(adapters, x, which, d_out, d_in))
    assert len(memo) == 3  # two batches and one set of adapters
    assert len(built) == 1 + 4  # the memo's, then one per call of check (no memo)
