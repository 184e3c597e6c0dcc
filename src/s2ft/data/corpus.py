"""Text for causal language modelling: the built-in Austen passages, the user's text or instruction files, or a
``datasets`` name.

Every source comes back as three ``datasets.Dataset`` splits of one of three forms:

- ``text``: plain text, trained on every token (``.txt`` files, JSONL with a ``text`` field, the Austen novels);
- ``prompt`` and ``response``: instruction data, trained on the response tokens only;
- ``messages``: chat data (a list of ``{"role", "content"}``, the last from the assistant), trained on the last
  message only.

A ``.txt`` file is cut into passages (paragraphs, blank-line separated, joined up to about 60-120 words). Splits
missing from a source get 10% of the training examples each, seeded (:func:`s2ft.data.common.seeded_order`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from s2ft.data.common import HOLDOUT_FRACTION, SPLITS, seeded_order
from s2ft.errors import DataError

AUSTEN_HOLDOUT = 150  # passages each for validation and test
FORMS = (("text",), ("prompt", "response"), ("messages",))


def _form(record: dict[str, Any], where: str) -> tuple[str, ...]:
    """Which of :data:`FORMS` a record has, or a one-line error naming ``where`` (the file and line) and the
    field at fault."""
    if "messages" in record:
        _check_messages(record["messages"], where)
        return ("messages",)
    if "prompt" in record or "response" in record:
        for key in ("prompt", "response"):
            _check_string(record, key, where, "an instruction example")
        return ("prompt", "response")
    if "text" in record:
        _check_string(record, "text", where, "a text example", empty_ok=True)
        return ("text",)
    raise DataError(
        f"{where}: an example needs 'text', or 'prompt' and 'response', or 'messages'; it has {sorted(record)}"
    )


def _check_string(record: dict[str, Any], key: str, where: str, what: str, empty_ok: bool = False) -> None:
    """``record[key]`` must be a string (non-blank unless ``empty_ok``)."""
    value = record.get(key)
    if value is None:
        raise DataError(
            f"{where}: {what} needs a string {key!r}, and it has none; add it, or drop the example"
        )
    if not isinstance(value, str):
        raise DataError(
            f"{where}: {what} needs a string {key!r}, but it holds {value!r:.40} (of type "
            f"{type(value).__name__}); write it as a JSON string, in quotes"
        )
    if not (empty_ok or value.strip()):
        raise DataError(f"{where}: {what} needs a non-empty {key!r}; fill it in or drop the example")


def _check_messages(messages: Any, where: str) -> None:
    """A chat: a non-empty list of ``{"role", "content"}`` objects with string fields, the last from the
    assistant and not empty (it is what is trained)."""
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for number, message in enumerate(messages, 1):
        for key in ("role", "content"):
            _check_string(message, key, where, f"message {number} of 'messages'", empty_ok=True)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last of 'messages' must be the assistant's (the trained response)")
    if not messages[-1]["content"].strip():
        raise DataError(
            f"{where}: the assistant's message (the last, which is trained) is empty; fill it in or drop the "
            "example"
        )


def _records_from_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The file's examples, and where each comes from (``"file, line N"``; ``"file, passage N"`` for .txt)."""
    if path.suffix.lower() == ".txt":
        from s2ft.data.austen import novel_passages

        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e})") from None
        passages = novel_passages(lines, min_words=1)
        return [{"text": p} for p in passages], [f"{path}, passage {i}" for i in range(1, len(passages) + 1)]
    records, wheres = [], []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise DataError(f"{path}, line {number}: expected a JSON object")
                    records.append(record)
                    wheres.append(f"{path}, line {number}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot parse {path}: {e}") from None
    return records, wheres


