"""The compiled FFT branch with the FFT path's chunk loop of an earlier commit (before) and of this tree (after),
beside compiled LoRA r = 8, round-robin in one process.

One adapter branch (``bench.Branch``: S2FT's FFT path with random permutations, n = 1,000; LoRA r = 8), forward and
backward, under ``torch.compile`` (inductor). The compiled operator calls ``s2ft.ops.apply._fft_forward`` and
``_fft_backward`` by name; *before* swaps in those two functions (and the helpers they call) as ``--before``'s
``src/s2ft/ops/apply.py`` defines them, read with ``git show``; the plans are this tree's (same interface), and
so are the chunk bounds (``_Plan.chunks``): this compares what happens inside a chunk loop, not the chunking.
A first call of each checks that both give the same output and gradients.

    OMP_NUM_THREADS=1 python benchmarks/compile_layer_ab.py --before 924b40e --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(__file__))

import bench  # noqa: E402
from compile_plan_ab import write_ab_tables  # noqa: E402
from s2ft.ops import apply  # noqa: E402


def chunk_loop(commit: str) -> dict:
    """The module namespace of ``commit``'s ``apply.py`` up to its operator registration (which would clash)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(
        ["git", "-C", root, "show", f"{commit}:src/s2ft/ops/apply.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    source = source[: source.index("OPERATOR_REVISION = ")]
    module = types.ModuleType(f"s2ft_apply_{commit}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{commit}:apply.py", "exec"), module.__dict__)  # noqa: S102 - our own file at a commit
    return module.__dict__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="commit whose chunk loop is 'before'")
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "cpu"))
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 256
    old = chunk_loop(args.before)
    functions = {
        "before": (old["_fft_forward"], old["_fft_backward"]),
        "after": (apply._fft_forward, apply._fft_backward),
    }
    rows = []
    for width in args.widths:
        lora = torch.compile(bench.Branch(width, args.n, None))
        fft = torch.compile(bench.Branch(width, args.n, "fft"))
        for tokens in args.tokens:
            x = torch.randn(tokens, width, requires_grad=True)
            grad = torch.randn(tokens, width)

            def use(name):
                apply._fft_forward, apply._fft_backward = functions[name]

            results = {}
            for name in functions:
                use(name)
                y = fft(x)
                results[name] = (y, *torch.autograd.grad(y, (x, fft.coeffs), grad))
            for ours, reference in zip(results["after"], results["before"]):
                torch.testing.assert_close(ours, reference, rtol=0, atol=0)

            def run(module, name, x=x, grad=grad):
                use(name)
                bench.train_step(module, x, grad)

            calls = {
                "lora": lambda lora=lora: run(lora, "after"),
                "before": lambda fft=fft: run(fft, "before"),
                "after": lambda fft=fft: run(fft, "after"),
            }
            ms = bench.median_ms(calls, args.repeats, float("inf"), torch.device("cpu"))
            use("after")
            rows.append({"width": width, "tokens": tokens, "ms": ms})
            print(json.dumps(rows[-1]), flush=True)
    write_ab_tables(
        args,
        rows,
        "compile_layer_ab",
        f"# The compiled FFT branch: chunk loop of {args.before} (before) and of this tree (after)",
        " Outputs and gradients of before and after checked equal (bitwise) first.",
    )


if __name__ == "__main__":
    main()
