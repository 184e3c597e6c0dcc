"""What the FSDP and DeepSpeed workers (fsdp_worker.py, deepspeed_worker.py) share: the model, batches and configs,
the steps each rank takes and records, the Adam of one process; and what their tests share: the ``torchrun``
launch, the one-process reference and the comparisons.

A worker runs as a script (``torchrun tests/distributed/<name>_worker.py OUT``), so it puts :data:`ROOT` on
``sys.path`` before importing this module as ``tests.distributed.common``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from s2ft import FourierFTConfig, S2FTConfig, SpectralModel, get_spectral_model
from s2ft.tuner.distributed import full
from tests.helpers import tiny_llama

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS, LR = 3, 0.05
PLAN_KEYS = ("rows", "cols", "perm_rows", "perm_cols")


def config() -> S2FTConfig:
    return S2FTConfig(target_modules=["q_proj", "v_proj"], n_frequency=20, seed=3)


def fourierft_config() -> FourierFTConfig:
    return FourierFTConfig(target_modules=["q_proj", "v_proj"], n_frequency=20, scaling=50.0)


def batches(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` causal-LM batches ``(2, 8)``, the same in every process for a seed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 64, (2, 8), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def plans(model: SpectralModel) -> dict[str, dict[str, torch.Tensor]]:
    return {
        n: {k: getattr(layer, k).clone() for k in PLAN_KEYS} for n, layer in model.spectral_layers().items()
    }


def coefficients(model: SpectralModel) -> dict[str, torch.Tensor]:
    """Every layer's coefficients, gathered whole (a collective; FSDP's DTensor or DeepSpeed's partitioned
    parameter itself, not a detached view)."""
    return {n: full(layer.coeffs).detach().clone() for n, layer in model.spectral_layers().items()}


def train(model: SpectralModel, steps: list[dict[str, torch.Tensor]]) -> None:
    """Adam on the coefficients, one batch per step (under FSDP: this rank's share of the step's batch)."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    for batch in steps:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


# --------------------------------------------------------------------------------------- the steps of a worker
def calibrate_share(model: SpectralModel, rank: int, world: int, seen: dict[str, Any]) -> None:
    """Calibrates on this rank's share of the batches, then on uneven shares (rank 0: two batches, rank 1: one),
    which must fail on every rank and change nothing."""
    model.calibrate(batches(4, seed=0)[rank::world])
    seen["plans"] = plans(model)
    try:
        model.calibrate(batches(3, seed=1)[: 2 - rank])
    except ValueError as error:
        seen["uneven_error"] = str(error)
    seen["plans_after_uneven"] = plans(model)


SKETCH_RANK = 4  # the sketched prior's rank in sketched_calibration


