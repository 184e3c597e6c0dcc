"""Bad user data is refused with one line naming the record and the field, before anything trains: chat messages,
instruction and text examples (:mod:`s2ft.data.corpus`), and the data-side cases of the other tasks."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from s2ft.data.corpus import load_corpus  # noqa: E402
from s2ft.errors import DataError  # noqa: E402

CHAT = {
    "messages": [{"role": "user", "content": "a question"}, {"role": "assistant", "content": "an answer"}]
}


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def user_turn(**message) -> dict:
    return {"messages": [message, {"role": "assistant", "content": "an answer"}]}


@pytest.mark.parametrize(
    "good, bad, message",
    [
        (CHAT, user_turn(role="user"), "message 1 of 'messages' needs a string 'content', and it has none"),
        (CHAT, user_turn(role="user", content=5), "'content', but it holds 5 (of type int)"),
        (CHAT, user_turn(role="user", content=["a"]), "'content', but it holds ['a'] (of type list)"),
        (CHAT, user_turn(content="a question"), "message 1 of 'messages' needs a string 'role'"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
            "the assistant's message (the last, which is trained) is empty",
        ),
        (CHAT, {"messages": []}, "'messages' must be a non-empty list"),
        ({"prompt": "p", "response": "r"}, {"prompt": "p"}, "needs a string 'response', and it has none"),
        ({"prompt": "p", "response": "r"}, {"prompt": "p", "response": ""}, "needs a non-empty 'response'"),
        (
            {"text": "words"},
            {"text": 123},
            "a text example needs a string 'text', but it holds 123 (of type int)",
        ),
        ({"text": "words"}, {"text": None}, "needs a string 'text', and it has none"),
    ],
)
def test_a_bad_record_is_refused_by_line_and_field(tmp_path, good, bad, message):
    """The third example (line 4: line 3 is blank) is the bad one; the error is one line that names it."""
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as error:
        load_corpus(str(path))
    text = str(error.value)
    assert text.startswith(f"{path}, line 4: ") and message in text
    assert "\n" not in text


def test_good_chat_data_loads_unchanged(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": ""}, *CHAT["messages"]]},
        *[
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(9)
        ],
    ]
    _, splits = load_corpus(write_jsonl(tmp_path / "chat.jsonl", rows))
    loaded = [m for split in splits.values() for m in split["messages"]]
    assert sorted(loaded, key=json.dumps) == sorted((r["messages"] for r in rows), key=json.dumps)


def test_a_bad_message_in_a_datasets_folder_is_named(tmp_path, monkeypatch):
    """A ``datasets`` folder fills a missing key with None; the error names the split and the example."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "hub"
    folder.mkdir()
    rows = [CHAT] * 20
    rows[7] = user_turn(role="user")
    write_jsonl(folder / "train.jsonl", rows)
    with pytest.raises(
        DataError, match=r"\(train\), example 8: message 1 of 'messages' needs a string 'content'"
    ):
        load_corpus(str(folder))


# ------------------------------------------------------------------------- evaluating one split of a user file
def labelled_rows(labels: dict[str, int]) -> list[dict]:
    return [{"text": f"{label} example {i}", "label": label} for label, n in labels.items() for i in range(n)]


def rare_in_validation(tmp_path) -> tuple[str, str]:
    """A file without a ``split`` column whose one ``c`` example is carved into validation (none in train)."""
    from s2ft.data.common import seeded_order

    rows = labelled_rows({"a": 15, "b": 14})
    for i in range(200):
        rare = {"text": f"a rare one {i}", "label": "c"}
        texts = [r["text"] for r in [*rows, rare]]
        if seeded_order(texts, 0).index(len(rows)) < 3:  # 30 examples: the first 3 of the ranking validate
            return write_jsonl(tmp_path / "eval.jsonl", [*rows, rare]), rare["text"]
    raise AssertionError("no text lands in validation")


