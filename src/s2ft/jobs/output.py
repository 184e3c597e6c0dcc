"""The folder a job writes: staged under a hidden name, renamed into place only when the job succeeds, and
marked so that ``--overwrite`` replaces only what s2ft wrote.

A finetune output holds :data:`RUN_FILE` (what to rebuild the model from, :mod:`s2ft.jobs.runs`), the
:data:`ADAPTER_DIR` folder, ``metrics.json`` and ``log.txt``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

from s2ft.errors import RunError

RUN_FILE = "run.json"
ADAPTER_DIR = "adapter"
MARKER = ".s2ft-output"  # written into every folder a job creates; --overwrite replaces only such folders


def is_s2ft_output(folder: str) -> bool:
    """Whether ``folder`` holds something an s2ft job wrote: its marker, or (runs of earlier versions) a
    ``run.json`` with a method."""
    if os.path.isfile(os.path.join(folder, MARKER)):
        return True
    try:
        with open(os.path.join(folder, RUN_FILE), encoding="utf-8") as f:
            return isinstance(json.load(f).get("method"), str)
    except (OSError, ValueError, AttributeError):
        return False


def check_output(output: str, overwrite: bool) -> str:
    """``output`` as an absolute path, after checking that a job may write it; raises :class:`RunError` otherwise.

    Allowed: a new path, an empty folder, or, with ``overwrite``, a folder an s2ft job wrote. Never a file, an
    empty name, or a folder of anything else (a source tree, a data set): s2ft deletes only what it wrote.
    """
    if not isinstance(output, str) or not output.strip():
        raise RunError("--output is empty; name a folder for the results")
    path = os.path.abspath(output)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(f"--output {output} is a file, not a folder; choose a folder")
    if os.path.isdir(path) and os.listdir(path):
        if not is_s2ft_output(path):
            raise RunError(
                f"{output} is not empty and holds nothing s2ft wrote; s2ft replaces only its own outputs, "
                "so choose a new or empty folder"
            )
        if not overwrite:
            raise RunError(
                f"{output} already holds an s2ft output; pass --overwrite to replace it, or choose another --output"
            )
    return path


@contextlib.contextmanager
def staged_output(output: str, overwrite: bool, is_main: bool, kind: str = "run") -> Iterator[str]:
    """A staging folder that becomes ``output`` only when the job succeeds.

    Ctrl-C or an error leaves nothing half-written, and an existing output is replaced only then (and only with
    ``overwrite``, and only if s2ft wrote it: :func:`check_output`, checked before the job starts). The staging
    and the set-aside folders are new folders of unique hidden names beside ``output``, created by this process,
    so nothing a user made is ever deleted. Other processes of a distributed job get a private temporary folder
    (only the main process writes outputs).
    """
    path = check_output(output, overwrite)
    if not is_main:
        with tempfile.TemporaryDirectory(prefix="s2ft-rank-") as private:
            yield private
        return
    parent, name = os.path.split(path)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".s2ft-staging", dir=parent)
    except OSError as e:
        raise RunError(f"cannot write into {parent}: {e.strerror or e}; choose another --output") from None
    try:
        yield staging
        with open(os.path.join(staging, MARKER), "w", encoding="utf-8") as f:
            json.dump({"kind": kind}, f)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(path):
        try:  # still ours: nothing else took the name while the job ran
            check_output(output, overwrite)
        except RunError as e:
            raise RunError(f"{e}. This job's results are kept in {staging}") from None
        trash = tempfile.mkdtemp(prefix=f".{name}.", suffix=".s2ft-old", dir=parent)
        os.replace(path, trash)  # onto the new empty folder: POSIX rename allows it
        os.replace(staging, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, path)
