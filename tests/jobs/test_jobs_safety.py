"""Every job refuses, before writing anything, an output folder it did not make or that overlaps what it reads; a
full disk or an output that cannot be replaced ends in one line (exit status 2) with nothing lost; what the jobs
write gets ordinary modes."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from s2ft.cli import main
from tests.helpers import finetune


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A finished FourierFT run of the tiny model."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert finetune(tiny, out, "--method", "fourierft", "--max-steps", "2") == 0
    return out


@pytest.fixture
def job_never_runs(monkeypatch):
    """Fails the test if a job gets as far as loading its data."""
    from s2ft.tasks.text_classification import TextClassification

    def never(*args, **kwargs):
        raise AssertionError("the job ran")

    monkeypatch.setattr(TextClassification, "load_data", never)


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def one_line_error(capsys) -> str:
    """The one error line of the command (progress bars of loading may come before it), without a traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("s2ft ") and "Traceback" not in err, err
    return lines[0]


def job_argv(tiny, command, output, *extra) -> list[str]:
    model, data = tiny
    argv = [command, "--model", model, "--dataset", data, "--output", str(output), "--quiet"]
    return [
        *argv,
        "--n-frequency",
        "16",
        "--max-steps",
        "1",
        "--batch-size",
        "8",
        "--head-warmup-steps",
        "0",
        *extra,
    ]


# ---------------------------------------------------------------------------------------------- export-lora
@pytest.mark.parametrize("where", ["run", "adapter", "inside", "parent"])
def test_export_lora_output_may_not_overlap_the_run(trained, capsys, where):
    targets = {
        "run": trained,
        "adapter": trained / "adapter",
        "inside": trained / "lora",
        "parent": trained.parent,
    }
    before = snapshot(trained)
    argv = [
        "export-lora",
        "--adapter",
        str(trained),
        "--rank",
        "4",
        "--output",
        str(targets[where]),
        "--overwrite",
    ]
    assert main(argv) == 2
    assert "overlaps the run it exports" in one_line_error(capsys)
    assert snapshot(trained) == before


@pytest.mark.parametrize("rank", ["inf", "-inf", "nan", "1e400"])
def test_export_lora_refuses_a_rank_that_is_no_number(trained, tmp_path, capsys, rank):
    out = tmp_path / "lora"
    assert main(["export-lora", "--adapter", str(trained), f"--rank={rank}", "--output", str(out)]) == 2
    assert "--rank must be a positive integer or a share" in one_line_error(capsys)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- foreign folders
def users_folder(tmp_path, *names):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in names:
        (folder / name).write_text(f"my own {name}\n")
    return folder


def test_compare_refuses_a_folder_it_did_not_make(tiny, tmp_path, capsys, job_never_runs):
    folder = users_folder(tmp_path, "results.md", "results.json")
    before = snapshot(folder)
    assert main(job_argv(tiny, "compare", folder, "--variants", "fourierft", "--seeds", "0")) == 2
    assert "holds nothing s2ft wrote" in one_line_error(capsys)
    assert snapshot(folder) == before and sorted(os.listdir(folder)) == ["results.json", "results.md"]


def test_analyze_refuses_a_folder_it_did_not_make(tiny, tmp_path, capsys, job_never_runs):
    folder = users_folder(tmp_path, "report.md")
    before = snapshot(folder)
    assert main(job_argv(tiny, "analyze", folder)) == 2
    assert "holds nothing s2ft wrote" in one_line_error(capsys)
    assert snapshot(folder) == before and os.listdir(folder) == ["report.md"]
    assert [p for p in os.listdir(tmp_path) if p != "mine"] == []  # no staging folder left either


def test_compare_output_that_is_a_file(tiny, tmp_path, capsys, job_never_runs):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    assert main(job_argv(tiny, "compare", path, "--variants", "fourierft", "--seeds", "0")) == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    assert path.read_text() == "mine"


