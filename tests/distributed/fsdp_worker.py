"""Run by tests/distributed/test_fsdp.py as two gloo processes (``torchrun --nproc_per_node 2``) on a tiny Llama
sharded with FSDP2 (``fully_shard`` on each decoder layer and on the :class:`s2ft.SpectralModel`): calibrate on this
rank's share of the batches, calibrate with uneven batches (must fail on every rank), train a few steps, save,
reload, try to merge, and train and save a FourierFT adapter in both formats. Each rank writes what it saw to
``{out}/rank{r}.pt``. The model, batches and steps are tests/distributed/common.py's, as under DeepSpeed."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from s2ft import SpectralModel, get_spectral_model  # noqa: E402
from tests.distributed import common  # noqa: E402
from tests.helpers import tiny_llama  # noqa: E402


def shard(model: SpectralModel) -> SpectralModel:
    for block in model.get_base_model().model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    seen: dict = {}
    model = shard(get_spectral_model(tiny_llama(), common.config()))

    # 1. calibration from this rank's share of the batches; then uneven shares: an error on every rank
    common.calibrate_share(model, rank, world, seen)
    seen.update(common.sketched_calibration(model, common.batches(4, seed=0)[rank::world]))

    # 2. training: each rank takes half of each step's batch
    steps = common.rank_steps(rank, world)
    common.train(model, steps)
    seen["coeffs"] = common.coefficients(model)

    # 3. save: rank 0 writes the gathered adapter, the others wait for it
    common.save(model, out, seen)  # every rank sees the finished folder

    # 4. merging a sharded model is refused, the model left as it was
    try:
        model.merge_and_unload()
    except RuntimeError as error:
        seen["merge_error"] = str(error)
    seen["spectral_after_merge"] = len(model.spectral_layers())

    # 5. resume: load the saved adapter into a fresh model, shard it, compare and train one more step on both
    resumed = shard(SpectralModel.from_pretrained(tiny_llama(), f"{out}/adapter", is_trainable=True))
    seen["resumed_coeffs"] = common.coefficients(resumed)
    try:  # adapters added after sharding would train unsharded: refused
        resumed.add_adapter("other", common.config())
    except RuntimeError as error:
        seen["add_error"] = str(error)
    seen["replan"] = resumed.replan()  # re-planned from the trained ΔW, gathered layer by layer
    seen["replanned"] = {"plans": common.plans(resumed), "coeffs": common.coefficients(resumed)}

    # 6. FourierFT: trains the same way, and saves in s2ft's and PEFT's formats
    fourierft = shard(get_spectral_model(tiny_llama(), common.fourierft_config()))
    common.train(fourierft, steps)
    common.save_fourierft(fourierft, out, seen)
    torch.save(seen, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
