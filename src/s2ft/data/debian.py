"""Data shipped as Debian packages: ``apt-get download`` a package and extract the files wanted from it.

Used by the built-in data sets (:mod:`s2ft.data.austen`, :mod:`s2ft.data.fashion_mnist`). Root is not needed:
``apt-get download`` only fetches the ``.deb`` and ``dpkg -x`` (or Python's tarfile, where there is no dpkg)
extracts it into a folder. Every failure is a :class:`DataError` whose message ends with ``manual``: how to
provide the files by hand.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path

from s2ft.errors import DataError

APT_TIMEOUT_S = 300


def _run(command: list[str], cwd: Path, package: str, manual: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    except FileNotFoundError:
        raise DataError(f"cannot obtain {package}: `{command[0]}` is not installed. {manual}") from None
    except subprocess.TimeoutExpired:
        raise DataError(f"`{' '.join(command)}` took over {APT_TIMEOUT_S} s. {manual}") from None


def download_deb(package: str, workdir: Path, manual: str) -> Path:
    """``apt-get download`` ``package`` into ``workdir``; if that fails (no package lists), ``apt-get update``
    and try once more. Returns the ``.deb`` path."""
    download = ["apt-get", "download", package]
    result = _run(download, workdir, package, manual)
    if result.returncode != 0:
        update = _run(["apt-get", "update"], workdir, package, manual)
        result = _run(download, workdir, package, manual) if update.returncode == 0 else update
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DataError(f"cannot download {package} with apt-get: {' '.join(detail)}. {manual}")
    return debs[0]


def _deb_data_tar(deb: Path) -> bytes:
    """The ``data.tar.*`` member of a .deb, which is an ``ar`` archive."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise DataError(f"{deb} is not a Debian package (no ar header)")
        while header := f.read(60):
            size = int(header[48:58])
            if header[:16].decode("ascii").strip().rstrip("/").startswith("data.tar"):
                return f.read(size)
            f.seek(size + size % 2, os.SEEK_CUR)  # members are padded to an even length
    raise DataError(f"{deb} has no data.tar member")


def extract_deb(deb: Path, dest: Path, wanted: Iterable[str], manual: str) -> None:
    """Extract the package into ``dest``: ``dpkg -x`` where there is dpkg, otherwise Python's tarfile (which reads
    gzip, bzip2 and xz members, not zstd), writing only the ``wanted`` paths (relative, e.g. ``usr/share/...``)."""
    if shutil.which("dpkg"):
        result = _run(["dpkg", "-x", str(deb), str(dest)], dest, deb.name, manual)
        if result.returncode != 0:
            raise DataError(f"`dpkg -x {deb.name}` failed: {result.stderr.strip()}. {manual}")
        return
    wanted = set(wanted)
    try:
        with tarfile.open(fileobj=io.BytesIO(_deb_data_tar(deb)), mode="r:*") as tar:
            for member in tar.getmembers():
                name = member.name.removeprefix("./")
                if name in wanted:
                    target = dest / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    if source is None:  # a link or a folder where the package has a file
                        raise DataError(
                            f"{deb.name} holds {name} as a link or a folder, not a file. {manual}"
                        )
                    target.write_bytes(source.read())
    except tarfile.TarError as e:
        raise DataError(f"cannot unpack {deb.name} without dpkg ({e}); install dpkg. {manual}") from None


def fetch_package(package: str, dest: Path, wanted: Iterable[str], manual: str) -> None:
    """Download ``package`` and extract it (or at least its ``wanted`` files) into ``dest``."""
    extract_deb(download_deb(package, dest, manual), dest, wanted, manual)
