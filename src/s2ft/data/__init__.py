"""Data sets: the built-in ones (Austen, Fashion-MNIST) and user data, through ``datasets`` where it helps."""

from s2ft.data.common import default_cache_dir
from s2ft.data.labelled import TaskData, load_dataset_spec
from s2ft.errors import DataError

__all__ = ["DataError", "TaskData", "default_cache_dir", "load_dataset_spec"]
