"""Time one adapted linear layer's forward+backward for each ``spectral_apply`` path, PEFT LoRA and PEFT FourierFT.

Per (width, n, tokens), with ``x`` (tokens, width) float32 requiring grad and a random output gradient:

- whole layers: a frozen ``nn.Linear(width, width)`` alone ("base"), PEFT LoRA r=8, PEFT FourierFT (n,
  scaling 150) and ``base(x) + spectral_apply(x, ...)`` on the FFT path ("fft+perm": with S2FT's
  permutations). Overhead = step time minus base's. Peak = the most memory the step allocated on top of what
  existed before it (torch profiler's allocation events), including the gradients it leaves.
- adapter branches alone: LoRA's ``B(A(x)) * scaling`` and ``spectral_apply`` on each path ("dense" computes
  what PEFT FourierFT computes). At large widths the base matmul's own noise swamps an overhead taken as a
  difference of whole-layer times; the branch times measure it directly.

Variants run round-robin so that load from other processes hits them alike; medians are reported. ``--clock cpu``
times the process's CPU time, which a shared machine disturbs far less than wall time (use it with
``--threads 1``). Last, the first step of the FFT path two ways: ``rfft`` of ``x`` and a gather of the distinct
column frequencies used, against a matmul with a real DFT basis of only those frequencies.

Usage: python benchmarks/factorized_sweep.py [--widths 384 1024 2048 4096] [--tokens 512 4096] [--n 1000 3000]
           [--repeats 3] [--budget 20] [--threads 2] [--clock wall]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import FourierFTConfig, LoraConfig, get_peft_model
from torch import nn
from torch.profiler import ProfilerActivity, profile

from s2ft.factorized import PATHS, choose_path, spectral_apply
from s2ft.spectral import fourierft_locations


class Holder(nn.Module):
    """A module holding the layer under test, for PEFT's ``target_modules``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class Spectral(nn.Module):
    """``spectral_apply(x, ...)`` on a fixed path, plus the frozen base layer's output when ``with_base``."""

    def __init__(self, width: int, n: int, path: str, permuted: bool, with_base: bool) -> None:
        super().__init__()
        self.base = nn.Linear(width, width).requires_grad_(False) if with_base else None
        self.coeffs = nn.Parameter(torch.randn(n))
        self.width, self.path = width, path
        self.rows, self.cols = fourierft_locations(width, width, n, seed=777)
        self.perms = (torch.randperm(width), torch.randperm(width)) if permuted else (None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = spectral_apply(
            x, self.coeffs, self.rows, self.cols, self.width, self.width, 150.0, *self.perms, path=self.path
        )
        return delta if self.base is None else self.base(x) + delta.to(x.dtype)


class LoraBranch(nn.Module):
    """LoRA r=8's adapter branch alone: ``B(A(x)) * alpha / r``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lora_A = nn.Linear(width, 8, bias=False)
        self.lora_B = nn.Linear(8, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * 2.0


def layers(width: int, n: int) -> dict[str, nn.Module]:
    return {
        "base": Holder(width).requires_grad_(False),
        "lora_r8": get_peft_model(Holder(width), LoraConfig(r=8, lora_alpha=16, target_modules=["layer"])),
        "peft_fourierft": get_peft_model(
            Holder(width), FourierFTConfig(n_frequency=n, scaling=150.0, target_modules=["layer"])
        ),
        "fft": Spectral(width, n, "fft", permuted=False, with_base=True),
        "fft+perm": Spectral(width, n, "fft", permuted=True, with_base=True),
    }


def branches(width: int, n: int) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {"lora_r8": LoraBranch(width)}
    for path in PATHS:
        out[path] = Spectral(width, n, path, permuted=False, with_base=False)
    out["fft+perm"] = Spectral(width, n, "fft", permuted=True, with_base=False)
    return out


def step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    module(x).backward(grad)
    x.grad = None
    for p in module.parameters():
        p.grad = None


def peak_bytes(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Peak of the running sum of the allocations and frees one step makes, after a warm-up step."""
    step(module, x, grad)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        module(x).backward(grad)
    step(module, x, grad)  # clears the gradients
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def median_times(calls: dict, repeats: int, budget: float, clock) -> dict[str, float]:
    """Median ms of each zero-argument call, round-robin after a warm-up call each (plans, allocator).

    A call stops being repeated once it has used ``budget`` seconds (it is timed once at least).
    """
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            if times[name] and sum(times[name]) > budget * 1e3:
                continue
            start = clock()
            call()
            times[name].append((clock() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def steps(modules: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor) -> dict:
    return {name: (lambda module=module: step(module, x, grad)) for name, module in modules.items()}


def analysis_times(x: torch.Tensor, n: int, repeats: int, clock) -> tuple[float, float, int]:
    """Median ms of ``rfft(x)`` gathered at the distinct folded column frequencies vs ``x @ basis``."""
    width = x.shape[1]
    _, cols = fourierft_locations(width, width, n, seed=777)
    distinct = torch.unique(torch.minimum(cols, width - cols))
    angles = 2 * torch.pi * torch.outer(torch.arange(width, dtype=torch.float64), distinct.double()) / width
    basis = torch.cat([angles.cos(), -angles.sin()], dim=1).float()  # (width, 2 * distinct): Re and Im
    calls = {"fft": lambda: torch.fft.rfft(x, dim=1).index_select(1, distinct), "basis": lambda: x @ basis}
    results = median_times(calls, repeats, float("inf"), clock)
    return results["fft"], results["basis"], distinct.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[384, 1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=20.0, help="stop timing a variant after this many s")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median {args.clock} ms per forward+backward"
    )
    for width in args.widths:
        for n in args.n:
            whole, alone = layers(width, n), branches(width, n)
            for tokens in args.tokens:
                x = torch.randn(tokens, width, requires_grad=True)
                grad = torch.randn(tokens, width)
                print(
                    f"\nwidth {width}, n {n}, tokens {tokens}; auto -> {choose_path(width, width, n, tokens, 'cpu')}"
                )
                peaks = {name: peak_bytes(module, x, grad) for name, module in whole.items()}
                layer_ms = median_times(steps(whole, x, grad), args.repeats, args.budget, clock)
                branch_ms = median_times(steps(alone, x, grad), args.repeats, args.budget, clock)
                overhead = {name: ms - layer_ms["base"] for name, ms in layer_ms.items()}
                print(
                    "  layer            step_ms  overhead_ms  ovh/lora  fourierft/this  peak_MiB  peak/lora"
                )
                for name, ms in layer_ms.items():
                    print(
                        f"  {name:15s} {ms:8.1f} {overhead[name]:12.1f} {overhead[name] / overhead['lora_r8']:9.2f}"
                        f" {layer_ms['peft_fourierft'] / ms:15.2f} {peaks[name] / 2**20:9.1f}"
                        f" {peaks[name] / peaks['lora_r8']:10.2f}"
                    )
                print("  branch alone   branch_ms  /lora  dense/this")
                for name, ms in branch_ms.items():
                    print(
                        f"  {name:15s} {ms:8.1f} {ms / branch_ms['lora_r8']:6.2f} {branch_ms['dense'] / ms:11.2f}"
                    )
                fft_ms, basis_ms, distinct = analysis_times(x.detach(), n, args.repeats, clock)
                print(
                    f"  first step: rfft+gather {fft_ms:.1f} ms; DFT-basis matmul over the {distinct} distinct"
                    f" column frequencies {basis_ms:.1f} ms",
                    flush=True,
                )


if __name__ == "__main__":
    main()
