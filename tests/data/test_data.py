"""Data for ``s2ft finetune``: the austen task (the real Debian package, once per session), the sentence splitter,
user files and Hugging Face folders, and every error case."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import gzip  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from s2ft.data import (  # noqa: E402
    DataError,
    debian,  # noqa: E402
    load_dataset_spec,
)
from s2ft.data import austen as data  # noqa: E402
from s2ft.data.austen import (  # noqa: E402
    AUSTEN_NOVELS,
    AUSTEN_SENTENCES,
    AUSTEN_TEST_SIZE,
    AUSTEN_VALIDATION_SIZE,
    load_austen,
    novel_sentences,
    split_sentences,
)

SENTENCES_FILE = Path("austen/sentences.v1.jsonl")


def no_subprocess(*args, **kwargs):
    raise AssertionError(f"no command may run here: {args}")


def split_texts(task) -> list[set[str]]:
    return [set(split["text"]) for split in (task.train, task.validation, task.test)]


# ---------------------------------------------------------------------------------------------- the real package
@pytest.fixture(scope="module")
def austen_cache(tmp_path_factory) -> Path:
    """A cache prepared once per session from the real package, fetched with apt-get."""
    if shutil.which("apt-get") is None and not os.environ.get("S2FT_AUSTEN_DIR"):
        pytest.skip(
            "apt-get is not installed and S2FT_AUSTEN_DIR is not set: the austen data cannot be obtained"
        )
    cache = tmp_path_factory.mktemp("cache")
    data.austen_sentences(cache)
    return cache


def test_austen_cache_file(austen_cache):
    files = [p.relative_to(austen_cache) for p in austen_cache.rglob("*") if p.is_file()]
    assert files == [SENTENCES_FILE]  # and no temporary file left behind
    assert (austen_cache / SENTENCES_FILE).stat().st_mode & 0o777 == 0o644
    rows = [json.loads(line) for line in (austen_cache / SENTENCES_FILE).read_text().splitlines()]
    assert {row["novel"] for row in rows} == set(AUSTEN_NOVELS)
    assert abs(len(rows) - AUSTEN_SENTENCES) < 0.02 * AUSTEN_SENTENCES  # exact for package version 1.0.0-1
    texts = [row["text"] for row in rows]
    assert len(set(texts)) == len(texts)
    assert all(5 <= len(t.split()) <= 40 and t == " ".join(t.split()) for t in texts)
    assert not any(t.lower().startswith("chapter ") for t in texts)
    opening = "It is a truth universally acknowledged, that a single man in possession of a good fortune,"
    assert f"{opening} must be in want of a wife." in texts


def test_austen_splits(austen_cache):
    task = load_dataset_spec("austen", cache_dir=austen_cache)
    total = len((austen_cache / SENTENCES_FILE).read_text().splitlines())
    assert task.name == "austen"
    assert task.label_names == list(AUSTEN_NOVELS) == sorted(AUSTEN_NOVELS)
    assert (len(task.validation), len(task.test)) == (AUSTEN_VALIDATION_SIZE, AUSTEN_TEST_SIZE)
    assert len(task.train) == total - AUSTEN_VALIDATION_SIZE - AUSTEN_TEST_SIZE
    train, validation, test = split_texts(task)
    assert len(train | validation | test) == total  # every sentence in exactly one split
    for split in (task.train, task.validation, task.test):
        assert split.column_names == ["text", "label"]
        assert (split.features["text"].dtype, split.features["label"].dtype) == ("string", "int64")
        assert set(split["label"]) == set(range(6))
    summary = task.summary()
    assert summary["num_labels"] == 6 and summary["test"] == AUSTEN_TEST_SIZE
    assert 0.1 < summary["majority_rate"] < 0.3  # emma is the largest novel, a little over a fifth


def test_austen_seeded(austen_cache):
    first, again = load_austen(seed=0, cache_dir=austen_cache), load_austen(seed=0, cache_dir=austen_cache)
    for split in ("train", "validation", "test"):
        assert getattr(first, split).to_dict() == getattr(again, split).to_dict()
    other = load_austen(seed=1, cache_dir=austen_cache)
    assert split_texts(other)[2] != split_texts(first)[2]
    assert set.union(*split_texts(other)) == set.union(*split_texts(first))


def test_austen_cached_runs_nothing(austen_cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    start = time.perf_counter()
    task = load_dataset_spec("austen", cache_dir=austen_cache)
    assert time.perf_counter() - start < 10
    assert len(task.test) == AUSTEN_TEST_SIZE


# ---------------------------------------------------------------------------------------------- a package made here
def rds(value) -> bytes:
    import rdata

    return rdata.unparser.unparse_data(rdata.conversion.convert_python_to_r_data(value, file_type="rds"))


def write_rdata(folder: Path, novels: dict[str, list[str]]) -> Path:
    """An R lazy-load database in the package's layout: a gzipped RDS index and zlib blobs with a length prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    blobs, index = b"", {}
    for name, lines in novels.items():
        raw = rds(np.array(lines))
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        index[name] = np.array([len(blobs), len(blob)], dtype=np.int32)
        blobs += blob
    (folder / "Rdata.rdb").write_bytes(blobs)
    (folder / "Rdata.rdx").write_bytes(
        gzip.compress(rds({"variables": index, "references": {}, "compressed": True}))
    )
    return folder


