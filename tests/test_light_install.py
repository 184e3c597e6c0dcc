"""The library alone (``pip install s2ft``: torch, safetensors, numpy) wraps, calibrates, saves and loads a plain
torch model; the jobs' dependencies (the ``jobs`` extra) are needed by the jobs only, and the CLI names the extra
in one line when one is missing. Each check runs in a fresh interpreter where those modules cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

JOB_MODULES = [
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "matplotlib",
    "rdata",
    "tqdm",
    "gguf",
    "PIL",
    "trl",
    "bitsandbytes",
    "efficientnet_lite_pytorch",
]
# Makes every job module unimportable (as if not installed) before the script runs.
BLOCK = f"import sys\nfor _name in {JOB_MODULES!r}:\n    sys.modules[_name] = None\n"


def run_blocked(script: str, *args: str) -> subprocess.CompletedProcess:
    code = BLOCK + textwrap.dedent(script)
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_the_library_works_without_the_jobs_dependencies(tmp_path):
    result = run_blocked(
        """
        import sys
        import torch
        from torch import nn

        import s2ft
        from s2ft import FourierFTConfig, S2FTConfig, SpectralModel, get_spectral_model

        def base():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)).eval()

        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(8, 12, generator=g), torch.randint(3, (8,), generator=g)) for _ in range(2)]
        x = torch.randn(5, 12, generator=g)
        for i, config in enumerate([
            FourierFTConfig(target_modules=["0", "2"], n_frequency=20, init="normal"),
            S2FTConfig(target_modules=["0", "2"], n_frequency=20, calibration_batches=2, init="normal"),
        ]):
            model = get_spectral_model(base(), config)
            if isinstance(config, S2FTConfig):
                model.calibrate(batches, loss_fn=lambda out, batch: nn.functional.cross_entropy(out, batch[1]))
            out = model(x)
            assert not torch.equal(out, base()(x)), "the adapter changes nothing"
            folder = f"{sys.argv[1]}/{i}"
            model.save_pretrained(folder)
            loaded = SpectralModel.from_pretrained(base(), folder)
            assert torch.equal(loaded(x), out), type(config).__name__
            merged = loaded.merge_and_unload()
            assert type(merged) is nn.Sequential and torch.allclose(merged(x), out, atol=1e-5)
        import s2ft.tasks, s2ft.data  # the task and data layers import without the jobs' dependencies too
        print("ok")
        """,
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_cli_names_the_jobs_extra_when_a_dependency_is_missing(tmp_path):
    result = run_blocked(
        """
        import sys
        from s2ft.cli import main
        sys.exit(main(["finetune", "--output", sys.argv[1]]))
        """,
        str(tmp_path / "run"),
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("s2ft: error: this job needs ")
    assert lines[0].endswith('pip install "s2ft[jobs]"')


def test_other_import_errors_pass_through():
    import pytest

    from s2ft.errors import RunError, jobs_extra_required

    with pytest.raises(RunError, match=r"needs peft.*s2ft\[jobs\]"), jobs_extra_required():
        raise ModuleNotFoundError("No module named 'peft.tuners'", name="peft.tuners")
    with pytest.raises(ModuleNotFoundError), jobs_extra_required():
        raise ModuleNotFoundError("No module named 'somethingelse'", name="somethingelse")