def test_outputs_of_another_kind_are_not_replaced(tiny, trained, tmp_path, capsys, job_never_runs):
    """--overwrite replaces an output of the job's own kind only: a comparison never becomes a run, nor a run a
    merged model or a comparison."""
    before = snapshot(trained)
    assert main(job_argv(tiny, "compare", trained, "--variants", "fourierft", "--seeds", "0")) == 2
    assert "holds an s2ft finetune run, not a comparison" in one_line_error(capsys)
    assert main(["merge", "--adapter", str(trained), "--output", str(tmp_path / "m")]) == 0
    assert finetune(tiny, tmp_path / "m", "--overwrite") == 2
    assert "holds an s2ft merged model, not a finetune run" in one_line_error(capsys)
    assert (
        main(
            [
                "export-lora",
                "--adapter",
                str(trained),
                "--rank",
                "2",
                "--output",
                str(tmp_path / "m"),
                "--overwrite",
            ]
        )
        == 2
    )
    assert "not a LoRA export" in one_line_error(capsys)
    assert snapshot(trained) == before and (tmp_path / "m" / "config.json").is_file()


def test_outputs_of_earlier_versions_are_recognized(tmp_path):
    """Compare and analyze folders written before outputs were marked are still theirs; a folder with anything
    else in it is not."""
    from s2ft.jobs.output import output_kind

    compare = tmp_path / "compare"
    (compare / "runs" / "fourierft-seed0").mkdir(parents=True)
    (compare / "runs" / "fourierft-seed0" / "run.json").write_text(json.dumps({"method": "fourierft"}))
    (compare / "runs" / "fourierft-seed0.lock").write_text("")
    (compare / "results.json").write_text(json.dumps({"summary": []}))
    (compare / "accuracy_vs_size.png").write_bytes(b"png")
    analysis = tmp_path / "analysis"
    analysis.mkdir()
    (analysis / "analysis.json").write_text(json.dumps({"settings": {}}))
    (analysis / "spectrum_prior.png").write_bytes(b"png")
    assert output_kind(str(compare)) == "compare" and output_kind(str(analysis)) == "analysis"
    (compare / "results.json").write_text("{}")  # still: its runs say so
    assert output_kind(str(compare)) == "compare"
    (compare / "runs" / "my_notes.txt").write_text("mine")
    (analysis / "thesis.tex").write_text("mine")
    assert output_kind(str(compare)) is None and output_kind(str(analysis)) is None
    assert output_kind(str(tmp_path)) is None


