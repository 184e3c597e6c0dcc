"""The arithmetic of S2FT's sketched calibration against a LoRA r = 8 training step, by dtype, at real model sizes.

A calibration batch is a forward and backward pass like a training step plus the sketched prior's own products (the
range and co-range sketches, the Adam prior's row and column squares). On a GPU what that costs depends on the dtype
each product runs in: an H100's bfloat16 tensor cores are ~15x its float32 (non-tensor-core) rate, so a float32
product as large as a layer's own matmul costs as much as fifteen of them. This counts the floating-point operations
of each, by dtype, with ``torch.utils.flop_counter`` on the ``meta`` device (nothing is computed: any size runs in
seconds on a CPU, Llama-2-7B's whole 32 layers included):

- one PEFT LoRA r = 8 training step's forward and backward (gradient checkpointing, non-reentrant, as
  ``benchmarks/llm_scale.py`` trains);
- one sketched calibration batch (``S2FTConfig(prior_rank=k)``, the Adam prior, every layer's gradient from its
  activations), with the sketch products in float32 (s2ft on a CPU, and before this benchmark on every device) and
  in bfloat16 (:func:`s2ft.tuner.calibration.product_dtype` on an accelerator).

and an estimate of the time ratio at an H100 SXM's dense peak rates (bfloat16 989 TFLOP/s, float32 67 TFLOP/s):
``Σ flops(dtype) / rate(dtype)``, a roofline bound that ignores memory traffic (it is arithmetic, not a timing)::

    python benchmarks/calibration_flops.py --sizes 0.5b 1b 7b --targets qv all-linear --tokens 512 4096 \\
        --output benchmarks/results/calibration_flops.md
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llm_scale import SIZES, TARGETS  # noqa: E402

# Llama-2-7B whole (llm_scale's 7b-2l has 2 of its 32 layers, for memory; here nothing is held)
SHAPES = {**SIZES, "7b": {**SIZES["7b-2l"], "num_hidden_layers": 32}}
# an H100 SXM's dense peak rates (NVIDIA's datasheet), FLOP/s: float32 without TF32, PyTorch's default for matmuls
PEAK = {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12, torch.float64: 33.5e12}


class _ByDtype(FlopCounterMode):
    """``FlopCounterMode`` that also sums each counted operation's flops by its first input's dtype."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.by_dtype: collections.Counter = collections.Counter()

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
            self.by_dtype[dtype] += self.flop_registry[func_packet](*args, **kwargs, out_val=out)
        return super()._count_flops(func_packet, out, args, kwargs)


def _model(size: str):
    """The bfloat16 Llama of ``size`` on the meta device, frozen, checkpointed, in training mode."""
    import transformers.masking_utils as masking
    from transformers import LlamaConfig, LlamaForCausalLM

    # its check for packed sequences reads a value (``.all()``), which a meta tensor has not; none are packed here
    masking.find_packed_sequence_indices = lambda *args, **kwargs: None
    # eager attention: its products in bfloat16 in both passes (on the meta device SDPA's choice of kernel, hence the
    # dtype of its products, differs between training and eval mode; on a GPU both would be one bfloat16 kernel)
    config = LlamaConfig(
        **SHAPES[size], tie_word_embeddings=False, use_cache=False, attn_implementation="eager"
    )
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _batch(tokens: int) -> dict:
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": ids}


