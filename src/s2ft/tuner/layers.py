"""The adapter: a module that wraps a frozen linear layer and adds a spectral ``ΔW``."""

from __future__ import annotations

import copy

import torch
from torch import nn

from s2ft.ops.apply import delta_weight, spectral_apply

try:  # transformers' GPT-2 style layer: y = x @ W + b with W stored (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the layer works without it
    Conv1D = None


class LayerKind:
    """How one kind of torch layer is adapted: its weight seen as a ``(d_out, d_in)`` matrix (``ΔW``'s shape),
    that matrix put back into the weight's layout, and ``ΔW`` applied to the layer's input.

    Nothing outside this module asks which kind a layer is; it calls :func:`kind_of`'s methods.
    """

    name = "linear"

    def matrix(self, layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the weight, or its gradient) in the ``(d_out, d_in)`` matrix view."""
        return tensor

    def to_weight(self, layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        """A ``(d_out, d_in)`` matrix in the layout of the layer's weight (inverse of :meth:`matrix`)."""
        return matrix

    def shape(self, layer: nn.Module) -> tuple[int, int]:
        return tuple(self.matrix(layer, layer.weight).shape)

    def apply(self, adapter: SpectralLinear, x: torch.Tensor) -> torch.Tensor:
        """``ΔW`` applied to the layer's input ``x`` ``(..., d_in)``: ``(..., d_out)``, float32."""
        return spectral_apply(x, *adapter._spectrum(), path=adapter.forward_path)


