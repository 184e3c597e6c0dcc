"""Training steps eager and under ``torch.compile`` (inductor), every method side by side in one process.

The setup of issue 32: a tiny random Llama (hidden 256, 2 layers, ``q_proj``/``v_proj`` adapted), batch 4 x 64,
AdamW; PEFT LoRA r = 8 against s2ft's FourierFT, S2FT and DCT (n = 200) on each forward path. For each, the number
of graphs and graph breaks ``torch._dynamo.explain`` finds, and the median step time eager and compiled
(``torch.compile(model)``, default mode, fullgraph where there are no breaks), round-robin after the warm-up
(compilation) steps. Ratios are against LoRA r = 8 in the same mode.

    OMP_NUM_THREADS=1 python benchmarks/compile_step.py   # -> benchmarks/results/<device>/compile_step.{md,json}
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
from s2ft import DCTConfig, FourierFTConfig, S2FTConfig, get_spectral_model  # noqa: E402
from s2ft.io import atomic_write_text  # noqa: E402


def base_model(hidden: int, layers: int, vocab: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).train()


def variants(base: nn.Module, n: int, calibration: list[dict]) -> dict[str, nn.Module]:
    targets = ["q_proj", "v_proj"]
    out: dict[str, nn.Module] = {
        "lora_r8": get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    }
    for method, config in (("fourierft", FourierFTConfig), ("s2ft", S2FTConfig), ("dct", DCTConfig)):
        for path in ("auto", "dense", "fft"):
            model = get_spectral_model(
                copy.deepcopy(base), config(target_modules=targets, n_frequency=n, forward_path=path)
            )
            if config is S2FTConfig:
                model.calibrate(calibration)
            out[f"{method}_{path}"] = model
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the variants' names")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    # every model here runs the same forward code: each is one more compiled version of it
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 256
    vocab = 1000
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.length), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids}
    calibration = [{"input_ids": ids, "labels": ids}]
    models = variants(base_model(args.hidden, args.layers, vocab).to(device), args.n, calibration)
    if args.methods:
        models = {k: v for k, v in models.items() if k in args.methods}
    explained, calls = {}, {}
    for name, model in models.items():
        model.to(device)
        torch._dynamo.reset()
        e = torch._dynamo.explain(lambda b, model=model: model(**b).loss)(batch)
        explained[name] = {"graphs": e.graph_count, "breaks": e.graph_break_count}
        compiled = torch.compile(model, fullgraph=e.graph_break_count == 0)
        for mode, runner in (("eager", model), ("compiled", compiled)):
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

            def call(runner=runner, optimizer=optimizer):
                runner(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            calls[f"{name}/{mode}"] = call
    torch._dynamo.reset()
    start = time.perf_counter()
    for call in calls.values():  # warm-up: compiles
        call()
    compile_s = time.perf_counter() - start
    step_ms = bench.median_ms(calls, args.repeats, float("inf"), device)
    report = {
        "command": "python benchmarks/compile_step.py " + " ".join(sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": vars(args),
        "explain": explained,
        "step_ms": step_ms,
        "warmup_s": compile_s,
    }
    folder = args.output or os.path.join(os.path.dirname(__file__), "results", device.type)
    os.makedirs(folder, exist_ok=True)
    atomic_write_text(os.path.join(folder, "compile_step.json"), json.dumps(report, indent=1) + "\n")
    atomic_write_text(os.path.join(folder, "compile_step.md"), markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    a, ms = r["args"], r["step_ms"]
    lora = {mode: ms.get(f"lora_r8/{mode}") for mode in ("eager", "compiled")}
    lines = [
        "# Training steps eager and compiled (torch.compile, inductor)",
        "",
        f"`{r['command']}`, {r['threads']} thread(s), {r['device']}, torch {r['torch']}, {r['date']}. Tiny random "
        f"Llama (hidden {a['hidden']}, {a['layers']} layers, `q_proj`/`v_proj`), batch {a['batch']} x "
        f"{a['length']}, n = {a['n']}, AdamW; medians of {a['repeats']} round-robin steps after the compiling "
        "warm-up. The machine was shared with parallel jobs: compare ratios within this table.",
        "",
        "| method | graphs / breaks | eager ms | compiled ms | compiled / eager | eager vs LoRA eager | "
        "compiled vs LoRA compiled |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, e in r["explain"].items():
        eager, compiled = ms[f"{name}/eager"], ms[f"{name}/compiled"]
        vs = [
            f"{value / lora[mode]:.2f}" if lora[mode] else "-"
            for value, mode in ((eager, "eager"), (compiled, "compiled"))
        ]
        lines.append(
            f"| {name} | {e['graphs']} / {e['breaks']} | {eager:.1f} | {compiled:.1f} | {compiled / eager:.2f} | "
            f"{vs[0]} | {vs[1]} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
