"""Time S2FT's per-matrix planning (row and column search, power spectrum, location sampling) on a random prior.

Usage: python benchmarks/calibration_speed.py [--size 4096] [--n 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from s2ft.ops.locations import power_spectrum, sample_locations
from s2ft.ops.permutation import search_order
from s2ft.tuner.planner import plan_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    prior = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(
        f"prior {args.size}x{args.size}, n={args.n}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    steps = {
        "row search (greedy)": lambda: search_order(prior, "greedy", torch.Generator().manual_seed(0)),
        "power spectrum": lambda: power_spectrum(prior),
        "location sampling": lambda: sample_locations(
            prior.abs(), args.n, 1.5, torch.Generator().manual_seed(0)
        ),
        "whole plan (rows + columns + spectrum + sampling)": lambda: plan_layer(
            prior, args.n, 1.5, torch.Generator().manual_seed(0)
        ),
    }
    for name, step in steps.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        print(
            f"{name:52s} median {statistics.median(times):7.2f} s  (min {min(times):.2f}, max {max(times):.2f})"
        )


if __name__ == "__main__":
    main()
