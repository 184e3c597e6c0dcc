"""What the text and image classification tasks share: the accuracy metric, the majority-class baseline, label
alignment by name, and loading a pretrained classifier with a new head (and finding that head's modules).

A classification task's data carries ``info["label_names"]``, the names of the label ids ``0..K-1``; the model's
``id2label`` follows them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from s2ft.errors import RunError
from s2ft.tasks.base import Task, TaskData, check_model_folder


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
    reference_keys = ("majority_rate",)
    # Head modules trained fully when the checkpoint's own head already has the right size (the first found).
    head_names: ClassVar[tuple[str, ...]] = ("classifier",)

    def evaluate(self, trainer: Any, dataset: Any) -> dict[str, float]:
        return {"accuracy": accuracy(trainer, dataset)}

    def baseline(self, data: TaskData) -> dict[str, float]:
        """``majority_rate``: the test accuracy of always predicting the most common training label."""
        return {"majority_rate": data.majority_rate()}

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
