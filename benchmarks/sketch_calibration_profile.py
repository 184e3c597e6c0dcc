"""Where a sketched S2FT calibration's time goes, on a Llama-architecture model with random bfloat16 weights.

Times (wall clock, one process) the parts of ``calibrate`` with ``S2FTConfig(prior_rank=k)``: the sketches added
call by call, the Adam prior's squares, the factorization at the end, and planning (the greedy search from points
with its nearest-neighbour lists, the spectrum sampled by blocks), against one plain forward and backward pass of
a batch; and the process's CPU time in each (with one thread, the less noisy figure on a shared machine). Prints a
small table; nothing is written.

    OMP_NUM_THREADS=1 python benchmarks/sketch_calibration_profile.py --layers 1 --batches 2   # Llama-2-7B shape
"""

from __future__ import annotations

import argparse
import collections
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--targets", default="all-linear")
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    import s2ft
    import s2ft.ops.point_search as point_search
    import s2ft.tuner.calibration as calibration
    import s2ft.tuner.planner as planner

    spent: collections.Counter = collections.Counter()
    cpu: collections.Counter = collections.Counter()

    def timed(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*a, **k):
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                return original(*a, **k)
            finally:
                spent[label] += time.perf_counter() - start
                cpu[label] += time.process_time() - start_cpu

        setattr(owner, name, wrapper)

    timed(calibration.SketchedGradientPrior, "add_call", "sketches, call by call")
    timed(calibration.SketchedAdamPrior, "add_calls", "Adam squares (row_col_squares)")
    timed(calibration.SketchedAdamPrior, "finish", "factorization (QR, lstsq, SVD)")
    timed(planner, "plan_for", "planning, all")
    timed(point_search, "greedy_paths_from_points", "  greedy search from points")
    timed(point_search, "nearest_neighbours", "    of which nearest-neighbour lists")
    timed(planner, "sample_locations_in_blocks", "  spectrum by blocks")

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=32000,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    wrapped = s2ft.get_spectral_model(
        model, s2ft.S2FTConfig(target_modules=targets, n_frequency=1000, prior_rank=args.rank)
    )
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(0, 32000, (1, args.seq_len), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    start, start_cpu = time.perf_counter(), time.process_time()
    wrapped.calibrate(batches)
    total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    model.train()
    start, start_cpu = time.perf_counter(), time.process_time()
    model(**batches[0]).loss.backward()
    plain, plain_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    what = f"{args.layers} layer(s), {args.batches} batch(es), k = {args.rank}, {args.targets}"
    print(f"| part | s ({what}) | CPU s |")
    print("|---|---|---|")
    print(f"| calibration, in all | {total:.1f} | {total_cpu:.1f} |")
    for label, seconds in spent.most_common():
        print(f"| {label} | {seconds:.1f} | {cpu[label]:.1f} |")
    print(f"| one plain forward and backward pass of a batch (for scale) | {plain:.1f} | {plain_cpu:.1f} |")


if __name__ == "__main__":
    main()