def test_evaluation_checks_only_the_split_it_scores(tmp_path):
    from s2ft.data import load_dataset_spec
    from s2ft.data.common import seeded_order
    from s2ft.tasks import get_task

    spec, rare = rare_in_validation(tmp_path)
    with pytest.raises(
        DataError, match=r"label\(s\) 'c' in the validation split never occur in the training"
    ):
        load_dataset_spec(spec)  # training on it is refused, as before
    trained = {"label_names": ["b", "c", "a"]}  # what the model knows, in its own id order
    task = get_task("text-classification")
    data = load_dataset_spec(spec, scored="test")
    aligned = task.align(data, trained, scored="test")
    assert rare in load_dataset_spec(spec, scored="validation").validation["text"]
    assert len(aligned.train) == len(aligned.validation) == 0  # not needed to score the test split
    assert aligned.label_names == ["b", "c", "a"]
    test = aligned.test.to_list()
    assert test and all(["b", "c", "a"][r["label"]] == r["text"].split()[0] for r in test)
    # the same file carved the same way: the test split is the one a run trained on this file would score
    texts = [r["text"] for r in labelled_rows({"a": 15, "b": 14})] + [rare]
    order = seeded_order(texts, 0)
    assert sorted(r["text"] for r in test) == sorted(texts[i] for i in order[3:6])


def test_evaluation_refuses_a_label_of_the_scored_split_the_model_lacks(tmp_path):
    from s2ft.data import load_dataset_spec
    from s2ft.errors import RunError
    from s2ft.tasks import get_task

    rows = [{**r, "split": "train"} for r in labelled_rows({"a": 4, "b": 4})]
    rows += [{**r, "split": "test"} for r in labelled_rows({"a": 2, "z": 1})]
    spec = write_jsonl(tmp_path / "eval.jsonl", rows)
    data = load_dataset_spec(spec, scored="test")
    with pytest.raises(
        RunError, match=r"^the test split of the data set has labels the model was not trained on: \['z'\]"
    ):
        get_task("text-classification").align(data, {"label_names": ["a", "b"]}, scored="test")
    # the training split may hold labels the model lacks: it is not scored
    aligned = get_task("text-classification").align(
        load_dataset_spec(spec, scored="test"), {"label_names": ["a", "z"]}, scored="test"
    )
    assert sorted(aligned.test["label"]) == [0, 0, 1]


def test_a_file_of_test_examples_only_can_be_scored(tmp_path):
    from s2ft.data import load_dataset_spec

    rows = [{**r, "split": "test"} for r in labelled_rows({"a": 3})]
    spec = write_jsonl(tmp_path / "eval.jsonl", rows)
    with pytest.raises(DataError, match="the training split is empty"):
        load_dataset_spec(spec)
    data = load_dataset_spec(spec, scored="test")
    assert data.label_names == ["a"] and data.test["text"] == [r["text"] for r in rows]


def test_image_evaluation_reads_only_the_split_it_scores(tmp_path, monkeypatch):
    import datasets
    import numpy as np

    from s2ft.data.images import load_images
    from s2ft.tasks import get_task

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    image = np.zeros((4, 4), np.uint8)
    split = {
        "train": (["cat", "dog"] * 6, 1),
        "validation": (["cat", "dog"], 2),
        "test": (["cat", "owl", "owl"], 3),
    }
    datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict({"image": [image + value] * len(labels), "label": labels})
            for name, (labels, value) in split.items()
        }
    ).save_to_disk(str(tmp_path / "images"))
    with pytest.raises(DataError, match="'owl' of the test split never occurs in training"):
        load_images(str(tmp_path / "images"))
    data = load_images(str(tmp_path / "images"), scored="test")
    assert len(data.train) == len(data.validation) == 0
    aligned = get_task("image-classification").align(data, {"label_names": ["owl", "cat"]}, scored="test")
    assert aligned.test["label"] == [1, 0, 0]
    assert all(np.array_equal(np.asarray(im, np.uint8), image + 3) for im in aligned.test["image"])
