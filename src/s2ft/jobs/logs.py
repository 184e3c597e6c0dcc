"""A job's messages: s2ft's and transformers' logs into the run's ``log.txt`` (and the console unless quiet), and
the Trainer's periodic loss and learning rate with them."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger("s2ft")


class _LogFile(logging.FileHandler):
    """A log file that, when the disk fills up, stops writing and keeps the error (``failed``) instead of
    printing a traceback at every message, as :class:`logging.FileHandler` does."""

    failed: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed is None:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        from s2ft.io import storage_problem

        error = sys.exc_info()[1]
        if error is None or storage_problem(error) is None:
            super().handleError(record)
        elif self.failed is None:
            self.failed = error


@contextlib.contextmanager
def log_to(path: str | None, quiet: bool) -> Iterator[None]:
    """Log s2ft's and transformers' messages to ``path``, and to the console unless ``quiet``. If the disk
    fills up while the log is written, the log stops and the error is raised when the block ends."""
    import transformers

    handlers: list[logging.Handler] = []
    if path is not None:
        handlers.append(_LogFile(path))
    if not quiet:
        handlers.append(logging.StreamHandler())
    formatter = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S")
    loggers = [logger, logging.getLogger("transformers")]
    levels = [lg.level for lg in loggers]
    for handler in handlers:
        handler.setFormatter(formatter)
        for lg in loggers:
            lg.addHandler(handler)
    logger.setLevel(logging.INFO)
    verbosity = transformers.logging.get_verbosity()
    if quiet:  # no load reports or progress bars on the console
        import datasets

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    else:
        transformers.logging.set_verbosity_warning()
        # our console handler shows transformers' notices (a load report, ...): its own would show them twice
        transformers.logging.disable_default_handler()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if not quiet:
            transformers.logging.enable_default_handler()
        if quiet:
            import datasets

            transformers.utils.logging.enable_progress_bar()
            datasets.enable_progress_bars()
        for handler in handlers:
            for lg in loggers:
                lg.removeHandler(handler)
            handler.close()
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    failed = next((h.failed for h in handlers if isinstance(h, _LogFile) and h.failed), None)
    if failed is not None:
        raise failed


class LogToFile(TrainerCallback):
    """The Trainer's periodic logs (loss, learning rate) into the run's log."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and state.is_world_process_zero:
            logger.info("step %d/%d: %s", state.global_step, state.max_steps, json.dumps(logs))
