"""What every built-in or user data set shares: the error type, the cache folder, and seeded splits."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from s2ft.errors import DataError  # noqa: F401  (re-exported)

SPLITS = ("train", "validation", "test")
HOLDOUT_FRACTION = 0.1  # of user data, for each of validation and test when the data set lacks them


def default_cache_dir() -> Path:
    """``$S2FT_CACHE``, or ``~/.cache/s2ft``."""
    return Path(os.environ.get("S2FT_CACHE") or Path.home() / ".cache" / "s2ft")


def seeded_order(keys: Sequence[str], seed: int) -> list[int]:
    """Indices ranked by ``sha256(f"{seed}:{key}")``, ties in index order: the same on every machine and Python
    version, and independent of input order for distinct keys."""
    digests = [hashlib.sha256(f"{seed}:{key}".encode()).digest() for key in keys]
    return sorted(range(len(keys)), key=lambda i: (digests[i], i))
