"""A job's messages: s2ft's and transformers' logs into the run's ``log.txt`` (and the console unless quiet), and
the Trainer's periodic loss and learning rate with them."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger("s2ft")


@contextlib.contextmanager
def log_to(path: str | None, quiet: bool) -> Iterator[None]:
    """Log s2ft's and transformers' messages to ``path``, and to the console unless ``quiet``."""
    import transformers

    handlers: list[logging.Handler] = []
    if path is not None:
        handlers.append(logging.FileHandler(path))
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
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
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


class LogToFile(TrainerCallback):
    """The Trainer's periodic logs (loss, learning rate) into the run's log."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and state.is_world_process_zero:
            logger.info("step %d/%d: %s", state.global_step, state.max_steps, json.dumps(logs))
