"""The folders jobs write. Each is marked (:data:`MARKER`, with its kind) so that no job ever writes into a folder
s2ft did not make, and ``--overwrite`` replaces only an output of the same kind.

- :func:`staged_output` (finetune, merge, export-lora, analyze): the job writes a hidden staging folder that is
  renamed into place only when it succeeds; the output is checked before the job starts.
- :func:`results_folder` (compare): a folder kept and added to across invocations.

A finetune output holds :data:`RUN_FILE` (what to rebuild the model from, :mod:`s2ft.jobs.runs`), the
:data:`ADAPTER_DIR` folder, ``metrics.json`` and ``log.txt``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from typing import IO

from s2ft.errors import RunError
from s2ft.io import folder_mode, ordinary_modes, storage_problem

RUN_FILE = "run.json"
ADAPTER_DIR = "adapter"
MARKER = ".s2ft-output"  # written into every folder a job creates, with its kind
STAGING_LOCK = ".s2ft-lock"  # in a staging folder, locked (flock) by the job writing it while it runs
# A staging folder without a lock file (an s2ft before 0.1.x, or a job killed the instant after making it) is
# taken as abandoned only when nothing in it changed for this long.
STALE_UNLOCKED_SECONDS = 24 * 3600
KINDS = {  # a marker's kind -> what it is called in messages
    "run": "finetune run",
    "merged": "merged model",
    "lora-export": "LoRA export",
    "compare": "comparison",
    "analysis": "analysis",
}
# Outputs of versions that wrote no marker (compare and analyze): every name such a folder holds, and the
# keys its JSON record has.
_UNMARKED = {
    "compare": ({"runs", "warmup", "results.json", "results.md", "*_vs_size.png"}, "results.json", "summary"),
    "analysis": ({"analysis.json", "report.md", "*.png"}, "analysis.json", "settings"),
}


# ---------------------------------------------------------------------------------------------- what a folder is
def output_kind(folder: str) -> str | None:
    """The kind of s2ft output ``folder`` holds (a key of :data:`KINDS`, or ``""`` for a marker of unknown
    kind), or None when s2ft did not write it. Outputs of earlier versions are recognized by their files: a
    ``run.json`` with a method, and compare and analyze folders holding only what those jobs write."""
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            kind = json.load(f).get("kind")
        return kind if isinstance(kind, str) else ""
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError):
        return ""  # a marker being written, or damaged: still s2ft's
    try:
        with open(os.path.join(folder, RUN_FILE), encoding="utf-8") as f:
            if isinstance(json.load(f).get("method"), str):
                return "run"
    except (OSError, ValueError, AttributeError):
        pass
    entries = _entries(folder)
    for kind, (names, record, key) in _UNMARKED.items():
        if entries and all(any(fnmatch.fnmatch(e, n) for n in names) for e in entries):
            runs = _runs(folder)  # a compare folder's: runs and lock files only
            if runs is not None and (_has_key(os.path.join(folder, record), key) or runs):
                return kind
    return None


def _entries(folder: str) -> list[str]:
    """The names in ``folder`` but s2ft's own leftovers (staging folders, temporary files of a killed job)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [n for n in names if not (n.startswith(".") and (".s2ft-" in n or n.endswith(".tmp")))]