# ---------------------------------------------------------------------------------------------- evaluate
def test_evaluate_names_both_tasks(trained, tmp_path, capsys):
    assert main(["evaluate", "--adapter", str(trained), "--task", "causal-lm", "--quiet"]) == 2
    err = one_line_error(capsys)
    assert "is a text-classification run, not causal-lm" in err
    corpus = tmp_path / "corpus.txt"  # plain text: causal-lm data
    corpus.write_text("\n\n".join(f"the wave and the cloud {i} ." for i in range(60)) + "\n")
    assert main(["evaluate", "--adapter", str(trained), "--dataset", str(corpus), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert "is causal-lm data" in err and "is a text-classification run" in err


# ---------------------------------------------------------------------------------------------- replacing
def test_an_output_that_cannot_be_replaced_is_found_before_training(
    tiny, tmp_path, capsys, monkeypatch, job_never_runs
):
    import s2ft.jobs.output as output

    target = tmp_path / "mounted"
    target.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(output.os.path, "ismount", lambda p: p == str(target) or real(p))
    assert finetune(tiny, target, "--max-steps", "1") == 2
    assert "is a mount point" in one_line_error(capsys)
    assert os.listdir(tmp_path) == ["mounted"]  # no staging folder left


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_final_rename_says_where_the_results_are(
    tiny, trained, tmp_path, capsys, monkeypatch, existing
):
    import shutil

    out = tmp_path / "run"
    if existing:
        shutil.copytree(trained, out)
    before = snapshot(out) if existing else None
    real = os.replace

    def refused(src, dst, *args, **kwargs):
        if str(src).endswith(".s2ft-staging"):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refused)
    assert finetune(tiny, out, "--method", "fourierft", "--max-steps", "1", "--overwrite") == 2
    err = one_line_error(capsys)
    assert "cannot move the results into" in err and "Operation not permitted" in err
    staging = err.split("results are in ")[1].split(" (")[0]
    assert staging.endswith(".s2ft-staging") and os.path.isfile(os.path.join(staging, "run.json"))
    if existing:
        assert snapshot(out) == before  # the earlier run back in place
    else:
        assert not out.exists()
    hidden = [p for p in os.listdir(tmp_path) if p.startswith(".")]
    assert hidden == [os.path.basename(staging)]  # nothing set aside is left behind


# ---------------------------------------------------------------------------------------------- full disk
def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("existing", [False, True])
def test_full_disk_during_finetune(tiny, trained, tmp_path, capsys, monkeypatch, existing):
    import shutil

    import s2ft.jobs.finetune as job

    out = tmp_path / "run"
    if existing:
        shutil.copytree(trained, out)
    before = snapshot(out) if existing else None
    monkeypatch.setattr(job, "atomic_write_text", disk_full)
    assert finetune(tiny, out, "--method", "fourierft", "--max-steps", "1", "--overwrite") == 2
    err = one_line_error(capsys)
    assert "the disk is full" in err and "free some space" in err
    if existing:
        assert snapshot(out) == before and "is as it was" in err
        assert os.listdir(tmp_path) == ["run"]
    else:
        assert "nothing was written" in err and os.listdir(tmp_path) == []


def test_full_disk_while_logging(tiny, tmp_path, capsys, monkeypatch):
    """The run's log.txt cannot be written: no traceback per message, and the run ends as on any full disk."""
    import s2ft.jobs.logs as logs

    class FullDisk:
        def write(self, text):
            disk_full()

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(logs._LogFile, "_open", lambda self: FullDisk())
    out = tmp_path / "run"
    assert finetune(tiny, out, "--method", "fourierft", "--max-steps", "1") == 2
    assert "the disk is full" in one_line_error(capsys)  # and no traceback per message
    assert os.listdir(tmp_path) == []


def test_full_disk_during_merge_and_export_lora(trained, tmp_path, capsys, monkeypatch):
    import transformers

    import s2ft.tuner.peft_fourierft as peft_files

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
    assert main(["merge", "--adapter", str(trained), "--output", str(tmp_path / "merged")]) == 2
    assert "the disk is full" in one_line_error(capsys)
    monkeypatch.setattr(peft_files, "atomic_write", disk_full)
    assert (
        main(["export-lora", "--adapter", str(trained), "--rank", "2", "--output", str(tmp_path / "lora")])
        == 2
    )
    assert "the disk is full" in one_line_error(capsys)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- modes
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(folder) -> set[tuple[str, int]]:
    """(``"d"`` or ``"f"``, mode) of ``folder`` and everything under it."""
    found = {("d", stat.S_IMODE(os.stat(folder).st_mode))}
    for root, dirs, files in os.walk(folder):
        found |= {("d", stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode)) for d in dirs}
        found |= {("f", stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode)) for f in files}
    return found


def test_outputs_get_ordinary_modes(tiny, tmp_path, umask_022):
    run = tmp_path / "run"
    assert finetune(tiny, run, "--method", "fourierft", "--max-steps", "1") == 0
    assert main(["merge", "--adapter", str(run), "--output", str(tmp_path / "merged")]) == 0
    assert (
        main(["export-lora", "--adapter", str(run), "--rank", "2", "--output", str(tmp_path / "lora")]) == 0
    )
    compare = tmp_path / "compare"
    assert main(job_argv(tiny, "compare", compare, "--variants", "fourierft", "--seeds", "0")) == 0
    for folder in (run, tmp_path / "merged", tmp_path / "lora", compare):
        assert modes(folder) == {("d", 0o755), ("f", 0o644)}, folder
    assert (tmp_path / "merged" / "model.safetensors").is_file()
