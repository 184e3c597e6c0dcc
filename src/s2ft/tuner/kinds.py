"""Layer kinds: how each kind of torch layer is adapted (its weight as a ``(d_out, d_in)`` matrix, that matrix put
back, ``ΔW`` applied to its input, whether ``"all-linear"`` takes it, its LoRA export shapes). A new kind is one
:class:`LayerKind` subclass and one line in :data:`KINDS`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from s2ft.tuner.serving import cached_delta, serve_one
from s2ft.tuner.walk import outer_modules

# The layers of other packages (transformers' Conv1D, bitsandbytes' quantized layers) are known by their classes'
# qualified names (:data:`NAMED_KINDS`), so that importing s2ft imports none of those packages: a model can only
# hold such a layer once its user imported the package.


class LayerKind:
    """How one kind of torch layer is adapted: its weight seen as a ``(d_out, d_in)`` matrix (``ΔW``'s shape),
    that matrix put back into the weight's layout, and ``ΔW`` applied to the layer's input.

    Nothing outside this module asks which kind a layer is; it calls :func:`kind_of`'s methods. ``apply`` gets
    the :class:`s2ft.tuner.layers.SpectralLayer` and one of its :class:`s2ft.tuner.layers.SpectralAdapter`.
    """

    name = "linear"
    label = "torch.nn.Linear"  # how error messages name the layers of this kind
    all_linear = True  # whether target_modules="all-linear" adapts layers of this kind
    lora_fan_in_fan_out = False  # PEFT's LoRA flag for a weight stored (d_in, d_out)
    quantized = False  # a weight that takes no gradient and cannot hold ΔW (merge needs dequantizing)
    prior_from_activations = (
        True  # whether weight_gradient gives ∂L/∂W from a call's input and output gradient
    )

    def matrix(self, layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the weight, or its gradient) in the ``(d_out, d_in)`` matrix view."""
        return tensor

    def to_weight(self, layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        """A ``(d_out, d_in)`` matrix in the layout of the layer's weight (inverse of :meth:`matrix`)."""
        return matrix

    def shape(self, layer: nn.Module) -> tuple[int, int]:
        d_out, d_in = self.matrix(layer, layer.weight).shape
        return d_out, d_in

    def apply(
        self, layer: nn.Module, adapter: nn.Module, x: torch.Tensor, path: str | None = None
    ) -> torch.Tensor:
        """``adapter``'s ``ΔW`` applied to the layer's input ``x`` ``(..., d_in)``: ``(..., d_out)``, float32, on
        ``path`` (default: the adapter's ``forward_path``). Without autograd (serving),
        :func:`s2ft.tuner.serving.serve_one`: the model's bounded dense cache if one is set, else the adapter's
        path as in training (the FFT one through the layer's bank), no dense ``ΔW`` kept."""
        # compiled: the graph's own path (the serving caches and banks are Python state)
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            served = serve_one(layer, adapter, x)
            if served is not None:
                return served
        return adapter.basis.apply(x, *adapter._spectrum(), path=path or adapter.forward_path)

    def float_linear(self, layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
        """A float ``nn.Linear`` computing what a quantized layer computes (quantized kinds only)."""
        raise TypeError(f"a {self.label} is not quantized: it has no float replacement")

    def lora_weights(
        self, layer: nn.Module, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PEFT's ``lora_A`` and ``lora_B`` weights for this layer from the factors ``A`` ``(r, d_in)`` and ``B``
        ``(d_out, r)`` of ``ΔW ≈ B A``: the matrices themselves for a linear map."""
        return a, b

    def weight_gradient(self, layer: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``∂L/∂W`` in the ``(d_out, d_in)`` matrix view from one call's input ``x`` ``(..., d_in)`` and output
        gradient ``delta`` ``(..., d_out)``: ``Σ_tokens δᵀ x``, in float32 (float64 for float64 tensors). What
        calibration uses for a weight that cannot take a gradient itself."""
        dtype = torch.promote_types(torch.promote_types(x.dtype, delta.dtype), torch.float32)
        return delta.reshape(-1, delta.shape[-1]).to(dtype).T @ x.reshape(-1, x.shape[-1]).to(dtype)


class Conv1DKind(LayerKind):
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` stored ``(d_in, d_out)``."""

    name = "conv1d"
    label = "transformers' Conv1D"
    lora_fan_in_fan_out = True

    def matrix(self, layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.T

    def to_weight(self, layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T


class Conv2dKind(LayerKind):
    """``nn.Conv2d``: the weight ``(out, in/groups, kh, kw)`` seen as ``(out, in/groups · kh · kw)``.

    Grouped and depthwise convolutions work the same way: ``ΔW`` is a weight of the layer's own shape, applied
    with its stride, padding, dilation, groups and padding mode (``conv2d(x, ΔW)``, no bias). A pointwise
    convolution (1x1, stride 1, no padding, one group) is a linear map of the channels; with
    ``forward_path="fft"`` it goes through the basis's ``apply`` on the channels-last input, which (for the
    Fourier basis, :func:`s2ft.ops.apply.spectral_apply`) never builds ``ΔW``. ``"auto"`` keeps
    ``conv2d(x, ΔW)``: on 2 CPU threads (forward + backward, batch 16, n = 1000, EfficientNet-Lite0's shapes) it
    took 26 / 36 / 47 ms at 40->240 (28x28), 112->672 (14x14) and 320->1280 (8x8) channels, against 32 / 49 / 43
    ms for the channels-last dense path and 82 / 64 / 47 ms for the FFT path (the move to channels-last copies
    the activation).
    """

    name = "conv2d"
    label = "torch.nn.Conv2d"
    all_linear = False  # as in PEFT: "all-linear" means the linear layers
    prior_from_activations = False

    def matrix(self, layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(tensor.shape[0], -1)

    def to_weight(self, layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(layer.weight.shape)

    @staticmethod
    def pointwise(layer: nn.Conv2d) -> bool:
        return (
            layer.kernel_size == (1, 1)
            and layer.stride == (1, 1)
            and layer.dilation == (1, 1)
            and layer.groups == 1
            and all(p == 0 for p in _padding(layer))
        )

    def apply(
        self, layer: nn.Module, adapter: nn.Module, x: torch.Tensor, path: str | None = None
    ) -> torch.Tensor:
        """``x`` ``(N, C_in, H, W)`` (or unbatched ``(C_in, H, W)``) -> ``(N, C_out, H', W')``, float32 (float64
        for float64 ``x``).
        ``path`` is accepted for the common signature; a convolution takes its adapter's ``forward_path``."""
        serving = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        dense = cached_delta(layer, adapter) if serving else None  # None: no cache, or full
        layer = layer.base_layer
        if adapter.forward_path == "fft" and self.pointwise(layer) and torch.is_grad_enabled():
            channels_last = x.movedim(-3, -1)  # (..., H, W, C_in)
            return super().apply(layer, adapter, channels_last).movedim(-1, -3)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if dense is None:
            coeffs, *spectrum = adapter._spectrum()
            dense = adapter.basis.delta_weight(coeffs.to(dtype), *spectrum)
        delta = self.to_weight(layer, dense.to(dtype))
        # The layer's own forward with ΔW as its weight and no bias: subclasses that pad in their forward
        # (TensorFlow-style "same" padding, as EfficientNet's) are applied as they apply themselves.
        zero_bias = None if layer.bias is None else torch.zeros_like(delta[:, 0, 0, 0])
        # functional_call takes None for a parameter (here: no bias); its annotation asks for tensors only
        params = {"weight": delta, "bias": zero_bias}
        return torch.func.functional_call(layer, params, (x.to(dtype),))  # type: ignore[arg-type]

    def weight_gradient(self, layer: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise TypeError("a Conv2d's prior is taken from its weight's gradient, not from its activations")

    def lora_weights(
        self, layer: nn.Module, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` as a ``(r, in, kh, kw)`` convolution and ``B`` as a 1x1 one ``(out, r, 1, 1)``; a grouped
        convolution has no PEFT LoRA form."""
        if layer.groups != 1:
            raise ValueError("a grouped Conv2d has no PEFT LoRA form; merge the adapter instead")
        return a.reshape(a.shape[0], *layer.weight.shape[1:]), b[:, :, None, None]


class QuantizedKind(LayerKind):
    """A quantized linear layer (bitsandbytes', torchao's): ``y = base(x) + ΔW x``, ``ΔW x`` computed in float32 beside the
    quantized base output and added in that output's dtype. The shape comes from ``in_features`` and
    ``out_features`` (the stored weight is packed); the weight takes no gradient, so calibration takes the prior
    from the layer's inputs and output gradients (:meth:`LayerKind.weight_gradient`), and merging needs a float
    weight (:meth:`dequantized`)."""

    quantized = True

    def shape(self, layer: nn.Module) -> tuple[int, int]:
        return (layer.out_features, layer.in_features)

    def matrix(self, layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"a {self.label} weight is quantized: it has no float matrix view (see dequantized)")

    def to_weight(self, layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        return self.matrix(layer, matrix)

    def dequantized(self, layer: nn.Module) -> torch.Tensor:
        """The weight the layer computes with, ``(d_out, d_in)`` float32."""
        raise NotImplementedError

    def float_linear(self, layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
        """An ``nn.Linear`` computing what ``layer`` computes, its weight dequantized, in ``dtype`` (default: the
        layer's :meth:`compute_dtype`)."""
        dtype = dtype or self.compute_dtype(layer)
        weight = self.dequantized(layer)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear = linear.to(device=weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        return linear.requires_grad_(False).train(layer.training)

    def compute_dtype(self, layer: nn.Module) -> torch.dtype:
        """The float dtype the layer computes in (float32 if it does not say)."""
        return torch.float32


class Linear4bitKind(QuantizedKind):
    """bitsandbytes' ``Linear4bit`` (nf4 and fp4, QLoRA's base layers)."""

    name = "linear4bit"
    label = "bitsandbytes' Linear4bit"

    def dequantized(self, layer: nn.Module) -> torch.Tensor:
        weight = layer.weight
        if weight.dtype.is_floating_point:  # not quantized yet
            return weight.detach().float()
        _unpack_for_cpu(weight)
        import bitsandbytes as bnb  # imported already: the layer is one of its

        matrix = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        return matrix.reshape(layer.out_features, layer.in_features).float()

    def compute_dtype(self, layer: nn.Module) -> torch.dtype:
        return layer.compute_dtype or torch.float32


def _unpack_for_cpu(weight: Any) -> bool:  # a bitsandbytes Params4bit
    """Undo bitsandbytes' repacking of a 4-bit weight for its AVX512-BF16 CPU kernel; whether there was any."""
    state: Any = getattr(weight, "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return False
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return True


def keep_differentiable(model: nn.Module) -> int:
    """Keep every bitsandbytes ``Linear4bit`` of ``model`` on its differentiable path; returns how many were not.

    On a CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit``'s weight the first time the layer runs in
    eval mode without gradients (an evaluation), and from then on computes it with a kernel autograd cannot
    differentiate, in train mode too: gradients stop at the layer, the adapters before it train on a wrong
    gradient, and calibration's activation prior gets none. This turns the repacking off on every such layer,
    targeted or not, and undoes it where it has happened (the weight's values are unchanged); inference on the CPU
    then uses bitsandbytes' general 4-bit path."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # not imported: no model holds its layers
        return 0
    unpacked = 0
    for _, module in outer_modules(model):
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            unpacked += _unpack_for_cpu(module.weight)
    return unpacked


class Linear8bitKind(QuantizedKind):
    """bitsandbytes' ``Linear8bitLt`` (LLM.int8()): int8 rows with one float scale each (``SCB``)."""

    name = "linear8bit"
    label = "bitsandbytes' Linear8bitLt"

    def dequantized(self, layer: nn.Module) -> torch.Tensor:
        weight = layer.weight
        if weight.dtype.is_floating_point:  # has_fp16_weights, or not quantized yet
            return weight.detach().float()
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return weight.data.float() * (scales.float()[:, None] / 127)

    def compute_dtype(self, layer: nn.Module) -> torch.dtype:
        return layer.bias.dtype if layer.bias is not None else torch.float32


class TorchAOKind(QuantizedKind):
    """An ``nn.Linear`` whose weight torchao quantized (``quantize_(model, Int8WeightOnlyConfig())``,
    ``IntxWeightOnlyConfig(weight_dtype=torch.int4)``, ...): a tensor subclass that computes the layer's
    ``F.linear`` itself, takes no gradient and cannot hold ``ΔW``."""

    name = "torchao"
    label = "torchao's quantized torch.nn.Linear"

    def dequantized(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight.detach().dequantize().float().reshape(layer.out_features, layer.in_features)

    def compute_dtype(self, layer: nn.Module) -> torch.dtype:
        return layer.weight.dtype  # the dtype the subclass reports: its scales' and outputs'


def _padding(layer: nn.Conv2d) -> tuple[int, ...]:
    """Explicit padding amounts; ``"same"`` counts as padding unless every kernel side is 1."""
    if isinstance(layer.padding, str):
        return (0,) if layer.padding == "valid" or layer.kernel_size == (1, 1) else (1,)
    return tuple(layer.padding)


KINDS: dict[type[nn.Module], LayerKind] = {nn.Linear: LayerKind(), nn.Conv2d: Conv2dKind()}

# Layers of other packages by their class's qualified name (module and class), so that only the users of a
# package import it: transformers' GPT-2 style layer (y = x @ W + b with W stored (d_in, d_out)), and the
# quantized base layers of bitsandbytes (QLoRA-style 4- and 8-bit models).
NAMED_KINDS: dict[str, LayerKind] = {
    "transformers.pytorch_utils.Conv1D": Conv1DKind(),
    "bitsandbytes.nn.modules.Linear4bit": Linear4bitKind(),
    "bitsandbytes.nn.modules.Linear8bitLt": Linear8bitKind(),
}

# Layers whose weight is a tensor subclass of a kind of its own (torchao's quantized weights inside an nn.Linear), by
# the subclass's qualified name, so that only the users of the package import it
WEIGHT_KINDS: dict[str, LayerKind] = {"torchao.utils.TorchAOBaseTensor": TorchAOKind()}

# Quantized layers s2ft cannot adapt (GPTQ, AWQ, HQQ, EETQ, ...), known by class name or the package defining it
_OTHER_QUANTIZED_CLASSES = ("QuantLinear", "WQLinear", "HQQLinear", "EetqLinear", "QLinear", "FP8Linear")
_OTHER_QUANTIZED_PACKAGES = (
    "auto_gptq",
    "gptqmodel",
    "awq",
    "hqq",
    "eetq",
    "optimum.quanto",
    "quanto",
    "aqlm",
)


def __getattr__(name: str) -> object:
    """``Conv1D`` (transformers'), once importable from here, imported only when asked for."""
    if name == "Conv1D":
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def supported_names() -> str:
    """The supported layers as error messages name them: "torch.nn.Linear, torch.nn.Conv2d and ..."."""
    torch_kinds = [kind for cls, kind in KINDS.items() if cls in (nn.Linear, nn.Conv2d)]
    added = [kind for cls, kind in KINDS.items() if cls not in (nn.Linear, nn.Conv2d)]  # registered later
    kinds = (*torch_kinds, *NAMED_KINDS.values(), *added, *WEIGHT_KINDS.values())
    labels = [kind.label for kind in kinds]
    return labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} and {labels[-1]}"


SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = tuple(KINDS)  # those of torch (others: NAMED_KINDS)
SUPPORTED_NAMES = supported_names()


def unsupported_quantized(layer: nn.Module) -> bool:
    """Whether ``layer`` is a quantized linear layer of a kind s2ft cannot adapt: a known class (GPTQ's
    ``QuantLinear``, AWQ's ``WQLinear*``, ``HQQLinear``, ...) or any layer with ``in_features``/``out_features``
    whose weight is not floating point."""
    if find_kind(layer) is not None:
        return False
    cls = type(layer)
    module = cls.__module__ + "."
    if cls.__name__.startswith(_OTHER_QUANTIZED_CLASSES) or module.startswith(
        tuple(p + "." for p in _OTHER_QUANTIZED_PACKAGES)
    ):
        return True
    weight = getattr(layer, "weight", None)
    linear_like = hasattr(layer, "in_features") and hasattr(layer, "out_features")
    return linear_like and isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point


def find_kind(layer: nn.Module) -> LayerKind | None:
    """The :class:`LayerKind` of ``layer`` (that of the most specific class it is an instance of), or None if
    s2ft cannot adapt it. A linear layer whose weight is a tensor subclass of :data:`WEIGHT_KINDS` is of that
    kind."""
    weight = getattr(layer, "weight", None)
    if isinstance(layer, nn.Linear) and type(weight) not in (torch.Tensor, nn.Parameter):
        for cls in type(weight).__mro__:
            kind = WEIGHT_KINDS.get(f"{cls.__module__}.{cls.__qualname__}")
            if kind is not None:
                return kind
    for cls in type(layer).__mro__:
        if cls in KINDS:
            return KINDS[cls]
        named = NAMED_KINDS.get(f"{cls.__module__}.{cls.__qualname__}")
        if named is not None:
            return named
    return None


def kind_of(layer: nn.Module) -> LayerKind:
    """The :class:`LayerKind` of a supported layer; ``TypeError`` for another."""
    kind = find_kind(layer)
    if kind is None:
        raise TypeError(f"cannot adapt a {type(layer).__name__}; supported: {supported_names()}")
    return kind


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a supported layer: the shape of its weight's matrix view, and of ``ΔW``."""
    return kind_of(layer).shape(layer)


def weight_matrix(layer: nn.Module, grad: bool = False) -> torch.Tensor:
    """The layer's weight (or, with ``grad``, its gradient) as a ``(d_out, d_in)`` matrix view."""
    tensor = layer.weight.grad if grad else layer.weight
    return kind_of(layer).matrix(layer, tensor)


def quantized_merge_error(name: str, layer: nn.Module) -> RuntimeError:
    """The error of merging into a quantized layer ``name``: it names the two ways out."""
    return RuntimeError(
        f"cannot merge into {name!r}: it is a quantized {kind_of(layer).label}, whose weight cannot hold ΔW. "
        "Either merge_and_unload(dequantize=True), which returns a float model (nn.Linear layers in the "
        "compute dtype) with ΔW merged, or keep serving unmerged: the adapters add ΔW x beside the quantized "
        "base layers"
    )


def dequantize_modules(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every quantized layer of ``model`` (an adapted layer's ``base_layer`` too) by an ``nn.Linear``
    computing the same with its dequantized weight, in ``dtype``: by default that of the model's input
    embeddings (a transformers model's activations), else each layer's compute dtype. A transformers model
    loses its ``quantization_config``. Returns the names of the replaced modules."""
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    weight = getattr(embeddings, "weight", None)  # a ViT's patch embeddings have none
    if dtype is None and isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point:
        dtype = weight.dtype
    replaced = []
    for name, module in list(model.named_modules()):
        kind = find_kind(module)
        if kind is not None and kind.quantized:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, kind.float_linear(module, dtype))
            replaced.append(name)
    quantizer = getattr(model, "hf_quantizer", None)
    if replaced and quantizer is not None:
        quantizer.remove_quantization_config(model)
    return replaced
