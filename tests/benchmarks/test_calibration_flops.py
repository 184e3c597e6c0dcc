"""benchmarks/calibration_flops.py on llm_scale's tiny Llama (meta device): the counts by dtype against formulas."""

from __future__ import annotations

import pytest
import torch

from s2ft.ops.sketch import corange_width
from tests.helpers import load_benchmark

# the tiny size: hidden 64, intermediate 128, 2 decoder layers, 4 heads of 16 (no grouped keys)
SHAPES = [(64, 64)] * 4 + [(128, 64), (128, 64), (64, 128)]  # q, k, v, o; gate, up; down: (d_out, d_in)


def _extra(tokens: int, rank: int, squares: str) -> int:
    """The flops a sketched Adam calibration adds per decoder layer in bfloat16: with exact squares their ``δᵀx`` a
    block of rows at a time (with sketched squares, none), and the two sketches (``δᵀ(xΩ)``, ``(Ψδᵀ)x``), the wide
    side along the rows."""
    total = 0
    for d_out, d_in in SHAPES:
        rows, cols = max(d_out, d_in), min(d_out, d_in)  # sketched transposed when d_out < d_in
        k = min(rank, d_out, d_in)
        width = corange_width(k, rows)
        total += 2 * tokens * d_out * d_in if squares == "exact" else 0  # the squares
        total += 2 * tokens * cols * k + 2 * tokens * k * rows  # Y = g Ω (g: rows x cols)
        total += 2 * width * rows * tokens + 2 * width * tokens * cols  # W = Ψ g
    return total


@pytest.mark.parametrize("squares", ["exact", "sketch"])
def test_counts_by_dtype_on_the_tiny_size(tmp_path, squares):
    script = load_benchmark("calibration_flops")
    tokens, rank = 32, 8
    lora = script.lora_step("tiny", "all-linear", tokens)
    wide = script.calibration_batch("tiny", "all-linear", tokens, rank, False, squares)
    narrow = script.calibration_batch("tiny", "all-linear", tokens, rank, True, squares)
    # PEFT keeps its adapters in float32 (autocast_adapter_dtype): x A and (x A) B, run twice (checkpointing), and
    # their two gradients each, in float32 (at most: autograd skips an input gradient nothing needs); the rest of
    # the step in bfloat16
    layers = 2 * sum(8 * tokens * 8 * (d_out + d_in) for d_out, d_in in SHAPES)
    assert 0.9 * layers <= lora[torch.float32] <= layers and lora[torch.bfloat16] > lora[torch.float32]
    assert narrow.get(torch.float32, 0) == 0 and wide[torch.float32] > 0
    # the same pass either way; the products all move from float32 to bfloat16
    assert narrow[torch.bfloat16] - wide[torch.bfloat16] == 2 * _extra(tokens, rank, squares)
    assert narrow[torch.bfloat16] + narrow.get(torch.float32, 0) > lora[torch.bfloat16]
    out = tmp_path / "flops.md"
    script.main(["--sizes", "tiny", "--targets", "qv", "--tokens", "16", "--rank", "4", "--output", str(out)])
    assert "| tiny | qv | 16 |" in out.read_text()
