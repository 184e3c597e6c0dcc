"""Training cost at LLM scale: S2FT and FourierFT (s2ft) against PEFT's FourierFT and LoRA on ~0.5B and ~1B models.

A Llama-architecture causal LM with random weights (speed and memory do not depend on the weights), built directly
in ``--dtype`` (bfloat16 by default) with a fixed seed: ``0.5b`` (hidden 1536, 16 layers, ~0.55B parameters) and
``1b`` (TinyLlama's shape, ~1.1B); ``tiny`` (hidden 64, 2 layers) is for checking that the script runs. For each
size, base (``none``, or ``4bit``: every linear layer but the LM head replaced by a bitsandbytes nf4 ``Linear4bit``
with the run's dtype as compute dtype), targets (``qv``: ``q_proj``/``v_proj``; ``all-linear``) and method:

- ``s2ft``, ``fourierft``: s2ft's adapters (n = ``--n-frequency``); S2FT is calibrated first on
  ``--calibration-batches`` random batches (timed, and its peak memory measured);
- ``peft-fourierft``: PEFT's FourierFT (same n); ``lora-8``, ``lora-16``: PEFT LoRA r = 8 and 16, alpha = 2r;

one training run: random token batches (``--batch-size`` x ``--seq-len``, labels = inputs), gradient checkpointing
on (non-reentrant), AdamW over the trainable parameters, one warm-up step and ``--steps`` timed ones. Measured:
seconds per step (median), the peak memory of the steps above what the built model (and adapter, and S2FT's plan)
held before them, optimizer state included; for S2FT, calibration's seconds and peak memory, and again with
``S2FTConfig.calibration_group_size = --group-size`` where the installed s2ft has that field. Each measurement runs
in a fresh subprocess, so that no peak leaks into another. A combination a library refuses (PEFT's FourierFT on a
4-bit layer) is recorded as unsupported, with the library's reason.

Peak memory: CUDA, ``max_memory_allocated`` after ``reset_peak_memory_stats``, less ``memory_allocated`` before;
CPU, the kernel's resident-set high-water mark (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``) less the
resident set before (or, where that reset is not permitted, the resident set sampled every 2 ms). On CPU each
subprocess first sets glibc's mmap threshold to 128 KiB, so that freed tensors go back to the kernel at once and a
phase's leftovers cannot hide the next phase's allocations.

Targets (ratios within one run, against PEFT LoRA r = 8 on the same size, base and targets): s2ft's methods' peak
training memory at most LoRA r = 8's; S2FT's calibration peak at most 1.2x LoRA r = 8's step peak; s2ft's
methods' step time at most 1.3x LoRA r = 8's with all-linear targets.

``--compile``: each training run then goes on, in the same process and on the same model and optimizer, under
``torch.compile(model)`` (inductor, default mode): the first compiled step (which compiles, forward and backward)
is timed apart as the compile time, then one more compiled warm-up step and ``--steps`` timed compiled steps; the
compiled step time, its ratio to the eager one and to LoRA r = 8's compiled step, and its own peak memory come
beside the eager columns (target: s2ft's methods' compiled step at most 1.3x LoRA r = 8's compiled step,
all-linear targets). The tables then go to ``llm_scale_compile.{md,json}``.

Writes ``llm_scale.md`` and ``llm_scale.json`` to ``benchmarks/results/<cpu|cuda>/`` (``--output-dir``), after each
measurement, so an interrupted run keeps what it measured.

    OMP_NUM_THREADS=2 python benchmarks/llm_scale.py                 # 0.5b and 1b, every combination (hours)
    python benchmarks/llm_scale.py --device cuda
    python benchmarks/llm_scale.py --sizes tiny --seq-len 64         # a check that it runs (minutes)
    python benchmarks/llm_scale.py --sizes 0.5b --quant none --targets qv --methods lora-8 --steps 1
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import torch

SIZES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
    ),
    "0.5b": dict(
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=16,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
    ),
    "1b": dict(  # TinyLlama-1.1B's shape
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    # Llama-2-7B's shape (every layer, the embeddings and the LM head as 7B's) with 2 of its 32 decoder layers: what
    # a layer costs is 7B's, and the model fits a CPU machine beside other jobs
    "7b-2l": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
}
SIZE_NOTES = {"7b-2l": "Llama-2-7B's shape with 2 of its 32 decoder layers (per-layer costs are 7B's)"}
METHODS = ("s2ft", "fourierft", "peft-fourierft", "lora-8", "lora-16")
OURS = ("s2ft", "fourierft")
TARGETS = {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"}
QUANT = ("none", "4bit")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
REFERENCE = "lora-8"
MEMORY_RATIO, CALIBRATION_RATIO, TIME_RATIO = 1.0, 1.2, 1.3
SKETCH_TIME_RATIO = (
    1.5  # a sketched calibration's time against as many LoRA r = 8 steps as calibration batches
)
MIB = 2**20


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def has_group_size() -> bool:
    """Whether the installed s2ft's S2FTConfig has ``calibration_group_size``."""
    import s2ft

    return "calibration_group_size" in {f.name for f in dataclasses.fields(s2ft.S2FTConfig)}


