"""The errors s2ft raises for problems the user must fix: the bottom floor, imported by every other layer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class RunError(ValueError):
    """A problem with a job's input that the user must fix; the message says what to do."""


class DataError(ValueError):
    """The data cannot be loaded or used; the message says what is wrong and what to do."""


JOBS_EXTRA = 'pip install "s2ft[jobs]"'
# Top-level modules the jobs import that the library alone does not install (pyproject.toml's "jobs" extra).
JOB_MODULES = frozenset(
    {
        "transformers",
        "accelerate",
        "peft",
        "datasets",
        "rdata",
        "tqdm",
        "matplotlib",
        "PIL",
        "gguf",
        "efficientnet_lite_pytorch",
    }
)


def missing_job_module(module: str) -> RunError:
    """The error for a job dependency that is not installed: one line naming it and the extra."""
    return RunError(f"this job needs {module}, which the library alone does not install: {JOBS_EXTRA}")


@contextmanager
def jobs_extra_required() -> Iterator[None]:
    """Turn an import of a missing job dependency (one of :data:`JOB_MODULES`) inside the block into a
    :class:`RunError` naming the ``jobs`` extra; any other import error passes through."""
    try:
        yield
    except ModuleNotFoundError as e:
        module = (e.name or "").split(".")[0]
        if module not in JOB_MODULES:
            raise
        raise missing_job_module(module) from None


__all__ = ["JOBS_EXTRA", "DataError", "RunError", "jobs_extra_required", "missing_job_module"]
