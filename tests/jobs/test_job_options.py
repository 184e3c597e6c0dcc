"""Each job option is declared once (:class:`s2ft.options.Option`): the fields of the jobs' arguments, the flags of the
command line and the checks all come from that declaration, and an option of a task or method other than the job's
is refused, for every method and task."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from s2ft.cli import build_parser, main
from s2ft.jobs.args import JOB_OPTIONS, FinetuneArgs, JobArgs, all_options, applicable
from s2ft.jobs.compare import variant_args
from s2ft.methods import METHODS, options
from s2ft.methods.spectral import prior_rank_arg
from s2ft.options import Option
from s2ft.tasks import TASKS, RunError, task_options


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fails the test if a job gets as far as loading data or a model."""

    def never(*args, **kwargs):
        raise AssertionError("the job ran")

    for task in TASKS.values():
        monkeypatch.setattr(type(task), "load_data", never)
        monkeypatch.setattr(type(task), "load_model", never)


def _flags(parser: argparse.ArgumentParser, command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {s: a for a in sub._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def _value(option: Option) -> list[str]:
    """A valid command-line value of ``option`` (its flag alone for a switch)."""
    if option.type is bool:
        return [option.flag]
    if option.choices:
        return [option.flag, str(option.choices[-1])]
    return [option.flag, {int: "2", float: "0.5", str: "x", prior_rank_arg: "2"}[option.type]]


def test_every_flag_comes_from_one_declaration():
    declared = all_options()
    assert set(declared) == {f.name for f in dataclasses.fields(FinetuneArgs)}
    assert {f.name for f in dataclasses.fields(JobArgs)} == {o.name for o in JOB_OPTIONS} | set(
        task_options()
    )
    assert {"text_column", "image_column", "label_column", "quantize"} == set(task_options())
    parser = build_parser()
    for command in ("finetune", "compare", "analyze"):
        flags = _flags(parser, command)
        for option in declared.values():
            if command in option.commands:
                action = flags[option.flag]
                assert action.dest == option.name and action.default == option.default, option.name
                assert option.type is bool or tuple(action.choices or ()) == tuple(option.choices or ())
    # the defaults of the fields are those of the flags
    parsed = vars(parser.parse_args(["finetune"]))
    assert {k: parsed[k] for k in declared if k in parsed} == {
        k: v for k, v in dataclasses.asdict(FinetuneArgs()).items() if k in parsed
    }


def test_checks_come_from_the_declarations():
    with pytest.raises(RunError, match="--batch-size must be positive, got 0"):
        FinetuneArgs(batch_size=0).resolved()
    with pytest.raises(RunError, match="--warmup-ratio must be a number in"):
        FinetuneArgs(warmup_ratio=1.0).resolved()
    with pytest.raises(RunError, match="--lr-schedule must be one of linear, cosine, constant"):
        FinetuneArgs(lr_schedule="step").resolved()
    with pytest.raises(RunError, match="--targets needs at least one module name"):
        FinetuneArgs(targets=[]).resolved()
    with pytest.raises(RunError, match="--quantize must be one of"):
        FinetuneArgs(task="causal-lm", quantize="2bit").resolved()


@pytest.mark.parametrize("method", list(METHODS))
def test_an_option_of_another_method_is_refused_for_every_method(method, nothing_loads, capsys):
    mine = {o.name for o in METHODS[method].options}
    others = [o for name, o in options().items() if name not in mine]
    assert others or method == "s2ft"
    for option in others:
        assert main(["finetune", "--method", method, *_value(option)]) == 2, option.name
        err = capsys.readouterr().err
        assert f"error: {option.flag} is for " in err and f"--method is {method!r}" in err, err
        assert len(err.strip().splitlines()) == 1
        # the Python API refuses a value other than the default the same way
        if option.type is not bool:
            value = option.choices[0] if option.choices and option.choices[0] != option.default else 2
            with pytest.raises(RunError, match=f"{option.flag} is for "):
                FinetuneArgs(method=method, **{option.name: value}).resolved()


def test_an_option_given_at_its_default_is_refused_too(nothing_loads, capsys):
    # the cases: accepted and ignored with fourierft before
    for argv in (["--prior", "adam"], ["--plan-from", "prior"], ["--calibration-group-size", "2"]):
        assert main(["finetune", "--method", "fourierft", *argv]) == 2
        # the S2FT recipe's options, which both S2FT methods (Fourier and wavelet bases) take
        assert f"{argv[0]} is for S2FT and S2FT (wavelet); --method is 'fourierft'" in capsys.readouterr().err


def test_options_that_do_not_apply_are_recorded_as_none():
    args = FinetuneArgs(method="fourierft").resolved()
    assert args.prior is None and args.plan_from is None and args.lora_r is None
    assert args.n_frequency == 1000 and args.image_column is None and args.text_column == "text"
    # a run.json of an earlier version recorded them (with any value given): they are dropped when read back
    recorded = {**dataclasses.asdict(args), "prior": "gradient", "image_column": "img"}
    kept = applicable(recorded)
    assert "prior" not in kept and "image_column" not in kept and kept["n_frequency"] == 1000
    FinetuneArgs(**kept).resolved()


@pytest.mark.parametrize(
    ("task", "argv"),
    [
        ("causal-lm", ["--text-column", "body"]),
        ("causal-lm", ["--label-column", "y"]),
        ("text-classification", ["--image-column", "img"]),
        ("image-classification", ["--quantize", "8bit"]),
    ],
)
def test_an_option_of_another_task_is_refused(task, argv, nothing_loads, capsys):
    assert main(["finetune", "--task", task, *argv]) == 2
    assert f"error: {argv[0]} is for the " in capsys.readouterr().err


def test_compare_gives_each_variant_the_options_it_takes(nothing_loads, capsys, tmp_path):
    base = FinetuneArgs(gamma=2.0, lora_r=4, n_frequency=64)
    assert variant_args(base, "s2ft", 0, "out").gamma == 2.0
    fourierft = variant_args(base, "fourierft", 0, "out")
    assert fourierft.gamma is None and fourierft.lora_r is None and fourierft.n_frequency == 64
    assert variant_args(base, "lora", 0, "out").lora_r == 4
    # an option none of the variants takes is refused
    argv = ["compare", "--variants", "fourierft", "s2ft", "--lora-r", "4", "--output", str(tmp_path / "c")]
    assert main(argv) == 2
    assert "--lora-r is for LoRA (PEFT); none of --variants runs it" in capsys.readouterr().err
    assert main(["analyze", "--lora-r", "4", "--output", str(tmp_path / "a")]) == 2
    assert "--lora-r is for LoRA (PEFT); analyze measures S2FT's plan" in capsys.readouterr().err


def test_full_finetuning_of_a_quantized_base_is_refused(nothing_loads, capsys):
    """It trained only the unquantized parameters (embeddings, norms, head) and wrote a run that could not be
    evaluated or merged."""
    with pytest.raises(
        RunError, match="--quantize 4bit keeps the base's linear weights quantized and frozen"
    ):
        FinetuneArgs(task="causal-lm", method="full", quantize="4bit").resolved()
    assert main(["finetune", "--task", "causal-lm", "--quantize", "4bit", "--method", "full"]) == 2
    err = capsys.readouterr().err
    assert "leave --quantize out to train every weight, or choose an adapter method" in err
    FinetuneArgs(task="causal-lm", method="lora", quantize="4bit").resolved()  # adapters train on it
