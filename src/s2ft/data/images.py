"""Images for classification: the built-in Fashion-MNIST task, image folders, ``.jsonl``/``.json``/``.csv``/``.tsv``
files of image paths and labels (:func:`image_file`), and ``datasets`` with an image column, each as a :class:`s2ft.data.common.TaskData` with columns ``image`` (a uint8 array ``(H, W)`` or
``(H, W, C)``) and ``label`` (int64 ids of ``info["label_names"]``).

A user data set without a validation or test split gets 10% of the training images for each missing one (seeded,
``datasets``' ``train_test_split``). Every image is decoded once while loading, so an unreadable file is reported
before training, by name. 16-bit greyscale images (a 16-bit PNG) are scaled from ``0..65535`` to ``0..255``
(:func:`to_uint8`), not clipped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from s2ft.data.common import HOLDOUT_FRACTION, SPLITS, TaskData
from s2ft.data.fashion_mnist import LABELS, VALIDATION_SIZE, load_fashion_mnist
from s2ft.data.labelled import FILE_SUFFIXES, read_records
from s2ft.errors import DataError

FASHION_MNIST = "fashion-mnist"
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes of 16-bit (and 32-bit integer) greyscale
WIDE_MAX = 65535  # a 16-bit image's white


def load_images(
    spec: str,
    image_column: str = "image",
    label_column: str = "label",
    seed: int = 0,
    scored: str | None = None,
) -> TaskData:
    """``"fashion-mnist"`` (the built-in task), an image folder (one subfolder per class), a file of image paths
    and labels (:func:`image_file`), or a ``datasets`` name or folder with an image and a label column. ``scored``: the one split an evaluation scores (see
    :func:`image_dataset`). Raises :class:`DataError` on any problem."""
    if spec == FASHION_MNIST:
        return fashion_mnist_task(seed)
    return image_dataset(spec, image_column, label_column, seed, scored)


def fashion_mnist_task(seed: int = 0, cache_dir: str | os.PathLike | None = None) -> TaskData:
    """Fashion-MNIST (:mod:`s2ft.data.fashion_mnist`) as a :class:`TaskData` with columns ``image`` (uint8
    ``(28, 28)``) and ``label``: the package's test images as the test split, a seeded 5,000 of its training images as
    validation."""
    import datasets

    arrays = load_fashion_mnist(cache_dir)
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


def image_dataset(
    spec: str, image_column: str, label_column: str, seed: int, scored: str | None = None
) -> TaskData:
    """An image folder (``imagefolder``: one subfolder per class) or a ``datasets`` name/folder, with missing
    validation and test splits carved out of train (10% each, seeded). Every image is decoded once here, so an
    unreadable file is reported before training, by name. With ``scored`` (the one split an evaluation scores)
    only that split is read (the others come back empty), its labels are named even when training lacks them
    (the task's ``align`` checks them against the model's), and one class is enough."""
    import datasets

    try:
        if os.path.isfile(spec):
            loaded = image_file(spec, image_column, label_column)
            image_column, label_column = "image", "label"
        elif os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "dataset_dict.json")):
            check_image_folder(spec)
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
    if scored in loaded and not isinstance(feature, datasets.ClassLabel):
        names = sorted({*names, *(str(v) for v in loaded[scored][label_column])})
    if len(names) < 2 and not scored:
        raise DataError(f"{spec!r}: only one class ({names}); a classifier needs at least two")
    splits = {s: loaded[s] for s in ("train", "validation", "test") if s in loaded}
    train = splits["train"]
    for split in ("test", "validation"):
        if split not in splits:
            if len(train) < 10:
                raise DataError(
                    f"{spec!r}: {len(train)} training images are too few to hold out a {split} split"
                )
            parts = train.train_test_split(test_size=HOLDOUT_FRACTION, seed=seed)
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
                if isinstance(image, str):  # a path (an image_file): read here, once
                    from PIL import Image

                    with Image.open(image) as opened:
                        opened.load()
                        image = to_uint8(opened)
                else:
                    image = to_uint8(image)
            except Exception as e:
                raise DataError(f"{spec!r}: an image of the {name} split cannot be read ({e})") from None
            return {"image": image, "label": index[label]}

        return split.map(convert, remove_columns=split.column_names, desc=f"reading {name} images")

    built = {
        name: normalize(split, name) if scored in (None, name) else split.select([])
        for name, split in splits.items()
    }
    return TaskData(
        os.path.basename(os.path.normpath(spec)),
        built["train"],
        built["validation"],
        built["test"],
        {"label_names": names},
    )


def image_file(path: str, image_column: str = "image", label_column: str = "label") -> Any:
    """A ``.jsonl``/``.json``/``.csv``/``.tsv`` file of examples as a ``datasets.DatasetDict`` with columns
    ``image`` (the path of each image, relative ones taken from the file's folder) and ``label`` (str), grouped by
    its ``split`` column (train, validation, test) if it has one, else all in train. Raises :class:`DataError`
    for another kind of file, a missing column or value, or an image that is missing or unreadable (named)."""
    import datasets
    from PIL import Image, UnidentifiedImageError

    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {suffix!r}; pass a {'/'.join(FILE_SUFFIXES)} file of image paths and "
            "labels, an image folder (one subfolder per class), or a datasets folder or name"
        )
    records, columns = read_records(Path(path))
    if not records:
        raise DataError(f"{path} has no examples")
    missing = [c for c in (image_column, label_column) if c not in columns]
    if missing:
        raise DataError(
            f"{path}: no column {' or '.join(map(repr, missing))}; its columns are {columns}. Name the right ones "
            "with --image-column/--label-column"
        )
    folder = os.path.dirname(os.path.abspath(path))
    grouped: dict[str, dict[str, list[str]]] = {}
    for line, record in enumerate(records, start=1):
        split = str(record.get("split") or "").strip().lower() if "split" in columns else "train"
        if split not in SPLITS:
            raise DataError(f"{path}: split value {record.get('split')!r} is none of {', '.join(SPLITS)}")
        image, label = record.get(image_column), record.get(label_column)
        if not isinstance(image, str) or not image or label is None or label == "":
            raise DataError(
                f"{path}: example {line} has no image path ({image_column}) or no label ({label_column})"
            )
        image = os.path.join(folder, os.path.expanduser(image))
        try:
            with Image.open(image) as opened:
                opened.verify()
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(
                f"{path}: the image of example {line}, {image}, is missing or not readable ({e}); fix the path "
                "(relative paths are taken from the file's folder) or remove the example"
            ) from None
        columns_of = grouped.setdefault(split, {"image": [], "label": []})
        columns_of["image"].append(image)
        columns_of["label"].append(str(label))
    if "train" not in grouped:
        raise DataError(f"{path} has no training examples (its split column names {', '.join(grouped)})")
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(data) for name, data in grouped.items()})


def to_uint8(image: Any) -> np.ndarray:
    """An image as a uint8 array: a PIL image of any mode as RGB ``(H, W, 3)``, an array as it is. 16-bit pixels
    (PIL modes ``I;16*`` and ``I``, as a 16-bit PNG opens, and uint16 arrays) are scaled from their range
    ``0..65535`` to ``0..255`` (``round(v * 255 / 65535)``), where PIL's own conversion would clip them at 255."""
    if getattr(image, "mode", None) in WIDE_MODES or (
        isinstance(image, np.ndarray) and image.dtype == np.uint16
    ):
        scaled = np.clip(np.rint(np.asarray(image, dtype=np.float64) * (255 / WIDE_MAX)), 0, 255).astype(
            np.uint8
        )
        return scaled if isinstance(image, np.ndarray) else np.repeat(scaled[..., None], 3, axis=-1)
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    return np.asarray(image)


def check_image_folder(folder: str) -> None:
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
