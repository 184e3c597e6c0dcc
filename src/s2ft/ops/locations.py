"""Spectrum locations: FourierFT's seeded uniform draw and S2FT's power-spectrum sampling.

Pure functions on tensors. A location is a pair ``(rows[k], cols[k])`` of the ``d_out x d_in`` 2-D spectrum;
the coefficient ``c[k]`` sits there and ``ΔW̄ = scaling * Re(ifft2(F))`` (see :mod:`s2ft.ops.apply`).
"""

from __future__ import annotations

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
    than ``n`` have positive power), which may be taken in another order."""
    check_n_frequency(n, d_out, d_in)
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    tiny = torch.finfo(torch.float32).tiny
    rows_per_block = max(1, block_entries // d_in)
    top = torch.zeros((), dtype=torch.float32)
    # per group (all; or canonical, mirrored): the kept candidates' power, log-draw and flat index
    groups = 2 if half else 1
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = [
        (torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long)) for _ in range(groups)
    ]
    counts = [0] * groups

    def best(
        power: torch.Tensor, logs: torch.Tensor, index: torch.Tensor, take: int, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys = logs * (power / scale.clamp_min(tiny)).pow_(-gamma)
        chosen = torch.topk(keys, min(take, keys.numel()), sorted=True).indices
        return power[chosen], logs[chosen], index[chosen]

    for start in range(0, d_out, rows_per_block):
        stop = min(start + rows_per_block, d_out)
        power = power_rows(start, stop).detach().to("cpu", torch.float32).flatten()
        if power.numel() != (stop - start) * d_in:
            raise ValueError(
                f"power_rows({start}, {stop}) gave {power.numel()} entries, not {(stop - start) * d_in}"
            )
        if not torch.isfinite(power).all() or (power < 0).any():
            raise ValueError("power must be finite and non-negative")
        logs = torch.rand(power.shape, generator=generator).log_()
        top = torch.maximum(top, power.max())
        index = torch.arange(start * d_in, stop * d_in)
        masks: list[torch.Tensor | None] = [None]
        if half:
            u, v = index // d_in, index % d_in
            mirrored = ((-u) % d_out) * d_in + (-v) % d_in < index
            masks = [~mirrored, mirrored]
        for g, mask in enumerate(masks):
            parts = (power, logs, index) if mask is None else (power[mask], logs[mask], index[mask])
            counts[g] += parts[0].numel()
            block_best = best(parts[0], parts[1], parts[2], n, top)
            power_g, logs_g, index_g = (torch.cat([a, b]) for a, b in zip(kept[g], block_best))
            kept[g] = best(power_g, logs_g, index_g, n, top)
    picked, left = [], n
    for g in range(groups):
        take = min(left, counts[g])
        picked.append(best(kept[g][0], kept[g][1], kept[g][2], take, top)[2])
        left -= take
    flat = torch.cat(picked)
    return flat // d_in, flat % d_in


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