# ------------------------------------------------------------------------------------------ memory
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def limit_malloc_caching() -> bool:
    """glibc: serve every allocation of 128 KiB and more by its own mmap (fixed threshold), so freed tensors go
    back to the kernel at once and the resident set follows what is allocated. False where that is not glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(-3, 128 * 1024))  # M_MMAP_THRESHOLD


def _trim() -> None:
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class Memory:
    """Peak memory above a baseline: ``reset()`` takes the baseline (what is held now) and starts a new peak,
    ``peak()`` the most held since, less the baseline; ``current()`` what is held now."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0
        self._sampled = 0
        self._stop: threading.Event | None = None
        if device.type == "cuda":
            self.method = "CUDA max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _hwm_bytes()
            self.method = "CPU VmHWM (reset through /proc/self/clear_refs)"
        except OSError:
            self.method = "CPU resident set sampled every 2 ms"
            self._stop = threading.Event()
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _rss_bytes())
            time.sleep(0.002)

    def close(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def current(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return _rss_bytes()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _trim()
        self.baseline = self.current()
        if self.device.type == "cpu":
            if self._stop is None:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            self._sampled = self.baseline

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        top = _hwm_bytes() if self._stop is None else max(self._sampled, _rss_bytes())
        return max(0, top - self.baseline)


# ------------------------------------------------------------------------------------------ one measurement
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def llama_config(size: str, seq_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        **SIZES[size],
        max_position_embeddings=max(2048, seq_len),
        tie_word_embeddings=False,
        use_cache=False,
    )


def build_model(spec: dict, device: torch.device) -> tuple[torch.nn.Module, int]:
    """The random-weight model, built in the run's dtype on ``device`` (no float32 copy), and its parameter count
    (before any quantization)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(spec["seed"])
    with default_dtype(DTYPES[spec["dtype"]]), device:
        model = LlamaForCausalLM(llama_config(spec["size"], spec["seq_len"]))
    params = sum(p.numel() for p in model.parameters())
    if spec["quant"] == "4bit":
        quantize_4bit(model, DTYPES[spec["dtype"]])
    model.requires_grad_(False)
    return model, params


def quantize_4bit(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Every ``nn.Linear`` but the output layer replaced by a bitsandbytes nf4 ``Linear4bit`` computing in
    ``compute_dtype``, quantized on the weight's own device, one layer at a time."""
    import bitsandbytes as bnb

    output = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not output]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
        # every method on bitsandbytes' differentiable path: its AVX512-BF16 CPU kernel (used in eval mode without
        # gradients, e.g. S2FT's calibration of layers before the first target) takes no gradient
        layer.support_avx512bf16_for_cpu = False
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(parent, child, layer.to(linear.weight.device))
        del linear, layer


def attach(model: torch.nn.Module, spec: dict, group_size: int | None):
    """The model with the spec's adapter (S2FT: with ``spec["prior_rank"]``, a sketched prior)."""
    method, targets, n = spec["method"], TARGETS[spec["targets"]], spec["n_frequency"]
    if method in OURS:
        import s2ft

        if method == "s2ft":
            extra = {} if group_size is None else {"calibration_group_size": group_size}
            # None: the exact prior (S2FTConfig's default, "auto", would sketch these wide layers)
            extra["prior_rank"] = spec.get("prior_rank", spec.get("s2ft_prior_rank"))
            config = s2ft.S2FTConfig(target_modules=targets, n_frequency=n, **extra)
        else:
            config = s2ft.FourierFTConfig(target_modules=targets, n_frequency=n)
        return s2ft.get_spectral_model(model, config)
    import peft

    if method == "peft-fourierft":
        config = peft.FourierFTConfig(target_modules=targets, n_frequency=n, task_type="CAUSAL_LM")
    else:
        r = int(method.split("-")[1])
        config = peft.LoraConfig(
            r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"
        )
    return peft.get_peft_model(model, config)


def adapter_bytes(wrapped, method: str) -> int:
    """Bytes of the adapter's weights file (safetensors), computed in memory."""
    if method in OURS:
        return wrapped.adapter_nbytes()
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(wrapped).items()}
    return len(save(state))


def random_batches(spec: dict, count: int, seed: int, device: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    vocab = SIZES[spec["size"]]["vocab_size"]
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (spec["batch_size"], spec["seq_len"]), generator=g).to(device)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 240 else line[:237] + "..."


