"""One adapted layer serving a mixed-adapter batch: ``s2ft.ops.mixed.MixedBank`` against the alternatives.

For each layer shape (MiniLM's ``query``/``value``, 384x384; SmolLM2-135M's ``q_proj`` 576x576 and ``k_proj``/
``v_proj`` 192x576), 2,048 tokens (64 sequences of 32), ``L`` loaded adapters (1, 8, 64, 1,000; random S2FT plans
with permutations, n = 1000) and ``D`` distinct adapters in the batch (1, 8, 64; sequence i gets adapter
``(i mod D) * L / D``), milliseconds per call of:

- ``base``: the base layer's matmul ``x @ W.T`` over the whole batch (what the merged model pays);
- ``mixed``: ``MixedBank.apply`` (one tiled FFT pipeline for all tokens, no dense ``ΔW``), building the
  batch's sparse maps on each call (the default);
- ``maps cached``: the same with every adapter's map kept between calls (``cache=``, what
  ``model.set_map_cache`` turns on);
- ``plan reused``: the same with the whole plan of the batch kept (``memo=``, what ``generate`` does for its
  new tokens);
- ``grouped fft``: ``spectral_apply(path="fft")`` once per distinct adapter on its tokens;
- ``dense on the fly``: each distinct adapter's dense ``ΔW`` built (``delta_weight``) and applied to its tokens;
- ``cached dense``: grouped matmuls with every adapter's dense ``ΔW`` kept in memory (today's serving path;
  only the batch's adapters are built here, the memory column says what L of them would hold).

Each adapter path returns ``ΔW x`` only; the base matmul comes on top in a served layer. The FourierFT rows use
1,000 adapters of one seed and ``n``, which share their locations. Memory per adapter: the adapter's own tensors
(float32 coefficients, locations and permutations in the int16 adapters keep; the bank references them and
holds nothing of its own), and a float32 dense ``ΔW``.

    python benchmarks/mixed_apply.py                 # ~2 min at one thread -> results/cpu/mixed_apply.md
    python benchmarks/mixed_apply.py --device cuda   # -> results/cuda/mixed_apply.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from s2ft.io import atomic_write_text
from s2ft.ops.apply import delta_weight, spectral_apply
from s2ft.ops.locations import fourierft_locations, index_dtype
from s2ft.ops.mixed import MixedBank, Spectral, _Maps

SHAPES = [(384, 384, "MiniLM query/value"), (576, 576, "SmolLM2 q_proj"), (192, 576, "SmolLM2 k_proj/v_proj")]
LOADED = [1, 8, 64, 1000]
DISTINCT = [1, 8, 64]
TOKENS, SEQUENCES, N = 2048, 64, 1000


def timed(calls: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Fastest milliseconds of each call over ``repeats`` rounds after one warm-up. The calls take turns within a
    round, so a busy spell on a shared machine hits all of them, and the minimum discards the rest of it."""
    times = {name: [] for name in calls}
    for round_ in range(repeats + 1):
        for name, call in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(t) for name, t in times.items()}


