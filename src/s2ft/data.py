"""Text-classification data for ``s2ft finetune``: the built-in ``austen`` task and user data sets.

Every task comes back as a :class:`TaskData`: ``train``/``validation``/``test`` ``datasets.Dataset`` objects with
exactly the columns ``text`` (str) and ``label`` (int64, ids ``0..K-1``), and the ``label_names`` of those ids.

The ``austen`` task
    Which of Jane Austen's six novels a sentence comes from (labels, in id order: emma, mansfieldpark,
    northangerabbey, persuasion, prideprejudice, sensesensibility). The text is Debian's ``r-cran-janeaustenr``
    package (public domain), obtained once with ``apt-get download`` and ``dpkg -x`` (or Python, without dpkg), or
    read from an extracted tree named by ``S2FT_AUSTEN_DIR``. Each novel's lines are joined into paragraphs;
    chapter and volume headings and paragraphs without a lowercase letter (titles, "THE END") are dropped; paragraphs are split into
    sentences at ``.``/``!``/``?`` followed by a capitalised word (not after Mr./Mrs./Dr./St./... or an initial);
    sentences of 5 to 40 words are kept, and any text that occurs more than once is dropped altogether, so no text
    has two labels or sits in two splits. That leaves 24,839 sentences (:data:`AUSTEN_SENTENCES`): 1,000 for
    validation, 2,000 for test, and 21,839 for training.

Cache layout (``cache_dir``, default ``$S2FT_CACHE`` or ``~/.cache/s2ft``)::

    austen/sentences.v1.jsonl   one {"text": ..., "novel": ...} object per line, in novel and reading order

It is written atomically (a temporary file, then ``os.replace``), so an error leaves nothing behind, and once it
exists nothing else (apt included) is run. The splits are recomputed from it on every load.

Splits are seeded and simple (not stratified): every example is ranked by ``sha256(f"{seed}:{text}")``, ties in
input order. That ranking is the same on every machine and Python version and does not depend on input order, so
the same seed always gives the same splits. ``austen`` takes the first 1,000 of the ranking as validation, the next
2,000 as test. User data without a validation or test split gets 10% of the training examples for each missing one
(at least one example each), taken from the start of the same ranking.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s2ft.io import atomic_write_text

AUSTEN_NOVELS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_VALIDATION_SIZE = 1_000
AUSTEN_TEST_SIZE = 2_000
# Measured with r-cran-janeaustenr 1.0.0-1 (Debian bookworm); training gets all but validation and test.
AUSTEN_SENTENCES = 24_839
MIN_WORDS = 5
MAX_WORDS = 40
HOLDOUT_FRACTION = 0.1  # of user data, for each of validation and test when the data set lacks them
SPLITS = ("train", "validation", "test")
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")

# Where the lazy-load database sits inside the package (and so inside an extracted tree).
RDATA_SUBDIR = Path("usr/lib/R/site-library/janeaustenr/data")
_SENTENCES_FILE = Path("austen/sentences.v1.jsonl")  # bump the version when the sentence rules change
_APT_TIMEOUT_S = 300

_HEADING = re.compile(r"^\s*(chapter|volume)\s+([ivxlc]+|\d+)\.?\s*$", re.IGNORECASE)
_BOUNDARY = re.compile(r"""[.!?]["')\]]*(?=\s+["'(\[]*[A-Z])""")
_LAST_WORD = re.compile(r"(\w+)$")
_ABBREVIATIONS = frozenset({"Mr", "Mrs", "Dr", "St", "Messrs", "Rev", "Col", "Capt"})

_Split = tuple[list[str], list[str]]  # texts, label names

_MANUAL = (
    f"To provide it by hand: download the Debian package (apt-get download {AUSTEN_PACKAGE}), extract it with "
    "`dpkg -x r-cran-janeaustenr_*.deb DIR`, and set S2FT_AUSTEN_DIR=DIR (or pass source_dir=DIR). DIR may also "
    "be a folder holding Rdata.rdx and Rdata.rdb."
)


class DataError(ValueError):
    """The data cannot be loaded or used; the message says what is wrong and what to do."""


@dataclass
class TaskData:
    """A classification task: three splits with columns ``text`` and ``label``, and the names of the label ids."""

    name: str
    train: Any  # datasets.Dataset
    validation: Any
    test: Any
    label_names: list[str]

    def summary(self) -> dict[str, Any]:
        """Split sizes, the labels, and ``majority_rate``: the test accuracy of always predicting the most common
        training label (the baseline a classifier has to beat)."""
        majority = Counter(self.train["label"]).most_common(1)[0][0]
        test_labels = list(self.test["label"])  # never empty: a missing test split is carved out of train
        return {
            "name": self.name,
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
            "num_labels": len(self.label_names),
            "label_names": list(self.label_names),
            "majority_rate": test_labels.count(majority) / len(test_labels),
        }


def default_cache_dir() -> Path:
    """``$S2FT_CACHE``, or ``~/.cache/s2ft``."""
    return Path(os.environ.get("S2FT_CACHE") or Path.home() / ".cache" / "s2ft")


# ---------------------------------------------------------------------------------------------- sentences
def _is_abbreviation(word: str) -> bool:
    """Whether a period after ``word`` marks an abbreviation (a title, or a single-letter initial)."""
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isupper())


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences at ``.``, ``!`` or ``?`` (with any closing quotes or brackets) followed by
    whitespace and a capitalised word, except after a title abbreviation (Mr., Mrs., ...) or a single-letter
    initial. Whitespace inside each sentence is collapsed to single spaces."""
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(text):
        if text[match.start()] == ".":
            word = _LAST_WORD.search(text, 0, match.start())
            if word and _is_abbreviation(word.group(1)):
                continue
        sentences.append(text[start : match.end()])
        start = match.end()
    sentences.append(text[start:])
    return [s for s in (" ".join(s.split()) for s in sentences) if s]


def _paragraphs(lines: Sequence[str]) -> Iterator[str]:
    """Blank-line separated paragraphs of wrapped lines, without headings, all-capitals paragraphs (titles,
    salutations, "THE END") or the underscores that mark italics."""
    block: list[str] = []
    for line in [*lines, ""]:
        if line.strip() and not _HEADING.match(line):
            block.append(line.strip())
            continue
        paragraph = " ".join(block).replace("_", "")
        block = []
        if re.search("[a-z]", paragraph):
            yield paragraph


def novel_sentences(
    lines: Sequence[str], min_words: int = MIN_WORDS, max_words: int = MAX_WORDS
) -> list[str]:
    """The sentences of ``min_words`` to ``max_words`` words in a novel given as its text lines, in reading order."""
    return [
        sentence
        for paragraph in _paragraphs(lines)
        for sentence in split_sentences(paragraph)
        if min_words <= len(sentence.split()) <= max_words
    ]


# ---------------------------------------------------------------------------------------------- the Debian package
def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=_APT_TIMEOUT_S)
    except FileNotFoundError:
        raise DataError(
            f"cannot obtain {AUSTEN_PACKAGE}: `{command[0]}` is not installed. {_MANUAL}"
        ) from None
    except subprocess.TimeoutExpired:
        raise DataError(f"`{' '.join(command)}` took over {_APT_TIMEOUT_S} s. {_MANUAL}") from None


def _download_deb(workdir: Path) -> Path:
    """``apt-get download`` the package into ``workdir``; if that fails (no package lists), ``apt-get update`` and
    try once more."""
    download = ["apt-get", "download", AUSTEN_PACKAGE]
    result = _run(download, workdir)
    if result.returncode != 0:
        update = _run(["apt-get", "update"], workdir)
        result = _run(download, workdir) if update.returncode == 0 else update
    debs = sorted(workdir.glob(f"{AUSTEN_PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DataError(f"cannot download {AUSTEN_PACKAGE} with apt-get: {' '.join(detail)}. {_MANUAL}")
    return debs[0]


def _deb_data_tar(deb: Path) -> bytes:
    """The ``data.tar.*`` member of a .deb, which is an ``ar`` archive."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise DataError(f"{deb} is not a Debian package (no ar header)")
        while header := f.read(60):
            size = int(header[48:58])
            if header[:16].decode("ascii").strip().rstrip("/").startswith("data.tar"):
                return f.read(size)
            f.seek(size + size % 2, os.SEEK_CUR)  # members are padded to an even length
    raise DataError(f"{deb} has no data.tar member")


