"""Serving many adapters on one base model: mixed batches through ``adapter_names`` against a merged model.

On the default text model (MiniLM-L6, S2FT adapters on ``query`` and ``value``, n = 1000, random plans and
coefficients: speed does not depend on their values), for N adapters and batches of B sentences of T tokens:

- (a) ``mixed``: one forward with ``adapter_names`` (example i gets adapter i mod N);
- (b) ``merged``: one adapter merged into the weights, a plain forward (the fastest a single adapter can be);
- (c) ``merge-per-batch``: for each adapter the batch names, merge it, run its examples, unmerge it;

then the time to load one saved adapter, and the adapters' memory. Writes ``benchmarks/results/<device>/serving.json``
and ``serving.md``.

    python benchmarks/serving.py            # ~3 min on 2 CPU threads

Without autograd, an adapted layer serves each adapter with its dense ``ΔW``, built once and cached
(``SpectralAdapter.served_delta``), so a mixed batch costs one small matmul per adapter named in it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from s2ft import S2FTConfig, SpectralModel, get_spectral_model
from s2ft.io import atomic_write_text


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def with_adapters(base: torch.nn.Module, count: int, n: int, path: str) -> SpectralModel:
    """``count`` S2FT adapters a0..a{count-1} with random plans and coefficients."""
    generator = torch.Generator().manual_seed(0)

    def config(i: int) -> S2FTConfig:
        return S2FTConfig(target_modules=["query", "value"], n_frequency=n, seed=i, forward_path=path)

    model = get_spectral_model(base, config(0), adapter_name="a0")
    for i in range(1, count):
        model.add_adapter(f"a{i}", config(i))
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            for adapter in layer.adapters.values():
                flat = torch.randperm(layer.d_out * layer.d_in, generator=generator)[:n]
                adapter.set_locations(
                    flat // layer.d_in,
                    flat % layer.d_in,
                    torch.randperm(layer.d_out, generator=generator),
                    torch.randperm(layer.d_in, generator=generator),
                )
                adapter.coeffs.normal_(generator=generator)
    model.set_adapter("a0")
    return model.eval()


def measure(model: SpectralModel, count: int, batch: int, tokens: int, repeats: int) -> dict[str, float]:
    ids = torch.randint(1000, 20000, (batch, tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    names = [f"a{i % count}" for i in range(batch)]
    total = batch * tokens

    @torch.no_grad()
    def mixed():
        model(input_ids=ids, attention_mask=mask, adapter_names=names)

    @torch.no_grad()
    def merge_per_batch():
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            model.set_adapter(name)
            model.merge()
            model(input_ids=ids[rows], attention_mask=mask[rows])
            model.unmerge()

    @torch.no_grad()
    def merged():
        model(input_ids=ids, attention_mask=mask)

    @torch.no_grad()
    def base():
        with model.disable_adapters():
            model(input_ids=ids, attention_mask=mask)

    seconds = {"mixed": timed(mixed, repeats), "merge_per_batch": timed(merge_per_batch, repeats)}
    model.set_adapter("a0")
    model.merge()
    seconds["merged"] = timed(merged, repeats)
    model.unmerge()
    seconds["base"] = timed(base, repeats)
    return {f"{k}_tokens_per_s": total / v for k, v in seconds.items()}


def layer_breakdown(d: int, batch: int, tokens: int, groups: int, repeats: int) -> dict[str, float]:
    """Where a mixed batch's time goes in one adapted ``d x d`` layer: milliseconds of the base layer's matmul
    over the whole batch, against ``groups`` adapter matmuls over ``batch / groups`` examples each (gathered,
    multiplied by the cached ``ΔW``, added back)."""
    x = torch.randn(batch, tokens, d)
    weight = torch.randn(d, d)
    deltas = [torch.randn(d, d) for _ in range(groups)]
    indices = [torch.arange(g, batch, groups) for g in range(groups)]

    def grouped() -> None:
        out = torch.nn.functional.linear(x, weight).clone()
        for index, delta in zip(indices, deltas):
            out.index_add_(0, index, torch.nn.functional.linear(x.index_select(0, index), delta))

    base = timed(lambda: torch.nn.functional.linear(x, weight), repeats)
    return {"base_matmul_ms": 1e3 * base, "with_grouped_adapters_ms": 1e3 * timed(grouped, repeats)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--batch", nargs="+", type=int, default=[16, 64], help="sentences per batch")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per sentence")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    from s2ft.tasks import RunError, get_task

    try:
        task = get_task("text-classification")
        loaded = task.load_model("minilm", {"label_names": [str(i) for i in range(6)]})
    except RunError as e:
        print(f"skipped: {e}", file=sys.stderr)
        return 1
    base_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    rows = []
    path = "auto"  # without autograd, served layers use each adapter's cached dense ΔW whatever the path
    if True:
        for count in args.adapters:
            loaded.model.load_state_dict(base_state)
            model = with_adapters(loaded.model, count, args.n, path)
            adapter_bytes = sum(
                sum(
                    t.numel() * t.element_size() for t in (a.coeffs, a.rows, a.cols, a.perm_rows, a.perm_cols)
                )
                for layer in model.spectral_layers().values()
                for a in layer.adapters.values()
            )
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp, selected_adapters=["a0"])
                model.set_adapter("a0")
                start = time.perf_counter()
                model.load_adapter(os.path.join(tmp, "a0"), "loaded")
                load_seconds = time.perf_counter() - start
                model.delete_adapter("loaded")
            for batch in args.batch:
                row = {
                    "adapters": count,
                    "batch": batch,
                    "tokens_per_batch": batch * args.tokens,
                }
                row.update(measure(model, count, batch, args.tokens, args.repeats))
                row["mixed_vs_merged"] = row["mixed_tokens_per_s"] / row["merged_tokens_per_s"]
                row["load_seconds"] = load_seconds
                row["adapter_memory_bytes"] = adapter_bytes
                rows.append(row)
                print(json.dumps(row), flush=True)
            model.unload()
    breakdown = {g: layer_breakdown(384, 64, args.tokens, g, args.repeats) for g in (1, 8, 64)}
    device = "cpu"
    output = args.output or os.path.join("benchmarks", "results", device)
    report = {
        "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
        "layer_breakdown_384x384_64x32_tokens": breakdown,
    }
    atomic_write_text(os.path.join(output, "serving.json"), json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Serving many adapters (MiniLM-L6, S2FT n = {args.n} on query/value)",
        "",
        f"`{report['command']}`, {report['threads']} threads, torch {report['torch']}. Tokens per second, medians.",
        "",
        "| adapters | distinct per batch | tokens/batch | mixed | merged | merge per batch | base | mixed / merged | load s | adapters MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['adapters']} | {min(r['adapters'], r['batch'])} | {r['tokens_per_batch']} | {r['mixed_tokens_per_s']:,.0f} | "
            f"{r['merged_tokens_per_s']:,.0f} | {r['merge_per_batch_tokens_per_s']:,.0f} | {r['base_tokens_per_s']:,.0f} | "
            f"{r['mixed_vs_merged']:.2f} | {r['load_seconds']:.3f} | {r['adapter_memory_bytes'] / 2**20:.2f} |"
        )
    lines += [
        "",
        "Where the time goes: one 384x384 adapted layer, a batch of 64 sentences of 32 tokens, milliseconds:",
        "",
        "| adapters in the batch | the base layer's matmul | with the adapters' grouped matmuls |",
        "|---|---|---|",
    ]
    for groups, r in breakdown.items():
        lines.append(f"| {groups} | {r['base_matmul_ms']:.2f} | {r['with_grouped_adapters_ms']:.2f} |")
    atomic_write_text(os.path.join(output, "serving.md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
