"""``import s2ft`` imports no optional backend and prints nothing; the jobs print no notice of a backend they do not
use, and each library notice once. (The import time itself is measured, not tested: see the docs.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BACKENDS = ("bitsandbytes", "torchao", "deepspeed", "transformers", "peft", "accelerate", "datasets")
NOISE = ("Failed to load", "Setting accelerator", "trust check", "is an Enum subclass")


def _python(code: str, *args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=False, cwd=cwd
    )


@pytest.mark.parametrize(
    "statement",
    [
        "import s2ft",
        "import s2ft, s2ft.tuner.kinds, s2ft.tuner.distributed, s2ft.methods",
        "from s2ft.cli import build_parser; build_parser()",  # s2ft --help, and the docs' CLI reference
    ],
)
def test_importing_s2ft_imports_no_optional_backend_and_prints_nothing(statement):
    code = f"import sys\n{statement}\nprint(sorted(m for m in {BACKENDS!r} if m in sys.modules))"
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n" and done.stderr == ""
    # nor torch's own distributed tensors (1-2 s): a DTensor only exists once something imported them
    assert (
        _python(f"import sys\n{statement}\nassert 'torch.distributed.tensor' not in sys.modules").returncode
        == 0
    )


def test_layers_of_other_packages_are_recognized_by_name():
    """transformers' Conv1D and bitsandbytes' layers get their kinds without s2ft importing the packages."""
    from transformers.pytorch_utils import Conv1D

    from s2ft.tuner.kinds import NAMED_KINDS, Conv1DKind, find_kind

    assert isinstance(find_kind(Conv1D(4, 3)), Conv1DKind)
    bnb = pytest.importorskip("bitsandbytes")
    for cls in (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, Conv1D):
        assert f"{cls.__module__}.{cls.__qualname__}" in NAMED_KINDS
    assert find_kind(bnb.nn.Linear4bit(8, 4)).name == "linear4bit"
    assert find_kind(bnb.nn.Linear8bitLt(8, 4, has_fp16_weights=False)).name == "linear8bit"


def test_a_job_prints_each_notice_once_and_no_unused_backends(tmp_path):
    """A finetune with a new head: transformers' load report once (it was printed twice), no notice of
    bitsandbytes, torchao or DeepSpeed, which it does not use; evaluate --quiet prints its JSON only."""
    from tests.helpers import write_dataset, write_tiny_model

    model = write_tiny_model(tmp_path / "model")
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    from transformers import BertConfig, BertForSequenceClassification

    config = {k: v for k, v in config.items() if k not in ("id2label", "label2id")}
    BertForSequenceClassification(BertConfig(**{**config, "num_labels": 2})).save_pretrained(
        model
    )  # new head
    data = write_dataset(tmp_path / "data.jsonl")
    run = str(tmp_path / "run")
    argv = ["finetune", "--model", model, "--dataset", data, "--output", run, "--max-steps", "1"]
    argv += [
        "--batch-size",
        "8",
        "--n-frequency",
        "16",
        "--calibration-batches",
        "1",
        "--head-warmup-steps",
        "1",
    ]
    code = "import sys\nfrom s2ft.cli import main\nsys.exit(main(sys.argv[1:]))"
    done = _python(code, *argv)
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    assert printed.count("LOAD REPORT") == 1, printed
    assert not [n for n in NOISE if n in printed], printed
    quiet = _python(code, "evaluate", "--adapter", run, "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert json.loads(quiet.stdout)["examples"] > 0