def sketched_calibration(model: SpectralModel, mine: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Calibrate with a sketched prior (``prior_rank=SKETCH_RANK``, sketches all-reduced) on this rank's batches,
    then with ranks that disagree (an error on every rank, the plans unchanged), then with the config's own prior
    setting again."""
    import torch.distributed as dist

    seen: dict[str, Any] = {}
    config = model.peft_config["default"]
    own = config.prior_rank
    config.prior_rank = SKETCH_RANK
    model.calibrate(mine)
    seen["sketched_plans"] = plans(model)
    config.prior_rank = SKETCH_RANK + dist.get_rank()
    try:
        model.calibrate(mine)
    except ValueError as error:
        seen["rank_error"] = str(error)
    seen["plans_after_rank_error"] = plans(model)
    config.prior_rank = own
    model.calibrate(mine)
    return seen


def single_sketched_plans() -> dict[str, dict[str, torch.Tensor]]:
    """One process's sketched plans from all the calibration batches."""
    model = get_spectral_model(tiny_llama(), config())
    model.peft_config["default"].prior_rank = SKETCH_RANK
    model.calibrate(batches(4, seed=0))
    return plans(model)


def rank_steps(rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """This rank's half of each training step's batch."""
    return [{k: v.chunk(world)[rank] for k, v in b.items()} for b in batches(STEPS, seed=2)]


def save(model: SpectralModel, out: str, seen: dict[str, Any]) -> None:
    """Saves the gathered adapter (rank 0 writes, the others wait) and records what every rank then sees."""
    model.save_pretrained(f"{out}/adapter")
    seen["saved_when_done"] = sorted(os.listdir(f"{out}/adapter"))


def save_fourierft(fourierft: SpectralModel, out: str, seen: dict[str, Any]) -> None:
    """Records the trained FourierFT adapter's coefficients and saves it in s2ft's and PEFT's formats."""
    seen["fourierft_coeffs"] = coefficients(fourierft)
    fourierft.save_pretrained(f"{out}/fourierft")
    fourierft.save_pretrained(f"{out}/fourierft-peft", format="peft")


# ------------------------------------------------------------------------------------------ the tests' side
def launch(worker: str, out: Path, port: int, timeout: int, **env: str) -> list[dict[str, Any]]:
    """Runs ``worker`` (a file beside this one) as two processes under ``torchrun``; what each rank saw."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
    ]
    subprocess.run([*command, os.path.join(HERE, worker), str(out)], env=env, check=True, timeout=timeout)
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def single_process() -> tuple[SpectralModel, dict[str, dict[str, torch.Tensor]]]:
    """One process: calibrated on all the workers' calibration batches, then trained on whole batches."""
    model = get_spectral_model(tiny_llama(), config())
    model.calibrate(batches(4, seed=0))
    planned = plans(model)
    train(model, batches(STEPS, seed=2))
    return model, planned


def assert_same_plans(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for key in PLAN_KEYS:
            assert torch.equal(a[name][key], b[name][key]), (name, key)


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (safe_open is no dict)


def check_sketched_calibration(rank0: dict[str, Any], rank1: dict[str, Any]) -> None:
    """What both ranks saw in :func:`sketched_calibration`: the plans of one process over all the batches on
    every rank, and the disagreeing-rank error on every rank with the plans unchanged."""
    assert_same_plans(rank0["sketched_plans"], rank1["sketched_plans"])
    assert_same_plans(rank0["sketched_plans"], single_sketched_plans())
    for seen in (rank0, rank1):
        assert "processes disagree on prior_rank" in seen["rank_error"]
        assert_same_plans(seen["plans_after_rank_error"], seen["sketched_plans"])


def check_fourierft_saves(
    rank_results: tuple[dict[str, Any], dict[str, Any]], out: Path, tmp_path: Path
) -> None:
    """FourierFT trained across two ranks: both ranks hold one process's coefficients for the whole batch, and rank
    0's s2ft and PEFT files equal what one process writes for them."""
    rank0, rank1 = rank_results
    model = get_spectral_model(tiny_llama(), fourierft_config())
    train(model, batches(STEPS, seed=2))
    for name, layer in model.spectral_layers().items():
        assert torch.equal(rank0["fourierft_coeffs"][name], rank1["fourierft_coeffs"][name])
        assert layer.coeffs.abs().max() > 0.05
        torch.testing.assert_close(
            rank0["fourierft_coeffs"][name], layer.coeffs.detach(), atol=1e-5, rtol=1e-4
        )
        with torch.no_grad():
            layer.coeffs.copy_(rank0["fourierft_coeffs"][name])
    model.save_pretrained(tmp_path / "s2ft")
    model.save_pretrained(tmp_path / "peft", format="peft")
    for ours, theirs in ((out / "fourierft", tmp_path / "s2ft"), (out / "fourierft-peft", tmp_path / "peft")):
        (weights,) = [f for f in os.listdir(theirs) if f.endswith(".safetensors")]
        distributed, one = read_weights(ours / weights), read_weights(theirs / weights)
        assert distributed[1] == one[1] and distributed[0].keys() == one[0].keys()
        for key, tensor in one[0].items():
            assert torch.equal(tensor, distributed[0][key]), key


def check_training_matches_one_process(
    rank_results: tuple[dict[str, Any], dict[str, Any]], model: SpectralModel
) -> None:
    """Both ranks hold the coefficients that ``model`` (one process, the whole batch) trained."""
    rank0, rank1 = rank_results
    for name, layer in model.spectral_layers().items():
        assert torch.equal(rank0["coeffs"][name], rank1["coeffs"][name])
        assert layer.coeffs.abs().max() > 0.05  # it trained
        torch.testing.assert_close(rank0["coeffs"][name], layer.coeffs.detach(), atol=1e-5, rtol=1e-4)


def check_rank0_file(rank_results: tuple[dict[str, Any], dict[str, Any]], out: Path, tmp_path: Path) -> None:
    """Only once training is done do both ranks see the adapter's two files, and rank 0's are what one process
    writes for its plans and coefficients (the same config bytes, tensors, dtypes and metadata)."""
    rank0, rank1 = rank_results
    assert (
        rank0["saved_when_done"]
        == rank1["saved_when_done"]
        == ["adapter_config.json", "adapter_model.safetensors"]
    )
    model = get_spectral_model(tiny_llama(), config())
    with torch.no_grad():
        for name, layer in model.spectral_layers().items():
            plan = rank0["plans"][name]
            layer.set_locations(plan["rows"], plan["cols"], plan["perm_rows"], plan["perm_cols"])
            layer.coeffs.copy_(rank0["coeffs"][name])
    model.save_pretrained(tmp_path / "one")
    name = "adapter_config.json"
    assert (out / "adapter" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    distributed, one = (
        read_weights(folder / "adapter_model.safetensors") for folder in (out / "adapter", tmp_path / "one")
    )
    assert (
        distributed[1] == one[1]
    )  # metadata (safetensors writes its keys in an order that varies by process)
    assert distributed[0].keys() == one[0].keys()
    for key, tensor in one[0].items():
        assert tensor.dtype == distributed[0][key].dtype and torch.equal(tensor, distributed[0][key]), key
