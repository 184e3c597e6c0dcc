"""The Haar wavelet adapter's training cost per layer against LoRA r = 8's, side by side in one process.

One square linear layer (``width x width``), input ``x`` ``(tokens, width)`` that requires grad (as inside a network)
and a random output gradient; one forward and backward per step, variants round-robin, medians reported
(:func:`bench.median_ms`). Variants: the frozen layer alone (``base``); PEFT LoRA r = 8; PEFT WaveFT (``n``, one level:
it rebuilds a dense ``ΔW`` by an inverse DWT at every step); s2ft's wavelet layer (one level, random row and column
permutations as S2FT's plan has) on the fast path (``fast``: the sparse analysis and synthesis maps of the ``n``
locations, :func:`s2ft.ops.wavelet.apply_sparse`, never ``ΔW``) and on the dense path; as branches also the fast
path at 3 levels and the whole-transform path it replaced (``whole transforms``: DWT of the input, the sparse map of
the coefficients, inverse DWT, :func:`s2ft.ops.wavelet.apply_transform`). *Overhead* is a variant's step time minus
``base``'s; *branch* times the adapter branch alone (``ΔW x``, or LoRA's ``B A x``), the same overhead without the
base matmul's noise. The ratios divide by LoRA r = 8's.

Writes ``wavelet_speed.json`` and ``wavelet_speed.md`` in ``--output`` (default ``benchmarks/results/<device>``).

Usage: python benchmarks/wavelet_speed.py [--device cpu|cuda] [--widths 1024 2048 4096] [--tokens 512 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch
from peft import LoraConfig, WaveFTConfig, get_peft_model
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import bench  # noqa: E402
from s2ft.io import atomic_write_text  # noqa: E402
from s2ft.ops import wavelet  # noqa: E402
from s2ft.tuner.layers import SpectralLinear  # noqa: E402

SCALING = 150.0


class Branch(nn.Module):
    """An adapter branch alone: the wavelet ``ΔW x`` on a fixed path, or LoRA r = 8's ``B(A(x)) * 2``."""

    def __init__(self, width: int, n: int, path: str | None, levels: int = 1) -> None:
        super().__init__()
        self.path, self.levels = path, levels
        if path is None:
            self.lora_A = nn.Linear(width, 8, bias=False)
            self.lora_B = nn.Linear(8, width, bias=False)
            return
        self.coeffs = nn.Parameter(torch.randn(n))
        rows, cols = wavelet.seeded_locations(width, width, n, seed=777)
        for name, value in zip(
            ("rows", "cols", "perm_rows", "perm_cols"),
            (rows, cols, torch.randperm(width), torch.randperm(width)),
        ):
            self.register_buffer(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path is None:
            return self.lora_B(self.lora_A(x)) * 2.0
        w = x.shape[-1]
        if self.path == "transform":  # the whole-transform path (the fast path before its sparse maps)
            return wavelet.apply_transform(
                x,
                self.coeffs,
                self.rows,
                self.cols,
                w,
                w,
                SCALING,
                self.perm_rows,
                self.perm_cols,
                self.levels,
            )
        return wavelet.apply(
            x,
            self.coeffs,
            self.rows,
            self.cols,
            w,
            w,
            SCALING,
            self.perm_rows,
            self.perm_cols,
            path=self.path,
            levels=self.levels,
        )


def wavelet_layer(width: int, n: int, path: str, levels: int = 1) -> nn.Module:
    """s2ft's wavelet layer as training uses it, with random (valid) permutations."""
    layer = SpectralLinear(
        nn.Linear(width, width),
        n,
        SCALING,
        init="normal",
        forward_path=path,
        basis=wavelet.basis_name(levels),
    )
    layer.base_layer.requires_grad_(False)
    rows, cols = wavelet.seeded_locations(width, width, n, seed=777)
    layer.set_locations(rows, cols, torch.randperm(width), torch.randperm(width))
    return layer


def layer_variants(width: int, n: int, peft_waveft: bool) -> dict[str, nn.Module]:
    variants = {
        "base": bench.Holder(width).requires_grad_(False),
        "lora_r8": get_peft_model(
            bench.Holder(width), LoraConfig(r=8, lora_alpha=16, target_modules=["layer"])
        ),
        "wavelet_fast": wavelet_layer(width, n, "fft"),
        "wavelet_dense": wavelet_layer(width, n, "dense"),
    }
    if peft_waveft:
        variants["peft_waveft"] = get_peft_model(
            bench.Holder(width), WaveFTConfig(n_frequency=n, target_modules=["layer"], init_weights=False)
        )
    return variants


def measure(args, device: torch.device) -> list[dict]:
    rows = []
    for width in args.widths:
        layers = {name: m.to(device) for name, m in layer_variants(width, args.n, not args.no_peft).items()}
        branches = {
            "lora_r8": Branch(width, args.n, None).to(device),
            "wavelet_fast": Branch(width, args.n, "fft").to(device),
            "wavelet_fast_3_levels": Branch(width, args.n, "fft", levels=3).to(device),
            "wavelet_transform": Branch(width, args.n, "transform").to(device),
            "wavelet_dense": Branch(width, args.n, "dense").to(device),
        }
        for tokens in args.tokens:
            x = torch.randn(tokens, width, device=device, requires_grad=True)
            grad = torch.randn(tokens, width, device=device)
            layer_ms = bench.median_ms(bench.steps(layers, x, grad), args.repeats, args.budget, device)
            branch_ms = bench.median_ms(bench.steps(branches, x, grad), args.repeats, args.budget, device)
            overhead = {k: ms - layer_ms["base"] for k, ms in layer_ms.items() if k != "base"}
            row = {
                "width": width,
                "n": args.n,
                "tokens": tokens,
                "auto_path": wavelet.choose_path(width, width, args.n, tokens, device),
                "step_ms": layer_ms,
                "overhead_ms": overhead,
                "branch_ms": branch_ms,
                "overhead_vs_lora": {k: v / overhead["lora_r8"] for k, v in overhead.items()},
                "branch_vs_lora": {k: v / branch_ms["lora_r8"] for k, v in branch_ms.items()},
            }
            rows.append(row)
            print(
                f"width {width} tokens {tokens}: base {layer_ms['base']:.1f} ms; overhead lora "
                f"{overhead['lora_r8']:.2f}, wavelet fast {overhead['wavelet_fast']:.2f} "
                f"({row['overhead_vs_lora']['wavelet_fast']:.2f}x); branch lora {branch_ms['lora_r8']:.2f}, "
                f"fast {branch_ms['wavelet_fast']:.2f} ({row['branch_vs_lora']['wavelet_fast']:.2f}x)",
                flush=True,
            )
        del layers, branches
    return rows


def markdown(report: dict) -> str:
    env = report["environment"]
    out = [
        "# Wavelet adapter: layer cost against LoRA r = 8",
        "",
        f"`{report['command']}` on {env['device_name']}, {env['threads']} thread(s), torch {env['torch']}, "
        f"peft {env['peft']}. {report['note']}",
        "",
        "One square linear layer, forward + backward, medians of round-robin steps, n = "
        f"{report['rows'][0]['n'] if report['rows'] else '-'} coefficients. *Overhead*: step time minus the frozen "
        "layer's; *branch*: the adapter branch alone. Ratios are to LoRA r = 8 (below 1: cheaper than LoRA).",
        "",
        "| width | tokens | base ms | LoRA r=8 overhead ms | wavelet fast overhead ms (x LoRA) | wavelet dense "
        "(x LoRA) | PEFT WaveFT (x LoRA) | branch: LoRA ms | wavelet fast (x LoRA) | fast, 3 levels (x LoRA) | "
        "whole transforms (x LoRA) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        o, ov, b, bv = r["overhead_ms"], r["overhead_vs_lora"], r["branch_ms"], r["branch_vs_lora"]
        peft = f"{o['peft_waveft']:.1f} ({ov['peft_waveft']:.1f}x)" if "peft_waveft" in o else "-"
        out.append(
            f"| {r['width']} | {r['tokens']} | {r['step_ms']['base']:.1f} | {o['lora_r8']:.2f} | "
            f"{o['wavelet_fast']:.2f} ({ov['wavelet_fast']:.2f}x) | {o['wavelet_dense']:.1f} "
            f"({ov['wavelet_dense']:.1f}x) | {peft} | {b['lora_r8']:.2f} | {b['wavelet_fast']:.2f} "
            f"({bv['wavelet_fast']:.2f}x) | {b['wavelet_fast_3_levels']:.2f} ({bv['wavelet_fast_3_levels']:.2f}x) | "
            f"{b['wavelet_transform']:.2f} ({bv['wavelet_transform']:.2f}x) |"
        )
    out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None)
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--budget", type=float, default=10.0, help="stop repeating a variant after this many s"
    )
    parser.add_argument(
        "--no-peft", action="store_true", help="leave out PEFT's WaveFT (slow at large widths)"
    )
    parser.add_argument(
        "--note", default="", help="a sentence for the report (e.g. that the machine was shared)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, to check that it runs")
    args = parser.parse_args()
    if args.quick:
        args.widths, args.tokens, args.n, args.repeats = [256], [64], [100][0], 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = measure(args, device)
    report = {
        "command": "python benchmarks/wavelet_speed.py " + shlex.join(sys.argv[1:]),
        "note": args.note,
        "environment": bench.environment(device),
        "rows": rows,
    }
    output = args.output or os.path.join("benchmarks", "results", device.type)
    os.makedirs(output, exist_ok=True)
    atomic_write_text(os.path.join(output, "wavelet_speed.json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(os.path.join(output, "wavelet_speed.md"), markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
