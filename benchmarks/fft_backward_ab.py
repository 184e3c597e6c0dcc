"""Two rearrangements of the FFT path's backward, against the FFT path as it is and LoRA r = 8, round-robin in one
process (eager: compiled, the path is one operator running this same code).

- ``main``: :func:`s2ft.ops.apply.spectral_apply` on ``path="fft"``.
- ``freq-major``: the same forward; in the backward the output gradient's half spectrum is transposed once to
  (frequency, token) and shared by ``sampled_addmm`` (which otherwise copies it so itself) and by the adjoint
  mix as CSR times that transposed spectrum (instead of dense times CSC, which transposes its operand and its
  result internally); the input's spectrum is recomputed as on ``main``.
- ``kept-spectrum``: as ``freq-major``, but the forward keeps each chunk's input spectrum (no copy: the one it
  mixes) for the backward, which skips that chunk's input gather and ``rfft``; one float32 ``(T, d_in + 2)``
  buffer more per adapted layer between forward and backward.

One adapter branch (``bench.Branch``: random permutations, FourierFT's locations, n = 1,000), forward and backward
with the input's gradient. Reports median thread CPU ms (``time.thread_time``) and each variant's ratio to LoRA's,
plus the peak memory each step allocates (``bench.peak_bytes``).

    OMP_NUM_THREADS=1 python benchmarks/fft_backward_ab.py --output benchmarks/results/cpu
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
from s2ft.ops.locations import fourierft_locations  # noqa: E402


def _transposed_product(matrix_t: torch.Tensor, spectrum_t: torch.Tensor) -> torch.Tensor:
    """``(matrix_t @ spectrum_t)`` for a CSR ``matrix_t`` and a (frequency, token)-contiguous spectrum."""
    out = spectrum_t.new_empty(matrix_t.shape[0], spectrum_t.shape[1])
    return torch.addmm(out, matrix_t, spectrum_t, beta=0.0, out=out)


class _Rearranged(torch.autograd.Function):
    """The FFT path with the backward of ``freq-major`` (``keep=False``) or ``kept-spectrum`` (``keep=True``)."""

    @staticmethod
    def forward(ctx, x, coeffs, plan, scaling, keep):
        dtype = torch.float32
        mix = plan.forward.matrix(coeffs.repeat(2) * plan.forward_factor * (scaling / plan.d_in))
        y = x.new_empty(x.shape[0], plan.d_out)
        kept = []
        for rows in plan.chunks(x.shape[0]):
            spectrum = apply._half_spectrum(x[rows], plan.perm_cols, dtype)
            kept.append(spectrum if keep else None)
            apply._synthesize(apply._mix(spectrum, mix), plan.inv_perm_rows, y[rows])
        ctx.save_for_backward(x, coeffs)
        ctx.plan, ctx.scaling, ctx.kept = plan, scaling, kept
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, coeffs = ctx.saved_tensors
        plan, scaling, dtype = ctx.plan, ctx.scaling, torch.float32
        adjoint_t = plan.adjoint.matrix(coeffs.repeat(2) * plan.adjoint_factor * (scaling / plan.d_out)).t()
        pattern = plan.grad.matrix(torch.zeros_like(plan.grad_sign))
        sampled = torch.zeros_like(pattern.values())
        grad_x = x.new_empty(x.shape)
        for i, rows in enumerate(plan.chunks(x.shape[0])):
            grad_t = apply._half_spectrum(grad_y[rows], plan.perm_rows, dtype).T.contiguous()
            spectrum = ctx.kept[i]
            ctx.kept[i] = None
            if spectrum is None:
                spectrum = apply._half_spectrum(x[rows], plan.perm_cols, dtype)
            sampled += torch.sparse.sampled_addmm(
                pattern, spectrum.T.contiguous(), grad_t.T, beta=0.0
            ).values()
            del spectrum
            half = _transposed_product(adjoint_t, grad_t).T.contiguous()
            apply._synthesize(half, plan.inv_perm_cols, grad_x[rows])
        per_part = sampled[plan.grad.slot] * plan.grad_sign
        grad_c = per_part.view(2, -1).sum(0) * (scaling / (plan.d_out * plan.d_in))
        return grad_x, grad_c, None, None, None


def measure(width: int, tokens: int, n: int, repeats: int) -> dict:
    """One shape: every variant's gradients checked against ``main``'s, then the round-robin timings and peaks."""
    torch.manual_seed(0)
    x = torch.randn(tokens, width, requires_grad=True)
    grad = torch.randn(tokens, width)
    coeffs = torch.nn.Parameter(torch.randn(n))
    rows, cols = fourierft_locations(width, width, n, seed=777)
    perm_rows, perm_cols = torch.randperm(width), torch.randperm(width)
    plan = apply._plan(rows, cols, width, width, perm_rows, perm_cols)
    lora = bench.Branch(width, n, None)
    scaling = bench.SCALING
    steps = {
        "lora_r8": lambda: lora(x),
        "main": lambda: apply.spectral_apply(
            x, coeffs, rows, cols, width, width, scaling, perm_rows, perm_cols, path="fft"
        ),
        "freq-major": lambda: _Rearranged.apply(x, coeffs, plan, scaling, False),
        "kept-spectrum": lambda: _Rearranged.apply(x, coeffs, plan, scaling, True),
    }
    grads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in ("main", "freq-major", "kept-spectrum"):
        x.grad = coeffs.grad = None
        steps[name]().backward(grad)
        assert x.grad is not None and coeffs.grad is not None
        grads[name] = (x.grad, coeffs.grad)
    for name in ("freq-major", "kept-spectrum"):
        for got, want in zip(grads[name], grads["main"]):
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), f"{name} differs from main"

    def call(forward):
        def run():
            forward().backward(grad)
            x.grad = coeffs.grad = None
            for p in lora.parameters():
                p.grad = None

        return run

    calls = {name: call(forward) for name, forward in steps.items()}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    for run in calls.values():
        run()
    for _ in range(repeats):
        for name, run in calls.items():
            start = time.thread_time()
            run()
            cpu[name].append((time.thread_time() - start) * 1e3)
    return {
        "width": width,
        "tokens": tokens,
        "cpu_ms": {k: statistics.median(v) for k, v in cpu.items()},
        "peak_bytes": {k: bench.peak_bytes(run, torch.device("cpu")) for k, run in calls.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", nargs="+", default=["1024x512", "2048x512", "4096x512", "1024x4096", "2048x4096"]
    )
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", default=None, help="folder for fft_backward_ab.{md,json}")
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        width, tokens = map(int, shape.split("x"))
        rows.append(measure(width, tokens, args.n, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    if args.output:
        write(rows, args)


def write(rows: list[dict], args) -> None:
    os.makedirs(args.output, exist_ok=True)
    names = ("main", "freq-major", "kept-spectrum")
    lines = [
        "# The FFT path's backward rearranged (`benchmarks/fft_backward_ab.py`)",
        "",
        f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/fft_backward_ab.py "
        f"--repeats {args.repeats}`, torch {torch.__version__}, {torch.get_num_threads()} thread(s); one branch "
        f"(n = {args.n}) forward + backward, median thread CPU ms of {args.repeats} round-robin repeats; "
        "peak = memory one step allocates.",
        "",
        "| width | tokens | LoRA r = 8 ms | "
        + " | ".join(f"{n} ms" for n in names)
        + " | "
        + " | ".join(f"{n} / LoRA" for n in names)
        + " | peak MiB LoRA / "
        + " / ".join(names)
        + " |",
        "|---|---|" + "---:|" * (1 + 2 * len(names)) + "---|",
    ]
    for r in rows:
        ms, peak = r["cpu_ms"], r["peak_bytes"]
        lora = ms["lora_r8"]
        lines.append(
            f"| {r['width']} | {r['tokens']} | {lora:.1f} | "
            + " | ".join(f"{ms[n]:.1f}" for n in names)
            + " | "
            + " | ".join(f"{ms[n] / lora:.2f}" for n in names)
            + " | "
            + " / ".join(f"{peak[n] / 2**20:.1f}" for n in ("lora_r8", *names))
            + " |"
        )
    base = os.path.join(args.output, "fft_backward_ab")
    with open(base + ".json", "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