class Conv1DKind(LayerKind):
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` stored ``(d_in, d_out)``."""

    name = "conv1d"

    def matrix(self, layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.T

    def to_weight(self, layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T


class Conv2dKind(LayerKind):
    """``nn.Conv2d``: the weight ``(out, in/groups, kh, kw)`` seen as ``(out, in/groups · kh · kw)``.

    Grouped and depthwise convolutions work the same way: ``ΔW`` is a weight of the layer's own shape, applied
    with its stride, padding, dilation, groups and padding mode (``conv2d(x, ΔW)``, no bias). A pointwise
    convolution (1x1, stride 1, no padding, one group) is a linear map of the channels; with
    ``forward_path="fft"`` it goes through :func:`s2ft.ops.apply.spectral_apply` on the channels-last input,
    which never builds ``ΔW``. ``"auto"`` keeps ``conv2d(x, ΔW)``: on 2 CPU threads (forward + backward, batch
    16, n = 1000, EfficientNet-Lite0's shapes) it took 26 / 36 / 47 ms at 40->240 (28x28), 112->672 (14x14) and
    320->1280 (8x8) channels, against 32 / 49 / 43 ms for the channels-last dense path and 82 / 64 / 47 ms for
    the FFT path (the move to channels-last copies the activation).
    """

    name = "conv2d"

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

    def apply(self, adapter: SpectralLinear, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(N, C_in, H, W)`` (or unbatched ``(C_in, H, W)``) -> ``(N, C_out, H', W')``, float32."""
        layer = adapter.base_layer
        if adapter.forward_path == "fft" and self.pointwise(layer):
            channels_last = x.movedim(-3, -1)  # (..., H, W, C_in)
            return super().apply(adapter, channels_last).movedim(-1, -3)
        delta = self.to_weight(layer, delta_weight(*adapter._spectrum()))
        # The layer's own forward with ΔW as its weight and no bias: subclasses that pad in their forward
        # (TensorFlow-style "same" padding, as EfficientNet's) are applied as they apply themselves.
        zero_bias = None if layer.bias is None else torch.zeros_like(delta[:, 0, 0, 0])
        return torch.func.functional_call(layer, {"weight": delta, "bias": zero_bias}, (x.float(),))


def _padding(layer: nn.Conv2d) -> tuple[int, ...]:
    """Explicit padding amounts; ``"same"`` counts as padding unless every kernel side is 1."""
    if isinstance(layer.padding, str):
        return (0,) if layer.padding == "valid" or layer.kernel_size == (1, 1) else (1,)
    return tuple(layer.padding)


KINDS: dict[type[nn.Module], LayerKind] = {nn.Linear: LayerKind(), nn.Conv2d: Conv2dKind()}
if Conv1D is not None:
    KINDS[Conv1D] = Conv1DKind()
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = tuple(KINDS)
SUPPORTED_NAMES = "torch.nn.Linear, torch.nn.Conv2d and transformers' Conv1D"


def kind_of(layer: nn.Module) -> LayerKind:
    """The :class:`LayerKind` of a supported layer (the most specific class it is an instance of)."""
    for cls in type(layer).__mro__:
        if cls in KINDS:
            return KINDS[cls]
    raise TypeError(f"cannot adapt a {type(layer).__name__}; supported: {SUPPORTED_NAMES}")


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a supported layer: the shape of its weight's matrix view, and of ``ΔW``."""
    return kind_of(layer).shape(layer)


def weight_matrix(layer: nn.Module, grad: bool = False) -> torch.Tensor:
    """The layer's weight (or, with ``grad``, its gradient) as a ``(d_out, d_in)`` matrix view."""
    tensor = layer.weight.grad if grad else layer.weight
    return kind_of(layer).matrix(layer, tensor)


class SpectralLinear(nn.Module):
    """``y = base_layer(x) + ΔW x`` with ``ΔW[perm_rows[i], perm_cols[j]] = scaling * Re(ifft2(F))[i, j]``.

    ``F`` is zero but at ``(rows[k], cols[k])``, where it holds the trainable ``coeffs[k]``. FourierFT has no
    permutations (``perm_rows``/``perm_cols`` are None); S2FT sets them, and the locations, in calibration.
    The coefficients stay float32 and the spectral math runs in float32 whatever the base layer's dtype.

    Shapes: ``x`` ``(..., d_in)`` -> ``(..., d_out)``; ``coeffs``, ``rows``, ``cols`` ``(n,)``;
    ``perm_rows`` ``(d_out,)``, ``perm_cols`` ``(d_in,)``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        n_frequency: int,
        scaling: float,
        init: str = "zeros",
        forward_path: str = "auto",
        method: str = "fourierft",
    ) -> None:
        super().__init__()
        self.kind = kind_of(base_layer)
        self.base_layer = base_layer
        self.d_out, self.d_in = self.kind.shape(base_layer)
        self.n_frequency = n_frequency
        self.scaling = scaling
        self.forward_path = forward_path
        self.method = method
        device = base_layer.weight.device
        coeffs = (
            torch.zeros(n_frequency, device=device)
            if init == "zeros"
            else torch.randn(n_frequency).to(device)
        )
        self.coeffs = nn.Parameter(coeffs)
        self.register_buffer("rows", None)
        self.register_buffer("cols", None)
        self.register_buffer("perm_rows", None)
        self.register_buffer("perm_cols", None)
        self.merged = False
        self.disabled = False
        # While merged: the coefficients that were merged (and their version), and, for a weight in a dtype coarser
        # than float32, the weight as it was, so that unmerge restores it bit for bit.
        self._merged: tuple[torch.Tensor, int, torch.Tensor | None] | None = None
        self.train(base_layer.training)  # in the mode of the layer it replaces

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.half()``, ``.bfloat16()`` cast the base layer; the coefficients stay float32."""
        super()._apply(fn, recurse)
        if self.coeffs.dtype != torch.float32:
            self.coeffs.data = self.coeffs.data.float()
        return self

    @property
    def is_ready(self) -> bool:
        """Whether the locations are set (always for FourierFT; after calibration or loading for S2FT)."""
        return self.rows is not None

    def set_locations(
        self,
        rows: torch.Tensor,
        cols: torch.Tensor,
        perm_rows: torch.Tensor | None = None,
        perm_cols: torch.Tensor | None = None,
    ) -> None:
        """Install locations (and S2FT's permutations) as int64 buffers on the layer's device."""
        if self.merged:
            raise RuntimeError("unmerge() the adapter before changing its locations")
        device = self.coeffs.device
        self.rows = rows.to(device, torch.long)
        self.cols = cols.to(device, torch.long)
        self.perm_rows = None if perm_rows is None else perm_rows.to(device, torch.long)
        self.perm_cols = None if perm_cols is None else perm_cols.to(device, torch.long)

    def _require_ready(self) -> None:
        if not self.is_ready:
            raise RuntimeError(
                "this S2FT adapter has no spectrum locations yet: call model.calibrate(batches) before training, "
                "or load a trained adapter with SpectralModel.from_pretrained"
            )

    def _spectrum(self) -> tuple:
        """The arguments :func:`delta_weight` and :func:`spectral_apply` take after ``x``."""
        self._require_ready()
        coeffs = self.coeffs.float()
        return (
            coeffs,
            self.rows,
            self.cols,
            self.d_out,
            self.d_in,
            self.scaling,
            self.perm_rows,
            self.perm_cols,
        )

    def delta_weight(self) -> torch.Tensor:
        """The dense ``ΔW``, ``(d_out, d_in)`` in float32 (``nn.Linear``'s convention, also for Conv1D)."""
        return delta_weight(*self._spectrum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            self._check_merged_unchanged()
            if self.training and torch.is_grad_enabled() and self.coeffs.requires_grad:
                raise RuntimeError(
                    "this adapter is merged into the base weight, so a training step would train nothing: "
                    "unmerge() before training (for inference while merged, call model.eval() or use "
                    "torch.no_grad())"
                )
        if self.disabled or self.merged:
            return self.base_layer(x)
        # The branch runs before the base layer, so that backward runs it after (reverse order): the base layer's
        # input gradient arrives first and autograd adds the branch's into it in place, not into a new tensor.
        delta = self.kind.apply(self, x)
        result = self.base_layer(x)
        return result + delta.to(result.dtype)

    def _check_merged_unchanged(self) -> None:
        if self._merged is not None and self.coeffs._version != self._merged[1]:
            raise RuntimeError(
                "the coefficients of a merged adapter were changed; the base weight holds the ΔW of the merged "
                "ones: unmerge() (it restores the base weight from the merged coefficients), then change them"
            )

    def merge(self) -> None:
        """Add ``ΔW`` into the base weight; the forward then costs what the base layer costs.

        A weight in float16 or bfloat16 is kept as it was (a copy of it, until :meth:`unmerge`), so that unmerge
        restores it bit for bit; a float32 weight is restored by subtraction (within float32 rounding).
        """
        if self.merged:
            return
        weight = self.base_layer.weight
        coeffs = self.coeffs.detach().clone()
        kept = weight.detach().clone() if torch.finfo(weight.dtype).bits < 32 else None
        delta = self.kind.to_weight(self.base_layer, self.delta_weight().detach())
        with torch.no_grad():
            weight.copy_((weight.float() + delta).to(weight.dtype))
        self._merged = (coeffs, self.coeffs._version, kept)
        self.merged = True

    def unmerge(self) -> None:
        """Take ``ΔW`` out of the base weight again: the weight as it was (float16/bfloat16), or the weight less
        the merged ``ΔW`` (float32). Coefficients changed while merged are an error, raised after the weight is
        restored from the merged ones."""
        if not self.merged:
            return
        coeffs, version, kept = self._merged
        weight = self.base_layer.weight
        with torch.no_grad():
            if kept is not None:
                weight.copy_(kept)
            else:
                merged = delta_weight(coeffs, *self._spectrum()[1:])
                weight.copy_((weight.float() - self.kind.to_weight(self.base_layer, merged)).to(weight.dtype))
        self.merged, self._merged = False, None
        if self.coeffs._version != version:
            raise RuntimeError(
                "the coefficients were changed while the adapter was merged; the base weight was restored from "
                "the merged coefficients, and the changes were never applied: change coefficients only unmerged"
            )

    def extra_repr(self) -> str:
        return f"method={self.method}, kind={self.kind.name}, d_out={self.d_out}, d_in={self.d_in}, n={self.n_frequency}, scaling={self.scaling}"


class TrainedCopy(nn.Module):
    """A module of ``modules_to_save``: a trainable copy is used and saved, the frozen original is kept.

    With adapters disabled the original runs, so the model computes exactly what it computed before wrapping.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.trained_module = copy.deepcopy(module)
        self.original_module.requires_grad_(False)
        self.trained_module.requires_grad_(True)
        self.disabled = False
        self.train(module.training)

    def forward(self, *args, **kwargs):
        module = self.original_module if self.disabled else self.trained_module
        return module(*args, **kwargs)
