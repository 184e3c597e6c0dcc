"""benchmarks/pair_runs.py: paired differences across budgets or folders, signed by the metric's direction."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_benchmark


def write_runs(root, prefix, key, values, nbytes):
    for seed, value in enumerate(values):
        folder = root / f"{prefix}-seed{seed}"
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps({key: value, "adapter_bytes": nbytes}))
    return str(root / prefix)


def row(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1].split(" | ")


def test_accuracy_higher_is_better(tmp_path, capsys):
    script = load_benchmark("pair_runs")
    a = write_runs(tmp_path, "a", "test_accuracy", [0.5, 0.4, 0.7], 100)
    b = write_runs(tmp_path, "b", "test_accuracy", [0.4, 0.5, 0.6], 200)
    assert script.main([a, b]) == 0
    cells = row(capsys)
    assert cells[6] == "+0.1000, -0.1000, +0.1000" and cells[7] == "+0.0333" and cells[8] == "2 of 3 |"
    assert cells[4:6] == ["100", "200"]


def test_perplexity_lower_is_better_and_mixed_metrics_refused(tmp_path, capsys):
    script = load_benchmark("pair_runs")
    a = write_runs(tmp_path, "a", "test_perplexity", [40.0, 41.0, 43.0], 1)
    b = write_runs(tmp_path, "b", "test_perplexity", [41.0, 40.0, 44.0], 1)
    assert script.main([a, b]) == 0
    assert row(capsys)[-1] == "2 of 3 |"
    c = write_runs(tmp_path, "c", "test_accuracy", [0.5, 0.5, 0.5], 1)
    with pytest.raises(SystemExit, match="different metrics"):
        script.main([a, c])
    with pytest.raises(SystemExit, match="cannot read"):
        script.main([a, str(tmp_path / "missing")])
