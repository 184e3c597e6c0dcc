"""The transformers Trainer works unchanged on a SpectralModel: column pruning, training, checkpoints."""

from __future__ import annotations

import copy

import torch
from datasets import Dataset

from s2ft import S2FTConfig, get_spectral_model
from tests.helpers import MODELS


def test_trainer_with_default_arguments(tmp_path):
    from transformers import Trainer, TrainingArguments

    base = MODELS["bert"][0]()
    model = get_spectral_model(
        copy.deepcopy(base),
        S2FTConfig(target_modules=["query", "value"], modules_to_save=["classifier"], n_frequency=40),
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (32, 10), generator=g)
    labels = (ids[:, 0] % 3).tolist()
    # an extra text column, which the Trainer must drop by inspecting the model's forward signature
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels, "text": ["x"] * 32})
    model.calibrate([{"input_ids": ids[:8], "labels": torch.tensor(labels[:8])}])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=4,
        learning_rate=0.05,
        save_steps=4,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 4
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith("coeffs") or ".copies." in n for n in changed)
    assert (tmp_path / "checkpoint-4").is_dir()
    # resuming from the checkpoint restores the adapter exactly
    resumed = get_spectral_model(
        copy.deepcopy(base),
        S2FTConfig(target_modules=["query", "value"], modules_to_save=["classifier"], n_frequency=40),
    )
    resumed.calibrate([{"input_ids": ids[:8], "labels": torch.tensor(labels[:8])}])
    Trainer(model=resumed, args=args, train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-4")
    )
    for name, param in resumed.named_parameters():
        torch.testing.assert_close(param, dict(model.named_parameters())[name])
