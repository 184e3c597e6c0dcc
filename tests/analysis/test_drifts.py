"""One source for each default and each config: the analysis reads S2FTConfig's defaults, DCTConfig lives beside the
other configs, and every module imports first in a fresh interpreter (no import circle through the package root)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import s2ft
from s2ft.analysis.measures import _settings
from s2ft.config import CONFIGS, DCTConfig, FourierFTConfig, S2FTConfig


def test_the_analysis_falls_back_on_s2ft_configs_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(S2FTConfig)}
    settings = _settings(FourierFTConfig(target_modules=["0"]), None, None, None, None, 0.1)
    assert settings["prior"] == defaults["prior"] == "adam"  # it fell back on the gradient prior before
    for key, field in (
        ("gamma", "gamma"),
        ("search", "permutation"),
        ("permute", "permute"),
        ("prior_lr", "prior_lr"),
    ):
        assert settings[key] == defaults[field], key
    chosen = S2FTConfig(target_modules=["0"], prior="trajectory", gamma=2.0)
    assert _settings(chosen, None, None, None, None, 0.1)["prior"] == "trajectory"


def test_dct_config_lives_with_the_other_configs():
    from s2ft.methods.dct import DCT
    from s2ft.methods.dct import DCTConfig as from_method

    assert s2ft.DCTConfig is DCTConfig is from_method is DCT.config_class is CONFIGS["dct"]
    assert DCTConfig.__module__ == "s2ft.config"


@pytest.mark.parametrize(
    "module",
    ["s2ft.config", "s2ft.methods.dct", "s2ft.methods", "s2ft.tuner.model", "s2ft.jobs.args", "s2ft.cli"],
)
def test_every_module_imports_first(module):
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_import_s2ft_leaves_the_methods_to_the_jobs():
    code = "import sys, s2ft; print('s2ft.methods' in sys.modules, 's2ft.jobs' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.stdout.split() == ["False", "False"], done.stderr
