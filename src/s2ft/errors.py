"""The errors s2ft raises for problems the user must fix: the bottom floor, imported by every other layer."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
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


def names_jobs_extra(main: Callable[..., int]) -> Callable[..., int]:
    """Wraps the command line's ``main``: when a job's dependency is missing (the library installed without the
    ``jobs`` extra), the command ends with one line naming the extra and exit status 2, not a traceback."""

    @functools.wraps(main)
    def run(*args: object, **kwargs: object) -> int:
        try:
            with jobs_extra_required():
                return main(*args, **kwargs)
        except RunError as e:
            print(f"s2ft: error: {e}", file=sys.stderr)
            return 2

    return run


__all__ = [
    "JOBS_EXTRA",
    "DataError",
    "RunError",
    "jobs_extra_required",
    "missing_job_module",
    "names_jobs_extra",
]
