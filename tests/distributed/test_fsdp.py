"""Two CPU processes (gloo) with a tiny Llama sharded by FSDP2 (``fully_shard``, tests/distributed/fsdp_worker.py):
calibration gives every rank the plan one process makes from all the batches, uneven batches fail on every rank,
training matches one process with the whole batch, rank 0 saves the file one process saves, a saved adapter resumes,
and merging a sharded model is refused with the way that works."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import common
from tests.distributed.common import assert_same_plans
from tests.helpers import tiny_llama

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed"),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks saw, and the folder they worked in (the worker runs once per module)."""
    out = tmp_path_factory.mktemp("fsdp")
    return common.launch("fsdp_worker.py", out, port=29531, timeout=600), out


@pytest.fixture(scope="module")
def single():
    return common.single_process()


def test_calibration_equals_one_process_on_all_batches(ranks, single):
    (rank0, rank1), _ = ranks
    assert_same_plans(rank0["plans"], rank1["plans"])
    assert_same_plans(rank0["plans"], single[1])


def test_uneven_batches_fail_on_every_rank_and_change_nothing(ranks):
    for seen in ranks[0]:
        assert "calibration batches differ across processes" in seen["uneven_error"]
        assert "same number of batches" in seen["uneven_error"]
        assert_same_plans(seen["plans_after_uneven"], seen["plans"])


def test_training_matches_one_process_with_the_whole_batch(ranks, single):
    common.check_training_matches_one_process(ranks[0], single[0])


def test_rank0_writes_the_file_one_process_writes(ranks, tmp_path):
    common.check_rank0_file(*ranks, tmp_path)


def test_a_saved_adapter_resumes_sharded(ranks):
    """Loaded before sharding, the adapter holds on both ranks what one process loads from the file, and its ΔW
    is the trained one."""
    from s2ft import SpectralModel
    from s2ft.ops.bases import get_basis

    (rank0, rank1), out = ranks
    model = SpectralModel.from_pretrained(tiny_llama(), out / "adapter")
    basis = get_basis("fourier")
    for name, layer in model.spectral_layers().items():
        plan = rank0["plans"][name]
        trained = basis.delta_weight(
            rank0["coeffs"][name],
            plan["rows"],
            plan["cols"],
            layer.d_out,
            layer.d_in,
            layer.scaling,
            plan["perm_rows"],
            plan["perm_cols"],
        )
        for seen in (rank0, rank1):
            assert torch.equal(seen["resumed_coeffs"][name], layer.coeffs.detach())
        torch.testing.assert_close(layer.delta_weight(), trained, atol=1e-6, rtol=0)


def test_replan_on_a_sharded_model_equals_one_process(ranks):
    from s2ft import SpectralModel

    (rank0, rank1), out = ranks
    model = SpectralModel.from_pretrained(tiny_llama(), out / "adapter", is_trainable=True)
    report = model.replan()
    for seen in (rank0, rank1):
        assert seen["replan"] == report
        assert_same_plans(seen["replanned"]["plans"], common.plans(model))
        for name, layer in model.spectral_layers().items():
            assert torch.equal(seen["replanned"]["coeffs"][name], layer.coeffs.detach()), name


def test_adding_an_adapter_to_a_sharded_model_is_refused(ranks):
    for seen in ranks[0]:
        assert "FSDP" in seen["add_error"] and "before sharding" in seen["add_error"]


def test_merging_a_sharded_model_is_refused(ranks):
    for seen in ranks[0]:
        assert "FSDP" in seen["merge_error"] and "from_pretrained" in seen["merge_error"]
        assert seen["spectral_after_merge"] == 4  # nothing was unloaded


def test_fourierft_trains_and_saves_both_formats_sharded(ranks, tmp_path):
    """FourierFT under FSDP: the coefficients of one process with the whole batch, and rank 0's s2ft and PEFT
    files hold what one process writes for them."""
    common.check_fourierft_saves(*ranks, tmp_path)


def test_sketched_calibration_equals_one_process_and_disagreeing_ranks_fail(ranks):
    """prior_rank: the ranks' sketches are all-reduced, so every rank plans what one process plans from all the
    batches; ranks that disagree on prior_rank fail on every rank, the plans unchanged."""
    common.check_sketched_calibration(*ranks[0])
