"""Fixtures for every test folder; the helpers they share are in tests/helpers.py."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import MODELS  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(params=sorted(MODELS))
def model_kind(request) -> str:
    return request.param