def fake_novels() -> dict[str, list[str]]:
    novels = {
        name: [
            name.upper(),
            "",
            "CHAPTER I",
            "",
            f"This is the first sentence of {name}, a novel. It ends",
            "here.",
        ]
        for name in AUSTEN_NOVELS
    }
    novels["emma"] += ["", "Every novel shares this one sentence."]
    novels["persuasion"] += ["", "Every novel shares this one sentence."]
    return novels


def make_deb(path: Path, members: dict[str, bytes]) -> Path:
    """A .deb: an ar archive of debian-binary, control.tar.xz and a data.tar.xz holding ``members``."""

    def tar_xz(files: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
            for name, content in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        return buffer.getvalue()

    archive = b"!<arch>\n"
    for name, content in (
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", tar_xz({"./control": b"Package: r-cran-janeaustenr\n"})),
        ("data.tar.xz", tar_xz(members)),
    ):
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n".encode()
        archive += header + content + b"\n" * (len(content) % 2)
    path.write_bytes(archive)
    return path


def test_source_dir_and_env_var(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    tree = tmp_path / "tree"
    rdata_dir = write_rdata(tree / data.RDATA_SUBDIR, fake_novels())
    rows = data.austen_sentences(tmp_path / "a", source_dir=tree)
    assert rows == [
        {"text": f"This is the first sentence of {name}, a novel.", "novel": name} for name in AUSTEN_NOVELS
    ]  # the shared sentence is dropped from both novels; "It ends here." is too short
    monkeypatch.setenv("S2FT_AUSTEN_DIR", str(rdata_dir))
    assert data.austen_sentences(tmp_path / "b") == rows
    monkeypatch.setenv("S2FT_AUSTEN_DIR", str(tmp_path))
    with pytest.raises(DataError, match="no Rdata.rdx"):
        data.austen_sentences(tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_deb_extracted_without_dpkg(tmp_path, monkeypatch):
    rdata_dir = write_rdata(tmp_path / "src", fake_novels())
    prefix = "./" + data.RDATA_SUBDIR.as_posix()
    deb = make_deb(
        tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb",
        {f"{prefix}/{name}": (rdata_dir / name).read_bytes() for name in ("Rdata.rdx", "Rdata.rdb")}
        | {"./usr/share/doc/r-cran-janeaustenr/copyright": b"GPL-2"},
    )
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    debian.extract_deb(deb, tmp_path / "out", data.RDATA_FILES, "")
    assert data.read_austen_novels(data.find_rdata_dir(tmp_path / "out")) == fake_novels()
    assert not (tmp_path / "out" / "usr" / "share").exists()  # only the data is written


def apt_missing(command, **kwargs):
    raise FileNotFoundError(command[0])


def apt_fails(command, **kwargs):
    return subprocess.CompletedProcess(command, 100, "", "E: Unable to locate package r-cran-janeaustenr")


@pytest.mark.parametrize(
    "run, message", [(apt_missing, "`apt-get` is not installed"), (apt_fails, "Unable to locate package")]
)
def test_unobtainable_austen_says_how_to_get_it(tmp_path, monkeypatch, run, message):
    monkeypatch.delenv("S2FT_AUSTEN_DIR", raising=False)
    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(DataError, match=message) as error:
        load_dataset_spec("austen", cache_dir=tmp_path)
    assert "dpkg -x" in str(error.value) and "S2FT_AUSTEN_DIR" in str(error.value)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- the splitter
def test_split_sentences():
    paragraph = (
        'Mr. and Mrs. Dashwood lived at Norland.  "Did they?" said she. '
        "Dr. Grant of St. James's knew J. Smith! Was it so? Yes. it was."
    )
    assert split_sentences(paragraph) == [
        "Mr. and Mrs. Dashwood lived at Norland.",
        '"Did they?" said she.',
        "Dr. Grant of St. James's knew J. Smith!",
        "Was it so?",
        "Yes. it was.",
    ]


def test_novel_sentences():
    long = " ".join(["word"] * 41) + "."
    lines = [
        "PERSUASION",
        "",
        "CHAPTER IV",
        "",
        "Sir Walter Elliot, of Kellynch Hall, was a man who never",
        "took up any book but the _Baronetage_. It rained.",
        "Chapter 12",
        "He was vain of his person and of his situation.",
        "",
        "Volume II",
        "",
        "THE END OF THIS PART. ALL CAPITALS, NO SENTENCES HERE.",
        "",
        long,
        "",
        "One two three four five. One two three four.",
    ]
    assert novel_sentences(lines) == [
        "Sir Walter Elliot, of Kellynch Hall, was a man who never took up any book but the Baronetage.",
        "He was vain of his person and of his situation.",
        "One two three four five.",
    ]
    assert novel_sentences([long], max_words=41) == [long]


# ---------------------------------------------------------------------------------------------- user data
def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_jsonl_with_string_labels(tmp_path):
    rows = [
        {"text": f"sentence number {i}", "label": ["pos", "neg", "mixed"][i % 3], "id": i} for i in range(50)
    ]
    spec = write_jsonl(tmp_path / "reviews.jsonl", rows)
    task = load_dataset_spec(spec)
    assert task.name == "reviews"
    assert task.label_names == ["mixed", "neg", "pos"]
    assert (len(task.train), len(task.validation), len(task.test)) == (40, 5, 5)
    for split in (task.train, task.validation, task.test):
        assert split.column_names == ["text", "label"]
        for example in split:
            assert rows[int(example["text"].split()[-1])]["label"] == task.label_names[example["label"]]
    assert len(set.union(*split_texts(task))) == 50
    assert load_dataset_spec(spec).test.to_dict() == task.test.to_dict()
    assert load_dataset_spec(spec, seed=1).test.to_dict() != task.test.to_dict()


def test_csv_with_split_column_and_integer_labels(tmp_path):
    lines = ["sentence,topic,split"]
    lines += [f"train sentence {i},{10 if i < 3 else 2},train" for i in range(8)]
    lines += [
        "held out one,10,validation",
        "held out two,2,test",
        '"quoted, with comma",10,test',
        " ,2,train",
    ]
    path = tmp_path / "topics.csv"
    path.write_text("\ufeff" + "\n".join(lines) + "\n")  # with a byte-order mark, as Excel writes
    task = load_dataset_spec(str(path), text_column="sentence", label_column="topic")
    assert task.label_names == ["2", "10"]  # numeric order
    assert (len(task.train), len(task.validation), len(task.test)) == (8, 1, 2)  # the blank text is dropped
    assert task.test.to_dict() == {"text": ["held out two", "quoted, with comma"], "label": [0, 1]}
    assert task.summary() == {
        "name": "topics",
        "train": 8,
        "validation": 1,
        "test": 2,
        "num_labels": 2,
        "label_names": ["2", "10"],
        "majority_rate": 0.5,  # "2", the most common training label, is one of the two test labels
    }


def test_tsv_json_and_a_missing_validation_split(tmp_path):
    tsv = tmp_path / "d.tsv"
    tsv.write_text(
        "text\tlabel\tsplit\n" + "".join(f"t{i}\t{i % 2}\ttrain\n" for i in range(20)) + "x\t1\ttest\n"
    )
    task = load_dataset_spec(str(tsv))
    assert (len(task.train), len(task.validation), len(task.test)) == (18, 2, 1)
    records = [{"text": f"t{i}", "label": i % 2 == 0} for i in range(5)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    task = load_dataset_spec(str(tmp_path / "d.json"))
    assert task.label_names == ["False", "True"]
    assert (len(task.train), len(task.validation), len(task.test)) == (3, 1, 1)


def test_saved_hugging_face_folder(tmp_path):
    import datasets

    label = datasets.ClassLabel(names=["neg", "pos"])
    features = datasets.Features({"sentence": datasets.Value("string"), "y": label})
    train = datasets.Dataset.from_dict(
        {"sentence": [f"s{i}" for i in range(30)], "y": [i % 2 for i in range(30)]}, features=features
    )
    unlabeled = datasets.Dataset.from_dict({"sentence": ["a", "b"], "y": [-1, -1]}, features=features)
    datasets.DatasetDict(train=train, test=unlabeled).save_to_disk(str(tmp_path / "hf"))
    task = load_dataset_spec(str(tmp_path / "hf"), text_column="sentence", label_column="y")
    assert task.label_names == ["neg", "pos"]
    # the unlabeled test split is replaced by one carved out of train
    assert (len(task.train), len(task.validation), len(task.test)) == (24, 3, 3)
    with pytest.raises(
        DataError, match=r"\(train\): no column 'text' or 'label'; its columns are \['sentence', 'y'\]"
    ):
        load_dataset_spec(str(tmp_path / "hf"))


@pytest.mark.parametrize(
    "rows, kwargs, message",
    [
        (
            [{"sentence": "a b", "label": 1}] * 5,
            {},
            r"no column 'text'; its columns are \['sentence', 'label'\]",
        ),
        ([{"text": "a b", "topic": 1}] * 5, {}, "no column 'label'.*--text-column/--label-column"),
        ([{"text": "a b"}] * 5, {"text_column": "body", "label_column": "y"}, "no column 'body' or 'y'"),
        ([{"text": "  ", "label": 1}] * 5, {}, "no training examples"),
        ([{"text": "a b", "label": None}] * 5, {}, "has no label"),
        ([{"text": "a b", "label": 1, "split": "dev"}] * 5, {}, "split value 'dev' is none of"),
        ([{"text": "a b", "label": 1}] * 2, {}, "too few to hold out"),
        (
            [{"text": f"t{i}", "label": "x", "split": "train"} for i in range(5)]
            + [
                {"text": "v", "label": "x", "split": "validation"},
                {"text": "u", "label": "y", "split": "test"},
            ],
            {},
            "label.*'y' in the test split never occur in the training split",
        ),
    ],
)
def test_bad_data(tmp_path, rows, kwargs, message):
    with pytest.raises(DataError, match=message):
        load_dataset_spec(write_jsonl(tmp_path / "d.jsonl", rows), **kwargs)


def test_bad_files(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("text,label\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"\n')
    (tmp_path / "notes.txt").write_text("text")
    for name, message in [
        ("empty.csv", "has no examples"),
        ("header.csv", "has no examples"),
        ("broken.jsonl", "cannot parse"),
        ("notes.txt", r"unsupported file type '.txt'"),
        ("missing.csv", "file not found"),
    ]:
        with pytest.raises(DataError, match=message):
            load_dataset_spec(str(tmp_path / name))


def test_hub_name_offline_fails_fast_and_clearly():
    start = time.perf_counter()
    with pytest.raises(
        DataError, match=r"'no-such-user/no-such-dataset'.*local data, pass a \.csv or \.jsonl"
    ):
        load_dataset_spec("no-such-user/no-such-dataset")
    assert time.perf_counter() - start < 10
