"""Spectrum locations: FourierFT's seeded uniform draw and S2FT's power-spectrum sampling.

Pure functions on tensors. A location is a pair ``(rows[k], cols[k])`` of the ``d_out x d_in`` 2-D spectrum;
the coefficient ``c[k]`` sits there and ``ΔW̄ = scaling * Re(ifft2(F))`` (see :mod:`s2ft.ops.apply`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SAMPLE_BLOCK_ENTRIES = 2**19  # spectrum entries sample_locations_in_blocks keys at once


def fourierft_locations(d_out: int, d_in: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FourierFT's ``n`` uniformly random distinct locations, identical to Hugging Face PEFT's for a seed.

    ``flat = randperm(d_out * d_in, generator=seeded)[:n]``; ``rows = flat // d_in``, ``cols = flat % d_in``.
    Returns two int64 tensors of shape ``(n,)`` on the CPU.
    """
    check_n_frequency(n, d_out, d_in)
    flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
    return flat // d_in, flat % d_in


def index_dtype(size: int) -> torch.dtype:
    """The integer dtype adapters keep their locations and permutations in (indices below ``size``): int32, half
    of int64's bytes, unless ``size`` needs int64. int32 indexes tensors directly, cannot overflow on a flat
    position ``rows * d_in + cols`` of any layer below 2**31 entries, and travels through NCCL and Gloo
    (int16 does neither of the last two)."""
    return torch.int32 if size <= 2**31 else torch.int64


def widen(*indices: torch.Tensor | None) -> tuple:
    """``indices`` as int64 (no copy where they already are; None stays None), for indexing."""
    return tuple(None if t is None else t.long() for t in indices)


def power_spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """``|DFT2(matrix)|``, the magnitude of the 2-D spectrum, in float32 (or float64 for float64 input)."""
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    return torch.fft.fft2(matrix.to(dtype)).abs()


def mirror_of(d_out: int, d_in: int) -> torch.Tensor:
    """Flat index of the mirror location ``(-u mod d_out, -v mod d_in)`` of every flat location ``u * d_in + v``.

    With a real coefficient, a location and its mirror give the same basis function
    ``cos(2π(u p / d_out + v q / d_in))`` of ``Re(ifft2(F))``: a coefficient on both is one degree of freedom.
    """
    rows = (-torch.arange(d_out)) % d_out
    cols = (-torch.arange(d_in)) % d_in
    return (rows[:, None] * d_in + cols[None, :]).flatten()


