"""Atomic file writes: write to a temporary file beside the target, then rename over it."""

from __future__ import annotations

import contextlib
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
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


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
            os.chmod(tmp, 0o666 & ~_umask())
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