def lora_step(size: str, targets: str, tokens: int) -> collections.Counter:
    """Flops by dtype of a PEFT LoRA r = 8 step's forward and backward."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(size), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS[targets]))
    model.enable_input_require_grads()
    with _ByDtype() as counter:
        model(**_batch(tokens)).loss.backward()
    return counter.by_dtype


def calibration_batch(
    size: str, targets: str, tokens: int, rank: int, sixteen: bool, squares: str | None = None
) -> collections.Counter:
    """Flops by dtype of one sketched calibration batch (Adam prior, from activations), the sketch products in
    bfloat16 (``sixteen``) or float32; ``squares``: how the Adam prior takes its squares' sums (None: the
    library's default, ``s2ft.tuner.calibration.SKETCH_SQUARES``)."""
    import s2ft
    import s2ft.tuner.calibration as calibration

    model = _model(size)
    config = s2ft.S2FTConfig(target_modules=TARGETS[targets], n_frequency=1000, prior_rank=rank)
    spectral = s2ft.get_spectral_model(model, config)
    layers = spectral.spectral_layers()
    strategy = calibration.SketchedAdamPrior(layers, rank=rank, seed=0, squares=squares)
    hooks = calibration._ActivationGradients(strategy, list(layers))
    original = calibration.product_dtype

    def products(x, delta, sums):  # the meta device is not a CPU: product_dtype would say bfloat16
        wide = torch.promote_types(torch.promote_types(x.dtype, delta.dtype), sums)
        return torch.bfloat16 if sixteen else wide

    calibration.product_dtype = products
    for layer in layers.values():
        layer.disabled = True
    try:
        hooks.attach()
        with calibration._only_weights_require_grad(spectral.model, []), _ByDtype() as counter:
            loss = calibration.batch_loss(spectral.model, _batch(tokens), None)
            loss.backward()
            hooks.end_batch()
    finally:
        hooks.detach()
        calibration.product_dtype = original
    return counter.by_dtype


def _seconds(flops: collections.Counter) -> float:
    return sum(count / PEAK[dtype] for dtype, count in flops.items())


def _tflop(flops: collections.Counter, dtype: torch.dtype) -> str:
    return f"{flops.get(dtype, 0) / 1e12:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["0.5b", "1b", "7b"], choices=sorted(SHAPES))
    parser.add_argument("--targets", nargs="+", default=["qv", "all-linear"], choices=sorted(TARGETS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[512], help="tokens per batch (batch 1)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument(
        "--squares",
        default=None,
        choices=["exact", "sketch"],
        help="how the Adam prior takes its squares' row and column sums (default: the library's)",
    )
    parser.add_argument("--output", default=None, help="a Markdown file for the table (default: print it)")
    args = parser.parse_args(argv)
    lines = [
        "| size | targets | tokens | LoRA r = 8 step: bf16 / fp32 TFLOP | calibration batch, products in float32: bf16 / "
        "fp32 TFLOP | x LoRA step (H100 peak rates) | products in bfloat16: bf16 / fp32 TFLOP | x LoRA step "
        "(H100 peak rates) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in args.sizes:
        for targets in args.targets:
            for tokens in args.tokens:
                lora = lora_step(size, targets, tokens)
                wide = calibration_batch(size, targets, tokens, args.rank, False, args.squares)
                narrow = calibration_batch(size, targets, tokens, args.rank, True, args.squares)
                base = _seconds(lora)
                lines.append(
                    f"| {size} | {targets} | {tokens} | {_tflop(lora, torch.bfloat16)} / {_tflop(lora, torch.float32)} | "
                    f"{_tflop(wide, torch.bfloat16)} / {_tflop(wide, torch.float32)} | "
                    f"{_seconds(wide) / base:.2f} | {_tflop(narrow, torch.bfloat16)} / "
                    f"{_tflop(narrow, torch.float32)} | {_seconds(narrow) / base:.2f} |"
                )
                print(lines[-1], flush=True)
    import s2ft.tuner.calibration as calibration

    squares = args.squares or calibration.SKETCH_SQUARES
    how = {
        "exact": "the Adam squares' products (`squares=\"exact\"`: one more product as large as the layer's per "
        "batch)",
        "sketch": 'the Adam squares estimated from the sketches (`squares="sketch"`: no product of their own)',
    }[squares]
    header = [
        "# Sketched calibration's arithmetic against a LoRA r = 8 step, by dtype",
        "",
        f"`python benchmarks/calibration_flops.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}. "
        f"Random-weight bfloat16 Llama shapes on the meta device (nothing computed), batch 1, k = {args.rank}, "
        "the Adam prior from activations (every layer), gradient checkpointing. TFLOP of one LoRA step's forward "
        "and backward (PEFT keeps the adapters' own products in float32), and of one calibration batch (a forward "
        f"and backward pass with the sketches' products and {how}), by the dtype each product runs in. `x LoRA step`: the calibration batch's time "
        "against the LoRA step's at an H100 SXM's dense peak rates (bfloat16 989 TFLOP/s, float32 67): a bound "
        "from arithmetic alone, not a timing; the target is 1.5.",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.output)
    else:
        print(text)


if __name__ == "__main__":
    main()
