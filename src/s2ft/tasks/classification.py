"""What the text and image classification tasks share: the accuracy metric, the majority-class baseline, label
alignment by name, and loading a pretrained classifier with a new head (and finding that head's modules).

A classification task's data carries ``info["label_names"]``, the names of the label ids ``0..K-1``; the model's
``id2label`` follows them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from s2ft.data.common import SPLITS
from s2ft.errors import RunError
from s2ft.options import Option
from s2ft.tasks.base import Task, TaskData, check_model_folder

LABEL_COLUMN = Option("label_column", str, "label", "the label column of a data set")


def accuracy(trainer: Any, dataset: Any) -> float:
    """The share of ``dataset``'s examples whose highest logit is their label (``trainer.predict``)."""
    output = trainer.predict(dataset)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    return float((logits.argmax(-1) == output.label_ids).mean())


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


class Classification(Task):
    """A task whose model predicts one of ``info["label_names"]`` per example; metric: accuracy."""

    metric = "accuracy"
    options: ClassVar[tuple[Option, ...]] = (LABEL_COLUMN,)
    reference_keys = ("majority_rate",)
    # Head modules trained fully when the checkpoint's own head already has the right size (the first found).
    head_names: ClassVar[tuple[str, ...]] = ("classifier",)

    def evaluate(self, trainer: Any, dataset: Any) -> dict[str, float]:
        return {"accuracy": accuracy(trainer, dataset)}

    def baseline(self, data: TaskData) -> dict[str, float]:
        """``majority_rate``: the test accuracy of always predicting the most common training label."""
        return {"majority_rate": data.majority_rate()}

    def align(self, data: TaskData, trained: dict[str, Any], scored: str | None = None) -> TaskData:
        """Label ids remapped by name to those the model was trained with; a label it never saw is refused. With
        ``scored``, only that split's labels are checked, and only that split is kept (the others come back
        empty): an evaluation needs no other."""
        names, trained_names = data.info["label_names"], trained.get("label_names", [])
        splits = {s: getattr(data, s) for s in SPLITS}
        used = names if scored is None else [names[i] for i in sorted(set(splits[scored]["label"]))]
        unknown = [n for n in used if n not in trained_names]
        if unknown:
            where = "the data set has" if scored is None else f"the {scored} split of the data set has"
            raise RunError(
                f"{where} labels the model was not trained on: {unknown[:10]}; the model knows "
                f"{trained_names[:20]} (score data with those labels only)"
            )
        mapping = [trained_names.index(n) if n in trained_names else -1 for n in names]

        def remap(name: str) -> Any:
            if scored not in (None, name):
                return splits[name].select([])
            return splits[name].map(lambda ex: {"label": mapping[ex["label"]]}, desc="mapping labels")

        train, validation, test = (remap(s) for s in SPLITS)
        return TaskData(data.name, train, validation, test, info={"label_names": list(trained_names)})

    def from_pretrained(
        self, name: str, path: str, processor_class: Any, model_class: Any, labels: list[str]
    ) -> tuple[torch.nn.Module, Any, list[str]]:
        """The processor and the classifier saved at ``path`` (a folder or hub id; ``name`` is what the user
        passed), with a head of ``len(labels)`` classes named by ``labels`` (a checkpoint's own head of another
        size is replaced), and the names of the head's freshly initialised modules. A :class:`RunError` when
        either cannot be loaded."""
        check_model_folder(path, name)
        try:
            processor = processor_class.from_pretrained(path)
            model, loading = model_class.from_pretrained(
                path,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={n: i for i, n in enumerate(labels)},
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
        except (OSError, ValueError) as e:
            raise RunError(f"--task {self.name}: cannot load {name!r} as a classifier: {e}") from None
        return model, processor, new_head_modules(model, loading, self.head_names)
