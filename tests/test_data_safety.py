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
