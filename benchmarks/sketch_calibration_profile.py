"""Where a sketched S2FT calibration's time goes, on a Llama-architecture model with random weights (bfloat16, or ``--dtype``).

Times (wall clock, one process) the parts of ``calibrate`` with ``S2FTConfig(prior_rank=k)``: the sketches added
call by call, the Adam prior's squares, the factorization at the end, and planning (the greedy search from points
with its nearest-neighbour lists, the spectrum sampled by blocks), against one plain forward and backward pass of
a batch; and the process's CPU time in each (with one thread, the less noisy figure on a shared machine). Prints a
small table; nothing is written.

    OMP_NUM_THREADS=1 python benchmarks/sketch_calibration_profile.py --layers 1 --batches 2   # Llama-2-7B shape

With ``--memory``, where the memory goes instead: what the sketched strategy holds for the whole pass (per layer:
the sketches ``Y`` ``(d_out, k)`` and ``W`` ``(l, d_in)``, the Adam row and column sums; the test matrices once per
shape), the peak of prior-sized tensors (:class:`s2ft.tuner.calibration.PriorMemory`), and the resident set's peak
(sampled every 0.5 ms, glibc mmap threshold 128 KiB) above the built model in each phase of ``calibrate`` (the
forward and backward passes, the sketches' ``add_call``, the Adam squares' ``add_calls``, the factorization, the
planning), beside the peak of one plain forward and backward pass (the model's own, what any training step pays):

    OMP_NUM_THREADS=1 python benchmarks/sketch_calibration_profile.py --memory --hidden 1536 --intermediate 4096 \
        --heads 12 --layers 2 --batches 2   # the 0.5B shape of benchmarks/llm_scale.py
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import os
import threading
import time

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="the model's weights (float32 on a CPU without bfloat16 arithmetic)",
    )
    parser.add_argument(
        "--squares",
        default=None,
        choices=["exact", "sketch"],
        help="how the sketched Adam prior takes its squares' row and column sums (default: the library's)",
    )
    parser.add_argument("--memory", action="store_true", help="where the memory goes, instead of the time")
    parser.add_argument(
        "--oversample", default=None, help="the co-range oversampling p (l = k + p; default: the library's)"
    )
    parser.add_argument(
        "--sketch-dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="default: the library's, by layer",
    )
    args = parser.parse_args(argv)
    if args.memory:
        memory_profile(args)
        return

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
    timed(
        calibration.SketchedAdamPrior,
        "add_calls",
        "Adam squares (add_calls: row_col_squares, or the sketches folded)",
    )
    timed(calibration.SketchedAdamPrior, "finish", "factorization (QR, lstsq, SVD)")
    timed(planner, "plan_for", "planning, all")
    timed(point_search, "greedy_paths_from_points", "  greedy search from points")
    timed(point_search, "nearest_neighbours", "    of which nearest-neighbour lists")
    timed(planner, "sample_locations_in_blocks", "  spectrum by blocks")

    if args.squares is not None:
        calibration.SKETCH_SQUARES = args.squares
    model, wrapped, batches = _build(args)
    start, start_cpu = time.perf_counter(), time.process_time()
    wrapped.calibrate(batches)
    total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    model.train()
    start, start_cpu = time.perf_counter(), time.process_time()
    model(**batches[0]).loss.backward()
    plain, plain_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    what = f"{args.layers} layer(s), {args.batches} batch(es), k = {args.rank}, {args.targets}"
    what += f", squares {calibration.SKETCH_SQUARES}"
    print(f"| part | s ({what}) | CPU s |")
    print("|---|---|---|")
    print(f"| calibration, in all | {total:.1f} | {total_cpu:.1f} |")
    for label, seconds in spent.most_common():
        print(f"| {label} | {seconds:.1f} | {cpu[label]:.1f} |")
    print(f"| one plain forward and backward pass of a batch (for scale) | {plain:.1f} | {plain_cpu:.1f} |")


def _build(args):
    """The random-weight bfloat16 Llama of ``args``'s shape, checkpointed, with S2FT at ``args.rank``, and the
    calibration batches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import s2ft

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
    torch.set_default_dtype(getattr(torch, getattr(args, "dtype", "bfloat16")))
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
    return model, wrapped, batches


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_profile(args) -> None:
    import s2ft.tuner.calibration as calibration
    import s2ft.tuner.planner as planner

    strategies = dict(calibration.SKETCHED_STRATEGIES)
    patched = [
        (calibration.SketchedGradientPrior, "add_call"),
        (calibration.SketchedAdamPrior, "add_calls"),
        (calibration.SketchedAdamPrior, "finish"),
        (planner, "plan_for"),
    ]
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name in patched]
    try:
        _memory_profile(args, calibration, planner)
    finally:  # as it was (for a caller in the same process)
        calibration.SKETCHED_STRATEGIES.update(strategies)
        for owner, name, original in saved:
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def _memory_profile(args, calibration, planner) -> None:

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: freed tensors go back at once, as in llm_scale.py

    def trim() -> None:
        gc.collect()
        libc.malloc_trim(0)

    options: dict = {}
    if args.oversample is not None:
        options["oversample"] = int(args.oversample)
    if args.sketch_dtype is not None:
        options["sketch_dtype"] = getattr(torch, args.sketch_dtype)
    held: dict = {}
    for kind, strategy in list(calibration.SKETCHED_STRATEGIES.items()):

        def init(self, layers, _strategy=strategy, **kw):
            _strategy.__init__(self, layers, **{**kw, **options})
            held["strategy"] = self
            held["breakdown"] = _held_by(self)

        calibration.SKETCHED_STRATEGIES[kind] = type(strategy.__name__, (strategy,), {"__init__": init})

    stage = ["idle"]
    peaks: collections.Counter = collections.Counter()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            now, where = _rss(), stage[0]
            peaks[where] = max(peaks[where], now)
            time.sleep(0.0005)

    def staged(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*a, **k):
            previous, stage[0] = stage[0], label
            try:
                return original(*a, **k)
            finally:
                stage[0] = previous

        setattr(owner, name, wrapper)

    staged(calibration.SketchedGradientPrior, "add_call", "sketches, call by call (add_call)")
    staged(calibration.SketchedAdamPrior, "add_calls", "Adam squares (add_calls)")
    staged(calibration.SketchedAdamPrior, "finish", "factorization (finish)")
    staged(planner, "plan_for", "planning")
    model, wrapped, batches = _build(args)
    wrapped.train()
    threading.Thread(target=sample, daemon=True).start()
    trim()
    base = _rss()
    stage[0] = "forward and backward passes (outside the above)"
    with calibration.prior_memory() as ledger:
        wrapped.calibrate(batches)
    stage[0] = "idle"
    held.pop("strategy", None)
    trim()
    # one plain forward and backward pass, inputs requiring grad (the model's own peak, as a step's)
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    base_plain = _rss()
    stage[0] = "plain"
    model(**batches[0]).loss.backward()
    stage[0] = "idle"
    time.sleep(0.01)
    stop.set()
    mib = 2**20
    label = f"{args.layers} layer(s), hidden {args.hidden}, intermediate {args.intermediate}, k = {args.rank}"
    print(f"| held for the whole pass ({label}, {args.targets}) | MiB |")
    print("|---|---|")
    for part, size in held["breakdown"].items():
        print(f"| {part} | {size / mib:.2f} |")
    print(f"| prior-sized tensors' peak (PriorMemory) | {ledger.peak / mib:.1f} |")
    print()
    print(f"| phase ({args.batches} batch(es)) | resident peak above the built model, MiB |")
    print("|---|---|")
    for where, top in peaks.most_common():
        if where not in ("idle", "plain"):
            print(f"| {where} | {(top - base) / mib:.1f} |")
    print(f"| one plain forward and backward pass | {(peaks['plain'] - base_plain) / mib:.1f} |")


def _held_by(strategy) -> dict:
    """Bytes the sketched strategy holds for the whole pass: per layer shape and sketch, and the test matrices."""
    out: collections.Counter = collections.Counter()

    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    for name, layer in strategy.layers.items():
        shape = f"{layer.d_out} x {layer.d_in}"
        y, w = strategy.y[name], strategy.w[name]
        dtype = str(y.dtype).removeprefix("torch.")
        out[f"Y ({layer.d_out} x {y.shape[1]}, {dtype}), {shape} layers"] += nbytes(y)
        out[f"W ({w.shape[0]} x {layer.d_in}, {dtype}), {shape} layers"] += nbytes(w)
        if hasattr(strategy, "row_sq"):
            out["Adam row and column sums, all layers"] += nbytes(strategy.row_sq[name])
            out["Adam row and column sums, all layers"] += nbytes(strategy.col_sq[name])
    seen = set()
    for name in strategy.layers:
        for t in (strategy.omega[name], strategy.psi[name]):
            if id(t) not in seen:
                seen.add(id(t))
                out["test matrices Ω, Ψ (once per shape)"] += nbytes(t)
    out["all"] = sum(out.values())
    return dict(out)


if __name__ == "__main__":
    main()
