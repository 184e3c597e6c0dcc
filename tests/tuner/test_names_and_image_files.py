"""Issue 34: adapter names that cannot name a folder or a module are refused up front, and an image task reads a
.jsonl (or .csv) file of image paths and labels."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from s2ft import FourierFTConfig, SpectralModel, get_spectral_model
from s2ft.errors import DataError
from tests.helpers import tiny_mlp


def config() -> FourierFTConfig:
    return FourierFTConfig(target_modules=["fc1", "fc2"], n_frequency=4)


BAD_NAMES = [
    "a\0b",
    "a\nb",
    "tab\there",
    "a.b",
    "..",
    ".hidden",
    "a/b",
    "a\\b",
    "",
    "x" * 256,
    "é" * 128,
    3,
    None,
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_names_that_cannot_name_a_folder_and_a_module_are_refused(name, tmp_path):
    model = get_spectral_model(tiny_mlp(), config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"an adapter name must be a non-empty string that can name a folder"
    ):
        model.add_adapter(name, config())
    assert list(model.peft_config) == ["default"]
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"an adapter name must be"):  # loading under that name too
        model.load_adapter(tmp_path / "saved", adapter_name=name)
    with pytest.raises(ValueError, match=r"an adapter name must be"):
        get_spectral_model(tiny_mlp(), config(), adapter_name=name)


@pytest.mark.parametrize("name", ["other", "a b", "é" * 127, "x" * 255, "v2-final_1"])
def test_ordinary_names_are_saved_in_their_folder(name, tmp_path):
    model = get_spectral_model(tiny_mlp(), config())
    model.add_adapter(name, config())
    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / name / "adapter_model.safetensors")
    SpectralModel.from_pretrained(tiny_mlp(), tmp_path / name)


def image_files(folder, count: int = 12) -> list[dict]:
    """``count`` small PNGs, two classes (dark and light), in ``folder/pictures``; their records."""
    from PIL import Image

    (folder / "pictures").mkdir(parents=True)
    records = []
    for i in range(count):
        label = "light" if i % 2 else "dark"
        pixels = np.full((6, 5, 3), 200 if i % 2 else 20, np.uint8)
        pixels[0, 0] = i
        Image.fromarray(pixels).save(folder / "pictures" / f"{i}.png")
        records.append({"image": f"pictures/{i}.png", "label": label})
    return records


def test_an_image_jsonl_file_loads(tmp_path, monkeypatch):
    from s2ft.data.images import load_images

    records = image_files(tmp_path)
    for i, record in enumerate(records):  # two examples per evaluation split, the rest in training
        record["split"] = "validation" if i in (0, 1) else "test" if i in (2, 3) else "train"
    path = tmp_path / "images.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.chdir(
        tmp_path / "pictures"
    )  # relative paths are taken from the file's folder, not the working one
    data = load_images(str(path))
    assert data.info["label_names"] == ["dark", "light"]
    assert (len(data.train), len(data.validation), len(data.test)) == (8, 2, 2)
    for split, first in ((data.validation, 0), (data.test, 2), (data.train, 4)):
        for j, example in enumerate(split):
            i = first + j
            image = np.asarray(example["image"], np.uint8)
            assert (
                image.shape == (6, 5, 3) and image[0, 0, 0] == i and image[1, 1, 0] == (200 if i % 2 else 20)
            )
            assert example["label"] == i % 2


def test_an_image_csv_file_without_splits_holds_some_out(tmp_path):
    from s2ft.data.images import load_images

    records = image_files(tmp_path, 20)
    path = tmp_path / "images.csv"
    path.write_text("path,kind\n" + "".join(f"{r['image']},{r['label']}\n" for r in records))
    data = load_images(str(path), image_column="path", label_column="kind")
    assert len(data.train) + len(data.validation) + len(data.test) == 20 and len(data.test) > 0


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda r: r[3].update(image="pictures/missing.png"),
            r"the image of example 4, .*missing.png, is missing",
        ),
        (lambda r: r[2].pop("label"), r"example 3 has no image path \(image\) or no label \(label\)"),
        (lambda r: [x.pop("image") for x in r], r"no column 'image'; its columns are \['label'\]"),
    ],
)
def test_image_file_problems_are_named(tmp_path, change, match):
    from s2ft.data.images import load_images

    records = image_files(tmp_path)
    change(records)
    path = tmp_path / "images.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=match):
        load_images(str(path))


def test_an_unsupported_image_file_is_named(tmp_path):
    from s2ft.data.images import load_images

    (tmp_path / "images.txt").write_text("x\n")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'; pass a .csv/.tsv/.jsonl/.json file"):
        load_images(str(tmp_path / "images.txt"))


def test_finetune_and_evaluate_on_an_image_jsonl_file(tmp_path):
    """The command line on a .jsonl of image paths: it trains, and evaluate reads the file again."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from s2ft.cli import main
    from s2ft.jobs.evaluate import run_evaluate

    torch.manual_seed(0)
    vit = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    ViTForImageClassification(vit).save_pretrained(tmp_path / "vit")
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(tmp_path / "vit")
    records = image_files(tmp_path / "data", 24)
    path = tmp_path / "data" / "images.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    argv = [
        "finetune",
        "--task",
        "image-classification",
        "--model",
        str(tmp_path / "vit"),
        "--dataset",
        str(path),
    ]
    argv += ["--output", str(out), "--quiet", "--n-frequency", "16", "--batch-size", "4", "--epochs", "1"]
    argv += ["--calibration-batches", "1", "--head-warmup-steps", "1", "--eval-samples", "0"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "run.json").read_text())["info"]["label_names"] == ["dark", "light"]
    assert run_evaluate(str(out), "test", quiet=True)["accuracy"] == pytest.approx(metrics["test_accuracy"])