def _split_records(
    records: list[dict[str, Any]], source: str, seed: int, holdout: int | None
) -> dict[str, list]:
    """Group by a ``split`` field when there is one, else carve validation and test out of the records."""
    if records and all("split" in r for r in records):
        grouped: dict[str, list] = {split: [] for split in SPLITS}
        for record in records:
            split = str(record["split"]).strip().lower()
            if split not in grouped:
                raise DataError(f"{source}: split value {record['split']!r} is none of {', '.join(SPLITS)}")
            grouped[split].append({k: v for k, v in record.items() if k != "split"})
        records, given = grouped.pop("train"), grouped
    else:
        given = {}
    keys = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records]
    order = seeded_order(keys, seed)
    size = holdout or max(1, round(HOLDOUT_FRACTION * len(records)))
    missing = [s for s in SPLITS[1:] if not given.get(s)]
    if size * len(missing) >= len(records):
        raise DataError(
            f"{source}: {len(records)} training examples are too few to hold out a {' and a '.join(missing)} split; "
            "add examples, or give every split in a 'split' field"
        )
    splits = {s: given[s] for s in SPLITS[1:] if given.get(s)}
    for split in missing:
        taken, order = order[:size], order[size:]
        splits[split] = [records[i] for i in taken]
    splits["train"] = [records[i] for i in order]
    return splits


def load_corpus(
    spec: str, seed: int = 0, cache_dir: str | os.PathLike | None = None
) -> tuple[str, dict[str, Any]]:
    """``(name, {"train", "validation", "test"} -> datasets.Dataset)`` for ``spec``: ``"austen"``, a ``.txt`` or
    ``.jsonl`` file, or a Hugging Face data set name or folder. Raises :class:`DataError` on any problem."""
    import datasets

    path = Path(spec)
    if spec == "austen":
        from s2ft.data.austen import austen_passages

        records, holdout, name = (
            [{"text": r["text"]} for r in austen_passages(cache_dir)],
            AUSTEN_HOLDOUT,
            "austen",
        )
        wheres = [f"austen, passage {i}" for i in range(1, len(records) + 1)]
    elif path.is_file():
        if path.suffix.lower() not in (".txt", ".jsonl", ".json"):
            raise DataError(f"{spec}: unsupported file type {path.suffix!r}; use .txt (plain text) or .jsonl")
        (records, wheres), holdout, name = _records_from_file(path), None, path.stem
    elif path.suffix.lower() in (".txt", ".jsonl", ".json"):
        raise DataError(f"{spec}: file not found (current directory: {os.getcwd()})")
    else:
        return spec, _hub_corpus(spec)
    if not records:
        raise DataError(
            f"{spec}: no text in it; a causal-LM data set needs at least a few passages or examples"
        )
    forms = {_form(r, where) for r, where in zip(records, wheres)}
    if len(forms) > 1:
        raise DataError(
            f"{spec}: mixes example forms {sorted(forms)}; use one of text, prompt/response, messages"
        )
    (form,) = forms
    if form == ("text",):
        records = [r for r in records if r["text"].strip()]
        if not records:
            raise DataError(f"{spec}: every 'text' is empty")
    splits = _split_records(records, spec, seed, holdout)
    columns = list(form)
    return name, {
        split: datasets.Dataset.from_list([{c: r[c] for c in columns} for r in rows])
        for split, rows in splits.items()
    }


def _hub_corpus(spec: str) -> dict[str, Any]:
    import datasets

    try:
        loaded = datasets.load_dataset(spec)
    except Exception as e:  # the datasets library raises many types here (offline, not found, bad files, ...)
        raise DataError(
            f"{spec!r} is not a .txt/.jsonl file, and loading it as a Hugging Face data set failed: "
            f"{type(e).__name__}: {e}"
        ) from None
    if "train" not in loaded:
        raise DataError(f"{spec!r} has no train split (it has {', '.join(loaded)})")
    columns = loaded["train"].column_names
    form = next((f for f in FORMS if all(c in columns for c in f)), None)
    if form is None:
        raise DataError(f"{spec!r}: no 'text', 'prompt'/'response' or 'messages' column; it has {columns}")
    given = {split: [{c: r[c] for c in form} for r in loaded[split]] for split in SPLITS if split in loaded}
    for split, records in given.items():
        for number, record in enumerate(records, 1):
            _form(record, f"{spec} ({split}), example {number}")
    splits = _split_records(given.pop("train"), spec, 0, None)
    splits.update(given)
    return {split: datasets.Dataset.from_list(rows) for split, rows in splits.items()}
