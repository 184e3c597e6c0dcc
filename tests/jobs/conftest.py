"""The jobs' fixtures: the tiny local model folder and dataset file that the job tests train on."""

from __future__ import annotations

import pytest

from tests.helpers import write_dataset, write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(model folder, dataset file)`` of tests.helpers, written once per test module."""
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_dataset(root / "data.jsonl")
