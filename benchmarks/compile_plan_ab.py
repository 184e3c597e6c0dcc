"""The compiled FFT branch with its plan rebuilt on every call (before ``10a400f``) and kept by content (after),
beside compiled LoRA r = 8, round-robin in one process.

One adapter branch (``bench.Branch``: S2FT's FFT path with random permutations, n = 1,000; LoRA r = 8), forward and
backward, under ``torch.compile`` (inductor). *before* swaps the operator's plan lookup for a plain rebuild.

    OMP_NUM_THREADS=1 python benchmarks/compile_plan_ab.py --repeats 5   # -> results/cpu/compile_plan_ab.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

import bench  # noqa: E402
from s2ft.io import atomic_write_text  # noqa: E402
from s2ft.ops import apply  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "cpu"))
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 256
    by_content = apply._plan_by_content

    def rebuild(rows, cols, d_out, d_in, perm_rows, perm_cols):
        return apply._Plan.build(rows, cols, d_out, d_in, perm_rows, perm_cols)

    rows = []
    for width in args.widths:
        lora = torch.compile(bench.Branch(width, args.n, None))
        fft = torch.compile(bench.Branch(width, args.n, "fft"))
        for tokens in args.tokens:
            x = torch.randn(tokens, width, requires_grad=True)
            grad = torch.randn(tokens, width)

            def run(module, lookup, x=x, grad=grad):
                apply._plan_by_content = lookup
                bench.train_step(module, x, grad)

            calls = {
                "lora": lambda lora=lora: run(lora, by_content),
                "before": lambda fft=fft: run(fft, rebuild),
                "after": lambda fft=fft: run(fft, by_content),
            }
            ms = bench.median_ms(calls, args.repeats, float("inf"), torch.device("cpu"))
            apply._plan_by_content = by_content
            rows.append({"width": width, "tokens": tokens, "ms": ms})
            print(json.dumps(rows[-1]), flush=True)
    write_ab_tables(
        args,
        rows,
        "compile_plan_ab",
        "# The compiled FFT branch: plan rebuilt per call (before) and kept by content (after)",
    )


def write_ab_tables(args, rows: list[dict], name: str, title: str, note: str = "") -> None:
    """``<name>.md`` and ``<name>.json`` in ``args.output``: an A/B table of compiled branch times, ms per step
    (``row["ms"]``: ``lora``, ``before``, ``after``), with the command, threads, torch and date."""
    command = f"python benchmarks/{name}.py " + " ".join(sys.argv[1:])
    meta = {"command": command, "threads": torch.get_num_threads(), "torch": torch.__version__}
    meta["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        title,
        "",
        f"`{command}`, {meta['threads']} thread(s), torch {meta['torch']}, {meta['date']}. One branch forward + "
        f"backward under torch.compile (inductor), n = {args.n}, medians of {args.repeats} round-robin steps, ms."
        + note,
        "",
        "| width | tokens | LoRA r = 8 compiled | S2FT fft before | after | after / before | before / LoRA | "
        "after / LoRA |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['width']} | {r['tokens']} | {ms['lora']:.1f} | {ms['before']:.1f} | {ms['after']:.1f} | "
            f"{ms['after'] / ms['before']:.2f} | {ms['before'] / ms['lora']:.2f} | {ms['after'] / ms['lora']:.2f} |"
        )
    os.makedirs(args.output, exist_ok=True)
    atomic_write_text(os.path.join(args.output, f"{name}.md"), "\n".join(lines) + "\n")
    atomic_write_text(
        os.path.join(args.output, f"{name}.json"), json.dumps({**meta, "rows": rows}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
