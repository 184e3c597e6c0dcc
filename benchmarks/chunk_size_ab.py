"""The compiled FFT branch with the FFT path's chunk bounds (``s2ft.ops.apply._CHUNK_ELEMENTS``) switched between
calls, beside compiled LoRA r = 8, round-robin in one process.

One adapter branch (``bench.Branch``: S2FT's FFT path with random permutations, n = 1,000; LoRA r = 8), forward and
backward, under ``torch.compile`` (inductor; the operator reads the bounds when it runs, so one compiled module
serves every variant). Reports the median thread CPU time (``time.thread_time``: what other processes on a shared
machine take from this one is left out, their effect on the caches is not) and the median wall time, ms.

    OMP_NUM_THREADS=1 python benchmarks/chunk_size_ab.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

import bench  # noqa: E402
from s2ft.ops import apply  # noqa: E402

VARIANTS = {"2^18-2^19": (1 << 18, 1 << 19), "2^16-2^17": (1 << 16, 1 << 17), "2^17": (1 << 17, 1 << 17)}


def timed(calls: dict, repeats: int) -> dict:
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    wall: dict[str, list[float]] = {k: [] for k in calls}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            start_cpu, start_wall = time.thread_time(), time.perf_counter()
            call()
            cpu[name].append((time.thread_time() - start_cpu) * 1e3)
            wall[name].append((time.perf_counter() - start_wall) * 1e3)
    return {k: {"cpu_ms": statistics.median(cpu[k]), "wall_ms": statistics.median(wall[k])} for k in calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["1024x512", "1024x4096", "2048x512", "2048x4096", "4096x512", "4096x4096"],
        help="WIDTHxTOKENS",
    )
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 64
    default = apply._CHUNK_ELEMENTS
    for shape in args.shapes:
        width, tokens = map(int, shape.split("x"))
        torch.manual_seed(0)
        fft = torch.compile(bench.Branch(width, args.n, "fft"))
        lora = torch.compile(bench.Branch(width, args.n, None))
        x = torch.randn(tokens, width, requires_grad=True)
        grad = torch.randn(tokens, width)

        def variant(bounds, fft=fft, x=x, grad=grad):
            def call():
                apply._CHUNK_ELEMENTS = bounds
                try:
                    bench.train_step(fft, x, grad)
                finally:
                    apply._CHUNK_ELEMENTS = default

            return call

        calls = {"lora": lambda lora=lora, x=x, grad=grad: bench.train_step(lora, x, grad)}
        calls |= {name: variant(bounds) for name, bounds in VARIANTS.items()}
        repeats = 11 if tokens < 4096 else (5 if width < 4096 else 3)
        result = timed(calls, repeats)
        ratio = {k: round(v["cpu_ms"] / result["lora"]["cpu_ms"], 2) for k, v in result.items()}
        print(
            json.dumps({"width": width, "tokens": tokens, "ms": result, "cpu_over_lora": ratio}), flush=True
        )


if __name__ == "__main__":
    main()