def _has_key(path: str, key: str) -> bool:
    """Whether ``path`` is a JSON object with ``key``."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and key in record


def _runs(folder: str) -> int | None:
    """How many runs ``folder/runs`` holds (0 when there is no such folder), or None when it holds anything but
    runs and their lock files."""
    runs = os.path.join(folder, "runs")
    kinds = [output_kind(os.path.join(runs, n)) for n in _entries(runs) if not n.endswith(".lock")]
    return len(kinds) if all(k == "run" for k in kinds) else None


def is_s2ft_output(folder: str) -> bool:
    """Whether ``folder`` holds something an s2ft job wrote (:func:`output_kind`)."""
    return output_kind(folder) is not None


def check_output(output: str, overwrite: bool, kind: str = "run", renamed: bool = True) -> str:
    """``output`` as an absolute path, after checking that a job writing a ``kind`` output may write it; raises
    :class:`RunError` otherwise.

    Allowed: a new path, an empty folder, or, with ``overwrite``, a folder an s2ft job wrote of the same kind.
    Never a file, an empty name, a folder of anything else (a source tree, a data set) or of another kind, nor,
    for an output ``renamed`` into place at the end (:func:`staged_output`), a symbolic link (to a folder, or
    dangling): the rename would replace the link, not what it points to.
    """
    if not isinstance(output, str) or not output.strip():
        raise RunError("--output is empty; name a folder for the results")
    path = os.path.abspath(output)
    if renamed and os.path.islink(path):
        raise RunError(
            f"--output {output} is a symbolic link (to {os.readlink(path)}); s2ft moves a finished output into "
            "place, which would replace the link itself: name a real folder (e.g. the link's target) instead"
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(f"--output {output} is a file, not a folder; choose a folder")
    try:
        entries = os.listdir(path) if os.path.isdir(path) else []
    except OSError as e:
        raise RunError(f"cannot read --output {output}: {e.strerror or e}; choose another --output") from None
    if entries:
        found = output_kind(path)
        if found is None:
            raise RunError(
                f"{output} is not empty and holds nothing s2ft wrote; s2ft writes only into folders it made, "
                "so choose a new or empty folder"
            )
        if found and found != kind:
            raise RunError(
                f"{output} holds an s2ft {KINDS.get(found, found)}, not a {KINDS[kind]}; choose another --output"
            )
        if not overwrite:
            raise RunError(
                f"{output} already holds an s2ft output (a {KINDS[kind]}); pass --overwrite to replace it, or "
                "choose another --output"
            )
    return path


def refuse_overlap(run: str, output: str, verb: str) -> None:
    """Refuse an ``output`` that is the run ``run`` (a run folder or its adapter folder) a job reads, lies inside
    it, or contains it: writing it would change or destroy the run. ``verb`` says what the job does
    (``"merges"``)."""
    run_dir = os.path.realpath(run)
    if not os.path.isfile(os.path.join(run_dir, RUN_FILE)):
        run_dir = os.path.dirname(run_dir)  # the adapter/ folder of a run was given
    target = os.path.realpath(output) if isinstance(output, str) and output.strip() else ""
    inside = target == run_dir or target.startswith(run_dir + os.sep) or run_dir.startswith(target + os.sep)
    if target and inside:
        raise RunError(
            f"--output {output} overlaps the run it {verb} ({run_dir}); choose a folder outside it"
        )


def _check_replaceable(path: str, output: str) -> None:
    """Refuse, before the job runs, an output that can be written but not replaced by a rename at its end: a
    mount point, or another user's folder in a folder with the sticky bit (such as /tmp)."""
    if os.path.ismount(path):
        raise RunError(
            f"--output {output} is a mount point, which s2ft cannot replace (it renames a finished output into "
            "place); choose a folder inside it"
        )
    parent = os.path.dirname(path)
    if os.path.lexists(path) and os.geteuid() != 0:
        owner = os.lstat(path).st_uid
        if os.stat(parent).st_mode & stat.S_ISVTX and owner != os.geteuid():
            raise RunError(
                f"--output {output} belongs to another user in a folder where only owners may replace entries; "
                "choose another --output"
            )


# ---------------------------------------------------------------------------------------------- writing them
@contextlib.contextmanager
def staged_output(output: str, overwrite: bool, is_main: bool, kind: str = "run") -> Iterator[str]:
    """A staging folder that becomes ``output`` only when the job succeeds.

    Ctrl-C or an error leaves nothing half-written, and an existing output is replaced only then (and only with
    ``overwrite``, and only if s2ft wrote it: :func:`check_output`, checked before the job starts with whether
    it can be replaced at all). A full disk ends the job with a :class:`RunError` saying so. The staging and
    the set-aside folders are new folders of unique hidden names beside ``output``, created by this process, so
    nothing a user made is ever deleted; the output gets ordinary modes (0755 and 0644 under umask 022). Other
    processes of a distributed job get a private temporary folder (only the main process writes outputs).
    """
    path = check_output(output, overwrite, kind)
    if not is_main:
        with tempfile.TemporaryDirectory(prefix="s2ft-rank-") as private:
            yield private
        return
    parent, name = os.path.split(path)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".s2ft-staging", dir=parent)
        lock = _lock_staging(staging)
        os.chmod(staging, folder_mode())
    except OSError as e:
        raise RunError(f"cannot write into {parent}: {e.strerror or e}; choose another --output") from None
    try:
        clear_stale_staging(path)
        _check_replaceable(path, output)
        yield staging
        with open(os.path.join(staging, MARKER), "w", encoding="utf-8") as f:
            json.dump({"kind": kind}, f)
        os.remove(os.path.join(staging, STAGING_LOCK))  # unlocked, but young: left alone until it is renamed
        ordinary_modes(staging)
    except BaseException as e:
        lock.close()
        shutil.rmtree(staging, ignore_errors=True)
        problem = storage_problem(e)
        if problem is None:
            raise
        kept = f"{output} is as it was" if os.path.isdir(path) else "nothing was written"
        raise RunError(
            f"{problem}; free some space (or choose an --output on another disk) and run again; {kept}"
        ) from None
    try:
        _put_in_place(staging, path, output, overwrite, kind)
    finally:
        lock.close()


