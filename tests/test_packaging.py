"""The package's metadata: the version is written once (``s2ft.__version__``, which pyproject.toml reads), and the
annotations ship with the package (``py.typed``, PEP 561)."""

from __future__ import annotations

import importlib.metadata
import os

import pytest

import s2ft
from tests.helpers import ROOT


def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_the_version_is_written_once_and_installed_as_written():
    config = project()
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "s2ft.__version__"}
    # an installed copy reports the same version (else it is stale: reinstall with pip install -e .)
    assert importlib.metadata.version("s2ft") == s2ft.__version__


def test_the_type_marker_ships_with_the_package():
    assert os.path.isfile(os.path.join(os.path.dirname(s2ft.__file__), "py.typed"))
    assert "py.typed" in project()["tool"]["setuptools"]["package-data"]["s2ft"]