class Unsupported(Exception):
    """The library refused to attach this adapter to this model."""


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Gradient (activation) checkpointing, non-reentrant, by the name this transformers version prefers."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def exercise(spec: dict, device: torch.device, memory: Memory, result: dict, tag: str | None) -> None:
    """Build, attach, calibrate (S2FT) and train as ``spec`` says, recording into ``result`` (``result["stage"]``:
    where it is). ``tag`` None: silent (the warm-up)."""

    def say(message: str) -> None:
        if tag is not None:
            log(f"  [{tag}] {message}")

    group_size = spec.get("group_size")
    result["stage"] = "build"
    memory.reset()
    before = memory.baseline
    say("building the model")
    model, params = build_model(spec, device)
    _trim()
    result["params"] = params
    result["base_bytes"] = memory.current() - before
    enable_checkpointing(model)
    result["stage"] = "attach"
    try:
        wrapped = attach(model, spec, group_size)
    except Exception as error:
        raise Unsupported(short(error)) from error
    wrapped.train()
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    result["trainable_params"] = sum(p.numel() for p in trainable)
    if spec["method"] == "s2ft":
        result["stage"] = "calibration"
        batches = random_batches(spec, spec["calibration_batches"], spec["seed"] + 1, device)
        say(f"calibrating on {len(batches)} batches")
        memory.reset()
        clock = _clock(spec)
        start = clock()
        wrapped.calibrate(batches)
        sync(device)
        result["calibration_s"] = clock() - start
        result["calibration_peak_bytes"] = memory.peak()
        result["calibration_batches"] = len(batches)
        if spec.get("s2ft_prior_rank") is not None and spec.get("prior_rank") is None:
            result["s2ft_prior_rank"] = spec["s2ft_prior_rank"]
        del batches
        say(
            f"calibration {result['calibration_s']:.2f} s, peak {result['calibration_peak_bytes'] / MIB:.1f} MiB"
        )
        if group_size is not None:
            result["group_size"] = group_size
            return
        if spec.get("prior_rank") is not None:  # the sketched calibration alone
            result["prior_rank"] = spec["prior_rank"]
            return
    result["stage"] = "training"
    batch = random_batches(spec, 1, spec["seed"] + 2, device)[0]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step() -> None:
        loss = wrapped(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    memory.reset()
    times = []
    clock = _clock(spec)
    for index in range(spec["steps"] + 1):
        start = clock()
        step()
        sync(device)
        seconds = clock() - start
        say(f"step {index}{' (warm-up)' if index == 0 else ''}: {seconds:.2f} s")
        if index:
            times.append(seconds)
    result["peak_step_bytes"] = memory.peak()
    result["step_times_s"] = times
    result["step_s"] = statistics.median(times)
    if spec.get("compile"):
        compiled_steps(wrapped, batch, optimizer, spec, device, memory, result, say)
    result["stage"] = "adapter size"
    result["adapter_bytes"] = adapter_bytes(wrapped, spec["method"])
    del result["stage"]


def compiled_steps(wrapped, batch, optimizer, spec, device, memory, result, say) -> None:
    """The same training step under ``torch.compile`` (inductor): the first call (which compiles) timed apart as
    ``compile_s``, one more warm-up, then ``spec["steps"]`` timed ones (``compiled_step_s``: their median)."""
    result["stage"] = "compiled training"
    import torch._dynamo

    torch._dynamo.reset()  # nothing compiled for the warm-up's tiny model counts here
    torch._dynamo.utils.counters.clear()
    # transformers' Llama layers set and reset the ``kernels`` package's kernel-mode variable in their forward; under
    # checkpointing Dynamo refuses that side effect (and runs the checkpointed layer eager) unless it may skip
    # replaying it in the backward's recomputation, which does not need it
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    compiled = torch.compile(wrapped)

    def step() -> None:
        loss = compiled(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    memory.reset()
    times = []
    for index in range(spec["steps"] + 2):
        start = time.perf_counter()
        step()
        sync(device)
        seconds = time.perf_counter() - start
        if index == 0:
            result["compile_s"] = seconds
        what = " (compiles)" if index == 0 else " (warm-up)" if index == 1 else ""
        say(f"compiled step {index}{what}: {seconds:.2f} s")
        if index > 1:
            times.append(seconds)
    result["compiled_peak_step_bytes"] = memory.peak()
    result["compiled_step_times_s"] = times
    result["compiled_step_s"] = statistics.median(times)
    counters = torch._dynamo.utils.counters
    result["graph_breaks"] = sum(counters["graph_break"].values())
    result["graphs"] = counters["stats"]["unique_graphs"]


def _clock(spec: dict):
    """The clock of the timings: the process's CPU time with ``spec["cpu_time"]`` (with one thread, what a shared
    machine's load does not inflate), else the wall clock."""
    return time.process_time if spec.get("cpu_time") else time.perf_counter


def measure(spec: dict) -> dict:
    """One (size, quant, targets, method) measurement; with ``spec["group_size"]``, S2FT's calibration alone with
    that group size. First (unless ``spec["warm_up"]`` is false) the same on the tiny model (one step, one
    calibration batch), unmeasured, so that what happens once per process (code loaded, kernels and caches
    initialized) counts in no measurement. Never raises: failures come back as ``status`` "unsupported" (the
    library refused to attach the adapter) or "error"."""
    device = torch.device(spec["device"])
    tag = f"{spec['size']} {spec['quant']} {spec['targets']} {spec['method']}"
    if spec.get("group_size") is not None:
        tag += f" (calibration, group size {spec['group_size']})"
    if spec.get("prior_rank") is not None:
        tag += f" (calibration, prior rank {spec['prior_rank']})"
    memory = Memory(device)
    result = {key: spec[key] for key in ("size", "quant", "targets", "method")}
    result.update(
        status="ok", memory_method=memory.method, threads=torch.get_num_threads(), malloc=spec.get("malloc")
    )
    warm = {**spec, "size": "tiny", "steps": 1, "calibration_batches": 1}
    squares = None
    if spec.get("sketch_squares"):  # how a sketched Adam prior takes its squares' sums, for this measurement
        import s2ft.tuner.calibration as calibration

        squares, calibration.SKETCH_SQUARES = calibration.SKETCH_SQUARES, spec["sketch_squares"]
    try:
        if spec.get("warm_up", True):
            result["stage"] = "warm-up on the tiny model"
            log(f"  [{tag}] warm-up on the tiny model")
            exercise(warm, device, memory, {}, None)
            _trim()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        exercise(spec, device, memory, result, tag)
    except Unsupported as error:
        result.update(status="unsupported", reason=str(error))
        result.pop("stage", None)
        log(f"  [{tag}] unsupported: {result['reason']}")
    except Exception as error:
        oom = device.type == "cuda" and isinstance(error, torch.cuda.OutOfMemoryError)
        result.update(status="error", reason="out of memory" if oom else short(error))
        result["traceback"] = traceback.format_exc().strip().splitlines()[-8:]
        log(f"  [{tag}] error during {result['stage']}:\n" + traceback.format_exc())
    finally:
        memory.close()
        if squares is not None:
            calibration.SKETCH_SQUARES = squares
    return result


def run_one(spec: dict) -> None:
    """The ``--one`` entry: measure in this fresh process, write the result to ``spec["result_path"]``."""
    if spec["device"] == "cpu":
        spec["malloc"] = "glibc mmap threshold 128 KiB" if limit_malloc_caching() else None
    result = measure(spec)
    with open(spec["result_path"], "w") as f:
        json.dump(result, f)


def run_isolated(spec: dict, timeout: float | None) -> dict:
    fd, path = tempfile.mkstemp(prefix="llm_scale.", suffix=".json")
    os.close(fd)
    try:
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--one",
            json.dumps({**spec, "result_path": path}),
        ]
        try:
            proc = subprocess.run(command, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return {"status": "error", "stage": "subprocess", "reason": f"timed out after {timeout:g} s"}
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            return json.load(f)
        killed = proc.returncode < 0 or proc.returncode == 137
        reason = f"the subprocess exited with code {proc.returncode}" + (
            " (killed: out of memory?)" if killed else ""
        )
        return {"status": "error", "stage": "subprocess", "reason": reason}
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


# ------------------------------------------------------------------------------------------ report
def environment(device: torch.device) -> dict:
    import peft
    import transformers

    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = None
    name = platform.processor() or "CPU"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            name = f"{models[0]} ({len(models)} logical CPUs)"
    try:  # how this s2ft sketches (S2FTConfig.prior_rank): the co-range width at k = 64, the sketches' dtype
        from s2ft.ops.sketch import corange_width

        sketch = f"co-range width l = {corange_width(64, 10**9)} at k = 64"
        try:
            from s2ft.tuner.calibration import sketch_dtype_of  # noqa: F401

            sketch += ", sketches held in bfloat16 for a 16-bit layer"
        except ImportError:
            sketch += ", sketches held in float32"
    except ImportError:
        sketch = None
    return {
        "sketch": sketch,
        "device": device.type,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bnb_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _find(rows: list[dict], row: dict, method: str) -> dict | None:
    for other in rows:
        same = all(other[k] == row[k] for k in ("size", "quant", "targets"))
        if same and other["method"] == method and other["status"] == "ok":
            return other
    return None


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or not reference > 0:
        return None
    return value / reference


def evaluate(rows: list[dict]) -> None:
    """Each row's ratios to LoRA r = 8 (same size, base and targets) and its targets' PASS/MISS, in place."""
    for row in rows:
        row["ratios"], row["targets_met"] = {}, {}
        ref = _find(rows, row, REFERENCE)
        if ref is not None:
            for sketch in row.get("calibration_sketched", []):
                _sketch_ratios(sketch, ref, row)
        if row["status"] != "ok" or ref is None:
            continue
        ratios = row["ratios"]
        ratios["step_s"] = _ratio(row.get("step_s"), ref.get("step_s"))
        ratios["peak_step"] = _ratio(row.get("peak_step_bytes"), ref.get("peak_step_bytes"))
        ratios["calibration_peak"] = _ratio(row.get("calibration_peak_bytes"), ref.get("peak_step_bytes"))
        grouped = row.get("calibration_grouped") or {}
        ratios["calibration_grouped_peak"] = _ratio(
            grouped.get("calibration_peak_bytes"), ref.get("peak_step_bytes")
        )
        ratios["compiled_step_s"] = _ratio(row.get("compiled_step_s"), ref.get("compiled_step_s"))
        ratios["compiled_vs_eager"] = _ratio(row.get("compiled_step_s"), row.get("step_s"))
        met = row["targets_met"]
        if row["method"] in OURS and ratios["peak_step"] is not None:
            met["memory"] = ratios["peak_step"] <= MEMORY_RATIO
        if row["method"] in OURS and row["targets"] == "all-linear" and ratios["step_s"] is not None:
            met["step time"] = ratios["step_s"] <= TIME_RATIO
        if row["method"] in OURS and row["targets"] == "all-linear" and ratios["compiled_step_s"] is not None:
            met["compiled step time"] = ratios["compiled_step_s"] <= TIME_RATIO
        if ratios["calibration_peak"] is not None:
            met["calibration"] = ratios["calibration_peak"] <= CALIBRATION_RATIO
        if row.get("s2ft_prior_rank") and row.get("calibration_s") is not None and ref.get("step_s"):
            # a sketched calibration: its time against as many LoRA r = 8 steps as calibration batches
            ratios["calibration_time"] = row["calibration_s"] / (ref["step_s"] * row["calibration_batches"])
            met["calibration time"] = ratios["calibration_time"] <= SKETCH_TIME_RATIO
        if ratios["calibration_grouped_peak"] is not None:
            met[f"calibration g={grouped['group_size']}"] = (
                ratios["calibration_grouped_peak"] <= CALIBRATION_RATIO
            )


def _sketch_ratios(sketch: dict, ref: dict, row: dict) -> None:
    """A sketched calibration's peak against LoRA r = 8's step peak, and its time against as many LoRA r = 8 steps
    as there are calibration batches (the issue's targets: at most 1.2x and 1.5x), in place."""
    batches = sketch.get("calibration_batches")
    steps = None if ref.get("step_s") is None or not batches else ref["step_s"] * batches
    sketch["peak_ratio"] = _ratio(sketch.get("calibration_peak_bytes"), ref.get("peak_step_bytes"))
    sketch["time_ratio"] = _ratio(sketch.get("calibration_s"), steps)
    sketch["targets_met"] = {}
    if sketch["peak_ratio"] is not None:
        sketch["targets_met"]["peak"] = sketch["peak_ratio"] <= CALIBRATION_RATIO
    if sketch["time_ratio"] is not None:
        sketch["targets_met"]["time"] = sketch["time_ratio"] <= SKETCH_TIME_RATIO


def _mib(nbytes: float | None) -> str:
    return "–" if nbytes is None else f"{nbytes / MIB:,.1f}"


def _x(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}"


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def _int(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def markdown(report: dict) -> str:
    env, settings, rows = report["environment"], report["settings"], report["rows"]
    grouped = settings.get("group_size")
    methods = sorted({r["memory_method"] for r in rows if r.get("memory_method")})
    malloc = sorted({r["malloc"] for r in rows if r.get("malloc")})
    out = [
        "# Training cost at LLM scale: S2FT and FourierFT against PEFT FourierFT and LoRA",
        "",
        f"`{report['command']}`",
        "",
        f"{env['date']}; {env['device_name']}, {env['threads']} threads; torch {env['torch']}, transformers "
        f"{env['transformers']}, peft {env['peft']}, bitsandbytes {env['bitsandbytes']}, Python {env['python']}.",
        "",
        f"Llama architecture, random weights in {settings['dtype']}; batch {settings['batch_size']} x "
        f"{settings['seq_len']} tokens; gradient checkpointing (non-reentrant); AdamW over the trainable "
        f"parameters; s/step = median of {settings['steps']} timed step(s) after one warm-up"
        + (
            " (times in process CPU seconds, `--cpu-time`: with one thread, other jobs' load does not inflate them)"
            if settings.get("cpu_time")
            else ""
        )
        + f". n = "
        f"{settings['n_frequency']} for S2FT, FourierFT and PEFT FourierFT; LoRA alpha = 2r. `4bit`: every linear "
        f"layer but the LM head a bitsandbytes nf4 `Linear4bit` computing in {settings['dtype']}. S2FT calibration: "
        f"{settings['calibration_batches']} random batch(es) of the same shape"
        + (
            f"; *grouped*: the same with `calibration_group_size = {grouped}` (layers planned per group)."
            if grouped
            else " (this s2ft has no `calibration_group_size`: no grouped calibration)."
        ),
        "",
        "Peak MiB = the most memory held during the phase (all steps, warm-up included, optimizer state included; "
        "or the calibration) above what was held just before it (the built model with its adapter). Measured by: "
        + "; ".join(methods or ["–"])
        + (f" ({', '.join(malloc)})" if malloc else "")
        + ". Each row ran in "
        + (
            "this one process (`--in-process`: peaks may leak between rows)."
            if settings.get("in_process")
            else "a fresh subprocess."
        ),
        "",
        "Targets, as ratios to PEFT LoRA r = 8 on the same size, base and targets (*targets met* column):",
        "",
        "1. *memory*: peak training memory of S2FT and FourierFT ≤ LoRA r = 8's;",
        f"2. *calibration*: S2FT's calibration peak ≤ {CALIBRATION_RATIO:g}x LoRA r = 8's training step peak;",
        f"3. *step time*: S2FT's and FourierFT's s/step ≤ {TIME_RATIO:g}x LoRA r = 8's, all-linear targets.",
        "",
    ]
    header = (
        "| base | targets | method | trainable params | adapter bytes | s/step | ×LoRA-8 s/step | peak step MiB "
        "| ×LoRA-8 peak | calibration s | calibration peak MiB | ×LoRA-8 step peak |"
    )
    columns = 12
    if grouped:
        header += " grouped calibration s | grouped peak MiB | grouped ×LoRA-8 step peak |"
        columns += 3
    header += " targets met |"
    columns += 1
    order = {key: i for i, key in enumerate(settings["quant"] + settings["targets"] + settings["methods"])}
    for size in settings["sizes"]:
        size_rows = sorted(
            (r for r in rows if r["size"] == size),
            key=lambda r: (order[r["quant"]], order[r["targets"]], order[r["method"]]),
        )
        if not size_rows:
            continue
        params = next((r["params"] for r in size_rows if r.get("params")), None)
        shape = SIZES[size]
        out += [
            f"## {size}: {_int(params)} parameters",
            "",
            f"hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, "
            f"{shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads "
            f"({shape['num_key_value_heads']} key/value), vocabulary {shape['vocab_size']:,}"
            + (f" ({SIZE_NOTES[size]})" if size in SIZE_NOTES else "")
            + (
                f"; the S2FT row's calibration is sketched, rank {settings['s2ft_prior_rank']}"
                if settings.get("s2ft_prior_rank")
                else ""
            )
            + ". Base model memory: "
            + ", ".join(
                f"{q} {_mib(next((r['base_bytes'] for r in size_rows if r['quant'] == q and r.get('base_bytes') is not None), None))} MiB"
                for q in settings["quant"]
            )
            + ".",
            "",
            header,
            "|" + "---|" * columns,
        ]
        for r in size_rows:
            key = f"| {r['quant']} | {r['targets']} | {r['method']} |"
            if r["status"] != "ok":
                where = f" during {r['stage']}" if r.get("stage") else ""
                label = r["status"] if r["status"] in ("unsupported", "skipped") else f"error{where}"
                reason = r["reason"].replace("|", "\\|")
                out.append(f"{key} {label}: {reason} |" + " – |" * (columns - 4))
                continue
            ratios = r.get("ratios", {})
            cells = [
                _int(r.get("trainable_params")),
                _int(r.get("adapter_bytes")),
                _s(r.get("step_s")),
                _x(ratios.get("step_s")),
                _mib(r.get("peak_step_bytes")),
                _x(ratios.get("peak_step")),
                _s(r.get("calibration_s")),
                _mib(r.get("calibration_peak_bytes")),
                _x(ratios.get("calibration_peak")),
            ]
            if grouped:
                g = r.get("calibration_grouped") or {}
                if g.get("status", "ok") != "ok":
                    cells += [f"{g['status']}: {g.get('reason', '')}".replace("|", "\\|"), "–", "–"]
                else:
                    cells += [
                        _s(g.get("calibration_s")),
                        _mib(g.get("calibration_peak_bytes")),
                        _x(ratios.get("calibration_grouped_peak")),
                    ]
            met = r.get("targets_met", {})
            cells.append(", ".join(f"{name} {'PASS' if ok else 'MISS'}" for name, ok in met.items()) or "–")
            out.append(key + "".join(f" {c} |" for c in cells))
        out.append("")
    sketched = [(r, s) for r in rows for s in r.get("calibration_sketched", [])]
    if sketched:
        out += [
            "## Sketched calibration (`S2FTConfig.prior_rank`)",
            "",
            f"S2FT's calibration alone with a sketched prior of rank k (one pass over the "
            f"{settings['calibration_batches']} batch(es), O((d_out + d_in)·k) numbers per layer), each in its own "
            f"process. Targets: peak ≤ {CALIBRATION_RATIO:g}x LoRA r = 8's step peak; time ≤ {SKETCH_TIME_RATIO:g}x "
            f"{settings['calibration_batches']} LoRA r = 8 steps (the LoRA row of the same size, base and targets, "
            "this run)."
            + (f" This s2ft: {env['sketch']}." if env.get("sketch") else "")
            + (
                f" The Adam prior's squares: {settings['sketch_squares']} (`--sketch-squares`)."
                if settings.get("sketch_squares")
                else ""
            ),
            "",
            "| size | base | targets | k | calibration s | ×(LoRA-8 s/step × batches) | calibration peak MiB | "
            "×LoRA-8 step peak | exact prior's calibration s | exact peak MiB | targets met |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r, s in sketched:
            if s.get("status") != "ok":
                reason = str(s.get("reason", "")).replace("|", "\\|")
                out.append(
                    f"| {r['size']} | {r['quant']} | {r['targets']} | {s['prior_rank']} | {s.get('status')}: "
                    f"{reason} |" + " – |" * 6
                )
                continue
            met = ", ".join(f"{k} {'PASS' if ok else 'MISS'}" for k, ok in s.get("targets_met", {}).items())
            out.append(
                f"| {r['size']} | {r['quant']} | {r['targets']} | {s['prior_rank']} | {_s(s['calibration_s'])} | "
                f"{_x(s.get('time_ratio'))} | {_mib(s['calibration_peak_bytes'])} | {_x(s.get('peak_ratio'))} | "
                f"{_s(r.get('calibration_s'))} | {_mib(r.get('calibration_peak_bytes'))} | {met or '–'} |"
            )
        out.append("")
    out += compiled_markdown(rows, settings)
    verdicts = [ok for r in rows for ok in r.get("targets_met", {}).values()]
    verdicts += [ok for _, s in sketched for ok in s.get("targets_met", {}).values()]
    if verdicts:
        out += [f"Targets met: {sum(verdicts)} of {len(verdicts)} checks PASS.", ""]
    return "\n".join(out)


def compiled_markdown(rows: list[dict], settings: dict) -> list[str]:
    """The compiled steps beside the eager ones (``--compile``), one table over every size."""
    timed = [r for r in rows if r["status"] == "ok" and r.get("compiled_step_s") is not None]
    if not timed:
        return []
    out = [
        "## Compiled training steps (`--compile`)",
        "",
        "The same model, optimizer and batch, right after the eager steps, under `torch.compile(model)` (inductor, "
        "default mode, gradient checkpointing on; Dynamo's `skip_fwd_side_effects_in_bwd_under_checkpoint` on, so that "
        "the checkpointed layers compile: see the script). *graphs / breaks*: Dynamo's counts for the compiled "
        "step (transformers' input-gradient hook and output capturing break the graph for every method alike). "
        "*compile s*: the first compiled step (it compiles forward and "
        f"backward), apart; then one compiled warm-up step and the median of {settings['steps']} timed ones. "
        f"Target: S2FT's and FourierFT's compiled step ≤ {TIME_RATIO:g}x LoRA r = 8's compiled step, all-linear "
        "targets.",
        "",
        "| size | base | targets | method | eager s/step | compiled s/step | compiled / eager | compile s | "
        "×LoRA-8 eager | ×LoRA-8 compiled | compiled peak MiB | graphs / breaks | compiled target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in timed:
        ratios = r.get("ratios", {})
        met = r.get("targets_met", {}).get("compiled step time")
        out.append(
            f"| {r['size']} | {r['quant']} | {r['targets']} | {r['method']} | {_s(r['step_s'])} | "
            f"{_s(r['compiled_step_s'])} | {_x(ratios.get('compiled_vs_eager'))} | {_s(r.get('compile_s'))} | "
            f"{_x(ratios.get('step_s'))} | {_x(ratios.get('compiled_step_s'))} | "
            f"{_mib(r.get('compiled_peak_step_bytes'))} | {r.get('graphs', '–')} / {r.get('graph_breaks', '–')} | "
            f"{'–' if met is None else 'PASS' if met else 'MISS'} |"
        )
    return [*out, ""]


def write_report(report: dict, output_dir: str) -> None:
    from s2ft.io import atomic_write_group

    evaluate(report["rows"])
    stem = "llm_scale_compile" if report["settings"].get("compile") else "llm_scale"
    text = {
        f"{stem}.json": json.dumps(report, indent=1) + "\n",
        f"{stem}.md": markdown(report),
    }

    def writer(content: str):
        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(content)

        return write

    os.makedirs(output_dir, exist_ok=True)
    atomic_write_group({os.path.join(output_dir, name): writer(content) for name, content in text.items()})


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--sizes", nargs="+", default=["0.5b", "1b"], choices=list(SIZES))
    parser.add_argument("--quant", nargs="+", default=list(QUANT), choices=QUANT)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    parser.add_argument("--n-frequency", type=int, default=1000)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument(
        "--group-size",
        type=int,
        default=8,
        help="calibration_group_size of the grouped calibration (0: none)",
    )
    parser.add_argument(
        "--prior-ranks",
        type=int,
        nargs="*",
        default=[],
        help="after each S2FT row, S2FT's calibration alone with S2FTConfig.prior_rank = each of these (sketched)",
    )
    parser.add_argument(
        "--s2ft-prior-rank",
        type=int,
        default=None,
        help="the S2FT rows' own calibration (before their steps) with S2FTConfig.prior_rank = this (sketched)",
    )
    parser.add_argument(
        "--skip-exact-s2ft",
        action="store_true",
        help="no S2FT row with the exact prior (its calibration and steps): only the sketched calibrations",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time each training run's steps under torch.compile (to llm_scale_compile.{md,json})",
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time calibration and steps in process CPU seconds (CPU only; with one thread, robust to other "
        "jobs' load) instead of the wall clock",
    )
    parser.add_argument(
        "--sketch-squares",
        default=None,
        choices=["exact", "sketch"],
        help="how a sketched Adam prior takes the row and column sums of its squares (default: the library's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="default: benchmarks/results/<device>")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per measurement subprocess")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process instead of one fresh subprocess each (for tests: peaks may then leak)",
    )
    parser.add_argument("--one", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("seq_len", "batch_size", "steps", "n_frequency", "calibration_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.s2ft_prior_rank is not None and args.s2ft_prior_rank < 1:
        parser.error("--s2ft-prior-rank must be a positive integer")
    if any(k < 1 for k in args.prior_ranks):
        parser.error("--prior-ranks must be positive integers")
    if args.group_size < 0:
        parser.error("--group-size must be at least 0")
    if args.device not in ("cpu", "cuda"):
        parser.error("--device must be cpu or cuda")
    if args.cpu_time and args.device != "cpu":
        parser.error("--cpu-time times CPU runs only")
    if args.device == "cuda" and not torch.cuda.is_available() and not args.one:
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.one:
        run_one(json.loads(args.one))
        return None
    device = torch.device(args.device)
    output_dir = args.output_dir or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", device.type
    )
    group_size = args.group_size if args.group_size and has_group_size() else None
    report = {
        "command": "python benchmarks/llm_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(device),
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("output_dir", "one", "timeout", "group_size")
        }
        | {"group_size": group_size},
        "rows": [],
    }
    base = {
        "device": args.device,
        "dtype": args.dtype,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "n_frequency": args.n_frequency,
        "calibration_batches": args.calibration_batches,
        "seed": args.seed,
        "s2ft_prior_rank": args.s2ft_prior_rank,
        "sketch_squares": args.sketch_squares,
        "cpu_time": args.cpu_time,
        "compile": args.compile,
    }
    combos = [
        (size, quant, targets, method)
        for size in args.sizes
        for quant in args.quant
        for targets in args.targets
        for method in sorted(args.methods, key=lambda m: m != REFERENCE)  # the reference first: ratios early
    ]
    s2ft_rows = sum(c[3] == "s2ft" for c in combos)
    runs = len(combos) + (s2ft_rows if group_size else 0) + s2ft_rows * len(args.prior_ranks)
    runs -= s2ft_rows if args.skip_exact_s2ft else 0
    log(
        f"llm_scale: {runs} measurements on {args.device} ({torch.get_num_threads()} threads), "
        f"results to {output_dir}"
    )
    done = 0

    def run(spec: dict) -> dict:
        nonlocal done
        done += 1
        label = " ".join(spec[k] for k in ("size", "quant", "targets", "method"))
        if spec.get("group_size"):
            label += f" (grouped calibration, {spec['group_size']})"
        if spec.get("prior_rank"):
            label += f" (sketched calibration, rank {spec['prior_rank']})"
        log(f"[{done}/{runs}] {label}")
        start = time.perf_counter()
        if args.in_process:  # one warm-up for the whole process: the first row's
            result = measure({**spec, "warm_up": done == 1})
        else:
            result = run_isolated(spec, args.timeout)
        log(f"[{done}/{runs}] {label}: {summary(result)} (wall {time.perf_counter() - start:.1f} s)")
        return result

    for size, quant, targets, method in combos:
        spec = {**base, "size": size, "quant": quant, "targets": targets, "method": method}
        key = {"size": size, "quant": quant, "targets": targets, "method": method}
        if method == "s2ft" and args.skip_exact_s2ft:
            row = key | {"status": "skipped", "reason": "--skip-exact-s2ft"}
        else:
            row = key | run(spec)
        if method == "s2ft" and args.prior_ranks:
            row["calibration_sketched"] = []
            for rank in args.prior_ranks:
                sketched = run({**spec, "prior_rank": rank})
                row["calibration_sketched"].append(
                    {
                        k: sketched.get(k)
                        for k in ("status", "reason", "calibration_s", "calibration_peak_bytes")
                    }
                    | {"prior_rank": rank, "calibration_batches": args.calibration_batches}
                )
        if method == "s2ft" and group_size and row["status"] in ("ok", "skipped"):
            grouped = run({**spec, "group_size": group_size})
            row["calibration_grouped"] = {
                k: grouped.get(k) for k in ("status", "reason", "calibration_s", "calibration_peak_bytes")
            } | {"group_size": group_size}
        report["rows"].append(row)
        write_report(report, output_dir)
    if not combos:
        write_report(report, output_dir)
    stem = "llm_scale_compile" if args.compile else "llm_scale"
    log(f"wrote {os.path.join(output_dir, stem + '.md')} and {stem}.json")
    return report


def summary(result: dict) -> str:
    if result.get("status") != "ok":
        return f"{result.get('status')}: {result.get('reason')}"
    parts = []
    if "step_s" in result:
        parts.append(f"{result['step_s']:.3f} s/step, peak {result['peak_step_bytes'] / MIB:.1f} MiB")
    if "calibration_s" in result:
        parts.append(
            f"calibration {result['calibration_s']:.2f} s, peak {result['calibration_peak_bytes'] / MIB:.1f} MiB"
        )
    return "; ".join(parts) or "ok"


if __name__ == "__main__":
    main()