def sample_locations(
    power: torch.Tensor,
    n: int,
    gamma: float,
    generator: torch.Generator | None = None,
    half: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n`` distinct locations without replacement with probability ``∝ power ** gamma``.

    ``power`` is a non-negative ``(d_out, d_in)`` matrix, typically :func:`power_spectrum` of the permuted prior.
    Uses exponential keys (Efraimidis-Spirakis): location ``i`` gets ``log(U_i) / w_i`` with ``U_i ~ U(0, 1)`` and
    the ``n`` largest keys win. This is exact sampling without replacement and, unlike ``torch.multinomial``, has no
    limit of 2**24 categories. Locations of zero weight are only taken when fewer than ``n`` have positive weight.
    The draw runs on the CPU with ``generator``, so it is identical on every device. Returns int64 ``(rows, cols)``
    on the device of ``power``, ordered by decreasing sampling priority.

    ``half=True`` samples from one location of each mirror pair ``(u, v)``, ``(-u, -v)`` (the one with the smaller
    flat index; :func:`mirror_of`), so that no two coefficients share a basis function: about half the spectrum,
    ``power`` being symmetric for a real matrix. The other half is drawn from only when ``n`` exceeds it.
    """
    if power.dim() != 2:
        raise ValueError(f"power must be a 2-D matrix, got shape {tuple(power.shape)}")
    d_out, d_in = power.shape
    check_n_frequency(n, d_out, d_in)
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    flat_power = power.detach().to("cpu", torch.float32).flatten()
    if not torch.isfinite(flat_power).all() or (flat_power < 0).any():
        raise ValueError("power must be finite and non-negative")
    # key_i = log(U_i) / w_i = -E_i / w_i with w = (p / max p) ** gamma; the n largest keys win. Zero weight
    # gives -inf: drawn only after every positive weight.
    inverse_weight = (flat_power / flat_power.max().clamp_min(torch.finfo(torch.float32).tiny)).pow_(-gamma)
    keys = torch.rand(flat_power.shape, generator=generator).log_().mul_(inverse_weight)
    if half:  # canonical locations first; mirrored ones only once those run out
        index = torch.arange(keys.numel())
        mirrored = mirror_of(d_out, d_in) < index
        groups = (index[~mirrored], index[mirrored])
        picked, left = [], n
        for group in groups:
            take = min(left, group.numel())
            picked.append(group[torch.topk(keys[group], take, sorted=True).indices])
            left -= take
        flat = torch.cat(picked)
    else:
        flat = torch.topk(keys, n, sorted=True).indices
    return (flat // d_in).to(power.device), (flat % d_in).to(power.device)


class FactoredPower:
    """The power spectrum ``|left @ rightᵀ|`` ``(d_out, d_in)`` of a low-rank matrix, from its transformed factors
    ``left`` ``(d_out, k)`` and ``right`` ``(d_in, k)`` (complex; :meth:`s2ft.ops.sketch.LowRank.permuted_power_rows`),
    never held whole: by rows (``power(start, stop)``, as :func:`sample_locations_in_blocks` asks), at given
    locations (:meth:`at`), and bounded (:meth:`bounds`: ``power[u, v] <= row[u] * col[v]`` by Cauchy-Schwarz), which
    lets :func:`sample_locations_in_blocks` compute the power only where a draw could still win."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor) -> None:
        if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[1]:
            raise ValueError(
                f"the factors must be (d_out, k) and (d_in, k), got {tuple(left.shape)} and {tuple(right.shape)}"
            )
        self.left, self.right = left, right
        self._right_t = right.T

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[0]

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        """``power[start:stop]`` ``(stop - start, d_in)``: one block's product."""
        return (self.left[start:stop] @ self._right_t).abs()

    def at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``power[rows, cols]`` ``(c,)`` at the int64 index arrays ``rows`` and ``cols``: ``c`` dot products."""
        return (self.left[rows] * self.right[cols]).sum(dim=1).abs()

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors' row norms ``(d_out,)`` and ``(d_in,)``, float64: ``power[u, v] <= row[u] * col[v]``."""
        return (
            torch.linalg.vector_norm(self.left.to(torch.complex128), dim=1),
            torch.linalg.vector_norm(self.right.to(torch.complex128), dim=1),
        )


def sample_locations_in_blocks(
    power_rows: Callable[[int, int], torch.Tensor],
    d_out: int,
    d_in: int,
    n: int,
    gamma: float,
    generator: torch.Generator | None = None,
    half: bool = False,
    block_entries: int = SAMPLE_BLOCK_ENTRIES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_locations` with the power spectrum given by rows, ``power_rows(start, stop)`` returning
    ``power[start:stop]`` ``(stop - start, d_in)``, so that no ``(d_out, d_in)`` tensor is held: one block of
    about ``block_entries`` entries and ``O(n)`` candidates at a time. Returns int64 ``(rows, cols)`` on the CPU.

    The keys are those of :func:`sample_locations`, ``log(U_i) / (p_i / max p)^γ`` with the uniform draws in the
    same order from ``generator``: each block keeps its ``n`` best locations (by keys taken against the largest
    power seen so far, which orders a block's locations as the final maximum does), and the kept ones are keyed
    again, from their stored power and draw, against the final maximum. So the locations are those of
    :func:`sample_locations` on the whole spectrum, to the rounding of the keys (a block's key may differ from the
    whole tensor's in its last bit), except among locations of zero power (key ``-inf``, taken only when fewer
    than ``n`` have positive power), which may be taken in another order.

    Once ``n`` locations are kept (of each group), a block's location can only join them if its key beats the
    ``n``-th kept one, ``τ < 0``; a key is at most ``log(U_i)`` (``p_i <= max p``), so the draws below ``exp(τ)``
    (less a little slack for rounding) are dropped before their log and key are taken. With a
    :class:`FactoredPower`, a key beats ``τ`` only if ``E_i = -log U_i <= |τ| (p_i / max p)^γ``, at most
    ``|τ| (row[u]·col[v] / max)^γ``, and ``E_i >= 1 - U_i``: the power itself is computed (dot products of the
    factors' rows) only at the draws that pass this bound, a block's whole product only while many do (the first
    block), so the draws, not the products, are most of the time. Its keys are taken against a fixed scale (the
    bound of the largest power, ``max row · max col``) instead of the largest power itself: the same order, to the
    rounding of the keys (the plans of a 7B-shaped calibration were bit-for-bit those of the rows' sampling; on
    random factors, 2 layers of 7 listed their locations in another order)."""
    check_n_frequency(n, d_out, d_in)
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if isinstance(power_rows, FactoredPower) and power_rows.shape == (d_out, d_in):
        canonical = _canonical_count(d_out, d_in)
        if not half or n <= canonical:
            return _sample_factored(power_rows, n, gamma, generator, half, block_entries)
    tiny = torch.finfo(torch.float32).tiny
    rows_per_block = max(1, block_entries // d_in)
    top = torch.zeros((), dtype=torch.float32)
    # per group (all; or canonical, mirrored): the kept candidates' power, log-draw and flat index
    groups = 2 if half else 1
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = [
        (torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long)) for _ in range(groups)
    ]

    def keyed(power: torch.Tensor, logs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return logs * (power / scale.clamp_min(tiny)).pow_(-gamma)

    def best(
        power: torch.Tensor, logs: torch.Tensor, index: torch.Tensor, take: int, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen = torch.topk(keyed(power, logs, scale), min(take, power.numel()), sorted=True).indices
        return power[chosen], logs[chosen], index[chosen]

    for start in range(0, d_out, rows_per_block):
        stop = min(start + rows_per_block, d_out)
        power = power_rows(start, stop).detach().to("cpu", torch.float32).flatten()
        if power.numel() != (stop - start) * d_in:
            raise ValueError(
                f"power_rows({start}, {stop}) gave {power.numel()} entries, not {(stop - start) * d_in}"
            )
        low, high = torch.aminmax(power)
        if not (bool(torch.isfinite(high)) and float(low) >= 0):  # a NaN makes the maximum NaN
            raise ValueError("power must be finite and non-negative")
        uniform = torch.rand(power.shape, generator=generator)
        top = torch.maximum(top, high)
        # a key is log(U) times (p / top)^-γ >= 1, so at most log(U): draws below exp(every group's n-th kept
        # key) cannot join
        thresholds = [keyed(k[0], k[1], top).min() if k[0].numel() >= n else None for k in kept]
        loosest = None if None in thresholds else min(float(t) for t in thresholds)  # type: ignore[arg-type]
        if loosest is None or loosest == float("-inf"):
            index = torch.arange(start * d_in, stop * d_in)
            logs = uniform.log_()
        else:
            index = torch.nonzero(uniform >= _draw_bar(loosest)).flatten()
            logs = uniform[index].log_()
            power = power[index]
            index += start * d_in
        masks: list[torch.Tensor | None] = [None]
        if half:
            u, v = index // d_in, index % d_in
            mirrored = ((-u) % d_out) * d_in + (-v) % d_in < index
            masks = [~mirrored, mirrored]
        for g, mask in enumerate(masks):
            parts = (power, logs, index) if mask is None else (power[mask], logs[mask], index[mask])
            block_best = best(*parts, n, top)
            power_g, logs_g, index_g = (torch.cat([a, b]) for a, b in zip(kept[g], block_best))
            kept[g] = best(power_g, logs_g, index_g, n, top)
    canonical = _canonical_count(d_out, d_in) if half else d_out * d_in
    counts = [canonical, d_out * d_in - canonical]
    picked, left = [], n
    for g in range(groups):
        take = min(left, counts[g])
        picked.append(best(kept[g][0], kept[g][1], kept[g][2], take, top)[2])
        left -= take
    flat = torch.cat(picked)
    return flat // d_in, flat % d_in


DRAW_SLACK = 1e-3  # relative slack on a key threshold when drawing the candidates (rounding of log and keys)


def _draw_bar(threshold: float) -> float:
    """The least uniform draw ``U`` whose ``log(U)`` may reach the (negative) key ``threshold``, with slack."""
    return math.exp(threshold * (1.0 + DRAW_SLACK)) - 1e-6


def _canonical_count(d_out: int, d_in: int) -> int:
    """How many locations are their mirror pair's first (:func:`mirror_of`): half, plus the self-mirrored ones."""
    self_mirrored = (1 + (d_out % 2 == 0)) * (1 + (d_in % 2 == 0))
    return (d_out * d_in + self_mirrored) // 2


def _sample_factored(
    power: FactoredPower,
    n: int,
    gamma: float,
    generator: torch.Generator | None,
    half: bool,
    block_entries: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_locations_in_blocks` of a :class:`FactoredPower`: the power computed only where a draw may win
    (see there). Falls back on the rows of the product for a zero matrix."""
    d_out, d_in = power.shape
    row, col = power.bounds()
    if not (bool(torch.isfinite(row).all()) and bool(torch.isfinite(col).all())):
        raise ValueError("power must be finite and non-negative")
    row_max, col_max = float(row.max()), float(col.max())
    if row_max == 0.0 or col_max == 0.0:  # all zero power: the draws' order, as the rows give it
        return sample_locations_in_blocks(
            lambda a, b: power(a, b), d_out, d_in, n, gamma, generator, half, block_entries
        )
    scale = torch.tensor(row_max * col_max, dtype=torch.float32)
    # power[u, v] / scale <= row_share[u] * col_share[v], each at most 1; to the γ
    row_share = (row / row_max).pow(gamma)
    col_share = (col / col_max).pow(gamma)
    rows_per_block = max(1, block_entries // d_in)
    keys = torch.empty(0)
    index = torch.empty(0, dtype=torch.long)
    for start in range(0, d_out, rows_per_block):
        stop = min(start + rows_per_block, d_out)
        uniform = torch.rand((stop - start, d_in), generator=generator)
        # the n-th kept key τ < 0: a location beats it only if E = -log U <= |τ| (p / scale)^γ, and E >= 1 - U
        threshold = float(keys.min()) if keys.numel() >= n else float("-inf")
        if threshold == float("-inf"):
            i, j = (
                t.flatten()
                for t in torch.meshgrid(torch.arange(stop - start), torch.arange(d_in), indexing="ij")
            )
            p = power(start, stop).flatten()
        else:
            slack = -threshold * (1.0 + DRAW_SLACK)
            bars = (1.0 - slack * row_share[start:stop]).sub_(1e-6).to(torch.float32)
            i, j = torch.nonzero(uniform >= bars[:, None], as_tuple=True)
            tight = (1.0 - slack * row_share[start + i] * col_share[j]).sub_(1e-6).to(torch.float32)
            sure = uniform[i, j] >= tight
            i, j = i[sure], j[sure]
            if i.numel() > (stop - start) * d_in // 16:  # many: one product of the block is the cheaper
                p = power(start, stop)[i, j]
            else:
                p = power.at(start + i, j)
        flat = (start + i) * d_in + j
        logs = uniform[i, j].log_()
        block_keys = logs * (p.to(torch.float32) / scale).pow_(-gamma)
        if half:  # one location of each mirror pair: n <= their count here
            u, v = flat // d_in, flat % d_in
            canonical = ((-u) % d_out) * d_in + (-v) % d_in >= flat
            flat, block_keys = flat[canonical], block_keys[canonical]
        keys, index = torch.cat([keys, block_keys]), torch.cat([index, flat])
        chosen = torch.topk(keys, min(n, keys.numel()), sorted=True).indices
        keys, index = keys[chosen], index[chosen]
    return index // d_in, index % d_in


def check_n_frequency(n: int, d_out: int, d_in: int) -> None:
    """Raise a clear error unless ``0 < n <= d_out * d_in``."""
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n_frequency must be a positive integer, got {n!r}")
    if n > d_out * d_in:
        raise ValueError(
            f"n_frequency={n} is larger than the {d_out}x{d_in} spectrum ({d_out * d_in} entries); "
            "lower n_frequency or exclude this layer from target_modules"
        )


def smallest_int_dtype(max_value: int) -> torch.dtype:
    """The smallest integer dtype safetensors stores that holds ``0..max_value``."""
    if max_value <= torch.iinfo(torch.uint8).max:
        return torch.uint8
    if max_value <= torch.iinfo(torch.int16).max:
        return torch.int16
    if max_value <= torch.iinfo(torch.int32).max:
        return torch.int32
    return torch.int64
