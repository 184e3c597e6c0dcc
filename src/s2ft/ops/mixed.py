"""Serving a batch whose tokens use different spectral adapters, without any dense per-adapter ``ΔW`` and
without any copy of the adapters' own tensors.

Notation as in :mod:`s2ft.ops.apply`: ``M = d_out``, ``N = d_in``, ``K_M = M//2+1`` and ``K_N = N//2+1`` half-spectrum
bins. Adapter ``a`` maps ``x̄ = x[perm_cols_a]`` to ``ΔW̄_a x̄ = irfft(rfft(x̄) S_a, M)`` (interleaved real and
imaginary parts), where ``S_a`` is a real sparse ``(2 K_N, 2 K_M)`` map with at most ``2 n_a`` entries that
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
   maps every tile with its own adapter's map (``O(n)`` per token, the same work as one adapter's map); for
   ``b > 1`` it runs transposed, ``blockdiag(...)ᵀ`` as CSR (the same arrays as the CSC map) times the
   ``(tiles·2K_N, b)`` spectra: on the CPU torch's CSR-times-dense kernel is about 4x faster there than
   dense-times-CSC at b = 16 and 9x at b = 128 (1 thread, 64 tiles of 4,000 entries); at ``b = 1``
   dense-times-CSC is the faster (0.45 against 0.67 ms);
4. one ``irfft``, one gather by each tile's inverse row permutation, and the slots gathered back to tokens.

The maps of the adapters present in the batch are built on each call from their coefficients and locations
(``O(n log n)`` per present adapter: one sort by output bin), so a bank holds nothing of its own: loading an
adapter costs its own tensors only, and a changed coefficient is served at once. A caller that serves the same
batch again (generation) passes a ``memo`` that keeps the whole plan of a batch (:class:`_Batch`) while it lasts;
one that serves the same adapters in many batches passes a ``cache`` (:class:`MapStore`) that keeps each adapter's
map between calls, at 12 bytes per location, so that a batch builds only the maps it lacks. Padding costs at most
``b - 1`` slots per distinct adapter; ``b`` is chosen per batch to balance padding against assembly.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, cast

import torch

# The cost model behind the tile width (:func:`tile_width`), in ns at one CPU thread (width 384, n = 1000):
# a slot (a token or padding) costs its FFTs, gathers and copies, about 3 ns per feature of d_in + d_out, plus
# its share of the sparse product, about 2.5 ns per map entry; a tile costs about 18 ns per map entry to
# assemble into the block-diagonal matrix.
SLOT_COST = (3.0, 2.5)
TILE_COST = 18.0


class Spectral(NamedTuple):
    """One adapter's parameters on one layer (:class:`s2ft.tuner.layers.SpectralAdapter` has the same attributes).

    ``coeffs``, ``rows``, ``cols``: ``(n,)``, the indices of any integer dtype; ``perm_rows`` ``(d_out,)`` and
    ``perm_cols`` ``(d_in,)`` or ``None``.
    """

    coeffs: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    scaling: float
    perm_rows: torch.Tensor | None = None
    perm_cols: torch.Tensor | None = None


class MixedBank(NamedTuple):
    """``A`` adapters of one ``(d_out, d_in)`` layer, served together by :meth:`apply`; build with :meth:`pack`.

    The bank references the adapters' own tensors (coefficients, locations, permutations) and copies none.
    """

    d_out: int
    d_in: int
    adapters: tuple  # of Spectral (or objects with the same attributes)

    @property
    def num_adapters(self) -> int:
        return len(self.adapters)

    @staticmethod
    def pack(adapters, d_out: int, d_in: int) -> MixedBank:
        """The bank of ``adapters`` (a sequence of :class:`Spectral` or objects with the same attributes) for a
        ``(d_out, d_in)`` layer, after checking each one's shapes and ranges (:func:`check`). Each may have its
        own ``n``, scaling and permutations (or none)."""
        for adapter in adapters:
            check(adapter, d_out, d_in)
        return MixedBank(d_out, d_in, tuple(adapters))

    @torch.no_grad()
    def apply(
        self, x: torch.Tensor, which: torch.Tensor, memo: dict | None = None, cache: MapStore | None = None
    ) -> torch.Tensor:
        """``ΔW_{which[t]} x[t]`` for every token: ``(T, d_out)`` float32, zero where ``which[t] == -1``.

        ``x``: ``(T, d_in)`` of any float dtype; ``which``: ``(T,)`` integers in ``[-1, A)``. Not differentiable.
        ``memo``: a dict in which to keep what a batch's ``which`` decides (the layout, the maps and their
        block-diagonal matrix) and from which to take it again for the same ``which``; the caller drops it when
        any adapter changes (generation serves the same batch at every new token).
        ``cache``: where each adapter's map is kept between calls (:class:`MapStore`), so that a batch builds
        only the maps of adapters it does not hold.
        """
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"x must be (tokens, {self.d_in}), got {tuple(x.shape)}")
        if which.shape != x.shape[:1]:
            raise ValueError(f"which must be ({x.shape[0]},), got {tuple(which.shape)}")
        key = None
        if memo is not None:
            key = (x.device, which.to("cpu", torch.long).numpy().tobytes())
            batch = memo.get(key)
            if batch is not None:
                return batch.run(x)
        which = which.to(x.device, torch.long)
        if which.numel() and not bool(((which >= -1) & (which < self.num_adapters)).all()):
            raise ValueError(f"which must lie in [-1, {self.num_adapters}); -1 means the base model only")
        batch = _Batch.build(self, which, memo, cache)
        if memo is not None and key is not None:
            memo[key] = batch
        return batch.run(x)


class _Batch(NamedTuple):
    """What one ``which`` decides: the layout of the slots, the column and row permutation indices and the
    block-diagonal map; :meth:`run` then serves any ``x`` of that many tokens."""

    d_out: int
    tokens: int  # T
    adapted: torch.Tensor | None  # bool (T,) of the adapted tokens; None if all are
    slot_tokens: torch.Tensor  # int64 (b * tiles,): the token each slot reads
    token_slot: torch.Tensor  # int64 (T,): the slot each token's output is read from (base-only: slot 0)
    gather_cols: torch.Tensor | None  # int64 (b, tiles, d_in) expanded: each tile's column permutation
    gather_rows: torch.Tensor | None  # int64 (b, tiles, d_out) expanded: each tile's inverse row permutation
    matrix: torch.Tensor | None  # sparse: the block-diagonal map (CSC) for b = 1, else its transpose (CSR)
    tile: int  # b
    tiles: int

    @staticmethod
    def build(
        bank: MixedBank, which: torch.Tensor, memo: dict | None = None, cache: MapStore | None = None
    ) -> _Batch:
        """``memo``: as in :meth:`MixedBank.apply`; the maps of a set of adapters are kept there too, for
        batches with other ``which`` (a prompt and then its new tokens)."""
        device, count = which.device, which.shape[0]
        base_only = which < 0
        tokens = (~base_only).nonzero().squeeze(1)
        if tokens.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return _Batch(bank.d_out, count, None, empty, empty, None, None, None, 0, 0)
        present, group = torch.unique(which[tokens], return_inverse=True)
        adapters = [bank.adapters[a] for a in present.tolist()]
        nnz = 2 * sum(a.coeffs.numel() for a in adapters) / len(adapters)
        slot_cost = SLOT_COST[0] * (bank.d_in + bank.d_out) + SLOT_COST[1] * nnz
        layout = _Layout.build(group, tokens, slot_cost, TILE_COST * nnz)
        maps_key = ("maps", *present.tolist())
        maps = None if memo is None else memo.get(maps_key)
        if maps is None:
            maps = _maps_of(adapters, bank.d_out, bank.d_in, device, cache)
            if memo is not None:
                memo[maps_key] = maps
        matrix = maps.block_diagonal(layout.adapters)
        if layout.tile > 1:  # S^T as CSR (the same arrays): a sparse-times-dense product with b columns
            matrix = torch.sparse_csr_tensor(
                matrix.ccol_indices(),
                matrix.row_indices(),
                matrix.values(),
                (matrix.shape[1], matrix.shape[0]),
                check_invariants=False,
            )

        def expanded(table):
            if table is None:
                return None
            return table.index_select(0, layout.adapters).expand(layout.tile, -1, -1)

        inverse_rows = None
        if maps.perm_rows is not None:  # gather by the inverse permutation: faster than a scatter
            inverse_rows = torch.empty_like(maps.perm_rows).scatter_(
                1, maps.perm_rows, torch.arange(bank.d_out, device=device).expand_as(maps.perm_rows)
            )
        token_slot = torch.zeros_like(which).index_copy_(0, layout.tokens, layout.slots)
        return _Batch(
            bank.d_out,
            count,
            None if tokens.numel() == count else ~base_only,
            layout.slot_tokens,
            token_slot,
            expanded(maps.perm_cols),
            expanded(inverse_rows),
            matrix,
            layout.tile,
            layout.tiles,
        )

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs ``(T, d_out)`` float32 for ``x`` ``(T, d_in)``."""
        if x.shape[0] != self.tokens:
            raise ValueError(f"this batch serves {self.tokens} tokens, got {x.shape[0]}")
        if self.matrix is None:  # no adapted token
            return torch.zeros(x.shape[0], self.d_out, device=x.device)
        b, tiles, d_in = self.tile, self.tiles, x.shape[1]
        # Padding slots repeat a token of their tile; their outputs are never read.
        slots = x.index_select(0, self.slot_tokens).float()  # (b * tiles, d_in)
        if self.gather_cols is not None:
            slots = torch.gather(slots.view(b, tiles, d_in), 2, self.gather_cols).view(-1, d_in)
        spectrum = torch.view_as_real(torch.fft.rfft(slots, dim=1)).reshape(b, -1)  # (b, tiles * 2 K_N)
        if b == 1:
            half = torch.mm(spectrum, self.matrix)
        else:  # (tiles * 2 K_M, b) = S^T spectrum^T
            half = torch.sparse.mm(self.matrix, spectrum.t().contiguous()).t().contiguous()
        k_out = self.d_out // 2 + 1
        signal = torch.fft.irfft(torch.view_as_complex(half.view(-1, k_out, 2)), n=self.d_out, dim=1)
        if self.gather_rows is not None:
            signal = torch.gather(signal.view(b, tiles, self.d_out), 2, self.gather_rows).view(-1, self.d_out)
        out = signal.index_select(0, self.token_slot)
        return out if self.adapted is None else out.masked_fill_(~self.adapted[:, None], 0.0)


