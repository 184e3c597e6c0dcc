"""What every built-in or user data set shares: the cache folder, seeded splits, and :class:`TaskData`, the three
splits that every loader returns (with :func:`to_task` for labelled text)."""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s2ft.errors import DataError

SPLITS = ("train", "validation", "test")
HOLDOUT_FRACTION = 0.1  # of user data, for each of validation and test when the data set lacks them


def default_cache_dir() -> Path:
    """``$S2FT_CACHE``, or ``~/.cache/s2ft``."""
    return Path(os.environ.get("S2FT_CACHE") or Path.home() / ".cache" / "s2ft")


def seeded_order(keys: Sequence[str], seed: int) -> list[int]:
    """Indices ranked by ``sha256(f"{seed}:{key}")``, ties in index order: the same on every machine and Python
    version, and independent of input order for distinct keys."""
    digests = [hashlib.sha256(f"{seed}:{key}".encode()).digest() for key in keys]
    return sorted(range(len(keys)), key=lambda i: (digests[i], i))


@dataclass
class TaskData:
    """A task's three splits (``datasets.Dataset`` objects in the task's raw format), its display name, and
    ``info``: what a model must know about the data (``label_names``, the names of label ids ``0..K-1``, for
    classification), saved with a run and handed back to the task when the run is loaded."""

    name: str
    train: Any
    validation: Any
    test: Any
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label_names(self) -> list[str]:
        """The names of the label ids (empty for data without labels)."""
        return list(self.info.get("label_names", []))

    def majority_rate(self) -> float:
        """The test accuracy of always predicting the most common training label (the baseline a classifier has
        to beat); the splits need a ``label`` column."""
        majority = Counter(self.train["label"]).most_common(1)[0][0]
        test_labels = list(self.test["label"])  # never empty: a missing test split is carved out of train
        return test_labels.count(majority) / len(test_labels)

    def summary(self) -> dict[str, Any]:
        """Split sizes, the labels, and :meth:`majority_rate`."""
        return {
            "name": self.name,
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
            "num_labels": len(self.label_names),
            "label_names": self.label_names,
            "majority_rate": self.majority_rate(),
        }


def _label_order(names: set[str]) -> list[str]:
    """Sorted label names; numerically when all of them are integers (so ``"10"`` comes after ``"9"``)."""
    if all(re.fullmatch(r"-?\d+", name) for name in names):
        return sorted(names, key=int)
    return sorted(names)


def to_task(name: str, splits: dict[str, tuple[list[str], list[str]]], scored: str | None = None) -> TaskData:
    """Labelled text ``{split: (texts, label names)}`` as a :class:`TaskData` with columns ``text`` and ``label``
    (int64), label ids from the sorted training labels; held-out labels must occur in training, and training
    needs two labels. With ``scored`` (the one split an evaluation scores) the ids come from the labels of every
    split and neither check applies: the model's own labels are checked against that split's (``align``)."""
    import datasets

    labelled = (label for split in (SPLITS if scored else ("train",)) for label in splits[split][1])
    label_names = _label_order(set(labelled))
    ids = {label: i for i, label in enumerate(label_names)}
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})
    built = {}
    for split in SPLITS:
        texts, labels = splits[split]
        unknown = sorted(set(labels) - ids.keys())
        if unknown:
            raise DataError(
                f"{name}: label(s) {', '.join(map(repr, unknown))} in the {split} split never occur in the training "
                "split, so the model cannot learn them; add training examples with them or drop those examples"
            )
        built[split] = datasets.Dataset.from_dict(
            {"text": texts, "label": [ids[label] for label in labels]}, features=features
        )
    if len(label_names) < 2 and not scored:
        raise DataError(
            f"{name}: the training split has only one label ({label_names[0]!r}); a classifier needs at least "
            "two (check --label-column)"
        )
    return TaskData(name, built["train"], built["validation"], built["test"], {"label_names": label_names})
