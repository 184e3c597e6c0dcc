"""The errors s2ft raises for problems the user must fix: the bottom floor, imported by every other layer."""

from __future__ import annotations


class RunError(ValueError):
    """A problem with a job's input that the user must fix; the message says what to do."""


class DataError(ValueError):
    """The data cannot be loaded or used; the message says what is wrong and what to do."""


__all__ = ["DataError", "RunError"]
