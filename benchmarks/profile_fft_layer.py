"""Where one S2FT FFT-path branch step (forward + backward) spends its time, eager and compiled.

The branch is ``benchmarks/bench.py``'s (``ΔW x`` with S2FT's random permutations, FourierFT's locations, float32,
``x`` requiring grad, a random output gradient). For each width and token count, eager and under
``torch.compile`` (inductor): the median wall time of ``--repeats`` steps, then one step under ``torch.profiler``
whose operators' self times are summed by category (median over ``--repeats`` profiled steps) (rfft, irfft, the sparse matmuls, ``sampled_addmm``,
gathers, casts and copies, the per-chunk bookkeeping, inductor's kernels). *Unattributed* is the wall time no
operator owns (Python in the operator, autograd, the compiled wrapper, the profiler's own cost), the median
wall time without the profiler minus the operators' total with it, so it can come out negative on a noisy
machine. Writes ``profile_fft_layer.{json,md}`` to ``--output``.

Usage: OMP_NUM_THREADS=1 python benchmarks/profile_fft_layer.py [--widths 1024 2048] [--tokens 512 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from bench import Branch, environment, train_step  # noqa: E402
from s2ft.io import atomic_write_text  # noqa: E402

# Operator name (or its prefix) -> category; the first match wins. Wrappers whose self time is their Python
# (the custom operator, autograd nodes, the compiled region) count under "python/dispatch".
CATEGORIES = [
    ("rfft", ("aten::_fft_r2c",)),
    ("irfft", ("aten::_fft_c2r",)),
    ("sampled_addmm", ("aten::sparse_sampled_addmm",)),
    ("matmul (sparse in S2FT, dense in LoRA)", ("aten::addmm", "aten::mm", "aten::_sparse")),
    ("gather/scatter", ("aten::gather", "aten::index", "aten::take", "aten::scatter")),
    ("cast/copy", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone")),
    (
        "chunks/views/alloc",
        (
            "aten::slice",
            "aten::empty",
            "aten::view",
            "aten::reshape",
            "aten::as_strided",
            "aten::t",
            "aten::transpose",
            "aten::new_",
            "aten::resize",
            "aten::select",
            "aten::expand",
            "aten::_reshape",
            "aten::unsafe",
            "aten::detach",
            "aten::alias",
            "aten::permute",
            "aten::zeros",
            "aten::zero_",
            "aten::fill_",
            "aten::values",
            "aten::_values",
            "aten::lift",
        ),
    ),
    ("inductor kernels", ("graph_", "cpp_fused", "kernel_")),
    ("other aten (elementwise; O(n) plan work)", ("aten::",)),
]


def category(name: str) -> str:
    for label, prefixes in CATEGORIES:
        if name.startswith(prefixes):
            return label
    return "python/dispatch"


def timed(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def profile_one(branch, x, grad, repeats: int) -> dict:
    """Median wall time of ``repeats`` steps; then ``repeats`` steps each under its own profiler, and per
    category (and per operator) the median over those steps, which keeps one preempted step from counting."""
    for _ in range(3):
        train_step(branch, x, grad)
    wall = timed(lambda: train_step(branch, x, grad), repeats)
    cats: dict[str, list[float]] = {}
    ops: dict[str, list] = {}
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(branch, x, grad)
        step: dict[str, float] = {}
        for e in prof.key_averages():
            ms = e.self_cpu_time_total / 1e3
            step[category(e.key)] = step.get(category(e.key), 0.0) + ms
            ops.setdefault(e.key, [e.count, []])[1].append(ms)
        for label in set(step) | set(cats):
            cats.setdefault(label, []).append(step.get(label, 0.0))
    by_cat = {label: statistics.median(values) for label, values in cats.items()}
    total = sum(by_cat.values())
    by_cat["unattributed"] = wall - total
    top = sorted(((k, [n, statistics.median(v)]) for k, (n, v) in ops.items()), key=lambda kv: -kv[1][1])[:15]
    return {"wall_ms": wall, "profiled_ms": total, "categories": by_cat, "top": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 64
    rows = []
    for width in args.widths:
        branches = {"lora_r8": Branch(width, args.n, None), "s2ft_fft": Branch(width, args.n, "fft")}
        branches.update({f"{k}/compiled": torch.compile(m) for k, m in list(branches.items())})
        for tokens in args.tokens:
            x = torch.randn(tokens, width, requires_grad=True)
            grad = torch.randn(tokens, width)
            for name, branch in branches.items():
                result = profile_one(branch, x, grad, args.repeats)
                rows.append({"width": width, "tokens": tokens, "variant": name} | result)
                cats = ", ".join(f"{k} {v:.1f}" for k, v in result["categories"].items())
                print(f"{width} {tokens} {name}: {result['wall_ms']:.1f} ms ({cats})", flush=True)
    report = {"command": " ".join(sys.argv), "environment": environment(torch.device("cpu")), "rows": rows}
    os.makedirs(args.output, exist_ok=True)
    atomic_write_text(os.path.join(args.output, "profile_fft_layer.json"), json.dumps(report, indent=1))
    atomic_write_text(os.path.join(args.output, "profile_fft_layer.md"), markdown(report))


def markdown(report: dict) -> str:
    labels = [c for c, _ in CATEGORIES] + ["python/dispatch", "unattributed"]
    lines = [
        "# Where the S2FT FFT branch's step goes, eager and compiled",
        "",
        f"`{report['command']}`, {report['environment']}. One step (forward + backward) under `torch.profiler`, "
        "operators' self time summed by category, ms; *wall* is the median step without the profiler.",
        "",
        "| width | tokens | variant | wall | " + " | ".join(labels) + " |",
        "|---|---|---|---:|" + "---:|" * len(labels),
    ]
    for r in report["rows"]:
        cells = " | ".join(f"{r['categories'].get(c, 0.0):.2f}" for c in labels)
        lines.append(f"| {r['width']} | {r['tokens']} | {r['variant']} | {r['wall_ms']:.2f} | {cells} |")
    lines += ["", "Top operators (self ms, calls) per row:", ""]
    for r in report["rows"]:
        top = "; ".join(f"{k} {ms:.2f} ({n})" for k, (n, ms) in r["top"][:10])
        lines.append(f"- {r['width']} x {r['tokens']} {r['variant']}: {top}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