def _lock_staging(staging: str) -> IO[str]:
    """Lock ``staging`` for this process (an exclusive ``flock`` on its :data:`STAGING_LOCK` file, holding the
    pid); the lock goes with the process, however it ends (SIGKILL too)."""
    import fcntl

    handle = open(os.path.join(staging, STAGING_LOCK), "w", encoding="utf-8")  # noqa: SIM115 (held open)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _abandoned(folder: str) -> bool:
    """Whether the staging ``folder`` belongs to no running job: its lock file is not locked by any process, or,
    without one, nothing in it changed for :data:`STALE_UNLOCKED_SECONDS`. A finished output (one holding its
    :data:`MARKER`: a job whose final rename failed said its results are there) is never abandoned."""
    import fcntl

    if os.path.lexists(os.path.join(folder, MARKER)):
        return False
    lock_file = os.path.join(folder, STAGING_LOCK)
    try:
        handle = open(lock_file, encoding="utf-8")  # noqa: SIM115
    except FileNotFoundError:
        try:
            newest = max(
                [os.lstat(folder).st_mtime]
                + [os.lstat(os.path.join(r, n)).st_mtime for r, ds, fs in os.walk(folder) for n in ds + fs]
            )
        except OSError:
            return False
        return time.time() - newest > STALE_UNLOCKED_SECONDS
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a running job holds it
        return True


def clear_stale_staging(path: str) -> list[str]:
    """Remove the staging folders of the output ``path`` (``.NAME.XXXXXXXX.s2ft-staging`` beside it) that jobs
    killed before they finished left behind (:func:`_abandoned`: no running process holds their lock). Only
    s2ft's own staging folders of this output are touched, never a set-aside earlier output (``.s2ft-old``).
    Returns the removed folders."""
    parent, name = os.path.split(path)
    pattern = re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]{{8}}\.s2ft-staging")
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for entry in names:
        folder = os.path.join(parent, entry)
        if not pattern.fullmatch(entry) or os.path.islink(folder) or not os.path.isdir(folder):
            continue
        if _abandoned(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _put_in_place(staging: str, path: str, output: str, overwrite: bool, kind: str) -> None:
    """Rename the finished ``staging`` folder to ``path``, replacing what is there (set aside first, put back if
    the rename fails). When it cannot be done, the error says where the results are."""
    parent, name = os.path.split(path)
    trash = None
    try:
        if os.path.isdir(path):
            try:  # still ours: nothing else took the name while the job ran
                check_output(output, overwrite, kind)
            except RunError as e:
                raise RunError(f"{e}. This job's results are kept in {staging}") from None
            trash = tempfile.mkdtemp(prefix=f".{name}.", suffix=".s2ft-old", dir=parent)
            os.replace(path, trash)  # onto the new empty folder: POSIX rename allows it
        os.replace(staging, path)
    except OSError as e:
        if trash is not None and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.replace(trash, path)  # the earlier output back in place
        if trash is not None and os.path.isdir(trash) and not os.listdir(trash):
            os.rmdir(trash)
        raise RunError(
            f"cannot move the results into {output}: {e.strerror or e}; this job's results are in {staging} "
            "(move them yourself)"
        ) from None
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def results_folder(output: str, kind: str) -> str:
    """``output`` (absolute) as a folder a job keeps adding to (``s2ft compare``): created with its marker when
    new or empty, reused when it holds an s2ft output of the same ``kind``; refused (:class:`RunError`, before
    anything is written) when it is a file or holds anything else."""
    path = check_output(output, True, kind, renamed=False)
    if output_kind(path) is None:  # new or empty; the marker first, so other processes see it is s2ft's
        try:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, MARKER), "w", encoding="utf-8") as f:
                json.dump({"kind": kind}, f)
        except OSError as e:
            problem = storage_problem(e) or e.strerror or str(e)
            raise RunError(f"cannot write into {output}: {problem}; choose another --output") from None
    return path
