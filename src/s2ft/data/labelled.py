"""Labelled text for classification: the built-in ``austen`` task and user data sets.

Every task comes back as a :class:`s2ft.data.common.TaskData`: ``train``/``validation``/``test`` ``datasets.Dataset`` objects with
exactly the columns ``text`` (str) and ``label`` (int64, ids ``0..K-1``), and the ``label_names`` of those ids
(in ``info``).
User data without a validation or test split gets 10% of the training examples for each missing one (at least one
example each), taken from the start of the seeded ranking :func:`s2ft.data.common.seeded_order`.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from s2ft.data.austen import load_austen
from s2ft.data.common import HOLDOUT_FRACTION, SPLITS, TaskData, seeded_order, to_task
from s2ft.errors import DataError

FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")

_Split = tuple[list[str], list[str]]  # texts, label names


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a .csv/.tsv/.jsonl/.json file, and the column names in first-seen order."""
    suffix = path.suffix.lower()
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: skip a byte-order mark
            if suffix in (".csv", ".tsv"):
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                records = list(reader)
                return records, list(reader.fieldnames or [])
            content = f.read()
        if suffix == ".json" and content.lstrip().startswith("["):
            records = json.loads(content)
        else:
            records = [json.loads(line) for line in content.splitlines() if line.strip()]
    except (UnicodeDecodeError, csv.Error, json.JSONDecodeError) as e:
        raise DataError(f"cannot parse {path}: {e}") from None
    if not all(isinstance(record, dict) for record in records):
        raise DataError(f"{path}: expected one JSON object per example, like {{'text': ..., 'label': ...}}")
    return records, list(dict.fromkeys(key for record in records for key in record))


def _check_columns(source: str, columns: Sequence[str], text_column: str, label_column: str) -> None:
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise DataError(
            f"{source}: no column {' or '.join(map(repr, missing))}; its columns are {list(columns)}. "
            "Name the right ones with --text-column/--label-column (text_column=, label_column=)."
        )


def _file_splits(path: Path, text_column: str, label_column: str) -> dict[str, tuple[list, list]]:
    """The file's examples, grouped by its ``split`` column if it has one, else all under ``train``."""
    records, columns = read_records(path)
    if not records:
        raise DataError(f"{path} has no examples")
    _check_columns(str(path), columns, text_column, label_column)
    grouped: dict[str, tuple[list, list]] = {}
    for record in records:
        split = str(record.get("split") or "").strip().lower() if "split" in columns else "train"
        if split not in SPLITS:
            raise DataError(f"{path}: split value {record.get('split')!r} is none of {', '.join(SPLITS)}")
        texts, labels = grouped.setdefault(split, ([], []))
        texts.append(record.get(text_column))
        labels.append(record.get(label_column))
    return grouped


def _hf_splits(spec: str, text_column: str, label_column: str, scored: str) -> dict[str, tuple[list, list]]:
    """The train/validation/test splits of a Hugging Face data set (a hub name or a local folder; a folder written
    by ``save_to_disk`` is read with ``load_from_disk``). Class-label ids become their names."""
    import datasets

    try:
        if (Path(spec) / "dataset_dict.json").is_file() or (Path(spec) / "state.json").is_file():
            loaded = datasets.load_from_disk(spec)
        else:
            loaded = datasets.load_dataset(spec)
    except Exception as e:  # the datasets library raises many types here (offline, not found, bad files, ...)
        raise DataError(
            f"{spec!r} is not a .csv/.tsv/.jsonl/.json file, and loading it as a Hugging Face data set failed: "
            f"{type(e).__name__}: {e}. For local data, pass a .csv or .jsonl file with text and label columns."
        ) from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict(train=loaded)
    splits = {}
    for split in SPLITS:
        if split not in loaded:
            continue
        dataset = loaded[split]
        _check_columns(f"{spec} ({split})", dataset.column_names, text_column, label_column)
        labels = list(dataset[label_column])
        feature = dataset.features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            labels = [feature.int2str(label) if label >= 0 else label for label in labels]
        splits[split] = (list(dataset[text_column]), labels)
    if scored not in splits and "train" not in splits:
        raise DataError(f"{spec!r} has no {scored} split (it has {', '.join(loaded) or 'none'})")
    return splits


