"""Bytes of an S2FT plan as stored today (smallest integer dtype) against the compact codec (``s2ft.ops.codec``).

For the three default jobs' adapted shapes (MiniLM-L6 ``query``/``value``: 12 x 384x384; SmolLM2-135M ``q_proj``
576x576 and ``v_proj`` 192x576 x 30 layers; EfficientNet-Lite0's 21 pointwise convolutions) and n = 100, 300,
1000: the bytes of the locations and of the permutations, today's against the codec's against the information bound
(``log2 C(d_out d_in, n)`` and ``log2(d!)``), the codec's encode and decode time over all matrices (1 thread), and
the safetensors files an adapter would be with 16-bit coefficients: FourierFT (coefficients and new head), S2FT
today, and S2FT with the codec (one tensor per part, or the plan as one tensor per matrix). The plans are random
(uniform locations, uniform permutations): the codec's sizes depend on the plan only through its shape, up to ~1%.
Writes ``benchmarks/results/cpu/plan_codec.md``.

    python benchmarks/plan_codec.py          # ~20 s on 1 CPU thread
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import save

from s2ft.io import atomic_write_text
from s2ft.ops.codec import (
    decode_locations,
    decode_permutation,
    encode_locations,
    encode_permutation,
    locations_bound_bits,
    permutation_bound_bits,
)
from s2ft.ops.locations import smallest_int_dtype

EFFICIENTNET = (  # (out, in) of blocks 6-15's expand/project 1x1 convolutions and the head convolution
    [(480, 80), (80, 480)] * 2
    + [(480, 80), (112, 480)]
    + [(672, 112), (112, 672)] * 2
    + [(672, 112), (192, 672)]
    + [(1152, 192), (192, 1152)] * 3
    + [(1152, 192), (320, 1152), (1280, 320)]
)
JOBS = {  # name -> (matrices as (module name, (d_out, d_in)), new head parameters in float32)
    "text (MiniLM q/v)": (
        [
            (f"bert.encoder.layer.{i}.attention.self.{m}", (384, 384))
            for i in range(6)
            for m in ("query", "value")
        ],
        {"modules_to_save.classifier.weight": (6, 384), "modules_to_save.classifier.bias": (6,)},
    ),
    "causal LM (SmolLM2 q/v)": (
        [
            (f"model.layers.{i}.self_attn.{m}", shape)
            for i in range(30)
            for m, shape in (("q_proj", (576, 576)), ("v_proj", (192, 576)))
        ],
        {},
    ),
    "image (EfficientNet 1x1)": (
        [
            (f"backbone._blocks.{i // 2 + 6}._{('expand', 'project')[i % 2]}_conv", s)
            for i, s in enumerate(EFFICIENTNET[:-1])
        ]
        + [("backbone._conv_head", EFFICIENTNET[-1])],
        {"modules_to_save.classifier.weight": (10, 1280), "modules_to_save.classifier.bias": (10,)},
    ),
}
NS = (100, 300, 1000)


def random_plan(d_out: int, d_in: int, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    flat = torch.randperm(d_out * d_in, generator=generator)[:n]
    return {
        "rows": flat // d_in,
        "cols": flat % d_in,
        "perm_rows": torch.randperm(d_out, generator=generator),
        "perm_cols": torch.randperm(d_in, generator=generator),
    }


def today_parts(plan: dict[str, torch.Tensor], d_out: int, d_in: int) -> dict[str, torch.Tensor]:
    """The plan as ``adapter_state_dict`` stores it today: every index in the smallest integer dtype."""
    rows_dtype, cols_dtype = smallest_int_dtype(d_out - 1), smallest_int_dtype(d_in - 1)
    return {
        "rows": plan["rows"].to(rows_dtype),
        "cols": plan["cols"].to(cols_dtype),
        "perm_rows": plan["perm_rows"].to(rows_dtype),
        "perm_cols": plan["perm_cols"].to(cols_dtype),
    }


def measure(job: str, n: int, seed: int = 0) -> dict:
    """Byte counts, bounds, times and projected file sizes of one job's adapter at ``n`` coefficients."""
    matrices, head = JOBS[job]
    generator = torch.Generator().manual_seed(seed)
    out = {"job": job, "n": n, "matrices": len(matrices), "encode_s": 0.0, "decode_s": 0.0}
    out.update(loc_today=0, loc_codec=0, loc_bound=0.0, perm_today=0, perm_codec=0, perm_bound=0.0)
    head_state = {k: torch.zeros(shape) for k, shape in head.items()}
    files = {"fourierft": dict(head_state), "today": dict(head_state), "codec": dict(head_state)}
    files["codec-1"] = dict(head_state)
    for name, (d_out, d_in) in matrices:
        plan = random_plan(d_out, d_in, n, generator)
        coeffs = torch.randn(n, generator=generator).to(torch.float16)
        start = time.perf_counter()
        locations, order = encode_locations(plan["rows"], plan["cols"], d_out, d_in)
        perm_rows, perm_cols = encode_permutation(plan["perm_rows"]), encode_permutation(plan["perm_cols"])
        middle = time.perf_counter()
        rows, cols = decode_locations(locations, n, d_out, d_in)
        decoded = decode_permutation(perm_rows, d_out), decode_permutation(perm_cols, d_in)
        out["encode_s"] += middle - start
        out["decode_s"] += time.perf_counter() - middle
        if not (
            torch.equal(rows, plan["rows"][order])
            and torch.equal(cols, plan["cols"][order])
            and torch.equal(decoded[0], plan["perm_rows"])
            and torch.equal(decoded[1], plan["perm_cols"])
        ):
            raise AssertionError(f"{name}: the codec did not round-trip")
        today = today_parts(plan, d_out, d_in)
        out["loc_today"] += today["rows"].nbytes + today["cols"].nbytes
        out["perm_today"] += today["perm_rows"].nbytes + today["perm_cols"].nbytes
        out["loc_codec"] += locations.numel()
        out["perm_codec"] += perm_rows.numel() + perm_cols.numel()
        out["loc_bound"] += locations_bound_bits(n, d_out, d_in) / 8
        out["perm_bound"] += (permutation_bound_bits(d_out) + permutation_bound_bits(d_in)) / 8
        files["fourierft"][f"{name}.coeffs"] = coeffs
        files["today"].update({f"{name}.coeffs": coeffs} | {f"{name}.{k}": v for k, v in today.items()})
        files["codec"].update(
            {f"{name}.coeffs": coeffs[order], f"{name}.locations": locations}
            | {f"{name}.perm_rows": perm_rows, f"{name}.perm_cols": perm_cols}
        )
        files["codec-1"].update(
            {f"{name}.coeffs": coeffs[order], f"{name}.plan": torch.cat([perm_rows, perm_cols, locations])}
        )
    metadata = {
        "format": "pt",
        "s2ft_shapes": json.dumps([list(s) for _, s in sorted(matrices)], separators=(",", ":")),
    }
    for kind, state in files.items():
        out[f"file_{kind}"] = len(save(state, metadata=metadata))
    out["coeffs_fp16"] = 2 * n * len(matrices)
    out["head"] = sum(v.nbytes for v in head_state.values())
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "# The plan's bytes: today's encoding against the compact codec",
        "",
        "`python benchmarks/plan_codec.py` (1 CPU thread; random plans of each default job's adapted shapes; "
        "bytes summed over all adapted matrices). Locations: today two integers of the smallest dtype each, the "
        "codec Golomb-codes the sorted set; the bound is `log2 C(d_out·d_in, n)` per matrix. Permutations: today "
        "integers of the smallest dtype, the codec the Lehmer code's rank in `ceil(log2(d!)/8)` bytes; the bound "
        "is `log2(d!)`. Times: the codec's encode and decode of every matrix's plan.",
        "",
        "| job | n | locations today | codec | bound | permutations today | codec | bound | encode ms "
        "| decode ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['job']} | {r['n']} | {r['loc_today']:,} | {r['loc_codec']:,} | {r['loc_bound']:,.0f} "
            f"| {r['perm_today']:,} | {r['perm_codec']:,} | {r['perm_bound']:,.0f} "
            f"| {1e3 * r['encode_s']:.0f} | {1e3 * r['decode_s']:.0f} |"
        )
    lines += [
        "",
        "## Adapter files with float16 coefficients",
        "",
        "Sizes of the safetensors file (header included) with the job's module names and new head (float32). "
        "FourierFT stores the coefficients and the head. S2FT today adds `rows`, `cols`, `perm_rows`, `perm_cols` "
        "per matrix; with the codec `locations`, `perm_rows`, `perm_cols` (coefficients in the canonical order), "
        "or the three as one `plan` tensor per matrix (fewer header entries). × is the size over FourierFT's; "
        "floor × is FourierFT's file plus the plan's information content (both bounds), over FourierFT's: no "
        "encoding of a stored random plan goes below it.",
        "",
        "| job | n | coefficients | head | FourierFT | S2FT today | × | S2FT codec | × | codec, one plan "
        "tensor | × | floor × |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        four = r["file_fourierft"]
        lines.append(
            f"| {r['job']} | {r['n']} | {r['coeffs_fp16']:,} | {r['head']:,} | {four:,} "
            f"| {r['file_today']:,} | {r['file_today'] / four:.2f} | {r['file_codec']:,} "
            f"| {r['file_codec'] / four:.2f} | {r['file_codec-1']:,} | {r['file_codec-1'] / four:.2f} "
            f"| {(four + r['loc_bound'] + r['perm_bound']) / four:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="benchmarks/results/cpu/plan_codec.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(job, n) for job in JOBS for n in NS]
    text = markdown(rows)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    atomic_write_text(args.output, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
