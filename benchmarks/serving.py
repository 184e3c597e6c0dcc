"""Serving many adapters on one base model: mixed batches (``adapter_names``) against the merged model.

Two random-weight models of real shapes (speed does not depend on the weights): MiniLM-L6 (a ``BertModel``, S2FT
on ``query``/``value``) and SmolLM2-135M (a ``LlamaForCausalLM``, S2FT on ``q_proj``/``v_proj``), n = 1000, random
plans and coefficients. Eight adapter folders are saved; 1, 8, 64 and 1,000 adapters are then loaded from them
(``load_adapter``, timed). For each number loaded and 1-64 distinct adapters per batch (example i gets adapter
i mod distinct):

- ``prefill``: one forward of B sequences of T tokens with ``adapter_names``, tokens per second, against the
  same forward with one adapter merged into the weights (the fastest a single adapter can be; timed before and
  after the rows, the faster of the two);
- ``generate`` (SmolLM2 only): greedy ``generate`` of G new tokens per sequence, token by token with the KV
  cache, new tokens per second, against the merged model;
- memory per loaded adapter after serving, everything included (``SpectralModel.serving_nbytes``: the adapters'
  tensors, plans, any dense cache; a mixed batch's banks hold none of their own), against its weights file.

Writes ``benchmarks/results/<device>/serving.json`` and ``serving.md`` (``serving-map-cache.*`` with ``--map-cache``).

    OMP_NUM_THREADS=2 python benchmarks/serving.py      # the full run, ~13 min on 2 CPU threads
    python benchmarks/serving.py --quick                # two layers, 1 and 8 adapters: a check that it works
    python benchmarks/serving.py --device cuda
    OMP_NUM_THREADS=2 python benchmarks/serving.py --map-cache 256   # with a 256 MiB map cache: serving-map-cache.md

Without autograd no adapter keeps a dense ``ΔW`` (``s2ft.tuner.serving``): a mixed batch goes through one
``MixedBank`` per layer, which copies nothing and builds the maps of the batch's adapters on each call.
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

from s2ft import S2FTConfig, get_spectral_model
from s2ft.io import atomic_write_text


def build(name: str, quick: bool) -> tuple[torch.nn.Module, list[str], int]:
    """(random-weight model, target modules, vocabulary size)."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    layers = 2 if quick else None
    if name == "minilm":
        config = BertConfig(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=layers or 6,
            num_attention_heads=12,
            intermediate_size=1536,
        )
        return BertModel(config).eval(), ["query", "value"], config.vocab_size
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers or 30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval(), ["q_proj", "v_proj"], config.vocab_size


def randomize(model, name: str, generator: torch.Generator) -> None:
    """Random locations, permutations and coefficients for adapter ``name`` (what calibration would plan)."""
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            adapter = layer.adapters[name]
            flat = torch.randperm(layer.d_out * layer.d_in, generator=generator)[: adapter.n_frequency]
            adapter.set_locations(
                flat // layer.d_in,
                flat % layer.d_in,
                torch.randperm(layer.d_out, generator=generator),
                torch.randperm(layer.d_in, generator=generator),
            )
            adapter.coeffs.normal_(generator=generator)