def _clean(source: str, texts: list, labels: list) -> _Split:
    """Drop examples with an empty text; labels become strings. An example without a label is an error."""
    kept_texts, kept_labels = [], []
    for text, label in zip(texts, labels):
        text = "" if text is None else str(text).strip()
        if not text:
            continue
        label = "" if label is None else str(label).strip()
        if not label:
            raise DataError(f"{source}: the example {text[:60]!r} has no label; label every example")
        kept_texts.append(text)
        kept_labels.append(label)
    return kept_texts, kept_labels


def _given(splits: dict[str, _Split], split: str) -> bool:
    """Whether the data set gives ``split``: not absent, not empty, and not all ``-1`` (the hub's mark of an
    unlabeled test set)."""
    return split in splits and bool(splits[split][0]) and set(splits[split][1]) != {"-1"}


def _fill_missing(spec: str, splits: dict[str, _Split], seed: int) -> dict[str, _Split]:
    """Carve each missing validation/test split (not :func:`_given`) out of train: 10% of it (at least one
    example), seeded."""
    missing = [s for s in SPLITS[1:] if not _given(splits, s)]
    texts, labels = splits["train"]
    size = max(1, round(HOLDOUT_FRACTION * len(texts)))
    if missing and size * len(missing) >= len(texts):
        raise DataError(
            f"{spec}: {len(texts)} training examples are too few to hold out a {' and a '.join(missing)} split; "
            "add examples, or give every split explicitly in a 'split' column"
        )
    order = seeded_order(texts, seed)
    filled = dict(splits)
    for split in missing:
        taken, order = order[:size], order[size:]
        filled[split] = ([texts[i] for i in taken], [labels[i] for i in taken])
    if missing:
        filled["train"] = ([texts[i] for i in order], [labels[i] for i in order])
    return filled


def load_dataset_spec(
    spec: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    scored: str | None = None,
) -> TaskData:
    """Load a classification task.

    ``spec`` is ``"austen"`` (the built-in task, prepared under ``cache_dir``); a .csv, .tsv, .jsonl or .json file
    (JSON: a list of objects, or one object per line), whose optional ``split`` column (train/validation/test)
    assigns the splits; or else a Hugging Face data set name or folder, loaded with ``datasets.load_dataset`` into
    the library's own cache (offline, with ``HF_HUB_OFFLINE=1``, a hub name fails at once). Missing validation/test
    splits are carved out of train (10% each, seeded). Examples with empty texts are dropped; labels (strings or
    integers) get ids in sorted order of the training labels. Raises :class:`DataError` on any problem.

    ``scored`` names the one split an evaluation scores: then only what scoring it needs is checked. When the data
    set gives that split (not train), it alone is loaded (the others come back empty); otherwise the splits are
    carved as for training, so the same file gives the same split. Labels of any split get ids, and none is
    refused here (the model's labels are checked against the scored split by the task's ``align``).
    """
    if spec == "austen":
        return load_austen(seed=seed, cache_dir=cache_dir)
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise DataError(
                f"{spec}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)} "
                "with a text and a label column"
            )
        raw, name = _file_splits(path, text_column, label_column), path.stem
    elif path.suffix.lower() in FILE_SUFFIXES:
        raise DataError(f"{spec}: file not found (current directory: {os.getcwd()})")
    else:
        raw, name = _hf_splits(spec, text_column, label_column, scored or "train"), spec
    if scored in raw and scored != "train":
        given = {scored: _clean(f"{spec} ({scored})", *raw[scored])}
        if _given(given, scored):  # the one split to score: the others are not read
            return to_task(name, {s: given.get(s, ([], [])) for s in SPLITS}, scored)
    splits = {split: _clean(f"{spec} ({split})", *columns) for split, columns in raw.items()}
    if not splits.get("train", ([], []))[0]:
        raise DataError(
            f"{spec}: no training examples with a non-empty {text_column!r} (the training split is empty)"
        )
    return to_task(name, _fill_missing(spec, splits, seed), scored)
