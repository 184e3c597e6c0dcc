"""benchmarks/llm_scale.py's sketched calibration rows (``--prior-ranks``) on its tiny size, in this process."""

from __future__ import annotations

import json

from tests.helpers import load_benchmark


def test_tiny_run_measures_the_sketched_calibrations(tmp_path):
    script = load_benchmark("llm_scale")
    argv = ["--sizes", "tiny", "--quant", "none", "--targets", "qv", "--methods", "s2ft", "lora-8"]
    argv += ["--seq-len", "16", "--steps", "1", "--calibration-batches", "2", "--group-size", "0"]
    argv += ["--prior-ranks", "4", "1000", "--skip-exact-s2ft", "--cpu-time", "--sketch-squares", "exact"]
    import s2ft.tuner.calibration as calibration

    before = calibration.SKETCH_SQUARES
    report = script.main([*argv, "--in-process", "--output-dir", str(tmp_path)])
    assert before == calibration.SKETCH_SQUARES  # set for the measurements only

    with open(tmp_path / "llm_scale.json") as f:
        saved = json.load(f)
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    rows = {r["method"]: r for r in saved["rows"]}
    assert rows["s2ft"]["status"] == "skipped"
    sketched = rows["s2ft"]["calibration_sketched"]
    assert [s["prior_rank"] for s in sketched] == [4, 1000]  # 1000: clamped to each layer's min(d_out, d_in)
    lora = rows["lora-8"]
    for s in sketched:
        assert s["status"] == "ok", s
        assert s["calibration_s"] > 0 and s["calibration_peak_bytes"] >= 0
        assert s["time_ratio"] == s["calibration_s"] / (2 * lora["step_s"])
        assert set(s["targets_met"]) == {"peak", "time"}
    text = (tmp_path / "llm_scale.md").read_text()
    assert "## Sketched calibration (`S2FTConfig.prior_rank`)" in text
    assert "| tiny | none | qv | 4 |" in text and "| tiny | none | qv | 1000 |" in text
    assert "| none | qv | s2ft | skipped: --skip-exact-s2ft |" in text
    assert "This s2ft: co-range width l = 96 at k = 64, sketches held in bfloat16 for a 16-bit layer." in text
    assert "The Adam prior's squares: exact (`--sketch-squares`)." in text
    assert "(times in process CPU seconds, `--cpu-time`" in text


def test_tiny_run_with_a_sketched_s2ft_row_trains_after_its_sketched_calibration(tmp_path):
    """``--s2ft-prior-rank``: the S2FT row itself calibrates with the sketched prior, then takes its steps; its
    calibration time is set against as many LoRA r = 8 steps as batches."""
    script = load_benchmark("llm_scale")
    argv = ["--sizes", "tiny", "--quant", "none", "--targets", "qv", "--methods", "s2ft", "lora-8"]
    argv += ["--seq-len", "16", "--steps", "1", "--calibration-batches", "2", "--group-size", "0"]
    argv += ["--s2ft-prior-rank", "4"]
    script.main([*argv, "--in-process", "--output-dir", str(tmp_path)])
    with open(tmp_path / "llm_scale.json") as f:
        rows = {r["method"]: r for r in json.load(f)["rows"]}
    s2ft, lora = rows["s2ft"], rows["lora-8"]
    assert s2ft["status"] == "ok" and s2ft["s2ft_prior_rank"] == 4 and s2ft["step_s"] > 0
    assert s2ft["ratios"]["calibration_time"] == s2ft["calibration_s"] / (2 * lora["step_s"])
    assert set(s2ft["targets_met"]) >= {"calibration", "calibration time"}
    assert "the S2FT row's calibration is sketched, rank 4" in (tmp_path / "llm_scale.md").read_text()


def test_memory_profile_reports_what_the_sketches_hold(capsys):
    """``sketch_calibration_profile.py --memory`` on a tiny Llama: per shape the sketches' bytes, which add up to
    the prior-sized peak, bfloat16 for bfloat16 layers and W (k + p) x d_in at the default co-range width; the
    calibration's classes as they were afterwards."""
    import s2ft.tuner.calibration as calibration
    from s2ft.ops.sketch import corange_width

    before = dict(calibration.SKETCHED_STRATEGIES), calibration.SketchedGradientPrior.add_call
    script = load_benchmark("sketch_calibration_profile")
    argv = ["--memory", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--layers", "1"]
    script.main([*argv, "--batches", "1", "--seq-len", "16", "--rank", "4"])
    text = capsys.readouterr().out
    width = corange_width(4, 64)
    assert f"| Y (64 x 4, bfloat16), 64 x 64 layers | {4 * 64 * 4 * 2 / 2**20:.2f} |" in text  # q, k, v, o
    assert f"| W ({width} x 64, bfloat16), 64 x 64 layers | {4 * width * 64 * 2 / 2**20:.2f} |" in text
    assert "| one plain forward and backward pass |" in text and "| planning |" in text
    assert (dict(calibration.SKETCHED_STRATEGIES), calibration.SketchedGradientPrior.add_call) == before
