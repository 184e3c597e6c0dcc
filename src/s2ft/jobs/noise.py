"""Optional backends that other libraries import on a job's behalf, kept quiet when the job does not use them.

s2ft imports bitsandbytes and torchao only for ``--quantize`` (and DeepSpeed only under a DeepSpeed launch), but
transformers' Trainer imports PEFT, which imports bitsandbytes and torchao when they are installed, and Accelerate
imports DeepSpeed: each then logs warnings about kernels it could not load or an accelerator it did not find
("Failed to load ... .so", "Setting accelerator to CPU"), which say nothing about a job that does not use them.
:func:`unused_backends_quiet` keeps their warnings (not their errors) off the console while such a job runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

# A backend -> the loggers of its import-time notices (and their children): torchao's kernel loading (and the
# deprecation notices torch's pytree logs while torchao registers its types), bitsandbytes' and its kernels
# package's CPU kernel loading.
_LOGGERS = {
    "torchao": ("torchao", "torch.utils._pytree"),
    "bitsandbytes": ("bitsandbytes", "kernels"),
}
# DeepSpeed's logger sets its own level when it is made, so a filter keeps its warnings out.
_DEEPSPEED_LOGGER = "DeepSpeed"


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def backends_of(quantize: str | None) -> set[str]:
    """The optional backends a job uses: the one of its ``--quantize`` (bitsandbytes' ``4bit``/``8bit``,
    ``torchao-*``), and DeepSpeed under ``accelerate launch`` with a DeepSpeed configuration."""
    used = set()
    if quantize is not None:
        used.add("torchao" if quantize.startswith("torchao") else "bitsandbytes")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes"):
        used.add("deepspeed")
    return used


@contextlib.contextmanager
def unused_backends_quiet(used: set[str]) -> Iterator[None]:
    """Within the block, the optional backends not in ``used`` log only errors; as they were after it."""
    levels = []
    for backend, names in _LOGGERS.items():
        if backend in used:
            continue
        for name in names:
            lg = logging.getLogger(name)
            levels.append((lg, lg.level))
            lg.setLevel(logging.ERROR)
    deepspeed, errors_only = logging.getLogger(_DEEPSPEED_LOGGER), _ErrorsOnly()
    if "deepspeed" not in used:
        deepspeed.addFilter(errors_only)
    try:
        yield
    finally:
        for lg, level in levels:
            lg.setLevel(level)
        deepspeed.removeFilter(errors_only)
