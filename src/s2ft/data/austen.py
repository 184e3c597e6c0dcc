"""The built-in Austen data: Jane Austen's six novels (public domain), from Debian's ``r-cran-janeaustenr``.

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

Splits are seeded (:func:`s2ft.data.common.seeded_order` of the texts): ``austen`` takes the first 1,000 of the
ranking as validation, the next 2,000 as test, the rest for training.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from s2ft.data.common import TaskData, default_cache_dir, seeded_order, to_task
from s2ft.data.debian import fetch_package
from s2ft.errors import DataError
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
# Where the lazy-load database sits inside the package (and so inside an extracted tree).
RDATA_SUBDIR = Path("usr/lib/R/site-library/janeaustenr/data")
_SENTENCES_FILE = Path("austen/sentences.v1.jsonl")  # bump the version when the sentence rules change
_PASSAGES_FILE = Path("austen/passages.v1.jsonl")
PASSAGE_WORDS = (60, 120)

_HEADING = re.compile(r"^\s*(chapter|volume)\s+([ivxlc]+|\d+)\.?\s*$", re.IGNORECASE)
_BOUNDARY = re.compile(r"""[.!?]["')\]]*(?=\s+["'(\[]*[A-Z])""")
_LAST_WORD = re.compile(r"(\w+)$")
_ABBREVIATIONS = frozenset({"Mr", "Mrs", "Dr", "St", "Messrs", "Rev", "Col", "Capt"})

_MANUAL = (
    f"To provide it by hand: download the Debian package (apt-get download {AUSTEN_PACKAGE}), extract it with "
    "`dpkg -x r-cran-janeaustenr_*.deb DIR`, and set S2FT_AUSTEN_DIR=DIR (or pass source_dir=DIR). DIR may also "
    "be a folder holding Rdata.rdx and Rdata.rdb."
)
RDATA_FILES = tuple((RDATA_SUBDIR / name).as_posix() for name in ("Rdata.rdx", "Rdata.rdb"))


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


# ---------------------------------------------------------------------------------------------- the package
def find_rdata_dir(root: Path) -> Path:
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


def _unique_pieces(rdata_dir: Path, cut: Callable[[Sequence[str]], list[str]]) -> list[dict[str, str]]:
    """``{"text", "novel"}`` rows of every novel cut into pieces by ``cut``, with every text that occurs more
    than once removed (so no text has two labels or sits in two splits)."""
    rows = [
        {"text": piece, "novel": novel}
        for novel, lines in read_austen_novels(rdata_dir).items()
        for piece in cut(lines)
    ]
    counts = Counter(row["text"] for row in rows)
    return [row for row in rows if counts[row["text"]] == 1]


def _austen_sentences_from(rdata_dir: Path) -> list[dict[str, str]]:
    return _unique_pieces(rdata_dir, novel_sentences)


def _cached_rows(
    cache_file: Path,
    build: Callable[[Path], list[dict[str, str]]],
    cache_dir: str | os.PathLike | None,
    source_dir: str | os.PathLike | None,
) -> list[dict[str, str]]:
    """Rows of a cache file under ``cache_dir``, made once by ``build(rdata_dir)`` from ``source_dir`` (or
    ``$S2FT_AUSTEN_DIR``), an extracted package tree or the folder holding ``Rdata.rdx``, or from the package
    fetched with apt-get, then written atomically."""
    path = Path(cache_dir or default_cache_dir()) / cache_file
    if not path.is_file():
        source_dir = source_dir or os.environ.get("S2FT_AUSTEN_DIR")
        if source_dir:
            rows = build(find_rdata_dir(Path(source_dir)))
        else:
            with tempfile.TemporaryDirectory(prefix="s2ft-austen-") as tmp:
                workdir = Path(tmp)
                fetch_package(AUSTEN_PACKAGE, workdir, RDATA_FILES, _MANUAL)
                rows = build(find_rdata_dir(workdir))
        atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def austen_sentences(
    cache_dir: str | os.PathLike | None = None, source_dir: str | os.PathLike | None = None
) -> list[dict[str, str]]:
    """The prepared ``{"text", "novel"}`` sentences (cached; see :func:`_cached_rows`)."""
    return _cached_rows(_SENTENCES_FILE, _austen_sentences_from, cache_dir, source_dir)


def novel_passages(
    lines: Sequence[str], min_words: int = PASSAGE_WORDS[0], max_words: int = PASSAGE_WORDS[1]
) -> list[str]:
    """A novel's text as passages: consecutive paragraphs joined until a passage holds ``min_words`` words; a
    paragraph longer than ``max_words`` is cut at sentence ends into pieces of at most that many (a longer sentence
    stays whole). Reading order."""
    pieces: list[str] = []
    for paragraph in _paragraphs(lines):
        chunk: list[str] = []
        for sentence in split_sentences(paragraph):
            if chunk and len(" ".join([*chunk, sentence]).split()) > max_words:
                pieces.append(" ".join(chunk))
                chunk = []
            chunk.append(sentence)
        if chunk:
            pieces.append(" ".join(chunk))
    passages, current = [], []
    for piece in pieces:
        current.append(piece)
        if len(" ".join(current).split()) >= min_words:
            passages.append(" ".join(current))
            current = []
    if current:
        passages.append(" ".join(current))
    return passages


def _austen_passages_from(rdata_dir: Path) -> list[dict[str, str]]:
    return _unique_pieces(rdata_dir, novel_passages)


def austen_passages(
    cache_dir: str | os.PathLike | None = None, source_dir: str | os.PathLike | None = None
) -> list[dict[str, str]]:
    """The novels as ``{"text", "novel"}`` passages of about 60 to 120 words, for language modelling (cached)."""
    return _cached_rows(_PASSAGES_FILE, _austen_passages_from, cache_dir, source_dir)


def load_austen(
    seed: int = 0, cache_dir: str | os.PathLike | None = None, source_dir: str | os.PathLike | None = None
) -> TaskData:
    """The ``austen`` task: 1,000 validation and 2,000 test sentences chosen by ``seed``, the rest for training."""
    rows = austen_sentences(cache_dir, source_dir)
    texts = [row["text"] for row in rows]
    labels = [row["novel"] for row in rows]
    order = seeded_order(texts, seed)
    held_out = AUSTEN_VALIDATION_SIZE + AUSTEN_TEST_SIZE
    chosen = {
        "train": order[held_out:],
        "validation": order[:AUSTEN_VALIDATION_SIZE],
        "test": order[AUSTEN_VALIDATION_SIZE:held_out],
    }
    splits = {split: ([texts[i] for i in idx], [labels[i] for i in idx]) for split, idx in chosen.items()}
    return to_task("austen", splits)
