"""``--quantize``: a loaded model's linear layers replaced by bitsandbytes' 4-bit (nf4) or 8-bit layers, QLoRA-style,
or their weights quantized by torchao (weight-only int8, or int4 in groups of 32 input channels).

The job quantizes after loading, so the same path serves a hub model and the default SmolLM2, which is rebuilt from
its GGUF file as float32 first. The output layer (an LM head, often tied to the input embeddings) stays as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from s2ft.errors import RunError
from s2ft.options import Option

QUANTIZE = ("4bit", "8bit", "torchao-int8", "torchao-int4")
QUANTIZE_OPTION = Option(
    "quantize",
    str,
    None,
    "load the base model's linear layers (not the output layer) in 4 bits (nf4) or 8 bits with bitsandbytes, "
    "QLoRA-style, or with torchao's weight-only int8 or int4 (groups of 32)",
    choices=QUANTIZE,
    per_task=False,
)
TORCHAO_GROUP = (
    32  # torchao-int4: input channels per scale (a layer whose width it does not divide: one per row)
)


def quantize_linears(model: nn.Module, bits: str) -> list[str]:
    """Quantize every ``nn.Linear`` of ``model`` but its output layer: replaced by a bitsandbytes layer holding the
    same weight quantized (``"4bit"``: ``Linear4bit``, nf4, compute dtype float32; ``"8bit"``: ``Linear8bitLt``),
    or its weight quantized in place by torchao (``"torchao-int8"``: ``Int8WeightOnlyConfig``, one scale per row;
    ``"torchao-int4"``: ``IntxWeightOnlyConfig`` int4, one scale per :data:`TORCHAO_GROUP` inputs). Returns the
    quantized modules' names."""
    if bits not in QUANTIZE:
        raise RunError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {bits!r}")
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    names = [
        name for name, module in model.named_modules() if type(module) is nn.Linear and module is not output
    ]
    if bits.startswith("torchao-"):
        _torchao(model, names, bits)
        return names
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise RunError(
            '--quantize needs bitsandbytes: pip install "s2ft[dev]" or pip install bitsandbytes'
        ) from None
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized(getattr(parent, child), bits, bnb))
    return names


def _quantized(linear: nn.Linear, bits: str, bnb) -> nn.Module:
    weight = linear.weight.detach().float().cpu()
    bias = linear.bias is not None
    if bits == "4bit":
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias, compute_dtype=torch.float32, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        # one 4-bit path for the base model's evaluation and for training: bitsandbytes' AVX512-BF16 CPU kernel
        # takes no gradients, and the wrapped model turns it off (s2ft.tuner.kinds.keep_differentiable)
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().float().cpu(), requires_grad=False)
    return layer.to(linear.weight.device).train(linear.training)


def _torchao(model: nn.Module, names: list[str], bits: str) -> None:
    try:
        from torchao import quantization as tq
    except ImportError:
        raise RunError(
            f'--quantize {bits} needs torchao: pip install "s2ft[dev]" or pip install torchao'
        ) from None
    chosen = set(names)
    if bits == "torchao-int8":
        tq.quantize_(model, tq.Int8WeightOnlyConfig(), filter_fn=lambda m, name: name in chosen)
        return
    for granularity, fits in (
        (tq.PerGroup(TORCHAO_GROUP), lambda m: m.in_features % TORCHAO_GROUP == 0),
        (tq.PerAxis(0), lambda m: m.in_features % TORCHAO_GROUP != 0),
    ):
        # torch.int4 exists (torch >= 2.6); torch's own type stubs do not declare it
        config = tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=granularity)  # type: ignore[attr-defined]
        tq.quantize_(model, config, filter_fn=lambda m, name, fits=fits: name in chosen and fits(m))
