"""What smaller adapter files cost in accuracy, on a finished text-classification run (default: the default job's).

- Coefficients stored in 16 bits: the run's adapter with its coefficients rounded to float16 and to bfloat16.
- The LoRA export (``s2ft export-lora``): the adapter factored into PEFT LoRA at several ranks and energy shares,
  loaded with ``peft.PeftModel``.

Each is scored on the run's test split; bytes are those of the file each would be saved as. Writes
``docs/results/storage.md`` and ``storage.json``.

    s2ft finetune && python benchmarks/storage.py --run runs/default     # ~2 min on 2 CPU threads

``--parts`` needs no run and trains nothing: the bytes per part of the files (as ``save_pretrained`` writes them,
:func:`s2ft.tuner.adapter_io.file_parts`) of the three default jobs' adapted shapes (``benchmarks/plan_codec.py``)
at n = 100, 300 and 1000: FourierFT; S2FT in format 1 (integer plans, before issue 19) and format 2 (compact
plans); S2FT with permutations of ``W0`` (``--plan-from base``: locations stored) and with the whole plan of
``W0`` (``--locations-from base``: coefficients and fingerprints); float32 and float16 coefficients. The plans
are random (uniform locations and permutations); the codec's sizes depend on a plan through its shape, up to ~1%
for uniform locations (a prior's clustered locations may take more). Writes ``benchmarks/results/cpu/
storage_parts.md``.

    python benchmarks/storage.py --parts                                  # ~20 s on 1 CPU thread
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
    parser.add_argument("--parts", action="store_true", help="bytes per part of the default jobs' shapes")
    args = parser.parse_args()
    if args.parts:
        return parts_table()
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


# (label, stores locations, stores permutations, fingerprints): what each kind of file holds
FILE_KINDS = (
    ("FourierFT", False, False, False),
    ("S2FT, format 1", True, True, False),
    ("S2FT", True, True, False),
    ("S2FT, permutations of W0", True, False, True),
    ("S2FT, plan of W0", False, False, True),
)


def job_state(matrices, head, n, kind, dtype, generator) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An adapter's state and metadata (as ``adapter_state_dict`` and ``_metadata`` give them) for a job's
    matrices, random coefficients and plans."""
    from s2ft.ops.locations import smallest_int_dtype
    from s2ft.tuner.planner import DIGEST_BYTES

    _, locations, permutations, fingerprints = kind
    state: dict[str, torch.Tensor] = {}
    for name, (d_out, d_in) in matrices:
        rows_dtype, cols_dtype = smallest_int_dtype(d_out - 1), smallest_int_dtype(d_in - 1)
        state[f"{name}.coeffs"] = torch.randn(n, generator=generator).to(dtype)
        flat = torch.randperm(d_out * d_in, generator=generator)[:n]
        if locations:
            state[f"{name}.rows"], state[f"{name}.cols"] = (
                (flat // d_in).to(rows_dtype),
                (flat % d_in).to(cols_dtype),
            )
        if permutations:
            state[f"{name}.perm_rows"] = torch.randperm(d_out, generator=generator).to(rows_dtype)
            state[f"{name}.perm_cols"] = torch.randperm(d_in, generator=generator).to(cols_dtype)
    for key, shape in head.items():
        state[key] = torch.zeros(shape)
    if fingerprints:
        state["s2ft.fingerprints"] = torch.zeros(DIGEST_BYTES * (len(matrices) + 1), dtype=torch.uint8)
    shapes = [list(shape) for _, shape in sorted(matrices)]
    return state, {"format": "pt", "s2ft_shapes": json.dumps(shapes, separators=(",", ":"))}


def parts_table() -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from plan_codec import JOBS, NS
    from s2ft.tuner.adapter_io import file_parts

    torch.set_num_threads(1)
    columns = ("coefficients", "locations", "permutations", "modules_to_save", "fingerprint", "header")
    lines = [
        "# Adapter files by part: the default jobs' shapes",
        "",
        f"`python benchmarks/storage.py --parts` ({__doc__.split('``--parts``')[1].split('Writes')[0].strip()})",
        "",
        "Bytes of each part of the safetensors file; × is the file's size over FourierFT's of the same job, n and "
        "coefficient dtype.",
        "",
        "| job | n | coefficients | file | coefficients | locations | permutations | head | fingerprint | "
        "header | total | × |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    results = []
    for job, (matrices, head) in JOBS.items():
        for n in NS:
            for dtype in (torch.float32, torch.float16):
                generator = torch.Generator().manual_seed(n)
                fourierft = None
                for kind in FILE_KINDS:
                    state, metadata = job_state(matrices, head, n, kind, dtype, generator)
                    if kind[0] == "S2FT, format 1":  # written as it was: no encoding
                        parts = {c: 0 for c in columns}
                        for key, value in state.items():
                            part = "coefficients" if key.endswith(".coeffs") else "modules_to_save"
                            part = "locations" if key.endswith((".rows", ".cols")) else part
                            part = "permutations" if key.endswith(("perm_rows", "perm_cols")) else part
                            parts[part] += value.numel() * value.element_size()
                        parts["header"] = len(save(state, metadata=metadata)) - sum(parts.values())
                    else:
                        parts = file_parts(state, metadata)
                    total = sum(parts.values())
                    fourierft = total if fourierft is None else fourierft
                    results.append(
                        {"job": job, "n": n, "dtype": str(dtype), "file": kind[0], **parts, "total": total}
                    )
                    cells = " | ".join(f"{parts.get(c, 0):,}" for c in columns)
                    lines.append(
                        f"| {job} | {n} | {str(dtype).removeprefix('torch.')} | {kind[0]} | {cells} | {total:,} | "
                        f"{total / fourierft:.2f} |"
                    )
                print(lines[-1], flush=True)
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu")
    atomic_write_text(os.path.join(folder, "storage_parts.md"), "\n".join(lines) + "\n")
    atomic_write_text(os.path.join(folder, "storage_parts.json"), json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
