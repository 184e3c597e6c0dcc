"""Serving a batch whose tokens use different spectral adapters, without any dense per-adapter ``ΔW``.

Notation as in :mod:`s2ft.ops.apply`: ``M = d_out``, ``N = d_in``, ``K_M = M//2+1`` and ``K_N = N//2+1`` half-spectrum
bins. Adapter ``a`` maps ``x̄ = x[perm_cols_a]`` to ``ΔW̄_a x̄ = irfft(rfft(x̄) S_a, M)`` (interleaved real and
imaginary parts), where ``S_a`` is a real sparse ``(2 K_N, 2 K_M)`` map with at most ``2 n_a`` entries that already
holds the coefficients, ``scaling / N`` and the Hermitian folding (:class:`s2ft.ops.apply._Plan`), and then
``(ΔW_a x)[perm_rows_a] = ΔW̄_a x̄``.

:meth:`MixedBank.apply` serves a batch in a fixed number of tensor operations, whatever the number of distinct
adapters in it:

1. tokens are sorted by adapter and dealt into *tiles* of ``b`` slots (``b`` a power of two, see
   :func:`tile_width`), each tile holding tokens of one adapter (a group of ``T_a`` tokens takes
   ``ceil(T_a / b)`` tiles; unused slots are zero);
   slot ``j`` of tile ``i`` is row ``j * tiles + i``, so a ``(b, tiles, ·)`` view puts each tile's frequencies
   side by side;
2. one gather applies each tile's column permutation (an index ``(tiles, N)`` broadcast over ``b``);
3. one ``rfft`` over all slots; one sparse product ``(b, tiles·2K_N) @ blockdiag(S_{a_1}, ..., S_{a_tiles})``
   maps every tile with its own adapter's map (``O(n)`` per token, the same work as one adapter's map);
4. one ``irfft``, one gather by each tile's inverse row permutation, and the slots scattered back to tokens.

The block-diagonal matrix is assembled per call from the bank's per-adapter maps in ``O(tiles · n)``; padding
costs at most ``b - 1`` slots per distinct adapter; ``b`` is chosen per batch to balance the two. FourierFT adapters with the same locations (same seed and
``n``) share one sparsity pattern in the bank and differ only in their values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from s2ft.ops.apply import _Plan

# The cost model behind the tile width (:func:`tile_width`), in ns at one CPU thread (width 384, n = 1000):
# a slot (a token or padding) costs its FFTs, gathers and copies, about 3 ns per feature of d_in + d_out, plus
# its share of the sparse product, about 2.5 ns per map entry; a tile costs about 18 ns per map entry to
# assemble into the block-diagonal matrix.
SLOT_COST = (3.0, 2.5)
TILE_COST = 18.0


class Spectral(NamedTuple):
    """One adapter's parameters on one layer (:class:`s2ft.tuner.layers.SpectralAdapter` has the same attributes).

    ``coeffs``, ``rows``, ``cols``: ``(n,)``; ``perm_rows`` ``(d_out,)`` and ``perm_cols`` ``(d_in,)`` or ``None``.
    """

    coeffs: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    scaling: float
    perm_rows: torch.Tensor | None = None
    perm_cols: torch.Tensor | None = None


@dataclass(frozen=True)
class MixedBank:
    """``A`` adapters of one ``(d_out, d_in)`` layer packed for :meth:`apply`; build with :meth:`pack`.

    Sparsity patterns (distinct location sets, ``P`` of them) are stored once; values per adapter. Every tensor
    field is counted by :meth:`nbytes`.
    """

    d_out: int
    d_in: int
    col_ptr: torch.Tensor  # int32 (P, 2 K_M + 1): CSC column pointers of each pattern
    row_idx: (
        torch.Tensor
    )  # int32 (Σ_p nnz_p,): CSC row indices (interleaved input bins), patterns back to back
    pattern_start: torch.Tensor  # int64 (P,): offset of each pattern in row_idx
    pattern_nnz: torch.Tensor  # int64 (P,)
    pattern_of: torch.Tensor  # int64 (A,): each adapter's pattern
    values: (
        torch.Tensor
    )  # float32 (Σ_a nnz_{pattern_of[a]},): each adapter's map entries, adapters back to back
    value_start: torch.Tensor  # int64 (A,): offset of each adapter in values
    perm_cols: torch.Tensor  # int64 (C, d_in): the distinct column permutations
    perm_cols_of: torch.Tensor  # int64 (A,): each adapter's row of perm_cols, -1 for none
    inv_perm_rows: torch.Tensor  # int64 (R, d_out): argsort of the distinct row permutations
    inv_perm_rows_of: torch.Tensor  # int64 (A,): each adapter's row of inv_perm_rows, -1 for none

    @property
    def num_adapters(self) -> int:
        return self.pattern_of.numel()

    def nbytes(self) -> int:
        """Bytes held by the bank's tensors (all of them: nothing else is cached)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    def to(self, device) -> MixedBank:
        """The bank with every tensor on ``device``."""
        moved = {name: t.to(device) for name, t in self._tensors().items()}
        return MixedBank(self.d_out, self.d_in, **moved)

    @staticmethod
    def pack(adapters, d_out: int, d_in: int) -> MixedBank:
        """Pack ``adapters`` (a sequence of :class:`Spectral` or objects with the same attributes) for a
        ``(d_out, d_in)`` layer. Each may have its own ``n``, scaling and permutations (or none)."""
        patterns: dict[tuple, tuple[int, _Plan]] = {}
        col_ptr, row_idx, pattern_of, values = [], [], [], []
        cols_table: dict[bytes, int] = {}
        rows_table: dict[bytes, int] = {}
        perm_cols, inv_perm_rows, perm_cols_of, inv_perm_rows_of = [], [], [], []
        for adapter in adapters:
            rows, cols = _check(adapter, d_out, d_in)
            key = (rows.numpy().tobytes(), cols.numpy().tobytes())
            if key not in patterns:
                plan = _Plan.build(rows, cols, d_out, d_in, None, None)
                patterns[key] = (len(patterns), plan)
                col_ptr.append(plan.forward.compressed)
                row_idx.append(plan.forward.plain)
            index, plan = patterns[key]
            pattern_of.append(index)
            coeffs = adapter.coeffs.detach().to("cpu", torch.float64)
            per_location = coeffs.repeat(2) * plan.forward_factor.double() * (float(adapter.scaling) / d_in)
            entries = torch.zeros(plan.forward.plain.numel(), dtype=torch.float64)
            values.append(entries.index_add_(0, plan.forward.slot, per_location).float())
            perm_cols_of.append(_intern(adapter.perm_cols, cols_table, perm_cols, d_in, invert=False))
            inv_perm_rows_of.append(_intern(adapter.perm_rows, rows_table, inv_perm_rows, d_out, invert=True))
        nnz = torch.tensor([r.numel() for r in row_idx], dtype=torch.long)
        value_counts = torch.tensor([v.numel() for v in values], dtype=torch.long)
        half_out = 2 * (d_out // 2 + 1)
        return MixedBank(
            d_out,
            d_in,
            col_ptr=torch.stack(col_ptr) if col_ptr else torch.zeros(0, half_out + 1, dtype=torch.int32),
            row_idx=torch.cat(row_idx) if row_idx else torch.zeros(0, dtype=torch.int32),
            pattern_start=nnz.cumsum(0) - nnz,
            pattern_nnz=nnz,
            pattern_of=torch.tensor(pattern_of, dtype=torch.long),
            values=torch.cat(values) if values else torch.zeros(0),
            value_start=value_counts.cumsum(0) - value_counts,
            perm_cols=_stack(perm_cols, d_in),
            perm_cols_of=torch.tensor(perm_cols_of, dtype=torch.long),
            inv_perm_rows=_stack(inv_perm_rows, d_out),
            inv_perm_rows_of=torch.tensor(inv_perm_rows_of, dtype=torch.long),
        )

    @staticmethod
    def concat(banks) -> MixedBank:
        """The adapters of ``banks`` (a non-empty sequence of banks of one layer shape), in order, in one bank.
        Patterns and permutations are not merged across banks, so a bank of pieces of one adapter each holds
        what the pieces hold."""
        first = banks[0]

        def shifted(of: torch.Tensor, offset: int) -> torch.Tensor:
            return torch.where(of >= 0, of + offset, of)

        def starts(counts: list[int]) -> list[int]:
            return [sum(counts[:i]) for i in range(len(counts))]

        pattern_offsets = starts([b.col_ptr.shape[0] for b in banks])
        value_offsets = starts([b.values.numel() for b in banks])
        cols_offsets = starts([b.perm_cols.shape[0] for b in banks])
        rows_offsets = starts([b.inv_perm_rows.shape[0] for b in banks])
        nnz = torch.cat([b.pattern_nnz for b in banks])
        return MixedBank(
            first.d_out,
            first.d_in,
            col_ptr=torch.cat([b.col_ptr for b in banks]),
            row_idx=torch.cat([b.row_idx for b in banks]),
            pattern_start=nnz.cumsum(0) - nnz,
            pattern_nnz=nnz,
            pattern_of=torch.cat([b.pattern_of + o for b, o in zip(banks, pattern_offsets)]),
            values=torch.cat([b.values for b in banks]),
            value_start=torch.cat([b.value_start + o for b, o in zip(banks, value_offsets)]),
            perm_cols=torch.cat([b.perm_cols for b in banks]),
            perm_cols_of=torch.cat([shifted(b.perm_cols_of, o) for b, o in zip(banks, cols_offsets)]),
            inv_perm_rows=torch.cat([b.inv_perm_rows for b in banks]),
            inv_perm_rows_of=torch.cat([shifted(b.inv_perm_rows_of, o) for b, o in zip(banks, rows_offsets)]),
        )

    @torch.no_grad()
    def apply(self, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """``ΔW_{which[t]} x[t]`` for every token: ``(T, d_out)`` float32, zero where ``which[t] == -1``.

        ``x``: ``(T, d_in)`` of any float dtype; ``which``: ``(T,)`` integers in ``[-1, A)``. Not differentiable.
        """
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"x must be (tokens, {self.d_in}), got {tuple(x.shape)}")
        if which.shape != x.shape[:1]:
            raise ValueError(f"which must be ({x.shape[0]},), got {tuple(which.shape)}")
        which = which.to(x.device, torch.long)
        if which.numel() and not bool(((which >= -1) & (which < self.num_adapters)).all()):
            raise ValueError(f"which must lie in [-1, {self.num_adapters}); -1 means the base model only")
        base_only = which < 0
        tokens = (~base_only).nonzero().squeeze(1)
        if tokens.numel() == 0:
            return torch.zeros(x.shape[0], self.d_out, device=x.device)
        nnz = self.values.numel() / max(1, self.num_adapters)
        slot_cost = SLOT_COST[0] * (self.d_in + self.d_out) + SLOT_COST[1] * nnz
        layout = _Layout.build(which[tokens], tokens, slot_cost, TILE_COST * nnz)
        # Padding slots repeat a token of their tile; their outputs are never read.
        slots = x.index_select(0, layout.slot_tokens).float()  # (b * tiles, d_in)
        slots = _permute(slots, layout, self.perm_cols, self.perm_cols_of)
        spectrum = torch.view_as_real(torch.fft.rfft(slots, dim=1)).reshape(layout.tile, -1)
        half = spectrum.new_empty(layout.tile, layout.tiles * 2 * (self.d_out // 2 + 1))
        torch.addmm(half, spectrum, self._block_diagonal(layout.adapters), beta=0.0, out=half)
        signal = torch.fft.irfft(
            torch.view_as_complex(half.view(-1, self.d_out // 2 + 1, 2)), n=self.d_out, dim=1
        )
        signal = _permute(signal, layout, self.inv_perm_rows, self.inv_perm_rows_of)
        token_slot = torch.zeros_like(which).index_copy_(0, layout.tokens, layout.slots)  # base-only: slot 0
        out = signal.index_select(0, token_slot)
        return out if tokens.numel() == which.numel() else out.masked_fill_(base_only[:, None], 0.0)

    def _block_diagonal(self, adapters: torch.Tensor) -> torch.Tensor:
        """CSC ``(tiles · 2 K_N, tiles · 2 K_M)``: block ``i`` is adapter ``adapters[i]``'s map."""
        tiles = adapters.numel()
        half_in, half_out = 2 * (self.d_in // 2 + 1), 2 * (self.d_out // 2 + 1)
        pattern = self.pattern_of[adapters]
        nnz = self.pattern_nnz[pattern]
        base = nnz.cumsum(0) - nnz  # (tiles,): where each block starts
        pointers = self.col_ptr[pattern][:, :-1] + base[:, None].int()  # (tiles, 2 K_M)
        col_ptr = torch.cat([pointers.reshape(-1), nnz.sum().reshape(1).int()])
        # Entry e of block i reads entry e - base[i] of its pattern and of its adapter's values. Positions are
        # int32: half the memory traffic of int64 on these tiles * n sized vectors.
        entry = torch.arange(int(nnz.sum()), device=adapters.device, dtype=torch.int32)
        row_at = entry + torch.repeat_interleave((self.pattern_start[pattern] - base).int(), nnz)
        value_at = entry + torch.repeat_interleave((self.value_start[adapters] - base).int(), nnz)
        shift = torch.repeat_interleave(
            torch.arange(tiles, device=adapters.device, dtype=torch.int32) * half_in, nnz
        )
        row_idx = self.row_idx.index_select(0, row_at) + shift
        values = self.values.index_select(0, value_at)
        size = (tiles * half_in, tiles * half_out)
        return torch.sparse_csc_tensor(col_ptr, row_idx, values, size, check_invariants=False)


class _Layout(NamedTuple):
    """Where each adapted token sits: ``tokens[k]`` (in ``x``) goes to slot row ``slots[k]`` of a
    ``(tile * tiles, ·)`` buffer seen as ``(tile, tiles, ·)``; tile ``i`` serves adapter ``adapters[i]``.
    ``slot_tokens`` ``(tile * tiles,)`` is the inverse map, with each padding slot given its tile's first token."""

    tokens: torch.Tensor  # int64 (T',)
    slots: torch.Tensor  # int64 (T',)
    slot_tokens: torch.Tensor  # int64 (tile * tiles,)
    adapters: torch.Tensor  # int64 (tiles,)
    tile: int
    tiles: int

    @staticmethod
    def build(which: torch.Tensor, tokens: torch.Tensor, slot_cost: float, tile_cost: float) -> _Layout:
        """``which`` ``(T',)``: adapter of each token in ``tokens`` (all ``>= 0``). The tile width is the power
        of two that minimizes ``slots * slot_cost + tiles * tile_cost`` (:func:`tile_width`)."""
        order = torch.argsort(which, stable=True)
        adapters, counts = torch.unique_consecutive(which[order], return_counts=True)
        tile = tile_width(counts.tolist(), slot_cost, tile_cost)
        per_group = (counts + tile - 1) // tile
        first_token, first_tile = counts.cumsum(0) - counts, per_group.cumsum(0) - per_group
        rank = torch.arange(order.numel(), device=which.device) - torch.repeat_interleave(first_token, counts)
        tile_of = torch.repeat_interleave(first_tile, counts) + rank // tile
        tiles = int(per_group.sum())
        slots = (rank % tile) * tiles + tile_of
        tokens = tokens[order]
        slot_tokens = tokens[rank % tile == 0].repeat(tile).index_copy_(0, slots, tokens)
        return _Layout(tokens, slots, slot_tokens, torch.repeat_interleave(adapters, per_group), tile, tiles)


def tile_width(counts: list[int], slot_cost: float, tile_cost: float) -> int:
    """The power of two ``b`` minimizing ``Σ_a ceil(T_a / b) * (b * slot_cost + tile_cost)`` for groups of
    ``counts`` tokens: wide tiles waste padded slots, narrow ones cost more blocks to assemble."""
    best, best_cost, width = 1, float("inf"), 1
    while True:
        tiles = sum(-(-count // width) for count in counts)
        cost = tiles * (width * slot_cost + tile_cost)
        if cost < best_cost:
            best, best_cost = width, cost
        if width >= max(counts):
            return best
        width *= 2


def _permute(
    rows: torch.Tensor, layout: _Layout, table: torch.Tensor, table_of: torch.Tensor
) -> torch.Tensor:
    """``rows`` ``(b * tiles, L)`` with each tile's columns gathered by ``table[table_of[adapter]]`` (none: kept)."""
    which = table_of[layout.adapters]  # (tiles,)
    if not bool((which >= 0).any()):
        return rows
    width = rows.shape[1]
    identity = torch.arange(width, device=rows.device).expand(layout.tiles, width)
    index = torch.where((which >= 0)[:, None], table[which.clamp(min=0)], identity)  # (tiles, L)
    view = rows.view(layout.tile, layout.tiles, width)
    return torch.gather(view, 2, index.expand(layout.tile, -1, -1)).view(-1, width)


def _check(adapter, d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's locations as int64 CPU tensors, after checking every shape and range."""
    rows, cols = adapter.rows.detach().to("cpu", torch.long), adapter.cols.detach().to("cpu", torch.long)
    n = adapter.coeffs.numel()
    if rows.shape != (n,) or cols.shape != (n,):
        raise ValueError(
            f"rows and cols must be ({n},) like coeffs, got {tuple(rows.shape)}, {tuple(cols.shape)}"
        )
    if n and (rows.min() < 0 or rows.max() >= d_out or cols.min() < 0 or cols.max() >= d_in):
        raise ValueError(f"locations outside the ({d_out}, {d_in}) spectrum")
    for perm, size, name in ((adapter.perm_rows, d_out, "perm_rows"), (adapter.perm_cols, d_in, "perm_cols")):
        if perm is not None and perm.shape != (size,):
            raise ValueError(f"{name} must be ({size},), got {tuple(perm.shape)}")
    return rows, cols


def _intern(perm, table: dict[bytes, int], stored: list, size: int, invert: bool) -> int:
    """Index of ``perm`` (its argsort when ``invert``) among the distinct permutations in ``stored``; -1 for None."""
    if perm is None:
        return -1
    perm = perm.detach().to("cpu", torch.long)
    key = perm.numpy().tobytes()
    if key not in table:
        table[key] = len(stored)
        stored.append(torch.argsort(perm) if invert else perm)
    return table[key]


def _stack(perms: list, size: int) -> torch.Tensor:
    return torch.stack(perms) if perms else torch.zeros(0, size, dtype=torch.long)
