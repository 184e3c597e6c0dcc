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

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a supported layer, in ``nn.Linear``'s convention whatever the storage."""
    d0, d1 = layer.weight.shape
    return (d1, d0) if _is_conv1d(layer) else (d0, d1)


def _is_conv1d(layer: nn.Module) -> bool:
    return Conv1D is not None and isinstance(layer, Conv1D)


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
        if not isinstance(base_layer, SUPPORTED_LAYERS):
            raise TypeError(f"cannot adapt a {type(base_layer).__name__}; supported: nn.Linear and Conv1D")
        self.base_layer = base_layer
        self.d_out, self.d_in = layer_shape(base_layer)
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
        if self.disabled or self.merged:
            return self.base_layer(x)
        # The branch runs before the base layer, so that backward runs it after (reverse order): the base layer's
        # input gradient arrives first and autograd adds the branch's into it in place, not into a new tensor.
        delta = spectral_apply(x, *self._spectrum(), path=self.forward_path)
        result = self.base_layer(x)
        return result + delta.to(result.dtype)

    def _add_to_weight(self, sign: float) -> None:
        weight = self.base_layer.weight
        delta = self.delta_weight()
        if _is_conv1d(self.base_layer):
            delta = delta.T
        with torch.no_grad():
            weight.copy_((weight.float() + sign * delta).to(weight.dtype))

    def merge(self) -> None:
        """Add ``ΔW`` into the base weight; the forward then costs what the base layer costs."""
        if not self.merged:
            self._add_to_weight(1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Subtract ``ΔW`` from the base weight again (exact up to the weight dtype's rounding)."""
        if self.merged:
            self._add_to_weight(-1.0)
            self.merged = False

    def extra_repr(self) -> str:
        return f"method={self.method}, d_out={self.d_out}, d_in={self.d_in}, n={self.n_frequency}, scaling={self.scaling}"


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

    def forward(self, *args, **kwargs):
        module = self.original_module if self.disabled else self.trained_module
        return module(*args, **kwargs)
