"""Atomic file writes (write to a temporary file beside the target, then rename over it), the modes of what s2ft
writes, and storage errors (a full disk) told apart from other errors."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def _temporary_beside(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in the target's folder; on success it replaces ``path``, on error it is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        # mkstemp creates the file private (0600), and a writer may replace it with a private one of its own
        # (safetensors does): give the result the mode a plain open() would, 0666 less the umask.
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode a plain ``open()`` gives a new file: 0666 less the umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder: 0777 less the umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


def ordinary_modes(root: str | os.PathLike) -> None:
    """Give ``root`` and every folder and file under it (all written by this process) the modes a plain
    ``mkdir``/``open()`` would: :func:`tempfile.mkdtemp` makes folders 0700, and some writers (transformers'
    ``save_pretrained``) leave files 0600. Symbolic links are left alone."""
    os.chmod(root, folder_mode())
    for folder, dirs, files in os.walk(os.fspath(root)):
        for name in dirs:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), folder_mode())
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), file_mode())


# errno -> what it means for the user; storage_problem() names these
_STORAGE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "a file is too large for the file system",
    errno.EROFS: "the file system is read-only",
}
# the same as writers outside Python word them (safetensors: "... No space left on device (os error 28)")
_STORAGE_TEXTS = {os.strerror(code): problem for code, problem in _STORAGE_ERRNOS.items()}


def storage_problem(error: BaseException | None) -> str | None:
    """What went wrong with the storage, in a few words (``"the disk is full (No space left on device:
    'out/x')"``), when ``error`` (or an error it was raised from) is a full disk, an exceeded quota, a file too
    large or a read-only file system; None for any other error."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
            where = f": {error.filename}" if error.filename else ""
            return f"{_STORAGE_ERRNOS[error.errno]} ({error.strerror or error}{where})"
        for text, problem in _STORAGE_TEXTS.items():
            if text in str(error):
                return f"{problem} ({text})"
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` only if it succeeded."""
    with _temporary_beside(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_group(writers: dict[str, Callable[[str], None]]) -> None:
    """Write several files as one: each ``writer(tmp_path)`` to a temporary file beside its target first, then
    every target replaced; if a replacement fails, the targets already replaced get their old files back. So the
    targets hold either all their old contents or all their new ones."""
    temporaries: dict[str, str] = {}
    backups: dict[str, str] = {}
    done: list[str] = []
    try:
        for path, write in writers.items():
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
            os.close(fd)
            temporaries[path] = tmp
            write(tmp)
            os.chmod(tmp, file_mode())
        for path in writers:
            if os.path.exists(path):
                fd, backup = tempfile.mkstemp(
                    prefix=f".{os.path.basename(path)}.",
                    suffix=".old",
                    dir=os.path.dirname(os.path.abspath(path)),
                )
                os.close(fd)
                os.replace(path, backup)
                backups[path] = backup
            os.replace(temporaries[path], path)
            del temporaries[path]
            done.append(path)
    except BaseException:
        for path in reversed(done):  # put the old files back (or remove a file that did not exist before)
            if path in backups:
                os.replace(backups.pop(path), path)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)
        for path, backup in backups.items():  # a target whose replacement failed after its backup was made
            if not os.path.exists(path):
                os.replace(backup, path)
            else:
                with contextlib.suppress(OSError):
                    os.remove(backup)
        for tmp in temporaries.values():
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise
    for backup in backups.values():
        with contextlib.suppress(OSError):
            os.remove(backup)
