"""What smaller adapter files cost in accuracy, on a finished text-classification run (default: the default job's).

- Coefficients stored in 16 bits: the run's adapter with its coefficients rounded to float16 and to bfloat16.
- The LoRA export (``s2ft export-lora``): the adapter factored into PEFT LoRA at several ranks and energy shares,
  loaded with ``peft.PeftModel``.

Each is scored on the run's test split; bytes are those of the file each would be saved as. Writes
``docs/results/storage.md`` and ``storage.json``.

    s2ft finetune && python benchmarks/storage.py --run runs/default     # ~2 min on 2 CPU threads
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
from safetensors.torch import save

from s2ft.io import atomic_write_text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="runs/default")
    parser.add_argument("--ranks", nargs="+", default=["1", "4", "16", "64", "0.5", "0.9"])
    parser.add_argument("--output", default="docs/results")
    args = parser.parse_args()
    import peft

    from s2ft.jobs.args import FinetuneArgs
    from s2ft.jobs.runs import load_trained
    from s2ft.jobs.splits import held_out
    from s2ft.jobs.training import make_trainer
    from s2ft.tasks import get_task
    from s2ft.tuner.peft_formats import export_lora

    model, processor, run = load_trained(args.run)
    task = get_task(run["task"])
    options = FinetuneArgs(**{k: v for k, v in run["args"].items() if k in FinetuneArgs.__dataclass_fields__})
    options = options.resolved()
    data = task.align(task.load_data(options), run["info"])
    test = task.prepare(held_out(data.test, options), processor, options, "test")
    collator = task.collator(processor)

    def score(candidate: torch.nn.Module) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            return task.evaluate(make_trainer(candidate.eval(), collator, options, tmp), test)[task.metric]

    rows = []
    state, metadata = model.adapter_state_dict(), model._metadata()
    original = {n: layer.coeffs.detach().clone() for n, layer in model.spectral_layers().items()}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        with torch.no_grad():
            for name, layer in model.spectral_layers().items():
                layer.coeffs.copy_(original[name].to(dtype).float())
        stored = {k: (v.to(dtype) if k.endswith(".coeffs") else v) for k, v in state.items()}
        rows.append(
            {
                "variant": f"coefficients in {str(dtype).removeprefix('torch.')}",
                "bytes": len(save(stored, metadata=metadata)),
                task.metric: score(model),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    with torch.no_grad():
        for name, layer in model.spectral_layers().items():
            layer.coeffs.copy_(original[name])
    for rank in args.ranks:
        value = float(rank)
        with tempfile.TemporaryDirectory() as tmp:
            report = export_lora(model, tmp, value)
            lora_bytes = os.path.getsize(os.path.join(tmp, "adapter_model.safetensors"))
            base = task.load_model(run["model"], run["info"]).model
            lora = peft.PeftModel.from_pretrained(base, tmp)
            errors = [r["relative_error"] for r in report.values()]
            rows.append(
                {
                    "variant": f"LoRA export, rank {rank}"
                    if value >= 1
                    else f"LoRA export, {value:.0%} of the energy",
                    "bytes": lora_bytes,
                    task.metric: score(lora),
                    "mean_relative_error": sum(errors) / len(errors),
                    "ranks": sorted({int(r["rank"]) for r in report.values()}),
                }
            )
        print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/storage.py " + " ".join(sys.argv[1:])
    atomic_write_text(
        os.path.join(args.output, "storage.json"),
        json.dumps({"command": command, "run": args.run, "rows": rows}, indent=2) + "\n",
    )
    lines = [
        "# Smaller adapter files: 16-bit coefficients and the LoRA export",
        "",
        f"`{command}` on `{args.run}` (task {run['task']}, method {run['method']}); test {task.metric} of each.",
        "",
        f"| variant | file bytes | test {task.metric} | mean relative error of ΔW | LoRA ranks |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        error = f"{r['mean_relative_error']:.3f}" if "mean_relative_error" in r else ""
        ranks = ", ".join(map(str, r.get("ranks", [])))
        lines.append(f"| {r['variant']} | {r['bytes']:,} | {r[task.metric]:.4f} | {error} | {ranks} |")
    atomic_write_text(os.path.join(args.output, "storage.md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