def _extract_deb(deb: Path, dest: Path) -> None:
    """Extract the package into ``dest``: ``dpkg -x`` where there is dpkg, otherwise Python's tarfile (which reads
    gzip, bzip2 and xz members, not zstd), writing only the two ``Rdata`` files."""
    if shutil.which("dpkg"):
        result = _run(["dpkg", "-x", str(deb), str(dest)], dest)
        if result.returncode != 0:
            raise DataError(f"`dpkg -x {deb.name}` failed: {result.stderr.strip()}. {_MANUAL}")
        return
    wanted = {(RDATA_SUBDIR / name).as_posix() for name in ("Rdata.rdx", "Rdata.rdb")}
    try:
        with tarfile.open(fileobj=io.BytesIO(_deb_data_tar(deb)), mode="r:*") as tar:
            for member in tar.getmembers():
                name = member.name.removeprefix("./")
                if name in wanted:
                    target = dest / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())
    except tarfile.TarError as e:
        raise DataError(f"cannot unpack {deb.name} without dpkg ({e}); install dpkg. {_MANUAL}") from None


def _find_rdata_dir(root: Path) -> Path:
    for candidate in (root, root / RDATA_SUBDIR):
        if (candidate / "Rdata.rdx").is_file() and (candidate / "Rdata.rdb").is_file():
            return candidate
    raise DataError(f"no Rdata.rdx/Rdata.rdb in {root} or {root / RDATA_SUBDIR}. {_MANUAL}")


