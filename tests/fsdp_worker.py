"""Run by tests/test_fsdp.py as two gloo processes (``torchrun --nproc_per_node 2``) on a tiny Llama sharded with
FSDP2 (``fully_shard`` on each decoder layer and on the :class:`s2ft.SpectralModel`): calibrate on this rank's
share of the batches, calibrate with uneven batches (must fail on every rank), train a few steps, save, reload,
try to merge, and train and save a FourierFT adapter in both formats. Each rank writes what it saw to ``{out}/rank{r}.pt``."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_llama  # noqa: E402
from s2ft import FourierFTConfig, S2FTConfig, SpectralModel, get_spectral_model  # noqa: E402
from s2ft.tuner.distributed import full  # noqa: E402

STEPS, LR = 3, 0.05


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


def shard(model: SpectralModel) -> SpectralModel:
    for block in model.get_base_model().model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def plans(model: SpectralModel) -> dict[str, dict[str, torch.Tensor]]:
    keys = ("rows", "cols", "perm_rows", "perm_cols")
    return {n: {k: getattr(layer, k).clone() for k in keys} for n, layer in model.spectral_layers().items()}


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


SKETCH_RANK = 4  # the sketched prior's rank in sketched_calibration


def sketched_calibration(model: SpectralModel, mine: list[dict[str, torch.Tensor]]) -> dict:
    """Calibrate with a sketched prior (``prior_rank=SKETCH_RANK``, sketches all-reduced) on this rank's batches,
    then with ranks that disagree (an error on every rank, the plans unchanged), then with the exact prior again."""
    seen: dict = {}
    config = model.peft_config["default"]
    config.prior_rank = SKETCH_RANK
    model.calibrate(mine)
    seen["sketched_plans"] = plans(model)
    config.prior_rank = SKETCH_RANK + dist.get_rank()
    try:
        model.calibrate(mine)
    except ValueError as error:
        seen["rank_error"] = str(error)
    seen["plans_after_rank_error"] = plans(model)
    config.prior_rank = None
    model.calibrate(mine)
    return seen


def single_sketched_plans() -> dict[str, dict[str, torch.Tensor]]:
    """One process's sketched plans from all the calibration batches."""
    model = get_spectral_model(tiny_llama(), config())
    model.peft_config["default"].prior_rank = SKETCH_RANK
    model.calibrate(batches(4, seed=0))
    return plans(model)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    seen: dict = {}
    model = shard(get_spectral_model(tiny_llama(), config()))

    # 1. calibration from this rank's share of the batches; then uneven shares: an error on every rank
    model.calibrate(batches(4, seed=0)[rank::world])
    seen["plans"] = plans(model)
    uneven = batches(3, seed=1)[: 2 - rank]  # rank 0: two batches, rank 1: one
    try:
        model.calibrate(uneven)
    except ValueError as error:
        seen["uneven_error"] = str(error)
    seen["plans_after_uneven"] = plans(model)
    seen.update(sketched_calibration(model, batches(4, seed=0)[rank::world]))

    # 2. training: each rank takes half of each step's batch
    steps = [{k: v.chunk(world)[rank] for k, v in b.items()} for b in batches(STEPS, seed=2)]
    train(model, steps)
    seen["coeffs"] = coefficients(model)

    # 3. save: rank 0 writes the gathered adapter, the others wait for it
    model.save_pretrained(f"{out}/adapter")
    seen["saved_when_done"] = sorted(os.listdir(f"{out}/adapter"))  # every rank sees the finished folder

    # 4. merging a sharded model is refused, the model left as it was
    try:
        model.merge_and_unload()
    except RuntimeError as error:
        seen["merge_error"] = str(error)
    seen["spectral_after_merge"] = len(model.spectral_layers())

    # 5. resume: load the saved adapter into a fresh model, shard it, compare and train one more step on both
    resumed = shard(SpectralModel.from_pretrained(tiny_llama(), f"{out}/adapter", is_trainable=True))
    seen["resumed_coeffs"] = coefficients(resumed)
    try:  # adapters added after sharding would train unsharded: refused
        resumed.add_adapter("other", config())
    except RuntimeError as error:
        seen["add_error"] = str(error)
    seen["replan"] = resumed.replan()  # re-planned from the trained ΔW, gathered layer by layer
    seen["replanned"] = {"plans": plans(resumed), "coeffs": coefficients(resumed)}

    # 6. FourierFT: trains the same way, and saves in s2ft's and PEFT's formats
    fourierft = shard(get_spectral_model(tiny_llama(), fourierft_config()))
    train(fourierft, steps)
    seen["fourierft_coeffs"] = coefficients(fourierft)
    fourierft.save_pretrained(f"{out}/fourierft")
    fourierft.save_pretrained(f"{out}/fourierft-peft", format="peft")
    torch.save(seen, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
