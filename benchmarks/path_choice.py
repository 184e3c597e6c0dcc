"""Which forward path ``"auto"`` should take in training: the fused dense path against the FFT path, per shape.

One adapted float32 ``nn.Linear`` (S2FT, n = 1000, random locations and permutations), forward + backward with the
input's gradient, at layer shapes of real models (the default jobs' 192x576, 384x384, 576x576; LLM projections
up to 2048 wide) and 128, 512 and 2,048 tokens: overhead over the frozen layer (fastest of the rounds,
round-robin), for the fused dense path, the FFT path and PEFT LoRA r = 8; the faster path, the path ``"auto"``
takes, and what its choice costs against the faster one.

    OMP_NUM_THREADS=2 python benchmarks/path_choice.py   # ~4 min -> benchmarks/results/<device>/path_choice-<threads>t.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import bench  # noqa: E402
from s2ft import S2FTConfig, get_spectral_model  # noqa: E402
from s2ft.io import atomic_write_text  # noqa: E402
from s2ft.tuner.layers import SpectralLayer  # noqa: E402

SHAPES = [
    (192, 576),
    (384, 384),
    (576, 576),
    (768, 768),
    (1024, 1024),
    (576, 1536),
    (1536, 1536),
    (2048, 2048),
]
TOKENS = [128, 512, 2048]
N_FREQUENCY = 1000


def variants(d_out: int, d_in: int, device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(d_in, d_out)).to(device)
    out = {"frozen": copy.deepcopy(base).requires_grad_(False)}
    out["lora_r8"] = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))
    for path in ("dense", "fft", "auto"):
        config = S2FTConfig(target_modules=["0"], n_frequency=N_FREQUENCY, init="normal", forward_path=path)
        model = get_spectral_model(copy.deepcopy(base), config)
        layer = next(m for m in model.modules() if isinstance(m, SpectralLayer))
        g = torch.Generator().manual_seed(0)
        flat = torch.randperm(d_out * d_in, generator=g)[:N_FREQUENCY]
        perms = torch.randperm(d_out, generator=g), torch.randperm(d_in, generator=g)
        layer.set_locations(flat // d_in, flat % d_in, *perms)
        out[path] = model.to(device)
    return out


def measure(d_out: int, d_in: int, tokens: int, rounds: int, device) -> dict:
    models = variants(d_out, d_in, device)
    x = torch.randn(tokens, d_in, device=device, requires_grad=True)
    best = bench.fastest_ms(models, x, rounds, device)
    layer = next(m for m in models["auto"].modules() if isinstance(m, SpectralLayer))
    with torch.enable_grad():
        auto = "dense" if layer._fusable(layer.current, x) else "fft"
    overhead = {name: ms - best["frozen"] for name, ms in best.items() if name != "frozen"}
    return {"d_out": d_out, "d_in": d_in, "tokens": tokens, "frozen_ms": best["frozen"]} | {
        "overhead_ms": overhead,
        "auto": auto,
    }


def markdown(report: dict) -> str:
    lines = [
        "# The forward path `auto` takes in training: fused dense against FFT",
        "",
        f"`{report['command']}`, {report['threads']} thread(s), {report['device']}, torch {torch.__version__}, "
        f"{report['date']}. S2FT n = {N_FREQUENCY}, float32; ms of forward + backward over the frozen layer, fastest "
        f"of {report['rounds']} round-robin rounds. *auto / best*: the overhead of the path `auto` took over the "
        "faster one's.",
        "",
        "| shape | tokens | frozen | LoRA r = 8 | dense (fused) | fft | faster | auto | auto / best |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    regrets = []
    for r in report["rows"]:
        o = r["overhead_ms"]
        faster = "dense" if o["dense"] <= o["fft"] else "fft"
        regret = max(o[r["auto"]], 1e-3) / max(min(o["dense"], o["fft"]), 1e-3)
        regrets.append(regret)
        lines.append(
            f"| {r['d_out']}x{r['d_in']} | {r['tokens']} | {r['frozen_ms']:.2f} | {o['lora_r8']:.2f} | "
            f"{o['dense']:.2f} | {o['fft']:.2f} | {faster} | {r['auto']} | {regret:.2f} |"
        )
    agree = sum(r <= 1.0 for r in regrets)
    lines += [
        "",
        f"`auto` took the faster path on {agree} of {len(regrets)} shapes; worst choice "
        f"{max(regrets):.2f}x the faster path's overhead.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    report = {
        "command": "python benchmarks/path_choice.py " + " ".join(sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": args.rounds,
        "rows": [],
    }
    for d_out, d_in in SHAPES:
        for tokens in args.tokens:
            report["rows"].append(measure(d_out, d_in, tokens, args.rounds, device))
            print(json.dumps(report["rows"][-1]), flush=True)
    folder = args.output or os.path.join(os.path.dirname(__file__), "results", device.type)
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"path_choice-{report['threads']}t")
    atomic_write_text(stem + ".json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(stem + ".md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
