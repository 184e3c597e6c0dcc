"""The dense path fused into the base GEMM (``F.linear(x, W + ΔW)``) against the separate branch and the FFT path.

1. One adapted ``nn.Linear`` (FourierFT, n = 1000, float32), forward + backward with the input's gradient, at widths
   384, 1024 and 2048 and 512 and 4,096 tokens: the fused dense path, the separate dense branch (``ΔW x`` beside the
   base layer, as before fusion), the FFT path, and the frozen layer alone; milliseconds (fastest of 5 round-robin
   rounds after a warm-up) and the overhead over the frozen layer.
2. End to end: one optimizer step of the default text job's model (``benchmarks/bench.py``'s part 2: MiniLM,
   batch 16 x 64, n = 1000) for LoRA r = 8, PEFT FourierFT, S2FT on ``auto`` (fused at width 384) and the same S2FT
   with fusion turned off, side by side.

    OMP_NUM_THREADS=2 python benchmarks/fused_dense.py     # ~3 min -> benchmarks/results/<device>/fused_dense.md
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import bench  # noqa: E402
from s2ft import FourierFTConfig, get_spectral_model  # noqa: E402
from s2ft.io import atomic_write_text  # noqa: E402
from s2ft.tuner.layers import SpectralLayer  # noqa: E402


def unfused(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose layers never fuse (the separate branch)."""
    model = copy.deepcopy(model)
    for layer in model.modules():
        if isinstance(layer, SpectralLayer):
            layer._fusion_path = lambda *args: None
    return model


def layers(widths, tokens_list, rounds: int, device) -> list[dict]:
    rows = []
    for width in widths:
        for tokens in tokens_list:
            torch.manual_seed(0)
            base = nn.Sequential(nn.Linear(width, width)).to(device)
            variants = {}
            for path in ("dense", "fft"):
                config = FourierFTConfig(
                    target_modules=["0"], n_frequency=1000, init="normal", forward_path=path
                )
                variants[path] = get_spectral_model(copy.deepcopy(base), config)
            variants["dense, separate"] = unfused(variants["dense"])
            variants["frozen"] = copy.deepcopy(base).requires_grad_(False)
            x = torch.randn(tokens, width, device=device, requires_grad=True)
            best = bench.fastest_ms(variants, x, rounds, device)
            rows.append({"width": width, "tokens": tokens, "ms": best})
            print(rows[-1], flush=True)
    return rows


def end_to_end(device, repeats: int) -> dict:
    original = bench.method_models

    def with_unfused(base, head, n):
        models = original(base, head, n)
        kept = {k: models[k] for k in ("lora_r8", "peft_fourierft", "s2ft_auto")}
        kept["s2ft_auto_separate"] = unfused(models["s2ft_auto"])
        return kept

    bench.method_models = with_unfused
    try:
        args = argparse.Namespace(model="minilm", e2e_n=1000, e2e_repeats=repeats, default_job_steps=250)
        return bench.bench_end_to_end(args, device)["step_ms"]
    finally:
        bench.method_models = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--widths", type=int, nargs="+", default=[384, 1024, 2048])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--e2e-repeats", type=int, default=10)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = layers(args.widths, args.tokens, args.rounds, device)
    steps = end_to_end(device, args.e2e_repeats)
    command = "python benchmarks/fused_dense.py " + " ".join(sys.argv[1:])
    lines = [
        "# The dense path fused into the base GEMM",
        "",
        f"`{command}`, {torch.get_num_threads()} thread(s), {device.type}, torch {torch.__version__}.",
        "",
        "## One layer (FourierFT n = 1000, float32), forward + backward, ms (overhead over the frozen layer)",
        "",
        "| width | tokens | frozen | dense, fused | dense, separate | fft |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = r["ms"]
        cells = [f"{ms[k]:.2f} (+{ms[k] - ms['frozen']:.2f})" for k in ("dense", "dense, separate", "fft")]
        lines.append(f"| {r['width']} | {r['tokens']} | {ms['frozen']:.2f} | " + " | ".join(cells) + " |")
    lora = steps["lora_r8"]
    lines += [
        "",
        "## One optimizer step of the default text job's model (MiniLM, batch 16 x 64, n = 1000)",
        "",
        "| method | step ms | vs LoRA r = 8 |",
        "|---|---:|---:|",
        *(f"| {name} | {ms:.1f} | {ms / lora:.2f} |" for name, ms in steps.items()),
    ]
    folder = args.output or os.path.join(os.path.dirname(__file__), "results", device.type)
    os.makedirs(folder, exist_ok=True)
    atomic_write_text(os.path.join(folder, "fused_dense.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