def random_adapters(d_out: int, d_in: int, count: int, method: str, generator) -> list[Spectral]:
    """``count`` adapters with random coefficients: S2FT (own locations, permutations) or FourierFT (seed 777)."""
    rows_dtype, cols_dtype = index_dtype(d_out), index_dtype(d_in)
    if method == "fourierft":
        rows, cols = fourierft_locations(d_out, d_in, N, 777)
        rows, cols = rows.to(rows_dtype), cols.to(cols_dtype)
        return [Spectral(torch.randn(N, generator=generator), rows, cols, 150.0) for _ in range(count)]
    adapters = []
    for _ in range(count):
        flat = torch.randperm(d_out * d_in, generator=generator)[:N]
        rows, cols = (flat // d_in).to(rows_dtype), (flat % d_in).to(cols_dtype)
        perms = (
            torch.randperm(d_out, generator=generator).to(rows_dtype),
            torch.randperm(d_in, generator=generator).to(cols_dtype),
        )
        adapters.append(Spectral(torch.randn(N, generator=generator), rows, cols, 150.0, *perms))
    return adapters


def own_bytes(adapters: list[Spectral]) -> int:
    """Bytes of the adapters' tensors, each tensor once (FourierFT's adapters here share their locations)."""
    tensors = {id(t): t for a in adapters for t in a if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def on(adapter: Spectral, device: torch.device) -> Spectral:
    return Spectral(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in adapter))


def grouped(x: torch.Tensor, which: torch.Tensor, d_out: int, branch) -> torch.Tensor:
    """``branch(a, x_a)`` on each distinct adapter's tokens, added into a zero ``(T, d_out)`` result."""
    out = x.new_zeros(x.shape[0], d_out)
    for a in which.unique().tolist():
        index = (which == a).nonzero().squeeze(1)
        out.index_add_(0, index, branch(a, x.index_select(0, index)))
    return out


def measure_shape(d_out: int, d_in: int, method: str, loaded: list[int], device, repeats: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    adapters = [on(a, device) for a in random_adapters(d_out, d_in, max(loaded), method, generator)]
    x = torch.randn(TOKENS, d_in, generator=generator).to(device)
    weight = torch.randn(d_out, d_in, generator=generator).to(device)
    rows = []
    for count in loaded:
        start = time.perf_counter()
        bank = MixedBank.pack(adapters[:count], d_out, d_in)
        pack_ms = 1e3 * (time.perf_counter() - start) / count
        own = own_bytes(adapters[:count]) / count
        for distinct in (d for d in DISTINCT if d <= count):
            chosen = [(i % distinct) * (count // distinct) for i in range(SEQUENCES)]
            which = torch.tensor(chosen, device=device).repeat_interleave(TOKENS // SEQUENCES)
            used = {a: on(adapters[a], device) for a in set(chosen)}
            with torch.no_grad():
                methods = calls(bank, x, which, used)
                row = timed({"base": lambda: x @ weight.T, **methods}, repeats, device)
            row.update(
                shape=f"{d_out}x{d_in}", method=method, loaded=count, distinct=distinct,
                pack_ms=pack_ms, own_bytes=own, dense_bytes=4 * d_out * d_in,
                map_bytes=_Maps.build(adapters[:1], d_out, d_in, device).split()[0].nbytes(),
            )  # fmt: skip
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    return rows


class Store:
    """Every adapter's map, kept without limit (a ``s2ft.ops.mixed.MapStore``)."""

    def __init__(self) -> None:
        self.maps = {}

    def get(self, adapter):
        return self.maps.get(id(adapter))

    def put(self, adapter, maps) -> None:
        self.maps[id(adapter)] = maps


def calls(bank: MixedBank, x: torch.Tensor, which: torch.Tensor, used: dict) -> dict:
    """The ways to compute ``ΔW_{which[t]} x[t]``; ``used``: the batch's adapters by index. The first timing
    round is a warm-up: it fills the store and the memo."""
    d_out, d_in = bank.d_out, bank.d_in
    cached = {a: delta_weight(*spectrum(adapter, d_out, d_in)) for a, adapter in used.items()}

    def fft(a, xa):
        return spectral_apply(xa, *spectrum(used[a], d_out, d_in), path="fft")

    def on_the_fly(a, xa):
        return xa @ delta_weight(*spectrum(used[a], d_out, d_in)).T

    store, memo = Store(), {}
    return {
        "mixed": lambda: bank.apply(x, which),
        "maps cached": lambda: bank.apply(x, which, cache=store),
        "plan reused": lambda: bank.apply(x, which, memo),
        "grouped fft": lambda: grouped(x, which, d_out, fft),
        "dense on the fly": lambda: grouped(x, which, d_out, on_the_fly),
        "cached dense": lambda: grouped(x, which, d_out, lambda a, xa: xa @ cached[a].T),
    }


def spectrum(adapter: Spectral, d_out: int, d_in: int) -> tuple:
    """The arguments of ``delta_weight`` and ``spectral_apply`` after ``x``."""
    a = adapter
    return a.coeffs, a.rows, a.cols, d_out, d_in, a.scaling, a.perm_rows, a.perm_cols


def table(rows: list[dict], device: str) -> str:
    lines = [
        f"# One layer serving a mixed-adapter batch ({device}, {torch.get_num_threads()} thread(s), "
        f"{TOKENS} tokens in {SEQUENCES} sequences, n = {N})",
        "",
        "Generated by `python benchmarks/mixed_apply.py`. Milliseconds per call of `ΔW x` alone; in brackets, "
        "against the base layer's own matmul `x @ W.T` over the same tokens (a served layer pays base + branch). "
        "Memory in KiB per loaded adapter: its own tensors (the `MixedBank` holds nothing of its own), its map "
        "as `maps cached` keeps it, and the float32 dense `ΔW` that `cached dense` keeps.",
        "",
        "| shape | method | loaded | distinct | base ms | mixed | maps cached | plan reused | grouped fft "
        "| dense on the fly | cached dense "
        "| pack ms/adapter | own KiB | map KiB | dense ΔW KiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [
            f"{r[k]:.1f} ({r[k] / r['base']:.2f}x)"
            for k in (
                "mixed",
                "maps cached",
                "plan reused",
                "grouped fft",
                "dense on the fly",
                "cached dense",
            )
        ]
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['loaded']} | {r['distinct']} | {r['base']:.1f} | "
            + " | ".join(cells)
            + f" | {r['pack_ms']:.2f} | {r['own_bytes'] / 1024:.1f} | {r['map_bytes'] / 1024:.1f} | "
            f"{r['dense_bytes'] / 1024:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--output", default=None, help="folder (default benchmarks/results/<device>)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for d_out, d_in, _ in SHAPES:
        rows += measure_shape(d_out, d_in, "s2ft", LOADED, device, args.repeats)
        rows += measure_shape(d_out, d_in, "fourierft", [1000], device, args.repeats)
    folder = args.output or os.path.join(os.path.dirname(__file__), "results", device.type)
    os.makedirs(folder, exist_ok=True)
    atomic_write_text(os.path.join(folder, "mixed_apply.md"), table(rows, device.type))
    print(table(rows, device.type))


if __name__ == "__main__":
    main()
