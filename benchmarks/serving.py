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

``--compile``: instead, each model with ``max(--distinct)`` adapters loaded, eager and under ``torch.compile``
(inductor, the wrapped model's inner forward compiled, as ``generate`` needs): the merged model (one adapter
merged and unloaded: a plain model, ``fullgraph=True``), one adapter active (``set_adapter``, ``fullgraph=True``)
and the mixed batch of ``max(--distinct)`` distinct adapters (``fullgraph=True`` too: without autograd each adapted
layer's adapters are one custom operator, ``s2ft.tuner.serving.mixed_apply``). Prefill and generation tokens per second against the merged
model in the same mode; the first call (which compiles) timed apart. To ``serving_compile.{md,json}``.
``--fold-head`` adds the merged model with frozen weights (as the wrapped model's are) and one adapter and the mixed
batch with the output head's input made contiguous (``s2ft.tuner.serving.fold_head_input``: on frozen weights
torch's matmul runs generate's sliced head as a ``bmm`` against the weight expanded over the batch); to
``serving_compile_gen.{md,json}``. ``--name`` sets the files' name instead.

    OMP_NUM_THREADS=2 python benchmarks/serving.py      # the full run, ~13 min on 2 CPU threads
    python benchmarks/serving.py --quick                # two layers, 1 and 8 adapters: a check that it works
    python benchmarks/serving.py --device cuda
    OMP_NUM_THREADS=2 python benchmarks/serving.py --map-cache 256   # with a 256 MiB map cache: serving-map-cache.md
    OMP_NUM_THREADS=1 python benchmarks/serving.py --compile --adapters 64 --distinct 64   # serving_compile.md
    OMP_NUM_THREADS=1 python benchmarks/serving.py --compile --fold-head --models smollm2 --layers 2 \
        --adapters 64 --distinct 64 --repeats 3                                        # serving_compile_gen.md
    OMP_NUM_THREADS=1 python benchmarks/serving.py --compile --fold-head --cpu-time --models smollm2 minilm \
        --layers 2 --adapters 64 --distinct 64 --repeats 6 --name serving_compile_mixed  # serving_compile_mixed.md

Without autograd no adapter keeps a dense ``ΔW`` (``s2ft.tuner.serving``): a mixed batch goes through one
``MixedBank`` per layer, which copies nothing and builds the maps of the batch's adapters on each call.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from s2ft import S2FTConfig, get_spectral_model
from s2ft.io import atomic_write_text
from s2ft.tuner import serving
from s2ft.tuner.serving import fold_head_input

FOLDED = "head input contiguous"  # the --fold-head settings (s2ft.tuner.serving.fold_head_input)


def build(name: str, quick: bool, depth: int | None = None) -> tuple[torch.nn.Module, list[str], int]:
    """(random-weight model, target modules, vocabulary size); ``depth``: that many layers instead of the
    model's own."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    layers = 2 if quick else depth
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


# What timed() reads: wall-clock seconds, or with --cpu-time the process's CPU seconds (on a shared machine, with
# one thread, what the process itself spent: other jobs' time slices do not count)
CLOCK = [time.perf_counter]


def timed(fn, repeats: int, device: str, first: dict | None = None, key: str = "") -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up (its seconds into ``first[key]``)."""
    sync, clock = synced(device), CLOCK[0]
    start = clock()
    fn()
    sync()
    if first is not None:
        first[key] = clock() - start
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        sync()
        times.append(clock() - start)
    return statistics.median(times)


def speeds(
    model, args, vocab: int, names: list[str] | None, causal: bool, first: dict | None = None
) -> dict[str, float]:
    """Tokens per second of prefill (and, causal, of generation) for a batch with ``names`` (None: plain);
    ``first``: the warm-up calls' seconds by kind."""
    g = torch.Generator().manual_seed(1)
    batch = len(names) if names else args.batch
    ids = torch.randint(100, vocab, (batch, args.tokens), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    kwargs = {} if names is None else {"adapter_names": names}

    @torch.no_grad()
    def prefill():
        model(input_ids=ids, attention_mask=mask, **kwargs)

    out = {"prefill": batch * args.tokens / timed(prefill, args.repeats, args.device, first, "prefill")}
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

        out["generate"] = (
            batch * new / timed(generate, max(1, args.repeats // 2), args.device, first, "generate")
        )
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


def run_compiled(name: str, args) -> list[dict]:
    """The ``--compile`` rows of one model: merged, one adapter and the mixed batch, eager and compiled."""
    base, targets, vocab = build(name, args.quick, args.layers)
    causal = name == "smollm2"
    base.to(args.device)
    generator = torch.Generator().manual_seed(0)
    distinct = max(args.distinct)

    def config(seed: int) -> S2FTConfig:
        return S2FTConfig(target_modules=targets, n_frequency=args.n, seed=seed)

    model = get_spectral_model(base, config(0), adapter_name="a0")
    randomize(model, "a0", generator)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=["a0"])
        sources = [os.path.join(tmp, "a0")]
        for i in range(1, min(8, distinct)):
            model.add_adapter(f"src{i}", config(i))
            randomize(model, f"src{i}", generator)
            model.save_pretrained(tmp, selected_adapters=[f"src{i}"])
            model.delete_adapter(f"src{i}")
            sources.append(os.path.join(tmp, f"src{i}"))
        for i in range(1, distinct):
            model.load_adapter(sources[i % len(sources)], f"a{i}")
    model.set_adapter("a0")
    if args.map_cache:
        model.set_map_cache(args.map_cache * 2**20)
    merged = copy.deepcopy(model).merge_and_unload(["a0"])  # a plain model: the fastest one adapter can be
    batch = max(args.batch, distinct)
    names = [f"a{i % distinct}" for i in range(batch)]
    inner = model.get_base_model()
    inner_forward, merged_forward = inner.forward, merged.forward
    # the three share the model class's forward code: each is one more compiled version of it
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 256
    # --fold-head turns a forward pre-hook of the head on and off between settings; by default Dynamo does not guard
    # on a submodule's hooks, so a graph traced without the hook would serve the settings with it (ignoring it)
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    # an s2ft from before the mixed operator (s2ft.tuner.serving.mixed_apply) breaks the graph at each adapted layer
    # under a mixed batch: compiled without fullgraph there (to measure the code before it with this script)
    whole = hasattr(serving, "mixed_apply")
    compiled = {
        "merged": torch.compile(merged_forward, fullgraph=True),
        "one adapter": torch.compile(inner_forward, fullgraph=True),
        "mixed": torch.compile(inner_forward, fullgraph=whole),  # one operator per adapted layer, no break
    }
    settings = {"merged": (merged, None), "one adapter": (model, None), "mixed": (model, names)}
    plain = {"merged": merged}  # the plain models, each with its own forward
    if args.fold_head:
        # merge_and_unload gives the weights back their requires_grad (True); the wrapped model's are frozen,
        # which changes how torch's matmul runs the head on generate's sliced hidden states (fold_head_input)
        frozen = copy.deepcopy(merged).requires_grad_(False)
        plain["merged, frozen"] = frozen
        compiled["merged, frozen"] = torch.compile(frozen.forward, fullgraph=True)
        settings = {
            "merged": settings["merged"],
            "merged, frozen": (frozen, None),
            "one adapter": settings["one adapter"],
            "mixed": settings["mixed"],
            f"one adapter, {FOLDED}": (model, None),
            f"mixed, {FOLDED}": (model, names),
        }
        compiled[f"one adapter, {FOLDED}"] = compiled["one adapter"]
        compiled[f"mixed, {FOLDED}"] = compiled["mixed"]
    forwards = {key: m.forward for key, m in plain.items()}
    rows = []
    for mode in ("eager", "compiled"):
        results: dict[str, dict] = {}
        for setting in (
            *settings,
            "merged",
        ):  # the merged model again at the end: the faster is the reference
            runner, batch_names = settings[setting]
            fold_head_input(inner, on=setting.endswith(FOLDED))
            if args.fold_head:  # SpectralModel.generate folds by default: the other settings without it
                model.fold_head_in_generate = setting.endswith(FOLDED)
            if mode == "compiled":
                target = plain.get(setting, inner)
                target.forward = compiled[setting]
            first: dict[str, float] = {}
            speed = speeds(runner, args, vocab, batch_names, causal, first)
            if setting in results:
                results[setting]["speed"] = {
                    k: max(v, results[setting]["speed"][k]) for k, v in speed.items()
                }
            else:
                results[setting] = {"speed": speed, "first_s": first}
            print(
                json.dumps(
                    {"model": name, "mode": mode, "setting": setting, "speed": speed, "first_s": first}
                ),
                flush=True,
            )
        inner.forward = inner_forward
        for key, m in plain.items():
            m.forward = forwards[key]
        reference = results["merged"]["speed"]
        for setting, r in results.items():
            rows.append(
                {
                    "model": name,
                    "mode": mode,
                    "setting": setting,
                    "adapters": distinct,
                    "distinct": distinct if setting.startswith("mixed") else 1,
                    "batch": batch,
                    "tokens": args.tokens,
                    **{f"{k}_tokens_per_s": v for k, v in r["speed"].items()},
                    **{f"{k}_vs_merged": v / reference[k] for k, v in r["speed"].items()},
                    **{f"{k}_first_call_s": v for k, v in r["first_s"].items()},
                }
            )
    eager = {r["setting"]: r for r in rows if r["mode"] == "eager"}
    for row in rows:
        for kind in ("prefill", "generate"):
            if row["mode"] == "compiled" and f"{kind}_tokens_per_s" in row:
                row[f"{kind}_compiled_vs_eager"] = (
                    row[f"{kind}_tokens_per_s"] / eager[row["setting"]][f"{kind}_tokens_per_s"]
                )
    return rows


def compiled_report(rows: list[dict], args, output: str, name: str = "serving_compile") -> None:
    command = "python benchmarks/serving.py " + " ".join(sys.argv[1:])
    meta = {
        "command": command,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    atomic_write_text(
        os.path.join(output, name + ".json"), json.dumps({**meta, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        f"# Serving eager and compiled (S2FT n = {args.n}, random-weight MiniLM-L6 and SmolLM2-135M shapes)",
        "",
        f"`{command}`, {meta['threads']} thread(s), {args.device}, torch {meta['torch']}, {meta['date']}"
        + (", timed in process CPU seconds" if args.cpu_time else "")
        + ". "
        f"Prefill: B sequences of {args.tokens} tokens; generate: {args.new_tokens} new tokens after "
        f"{args.prompt}"
        + (f"; {args.layers} layers instead of the models' own" if args.layers else "")
        + (f"; map cache {args.map_cache} MiB (`set_map_cache`)" if args.map_cache else "")
        + ". *merged*: one adapter merged and unloaded (a plain model); *one adapter*: `set_adapter`, "
        "unmerged; *mixed*: one adapter per sequence (`adapter_names`), as many distinct as loaded. Compiled: "
        "`torch.compile` (inductor) of the inner model's forward, `fullgraph=True` "
        + (
            "(*mixed*: each adapted layer's adapters one custom operator, `s2ft.tuner.serving.mixed_apply`, which "
            "runs the eager serving code)"
            if hasattr(serving, "mixed_apply")
            else "but for *mixed* (this s2ft looks each example's adapter up outside the graph: two breaks per "
            "adapted layer)"
        )
        + "; Dynamo guards on the modules' hooks (`skip_nnmodule_hook_guards = False`). Tokens per second "
        "(medians after the first call) and their ratio to the merged model in the same mode; *first call s*: the warm-up call, which compiles. The machine was shared "
        "with other jobs: compare ratios within this table."
        + (
            f" *merged, frozen*: the merged model with its weights' `requires_grad` off, as the wrapped model's "
            f"base weights are; *{FOLDED}*: with `s2ft.tuner.serving.fold_head_input` (the output head's "
            "input made contiguous, so that torch's matmul runs the head as one `mm` on frozen weights too)."
            if args.fold_head
            else ""
        ),
        "",
        "| model | mode | setting | distinct | B | prefill tok/s | vs merged | compiled / eager | first call s "
        "| generate tok/s | vs merged | compiled / eager | first call s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cells(r: dict, kind: str) -> str:
        if f"{kind}_tokens_per_s" not in r:
            return "– | – | – | –"
        gain = r.get(f"{kind}_compiled_vs_eager")
        return (
            f"{r[f'{kind}_tokens_per_s']:,.0f} | {r[f'{kind}_vs_merged']:.2f} | "
            f"{'–' if gain is None else f'{gain:.2f}'} | {r[f'{kind}_first_call_s']:.1f}"
        )

    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['setting']} | {r['distinct']} | {r['batch']} | "
            f"{cells(r, 'prefill')} | {cells(r, 'generate')} |"
        )
    atomic_write_text(os.path.join(output, name + ".md"), "\n".join(lines) + "\n")


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
    parser.add_argument(
        "--layers", type=int, default=None, help="this many layers instead of each model's own (6 and 30)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="merged, one adapter and mixed batches, eager and under torch.compile (to serving_compile.*)",
    )
    parser.add_argument(
        "--fold-head",
        action="store_true",
        help="with --compile: also the merged model frozen, and one adapter and the mixed batch with the "
        "head's input made contiguous (s2ft.tuner.serving.fold_head_input); to serving_compile_gen.*",
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process's CPU seconds instead of wall-clock ones (CPU, one thread, a shared machine)",
    )
    parser.add_argument("--output", default=None)
    parser.add_argument("--name", default=None, help="with --compile: the result files' name (no extension)")
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.distinct, args.batch, args.tokens = [1, 8], [1, 8], 8, 8
        args.new_tokens, args.repeats = 4, 1
    if args.cpu_time:
        if args.device != "cpu":
            print("--cpu-time measures CPU runs only", file=sys.stderr)
            return 1
        CLOCK[0] = time.process_time
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    default = os.path.join("benchmarks", "results", args.device + ("-quick" if args.quick else ""))
    if args.compile:
        rows = [row for name in args.models for row in run_compiled(name, args)]
        name = args.name or ("serving_compile_gen" if args.fold_head else "serving_compile")
        compiled_report(rows, args, args.output or default, name)
        return 0
    rows = [row for name in args.models for row in run_model(name, args)]
    report(rows, args, args.output or default, "serving-map-cache" if args.map_cache else "serving")
    return 0


if __name__ == "__main__":
    sys.exit(main())
