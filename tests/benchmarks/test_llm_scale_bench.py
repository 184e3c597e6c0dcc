"""benchmarks/llm_scale.py on its tiny size, in this process: every row measured, both files written."""

from __future__ import annotations

import json

from tests.helpers import load_benchmark


def test_tiny_run_writes_the_table_and_the_json(tmp_path):
    script = load_benchmark("llm_scale")
    argv = [
        "--sizes",
        "tiny",
        "--quant",
        "none",
        "--targets",
        "qv",
        "--methods",
        "s2ft",
        "fourierft",
        "lora-8",
    ]
    argv += ["--seq-len", "16", "--steps", "1", "--calibration-batches", "1", "--group-size", "1"]
    report = script.main([*argv, "--in-process", "--output-dir", str(tmp_path)])

    with open(tmp_path / "llm_scale.json") as f:
        saved = json.load(f)
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    rows = {r["method"]: r for r in saved["rows"]}
    assert set(rows) == {"s2ft", "fourierft", "lora-8"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["params"] == 210_240
        assert row["step_s"] > 0 and row["peak_step_bytes"] >= 0
        assert row["trainable_params"] > 0 and row["adapter_bytes"] > 0
    assert rows["lora-8"]["ratios"]["step_s"] == 1.0
    assert rows["s2ft"]["calibration_s"] > 0
    assert "memory" in rows["s2ft"]["targets_met"] and "calibration" in rows["s2ft"]["targets_met"]
    if script.has_group_size():
        assert rows["s2ft"]["calibration_grouped"]["status"] == "ok"
        assert rows["s2ft"]["calibration_grouped"]["group_size"] == 1

    text = (tmp_path / "llm_scale.md").read_text()
    assert "## tiny: 210,240 parameters" in text
    assert "| none | qv | s2ft | 4,000 |" in text
    assert "PASS" in text or "MISS" in text
