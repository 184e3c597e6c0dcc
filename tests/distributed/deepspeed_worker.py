"""Run by tests/distributed/test_deepspeed.py as two gloo processes (``torchrun --nproc_per_node 2``, ``DS_ACCELERATOR=cpu``)
on a tiny Llama under DeepSpeed ZeRO-3 (every parameter partitioned, the coefficients too): calibrate on this rank's
share of the batches after ``deepspeed.initialize``, train a few steps with the engine, save, try to merge and to
re-plan, and train and save a FourierFT adapter in both formats. Each rank writes what it saw to
``{out}/rank{r}.pt``. The model, batches and steps are tests/distributed/common.py's, as under FSDP."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from s2ft import SpectralModel, get_spectral_model  # noqa: E402
from s2ft.tuner.distributed import is_partitioned  # noqa: E402
from tests.distributed import common  # noqa: E402
from tests.helpers import tiny_llama  # noqa: E402


def engine_of(model: SpectralModel):
    """ZeRO-3 with every parameter partitioned (no persistence threshold), and the Adam of ``common.train``."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "Adam", "params": {"lr": common.LR, "torch_adam": True, "adam_w_mode": False}},
    }
    trained = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trained, config=config)
    return engine


def train(engine, steps: list[dict[str, torch.Tensor]]) -> None:
    engine.train()
    for batch in steps:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    engine.eval()


def main(out: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    seen: dict = {}
    model = get_spectral_model(tiny_llama(), common.config())
    engine = engine_of(model)
    layer = next(iter(model.spectral_layers().values()))
    seen["partitioned"] = is_partitioned(layer.base_layer.weight) and is_partitioned(layer.coeffs)
    seen["local_numel"] = layer.base_layer.weight.numel()  # empty outside the layer's forward

    # 1. calibration after initialize, from this rank's share of the batches; uneven shares fail on every rank
    common.calibrate_share(model, rank, world, seen)
    seen.update(common.sketched_calibration(model, common.batches(4, seed=0)[rank::world]))

    # 2. training with the engine: each rank takes half of each step's batch
    steps = common.rank_steps(rank, world)
    train(engine, steps)
    seen["coeffs"] = common.coefficients(model)

    # 3. save: gathered, rank 0 writes, the others wait
    common.save(model, out, seen)

    # 4. merging and re-planning are refused, the model left as it was
    for action in ("merge_and_unload", "replan"):
        try:
            getattr(model, action)()
        except RuntimeError as error:
            seen[f"{action}_error"] = str(error)
    seen["spectral_after_merge"] = len(model.spectral_layers())
    seen["coeffs_after_refusals"] = common.coefficients(model)

    # 5. resume: the saved adapter loaded into a fresh model before initialize holds the trained coefficients
    resumed = SpectralModel.from_pretrained(tiny_llama(), f"{out}/adapter", is_trainable=True)
    engine_of(resumed)
    seen["resumed_coeffs"] = common.coefficients(resumed)

    # 6. FourierFT: trains the same way, and saves in s2ft's and PEFT's formats
    fourierft = get_spectral_model(tiny_llama(), common.fourierft_config())
    train(engine_of(fourierft), steps)
    common.save_fourierft(fourierft, out, seen)
    torch.save(seen, f"{out}/rank{rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