def synced(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    sync = synced(device)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speeds(model, args, vocab: int, names: list[str] | None, causal: bool) -> dict[str, float]:
    """Tokens per second of prefill (and, causal, of generation) for a batch with ``names`` (None: plain)."""
    g = torch.Generator().manual_seed(1)
    batch = len(names) if names else args.batch
    ids = torch.randint(100, vocab, (batch, args.tokens), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    kwargs = {} if names is None else {"adapter_names": names}

    @torch.no_grad()
    def prefill():
        model(input_ids=ids, attention_mask=mask, **kwargs)

    out = {"prefill": batch * args.tokens / timed(prefill, args.repeats, args.device)}
    if causal:
        prompts, prompt_mask = ids[:, : args.prompt], mask[:, : args.prompt]
        new = args.new_tokens

        @torch.no_grad()
        def generate():
            model.generate(
                input_ids=prompts,
                attention_mask=prompt_mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                **kwargs,
            )

        out["generate"] = batch * new / timed(generate, max(1, args.repeats // 2), args.device)
    return out


def run_model(name: str, args) -> list[dict]:
    base, targets, vocab = build(name, args.quick)
    causal = name == "smollm2"
    base.to(args.device)
    generator = torch.Generator().manual_seed(0)

    def config(seed: int) -> S2FTConfig:
        return S2FTConfig(target_modules=targets, n_frequency=args.n, seed=seed)

    model = get_spectral_model(base, config(0), adapter_name="a0")
    model.set_map_cache(args.map_cache * 2**20)
    randomize(model, "a0", generator)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=["a0"])  # a name but "default": in its own subfolder
        sources = [os.path.join(tmp, "a0")]
        for i in range(1, min(8, max(args.adapters))):
            model.add_adapter(f"src{i}", config(i))
            randomize(model, f"src{i}", generator)
            model.save_pretrained(tmp, selected_adapters=[f"src{i}"])
            model.delete_adapter(f"src{i}")
            sources.append(os.path.join(tmp, f"src{i}"))
        file_bytes = [os.path.getsize(os.path.join(s, "adapter_model.safetensors")) for s in sources]
        model.set_adapter("a0")
        model.merge()
        merged = speeds(model, args, vocab, None, causal)
        model.unmerge()
        print(json.dumps({"model": name, "merged_tokens_per_s": merged}), flush=True)
        loaded, load_seconds, loaded_bytes = 1, [], file_bytes[0]
        for count in sorted(args.adapters):
            while loaded < count:
                start = time.perf_counter()
                model.load_adapter(sources[loaded % len(sources)], f"a{loaded}")
                load_seconds.append(time.perf_counter() - start)
                loaded_bytes += file_bytes[loaded % len(sources)]
                loaded += 1
            for distinct in [d for d in args.distinct if d <= count]:
                batch = max(args.batch, distinct)
                names = [f"a{i % distinct}" for i in range(batch)]
                mixed = speeds(model, args, vocab, names, causal)
                memory = model.serving_nbytes()
                row = {
                    "model": name,
                    "adapters": count,
                    "distinct": distinct,
                    "batch": batch,
                    "tokens": args.tokens,
                    **{f"{k}_tokens_per_s": v for k, v in mixed.items()},
                    **{f"merged_{k}_tokens_per_s": v for k, v in merged.items()},
                    **{f"{k}_vs_merged": mixed[k] / merged[k] for k in mixed},
                    "load_seconds_per_adapter": statistics.median(load_seconds) if load_seconds else None,
                    "file_bytes_per_adapter": loaded_bytes / count,
                    "memory_bytes_per_adapter": memory["total"] / count,
                    "memory": memory,
                }
                row["memory_vs_file"] = row["memory_bytes_per_adapter"] / row["file_bytes_per_adapter"]
                rows.append(row)
                print(json.dumps(row), flush=True)
        # The merged model once more, at the end: the faster of the two timings is the reference (a busy spell
        # at the start would otherwise flatter every row).
        model.set_adapter("a0")
        model.merge()
        again = speeds(model, args, vocab, None, causal)
        model.unmerge()
        merged = {k: max(v, again[k]) for k, v in merged.items()}
        for row in rows:
            for k, v in merged.items():
                row[f"merged_{k}_tokens_per_s"] = v
                row[f"{k}_vs_merged"] = row[f"{k}_tokens_per_s"] / v
    return rows


def report(rows: list[dict], args, output: str, name: str) -> None:
    command = "python benchmarks/serving.py " + " ".join(sys.argv[1:])
    meta = {"command": command, "threads": torch.get_num_threads(), "torch": torch.__version__}
    atomic_write_text(
        os.path.join(output, name + ".json"), json.dumps({**meta, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        f"# Serving many adapters (S2FT n = {args.n}, random-weight MiniLM-L6 and SmolLM2-135M shapes)"
        + (f", map cache {args.map_cache} MiB" if args.map_cache else ""),
        "",
        f"`{command}`, {meta['threads']} thread(s), {args.device}, torch {meta['torch']}. Prefill: batches of "
        f"B sequences of {args.tokens} tokens; generate: {args.new_tokens} new tokens after {args.prompt}. "
        "Tokens per second (medians) and their ratio to the merged model's; memory per loaded adapter "
        "after serving, everything held (the adapters' tensors, plans, dense and map caches: `serving_nbytes()`), "
        "in KiB and against its weights file.",
        "",
        "| model | loaded | distinct | B | prefill tok/s | vs merged | generate tok/s | vs merged "
        "| load ms/adapter | file KiB | memory KiB | memory / file |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gen = (
            f"{r['generate_tokens_per_s']:,.0f} | {r['generate_vs_merged']:.2f}"
            if "generate_tokens_per_s" in r
            else "– | –"
        )
        load = "–" if r["load_seconds_per_adapter"] is None else f"{1e3 * r['load_seconds_per_adapter']:.1f}"
        lines.append(
            f"| {r['model']} | {r['adapters']} | {r['distinct']} | {r['batch']} | "
            f"{r['prefill_tokens_per_s']:,.0f} | {r['prefill_vs_merged']:.2f} | {gen} | {load} | "
            f"{r['file_bytes_per_adapter'] / 1024:.1f} | {r['memory_bytes_per_adapter'] / 1024:.1f} | "
            f"{r['memory_vs_file']:.2f} |"
        )
    atomic_write_text(os.path.join(output, name + ".md"), "\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    parser.add_argument("--adapters", nargs="+", type=int, default=[1, 8, 64, 1000])
    parser.add_argument("--distinct", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument(
        "--batch", type=int, default=64, help="sequences per batch (at least the distinct count)"
    )
    parser.add_argument("--tokens", type=int, default=16, help="tokens per sequence (prefill)")
    parser.add_argument("--prompt", type=int, default=4, help="prompt tokens (generate)")
    parser.add_argument("--new-tokens", type=int, default=8, help="new tokens per sequence (generate)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--map-cache",
        type=int,
        default=0,
        help="MiB of adapters' maps kept between batches (model.set_map_cache; default 0: off)",
    )
    parser.add_argument("--quick", action="store_true", help="two layers, 1 and 8 adapters, small batches")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.distinct, args.batch, args.tokens = [1, 8], [1, 8], 8, 8
        args.new_tokens, args.repeats = 4, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    rows = [row for name in args.models for row in run_model(name, args)]
    default = os.path.join("benchmarks", "results", args.device + ("-quick" if args.quick else ""))
    report(rows, args, args.output or default, "serving-map-cache" if args.map_cache else "serving")
    return 0


if __name__ == "__main__":
    sys.exit(main())
