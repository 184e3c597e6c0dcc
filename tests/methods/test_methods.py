"""Methods carry what is particular to them: options, budget, labels, compare variants, roles."""

from __future__ import annotations

import dataclasses

import pytest

from s2ft.cli import build_parser
from s2ft.jobs.args import FinetuneArgs, JobArgs
from s2ft.jobs.compare import VARIANTS, budgets_of, run_name, variant_args, variant_label
from s2ft.methods import (
    METHODS,
    after_warmup,
    full_method,
    options,
    owners,
    paired_baseline,
    planning_method,
)
from s2ft.tasks import RunError

# The method flags ``s2ft finetune`` had when cli.py declared them by hand, with their defaults.
FLAGS_BEFORE = {
    "n_frequency": None,
    "scaling": None,
    "gamma": 1.5,
    "permutation": "greedy",
    "locations": "prior",
    "prior": "adam",  # "gradient" until the default changed (issue 19)
    "prior_lr": None,
    "replan_at": 0.0,
    "calibration_batches": None,
    "lora_r": 8,
}


def test_method_options_are_job_fields_and_flags_with_the_same_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(FinetuneArgs)}
    common = {f.name for f in dataclasses.fields(JobArgs)}
    for name, option in options().items():
        assert name not in common and fields[name] == option.default, name
    parsed = vars(build_parser().parse_args(["finetune"]))
    for name, default in FLAGS_BEFORE.items():
        assert parsed[name] == default, name
    assert parsed["permute"] is True and FinetuneArgs().permute is True
    no_permute = build_parser().parse_args(["finetune", "--no-permute", "--gamma", "2", "--lora-r", "4"])
    assert (no_permute.permute, no_permute.gamma, no_permute.lora_r) == (False, 2.0, 4)


def test_each_method_declares_its_budget_among_its_options():
    for method in METHODS.values():
        names = {o.name for o in method.options}
        assert method.budget is None or method.budget in names, method.name
        assert (method.budget is None) == method.trains_everything, method.name


def test_options_are_validated_by_their_declarations():
    with pytest.raises(RunError, match="--gamma must be a finite number >= 0, got -1.0"):
        FinetuneArgs(gamma=-1.0).resolved()
    with pytest.raises(RunError, match="--lora-r must be positive, got 0"):
        FinetuneArgs(method="lora", lora_r=0).resolved()
    with pytest.raises(RunError, match="--prior must be one of gradient, adam, trajectory, got 'x'"):
        FinetuneArgs(prior="x").resolved()
    with pytest.raises(RunError, match="--permutation must be one of"):
        FinetuneArgs(permutation="shortest").resolved()
    with pytest.raises(RunError, match="--replan-at is for S2FT; --method is 'lora'"):
        FinetuneArgs(method="lora", replan_at=0.5).resolved()
    assert FinetuneArgs(replan_at=0.5).resolved().replan_at == 0.5


def test_prior_lr_defaults_to_the_tasks_full_finetuning_rate():
    assert FinetuneArgs().resolved().prior_lr == full_method().default_lr  # the text task sets no rates
    assert FinetuneArgs(task="image-classification").resolved().prior_lr == 1e-4  # its "full" rate
    assert FinetuneArgs(prior_lr=3e-3).resolved().prior_lr == 3e-3


def test_roles_are_found_by_behaviour():
    assert full_method().trains_everything and full_method().budget is None
    assert planning_method().plans and planning_method().config_class.planned
    assert paired_baseline().budget == "n_frequency"
    assert [m.name for m in owners("lora_r")] == ["lora"]
    # no method option changes a warmed head: the S2FT variants share one warm-up
    assert {"prior", "prior_lr", "replan_at", "gamma", "n_frequency", "lora_r"} <= after_warmup()


def test_every_variant_sets_only_options_its_method_or_every_job_has():
    common = {f.name for f in dataclasses.fields(JobArgs)}
    for name, variant in VARIANTS.items():
        mine = {o.name for o in variant.method.options}
        assert set(variant.overrides) <= mine | common, name
    ablations = [name for name, v in VARIANTS.items() if v.ablation]
    assert list(VARIANTS)[-len(ablations) :] == ablations  # ablations after every main variant


def test_labels_come_from_the_methods_and_name_the_budget():
    base = FinetuneArgs(n_frequency=64)
    labels = {name: variant_label(variant_args(base, name, 0, "out"), name) for name in VARIANTS}
    assert len(set(labels.values())) == len(labels)  # every row of a table is told apart
    for name, label in labels.items():
        method = VARIANTS[name].method
        assert label.startswith(method.label.split(" (")[0]), (name, label)
        if method.budget == "n_frequency":
            assert "n = 64" in label or "n = 32" in label, label
    assert labels["lora"] == "LoRA r = 8 (PEFT)" and labels["fourierft"] == "FourierFT, n = 64"
    assert labels["s2ft-uniform"] == "S2FT, n = 64, random locations"
    assert run_name("lora", 4, 1) == "lora-r4-seed1" and run_name("s2ft", 8, 0) == "s2ft-n8-seed0"
    assert budgets_of("lora", [8], [1, 2]) == [1, 2] and budgets_of("full", [8], [1]) == [None]


def test_every_variant_of_a_seed_shares_one_warmed_head():
    """The warm-up's cache key leaves out every method option (none affects the head): one warm-up per seed."""
    from s2ft.jobs.training import warmup_cache_key

    base = FinetuneArgs(n_frequency=64)
    keys = {name: warmup_cache_key(variant_args(base, name, 0, f"out/{name}")) for name in VARIANTS}
    assert len(set(keys.values())) == 1, keys
    assert warmup_cache_key(variant_args(base, "s2ft", 1, "out")) != keys["s2ft"]  # the seed changes the head
    assert (
        warmup_cache_key(variant_args(dataclasses.replace(base, head_lr=1e-2), "s2ft", 0, "o"))
        != keys["s2ft"]
    )


def test_no_method_is_named_outside_methods_and_the_config_classes():
    """The issue's check: outside s2ft/methods/ and config.py no code compares, looks up or sets a method by name
    (a task's per-method learning rates are dict keys, which are fine)."""
    import pathlib
    import re

    import s2ft

    names = "|".join(METHODS)
    patterns = [
        r"\bmethod\s*(==|!=)",
        rf"(==|!=)\s*[\"']({names})[\"']",
        rf"[\"']({names})[\"']\s*(==|!=)",
        rf"get_method\(\s*[\"']({names})[\"']",
        rf"\bmethod\s*=\s*[\"']({names})[\"']",
        r"\bmethod\s+(not\s+)?in\s*[(\[{]",
    ]
    root = pathlib.Path(s2ft.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith("methods/") or relative == "config.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(re.search(p, line) for p in patterns):
                found.append(f"{relative}:{number}: {line.strip()}")
    assert found == []
