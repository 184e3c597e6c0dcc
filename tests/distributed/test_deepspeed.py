"""Two CPU processes (gloo) with a tiny Llama under DeepSpeed ZeRO-3, every parameter partitioned
(tests/distributed/deepspeed_worker.py): calibration after ``deepspeed.initialize`` gives every rank the plan one
process makes from all the batches, uneven batches fail on every rank, the engine's training matches one process
with the whole batch, rank 0 saves the file one process saves, a saved adapter resumes, and merging and re-planning
are refused."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.distributed import common
from tests.distributed.common import assert_same_plans
from tests.helpers import tiny_llama

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (the dev extras)"
    ),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks saw, and the folder they worked in (the worker runs once per module)."""
    out = tmp_path_factory.mktemp("deepspeed")
    return common.launch("deepspeed_worker.py", out, port=29541, timeout=900, DS_ACCELERATOR="cpu"), out


@pytest.fixture(scope="module")
def single():
    return common.single_process()


def test_every_parameter_is_partitioned(ranks):
    for seen in ranks[0]:
        assert seen["partitioned"] and seen["local_numel"] == 0


def test_calibration_after_initialize_equals_one_process_on_all_batches(ranks, single):
    (rank0, rank1), _ = ranks
    assert_same_plans(rank0["plans"], rank1["plans"])
    assert_same_plans(rank0["plans"], single[1])
    for seen in (rank0, rank1):
        assert "calibration batches differ across processes" in seen["uneven_error"]


def test_engine_training_matches_one_process_with_the_whole_batch(ranks, single):
    common.check_training_matches_one_process(ranks[0], single[0])


def test_rank0_writes_the_file_one_process_writes(ranks, tmp_path):
    common.check_rank0_file(*ranks, tmp_path)


def test_a_saved_adapter_resumes_partitioned(ranks):
    from s2ft import SpectralModel

    (rank0, rank1), out = ranks
    model = SpectralModel.from_pretrained(tiny_llama(), out / "adapter")
    for name, layer in model.spectral_layers().items():
        for seen in (rank0, rank1):
            assert torch.equal(seen["resumed_coeffs"][name], layer.coeffs.detach()), name


def test_merging_and_replanning_are_refused_model_unchanged(ranks):
    for seen in ranks[0]:
        assert (
            "DeepSpeed ZeRO-3" in seen["merge_and_unload_error"]
            and "from_pretrained" in seen["merge_and_unload_error"]
        )
        assert "cannot replan under DeepSpeed ZeRO-3" in seen["replan_error"]
        assert seen["spectral_after_merge"] == 4
        for name, coeffs in seen["coeffs"].items():
            assert torch.equal(seen["coeffs_after_refusals"][name], coeffs)


def test_fourierft_trains_and_saves_both_formats_partitioned(ranks, tmp_path):

    common.check_fourierft_saves(*ranks, tmp_path)


def test_sketched_calibration_equals_one_process_and_disagreeing_ranks_fail(ranks):
    """prior_rank: the ranks' sketches are all-reduced, so every rank plans what one process plans from all the
    batches; ranks that disagree on prior_rank fail on every rank, the plans unchanged."""
    common.check_sketched_calibration(*ranks[0])