def read_austen_novels(rdata_dir: Path) -> dict[str, list[str]]:
    """Each novel's text lines, from the package's R lazy-load database: ``Rdata.rdx`` is a gzipped RDS index of
    ``name -> (offset, length)`` in ``Rdata.rdb``, where each blob is a 4-byte big-endian length and a zlib stream
    of a serialized R character vector."""
    import rdata

    def parse(raw: bytes) -> Any:
        return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))

    try:
        index = parse(gzip.decompress((rdata_dir / "Rdata.rdx").read_bytes()))["variables"]
        rdb = (rdata_dir / "Rdata.rdb").read_bytes()
        novels = {}
        for name in AUSTEN_NOVELS:
            offset, length = (int(v) for v in index[name])
            blob = rdb[offset : offset + length]
            novels[name] = [str(line) for line in parse(zlib.decompress(blob[4:]))]
    except (OSError, KeyError, ValueError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read the janeaustenr data in {rdata_dir}: {e!r}. {_MANUAL}") from None
    return novels


def _austen_sentences_from(rdata_dir: Path) -> list[dict[str, str]]:
    """Labelled sentences of all novels, with every text that occurs more than once removed."""
    rows = [
        {"text": sentence, "novel": novel}
        for novel, lines in read_austen_novels(rdata_dir).items()
        for sentence in novel_sentences(lines)
    ]
    counts = Counter(row["text"] for row in rows)
    return [row for row in rows if counts[row["text"]] == 1]


def austen_sentences(
    cache_dir: str | os.PathLike | None = None, source_dir: str | os.PathLike | None = None
) -> list[dict[str, str]]:
    """The prepared ``{"text", "novel"}`` sentences, from the cache when it has them. Otherwise they are made from
    ``source_dir`` (or ``$S2FT_AUSTEN_DIR``), an extracted package tree or the folder holding ``Rdata.rdx``, or from
    the package fetched with apt-get, and then cached."""
    path = Path(cache_dir or default_cache_dir()) / _SENTENCES_FILE
    if not path.is_file():
        source_dir = source_dir or os.environ.get("S2FT_AUSTEN_DIR")
        if source_dir:
            rows = _austen_sentences_from(_find_rdata_dir(Path(source_dir)))
        else:
            with tempfile.TemporaryDirectory(prefix="s2ft-austen-") as tmp:
                workdir = Path(tmp)
                _extract_deb(_download_deb(workdir), workdir)
                rows = _austen_sentences_from(_find_rdata_dir(workdir))
        atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_austen(
    seed: int = 0, cache_dir: str | os.PathLike | None = None, source_dir: str | os.PathLike | None = None
) -> TaskData:
    """The ``austen`` task: 1,000 validation and 2,000 test sentences chosen by ``seed``, the rest for training."""
    rows = austen_sentences(cache_dir, source_dir)
    texts = [row["text"] for row in rows]
    labels = [row["novel"] for row in rows]
    order = _seeded_order(texts, seed)
    held_out = AUSTEN_VALIDATION_SIZE + AUSTEN_TEST_SIZE
    chosen = {
        "train": order[held_out:],
        "validation": order[:AUSTEN_VALIDATION_SIZE],
        "test": order[AUSTEN_VALIDATION_SIZE:held_out],
    }
    splits = {split: ([texts[i] for i in idx], [labels[i] for i in idx]) for split, idx in chosen.items()}
    return _to_task("austen", splits)


# ---------------------------------------------------------------------------------------------- user data
def _seeded_order(texts: Sequence[str], seed: int) -> list[int]:
    """Indices ranked by ``sha256(f"{seed}:{text}")``, ties in index order."""
    keys = [hashlib.sha256(f"{seed}:{text}".encode()).digest() for text in texts]
    return sorted(range(len(texts)), key=lambda i: (keys[i], i))


def _read_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
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
    records, columns = _read_file(path)
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


def _hf_splits(spec: str, text_column: str, label_column: str) -> dict[str, tuple[list, list]]:
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
    if "train" not in splits:
        raise DataError(f"{spec!r} has no train split (it has {', '.join(loaded) or 'none'})")
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


def _fill_missing(spec: str, splits: dict[str, _Split], seed: int) -> dict[str, _Split]:
    """Carve each missing validation/test split out of train: 10% of it (at least one example), seeded. An empty
    split, or one whose labels are all ``-1`` (the hub's mark of an unlabeled test set), counts as missing."""
    missing = [s for s in SPLITS[1:] if s not in splits or not splits[s][0] or set(splits[s][1]) == {"-1"}]
    texts, labels = splits["train"]
    size = max(1, round(HOLDOUT_FRACTION * len(texts)))
    if missing and size * len(missing) >= len(texts):
        raise DataError(
            f"{spec}: {len(texts)} training examples are too few to hold out a {' and a '.join(missing)} split; "
            "add examples, or give every split explicitly in a 'split' column"
        )
    order = _seeded_order(texts, seed)
    filled = dict(splits)
    for split in missing:
        taken, order = order[:size], order[size:]
        filled[split] = ([texts[i] for i in taken], [labels[i] for i in taken])
    if missing:
        filled["train"] = ([texts[i] for i in order], [labels[i] for i in order])
    return filled


def _label_order(names: set[str]) -> list[str]:
    """Sorted label names; numerically when all of them are integers (so ``"10"`` comes after ``"9"``)."""
    if all(re.fullmatch(r"-?\d+", name) for name in names):
        return sorted(names, key=int)
    return sorted(names)


def _to_task(name: str, splits: dict[str, _Split]) -> TaskData:
    """A TaskData with label ids from the sorted training labels; held-out labels must occur in training."""
    import datasets

    label_names = _label_order(set(splits["train"][1]))
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
    return TaskData(name=name, label_names=label_names, **built)


def load_dataset_spec(
    spec: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> TaskData:
    """Load a classification task.

    ``spec`` is ``"austen"`` (the built-in task, prepared under ``cache_dir``); a .csv, .tsv, .jsonl or .json file
    (JSON: a list of objects, or one object per line), whose optional ``split`` column (train/validation/test)
    assigns the splits; or else a Hugging Face data set name or folder, loaded with ``datasets.load_dataset`` into
    the library's own cache (offline, with ``HF_HUB_OFFLINE=1``, a hub name fails at once). Missing validation/test
    splits are carved out of train (10% each, seeded). Examples with empty texts are dropped; labels (strings or
    integers) get ids in sorted order of the training labels. Raises :class:`DataError` on any problem.
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
        raw, name = _hf_splits(spec, text_column, label_column), spec
    splits = {split: _clean(f"{spec} ({split})", *columns) for split, columns in raw.items()}
    if not splits.get("train", ([], []))[0]:
        raise DataError(
            f"{spec}: no training examples with a non-empty {text_column!r} (the training split is empty)"
        )
    return _to_task(name, _fill_missing(spec, splits, seed))
