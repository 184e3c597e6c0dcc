"""The built-in Fashion-MNIST data: 70,000 greyscale 28x28 images of clothing in 10 balanced classes, from
Debian's ``dataset-fashion-mnist`` (MIT licence).

The package's four idx ``.gz`` files are fetched once with ``apt-get download`` and ``dpkg -x`` (or read from an
extracted tree named by ``S2FT_FASHION_MNIST_DIR``) and copied atomically into the cache
(``$S2FT_CACHE/fashion-mnist``, default ``~/.cache/s2ft``). The package's 10,000 test images are the test split;
a seeded 5,000 of the 60,000 training images are the validation split.
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from s2ft.data.common import default_cache_dir
from s2ft.data.debian import fetch_package
from s2ft.errors import DataError
from s2ft.io import atomic_write

PACKAGE = "dataset-fashion-mnist"
SUBDIR = Path("usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
VALIDATION_SIZE = 5_000
_MANUAL = (
    f"To provide it by hand: download the Debian package (apt-get download {PACKAGE}), extract it with "
    "`dpkg -x dataset-fashion-mnist_*.deb DIR`, and set S2FT_FASHION_MNIST_DIR=DIR (DIR may also be the folder "
    "holding the four idx .gz files)."
)


def read_idx(path: str | os.PathLike, offset: int) -> np.ndarray:
    """The bytes of a gzipped idx file after its ``offset``-byte header (16 for images, 8 for labels)."""
    try:
        with gzip.open(path) as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}. {_MANUAL}") from None


def _find_files(root: Path) -> Path:
    for candidate in (root, root / SUBDIR):
        if all((candidate / name).is_file() for pair in FILES.values() for name in pair):
            return candidate
    raise DataError(f"no Fashion-MNIST idx files in {root} or {root / SUBDIR}. {_MANUAL}")


def fashion_mnist_files(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached folder holding the four idx files, filled on first use."""
    cache = Path(cache_dir or default_cache_dir()) / "fashion-mnist"
    if all((cache / name).is_file() for pair in FILES.values() for name in pair):
        return cache
    source = os.environ.get("S2FT_FASHION_MNIST_DIR")
    with tempfile.TemporaryDirectory(prefix="s2ft-fashion-") as tmp:
        if source:
            folder = _find_files(Path(source))
        else:
            wanted = [(SUBDIR / name).as_posix() for pair in FILES.values() for name in pair]
            fetch_package(PACKAGE, Path(tmp), wanted, _MANUAL)
            folder = _find_files(Path(tmp))
        for pair in FILES.values():
            for name in pair:
                atomic_write(cache / name, functools.partial(shutil.copyfile, folder / name))
    return cache


def load_fashion_mnist(
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": (...)}``: uint8 ``(N, 28, 28)`` images and ``(N,)`` labels."""
    folder = fashion_mnist_files(cache_dir)
    arrays = {}
    for split, (images, labels) in FILES.items():
        pixels = read_idx(folder / images, 16)
        targets = read_idx(folder / labels, 8)
        if pixels.size != targets.size * 28 * 28:
            raise DataError(
                f"{folder}: {split} images and labels disagree in number; delete the folder to refetch"
            )
        arrays[split] = (pixels.reshape(-1, 28, 28), targets)
    return arrays