class MapStore(Protocol):
    """Keeps adapters' maps between calls (:class:`s2ft.tuner.serving.MapCache` bounds it in bytes)."""

    def get(self, adapter) -> _Maps | None: ...

    def put(self, adapter, maps: _Maps) -> None: ...


def _maps_of(adapters: list, d_out: int, d_in: int, device, cache: MapStore | None) -> _Maps:
    """The maps of ``adapters``: those ``cache`` holds, the others built together (and offered to it)."""
    if cache is None:
        return _Maps.build(adapters, d_out, d_in, device)
    parts = [cache.get(adapter) for adapter in adapters]
    missing = [i for i, part in enumerate(parts) if part is None]
    if missing:
        built = _Maps.build([adapters[i] for i in missing], d_out, d_in, device)
        for i, part in zip(missing, built.split()):
            parts[i] = part
            cache.put(adapters[i], part)
    return _Maps.concat(cast("list[_Maps]", parts), adapters, d_out, d_in, device)  # every part filled


class _Maps(NamedTuple):
    """The sparse maps ``S_a`` of ``P`` adapters, each in CSC form, adapters back to back, and their permutations."""

    counts: torch.Tensor  # int32 (P, 2 K_M): entries per output column of each adapter
    start: torch.Tensor  # int64 (P,): offset of each adapter's entries
    nnz: torch.Tensor  # int64 (P,)
    row_idx: torch.Tensor  # int32 (Σ nnz_a,): input bin (interleaved) of each entry
    values: torch.Tensor  # float32 (Σ nnz_a,)
    half_in: int  # 2 K_N
    half_out: int  # 2 K_M
    perm_rows: torch.Tensor | None  # int64 (P, d_out): each adapter's row permutation (identity for none)
    perm_cols: torch.Tensor | None  # int64 (P, d_in), the same for the columns; None where no adapter has one

    @staticmethod
    def build(adapters: list, d_out: int, d_in: int, device) -> _Maps:
        """The maps of ``adapters``, on ``device``: ``O(n log n)`` per adapter (one sort by folded frequency)."""
        count, k_in, k_out = len(adapters), d_in // 2 + 1, d_out // 2 + 1
        sizes = torch.tensor([a.coeffs.numel() for a in adapters], device=device)
        scales = torch.tensor([float(a.scaling) / d_in for a in adapters], device=device)
        # One concatenation of the flat locations (an adapter module keeps them so; its rows and cols would be
        # two divisions per adapter), then rows and columns of all at once, in int32 where they fit.
        flat = torch.cat([_flat(a, d_in) for a in adapters]).to(device)
        flat = flat.int() if d_out * d_in <= 2**31 else flat.long()
        rows = torch.div(flat, d_in, rounding_mode="floor")
        cols = flat - rows * d_in
        coeffs = torch.cat([a.coeffs.detach().reshape(-1) for a in adapters]).to(device, torch.float32)
        owner = torch.repeat_interleave(torch.arange(count, device=device), sizes)
        # (index_select and index_copy_ below: several times faster than indexing with a tensor on the CPU)
        # Folding and weights as in s2ft.ops.apply._Plan.build: location k adds w c_k to the real entry and
        # ±w c_k to the imaginary entry of folded frequency (u', v') = (min(u, M - u), min(v, N - v)).
        u, v = torch.minimum(rows, d_out - rows), torch.minimum(cols, d_in - cols)
        real = coeffs * scales.index_select(0, owner) * torch.where((u == 0) | (2 * u == d_out), 1.0, 0.5)
        imag = torch.where((2 * rows > d_out) ^ (2 * cols > d_in), real, -real)
        # Locations that fold onto one entry (up to four) share it, their terms added in the order of the
        # locations (stable sort), as on the FFT path: the sums depend on the adapter alone (files keep the order).
        group_of = owner * k_out + u  # (adapter, u'): int64
        key = group_of * k_in + v  # (adapter, u', v'), increasing in the CSC order
        order = torch.argsort(key, stable=True)
        entries, slot = torch.unique_consecutive(key.index_select(0, order), return_inverse=True)
        merged = entries.numel() < key.numel()  # some locations fold onto one entry (rare at random)
        # (adapter, u') of each entry: its real part goes to column 2u', imaginary 2u'+1
        group = torch.div(entries, k_in, rounding_mode="floor") if merged else group_of.index_select(0, order)
        sizes = torch.bincount(group, minlength=count * k_out)
        first = sizes.cumsum(0) - sizes
        # Entry e, the (e - first)-th of its group, sits at 2 first + (e - first) (real) and that + size (imaginary).
        at_real = torch.arange(entries.numel(), device=device) + first.index_select(0, group)
        at_imag = at_real + sizes.index_select(0, group)
        bins = (2 * (entries - group * k_in)).int()
        row_idx = torch.empty(2 * entries.numel(), dtype=torch.int32, device=device)
        row_idx.index_copy_(0, at_real, bins).index_copy_(0, at_imag, bins + 1)
        values = torch.empty(2 * entries.numel(), device=device)
        for part, at in ((real, at_real), (imag, at_imag)):
            part = part.index_select(0, order)
            if merged:
                part = torch.zeros(entries.numel(), device=device).index_add_(0, slot, part)
            values.index_copy_(0, at, part)
        counts = sizes.view(count, k_out).repeat_interleave(2, dim=1).int()  # (P, 2 K_M)
        nnz = counts.sum(1, dtype=torch.long)
        perm_rows = _table([a.perm_rows for a in adapters], d_out, device)
        perm_cols = _table([a.perm_cols for a in adapters], d_in, device)
        return _Maps(
            counts, nnz.cumsum(0) - nnz, nnz, row_idx, values, 2 * k_in, 2 * k_out, perm_rows, perm_cols
        )

    def split(self) -> list[_Maps]:
        """Each adapter's map alone, copied out (so that keeping one keeps nothing of the others), without
        permutations (:meth:`concat` takes them from the adapters)."""
        parts = []
        compact = (
            torch.int16 if self.half_in <= 2**15 else torch.int32
        )  # input bins: 2 bytes up to d_in 32,766
        for a, (start, nnz) in enumerate(zip(self.start.tolist(), self.nnz.tolist())):
            entries = slice(start, start + nnz)
            parts.append(
                _Maps(
                    self.counts[a : a + 1].clone(),
                    self.start.new_zeros(1),
                    self.nnz[a : a + 1].clone(),
                    self.row_idx[entries].to(compact, copy=True),
                    self.values[entries].clone(),
                    self.half_in,
                    self.half_out,
                    None,
                    None,
                )
            )
        return parts

    @staticmethod
    def concat(parts: list[_Maps], adapters: list, d_out: int, d_in: int, device) -> _Maps:
        """The maps of ``adapters`` from their maps alone (``parts``, as :meth:`split` makes them)."""
        nnz = torch.cat([part.nnz for part in parts])
        return _Maps(
            torch.cat([part.counts for part in parts]),
            nnz.cumsum(0) - nnz,
            nnz,
            torch.cat([part.row_idx for part in parts]).int(),
            torch.cat([part.values for part in parts]),
            parts[0].half_in,
            parts[0].half_out,
            _table([a.perm_rows for a in adapters], d_out, device),
            _table([a.perm_cols for a in adapters], d_in, device),
        )

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.counts, self.start, self.nnz, self.row_idx, self.values)
        )

    def block_diagonal(self, tile_of: torch.Tensor) -> torch.Tensor:
        """CSC ``(tiles · 2 K_N, tiles · 2 K_M)``: block ``i`` is the map of adapter ``tile_of[i]``."""
        tiles = tile_of.numel()
        nnz = self.nnz[tile_of]
        base = nnz.cumsum(0) - nnz  # (tiles,): where each block starts
        counts = self.counts.index_select(0, tile_of)
        pointers = counts.cumsum(1, dtype=torch.long) - counts + base[:, None]  # (tiles, 2 K_M)
        total = nnz.sum()
        col_ptr = torch.cat([pointers.reshape(-1), total.reshape(1)]).int()
        if tiles == self.nnz.numel():  # one tile per adapter, in order: the entries as they are
            source = None
        else:  # entry e of block i is entry e - base[i] of its adapter
            entry = torch.arange(int(total), device=tile_of.device)
            source = entry + torch.repeat_interleave(self.start[tile_of] - base, nnz)
        row_idx = self.row_idx if source is None else self.row_idx.index_select(0, source)
        values = self.values if source is None else self.values.index_select(0, source)
        shift = torch.arange(tiles, device=tile_of.device, dtype=torch.int32) * self.half_in
        row_idx = row_idx + torch.repeat_interleave(shift, nnz)
        size = (tiles * self.half_in, tiles * self.half_out)
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


def _flat(adapter, d_in: int) -> torch.Tensor:
    """The flat locations ``rows * d_in + cols`` of ``adapter``: its ``locations`` where it keeps them."""
    flat = getattr(adapter, "locations", None)
    if flat is not None:
        return flat
    return adapter.rows.long() * d_in + adapter.cols.long()


def _table(perms: list, size: int, device) -> torch.Tensor | None:
    """``perms`` (each ``(size,)`` or None: the identity) stacked as int64 ``(P, size)``; None if all are None."""
    if all(perm is None for perm in perms):
        return None
    if all(perm is not None and perm.dtype == perms[0].dtype for perm in perms):
        return torch.stack(perms).to(device, torch.long)  # one stack, one conversion
    identity = torch.arange(size, device=device)
    return torch.stack([identity if perm is None else perm.to(device, torch.long) for perm in perms])


def check(adapter, d_out: int, d_in: int) -> None:
    """Refuse an adapter whose locations or permutations do not fit a ``(d_out, d_in)`` layer."""
    rows, cols = adapter.rows, adapter.cols
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
