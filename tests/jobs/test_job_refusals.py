"""Issue 34's job cases: a symlinked --output is refused before anything loads; evaluate (and merge, export-lora)
turn a damaged adapter into one line, rc 2; staging folders that killed jobs left are cleared by a later run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from s2ft.cli import main
from s2ft.jobs.output import STAGING_LOCK, clear_stale_staging, staged_output
from tests.helpers import finetune, write_tiny_model


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A finished FourierFT run of the tiny model."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert finetune(tiny, out, "--method", "fourierft", "--max-steps", "2") == 0
    return out


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fails the test if a job gets as far as loading its data or a model."""
    from s2ft.jobs import runs
    from s2ft.tasks.text_classification import TextClassification

    def never(*args, **kwargs):
        raise AssertionError("the job ran")

    monkeypatch.setattr(TextClassification, "load_data", never)
    for module in ("s2ft.jobs.merge", "s2ft.jobs.export_lora"):  # imported (binding the real one) first
        monkeypatch.setattr(f"{module}.load_trained", never)
    monkeypatch.setattr(runs, "load_trained", never)


def _staging(parent) -> list[str]:
    return [n for n in os.listdir(parent) if n.endswith((".s2ft-staging", ".s2ft-old"))]


# ---------------------------------------------------------------------------------------------- symlinked outputs
@pytest.mark.parametrize("target", ["run", "empty", "dangling"])
@pytest.mark.parametrize("command", ["finetune", "merge", "export-lora", "analyze"])
def test_a_symlinked_output_is_refused_before_anything_loads(
    tiny, trained, tmp_path, capsys, nothing_loads, target, command
):
    import shutil

    pointed = {"run": tmp_path / "a-run", "empty": tmp_path / "empty", "dangling": tmp_path / "nowhere"}[
        target
    ]
    if target == "empty":
        pointed.mkdir()
    if target == "run":  # another finished run (a copy), which --overwrite would replace were it no link
        shutil.copytree(trained, pointed)
    before = sorted(os.listdir(pointed)) if pointed.exists() else None
    link = tmp_path / "out"
    link.symlink_to(pointed)
    model, data = tiny
    argv = {
        "finetune": ["finetune", "--model", model, "--dataset", data, "--overwrite"],
        "merge": ["merge", "--adapter", str(trained), "--overwrite"],
        "export-lora": ["export-lora", "--adapter", str(trained), "--rank", "2", "--overwrite"],
        "analyze": ["analyze", "--model", model, "--dataset", data],
    }[command]
    assert main([*argv, "--output", str(link)]) == 2
    err = capsys.readouterr().err
    assert f"error: --output {link} is a symbolic link" in err and "name a real folder" in err, err
    assert os.readlink(link) == str(pointed) and _staging(tmp_path) == []
    assert (sorted(os.listdir(pointed)) if pointed.exists() else None) == before


# ---------------------------------------------------------------------------------------------- damaged adapters
@pytest.mark.parametrize("damage", ["truncated", "other model"])
def test_evaluate_a_damaged_adapter_is_one_line(tiny, trained, tmp_path, capsys, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:  # a model of other shapes: the adapter does not fit it
        record = json.loads((run / "run.json").read_text())
        other = write_tiny_model(tmp_path / "other")
        config = json.loads((tmp_path / "other" / "config.json").read_text())
        config.update(hidden_size=48, intermediate_size=96)
        (tmp_path / "other" / "config.json").write_text(json.dumps(config))
        from transformers import BertConfig, BertForSequenceClassification

        BertForSequenceClassification(BertConfig(**config)).save_pretrained(other)
        record["model"] = other
        (run / "run.json").write_text(json.dumps(record))
    for argv in (
        ["evaluate", "--adapter", str(run), "--quiet"],
        ["merge", "--adapter", str(run), "--output", str(tmp_path / "merged")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error" in line.lower()]
        assert len(lines) == 1 and "cannot load the adapter in" in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "merged").exists() and _staging(tmp_path) == []


# ---------------------------------------------------------------------------------------------- stale staging
def test_a_killed_jobs_staging_folder_is_cleared_by_a_later_run(tmp_path):
    """SIGKILL inside a job's staged output leaves its staging folder; the next job writing that output removes it
    (no process holds its lock), but never the staging folder of a job still running, nor another output's."""
    out = tmp_path / "out"
    script = (
        "import os, signal, sys\n"
        "from s2ft.jobs.output import staged_output\n"
        "with staged_output(sys.argv[1], False, True) as work:\n"
        "    open(os.path.join(work, 'half.bin'), 'wb').write(b'x' * 10)\n"
        "    if sys.argv[2] == 'kill':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    print('holding', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([sys.executable, "-c", script, str(out), "kill"], env=env, check=False)
    assert killed.returncode == -signal.SIGKILL
    left = _staging(tmp_path)
    assert len(left) == 1 and not out.exists()
    # a job still running (it holds its lock) keeps its staging folder
    running = subprocess.Popen(
        [sys.executable, "-c", script, str(out), "wait"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert running.stdout.readline().strip() == b"holding"
        live = _staging(tmp_path)  # the new job cleared the killed one's folder as it started
        assert len(live) == 1 and live != left
        # another output's staging folder, and one of a version without lock files, recent: both kept
        other = tmp_path / ".out2.abcdefgh.s2ft-staging"
        other.mkdir()
        unlocked = tmp_path / ".out.ABCDEFGH.s2ft-staging"
        unlocked.mkdir()
        assert clear_stale_staging(str(out)) == []
        assert sorted(_staging(tmp_path)) == sorted([*live, other.name, unlocked.name])
        # the unlocked one once nothing in it changed for a day
        old = time.time() - 2 * 24 * 3600
        os.utime(unlocked, (old, old))
        assert [os.path.basename(r) for r in clear_stale_staging(str(out))] == [unlocked.name]
    finally:
        running.communicate(b"\n", timeout=60)
    assert running.returncode == 0 and (out / "half.bin").exists() and not (out / STAGING_LOCK).exists()
    assert sorted(_staging(tmp_path)) == [other.name]


def test_a_job_clears_stale_staging_itself(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.zzzzzzzz.s2ft-staging"
    stale.mkdir()
    (stale / STAGING_LOCK).write_text("12345\n")  # its process is gone: the lock is free
    with staged_output(str(out), False, True) as work:
        assert not stale.exists() and os.path.isfile(os.path.join(work, STAGING_LOCK))
    assert _staging(tmp_path) == [] and sorted(os.listdir(out)) == [".s2ft-output"]
