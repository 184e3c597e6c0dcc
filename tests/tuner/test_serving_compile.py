"""Serving generation with the output head's input made contiguous (:func:`s2ft.tuner.serving.fold_head_input`):
the head then runs as one ``mm`` on the wrapped model's frozen weights (not a ``bmm`` against its weight expanded
over the batch), and everything served stays what it was: the same tokens and logits with one adapter, with a
mixed batch (row i as the single-adapter model's row for adapter i), eager and compiled (fullgraph, no break), and
after the adapters change under it.

Tolerances: the hook only copies the head's input, but torch's mm and bmm sum the products in different orders:
eager logits within 1e-6 relative to their largest entry (float32; measured: 1.7e-7); compiled (inductor)
logits against eager ones within 1e-4 relative to their largest entry (float32; one compiled GEMM in place of
another).
"""

from __future__ import annotations

import copy

import pytest
import torch

from s2ft import FourierFTConfig, get_spectral_model
from s2ft.tuner.serving import _contiguous_input, fold_head_input
from tests.helpers import generate_with_logits, tiny_llama


def _wrapped(names=("a", "b", "c")):
    """A tiny Llama with adapters ``names`` on q_proj and v_proj (FFT path), random coefficients, eval mode."""
    config = {
        name: FourierFTConfig(
            target_modules=["q_proj", "v_proj"],
            n_frequency=20,
            init="normal",
            scaling=50.0,
            forward_path="fft",
            seed=i,
        )
        for i, name in enumerate(names)
    }
    model = get_spectral_model(tiny_llama(), config[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config[name])
    return model.eval()


def _head_calls(model):
    """Record (ndim, contiguous) of each call of the head: a hook that runs after ``fold_head_input``'s."""
    calls = []
    head = model.get_base_model().get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda m, a: calls.append((a[0].dim(), a[0].is_contiguous())))
    return calls, handle


IDS = torch.randint(3, 60, (4, 5), generator=torch.Generator().manual_seed(0))


def test_fold_head_input_same_outputs_and_contiguous():
    """One adapter and a mixed batch: the same tokens and logits (to rounding) with the hook as without; with it,
    the head gets contiguous inputs only."""
    model = _wrapped()
    model.fold_head_in_generate = False  # generate as the wrapped model's own: no hook
    inner = model.get_base_model()
    assert not inner.lm_head.weight.requires_grad  # the case the hook is for
    names = ["a", "b", "c", "b"]
    expected_one = generate_with_logits(model, IDS)
    expected_mixed = generate_with_logits(model, IDS, adapter_names=names)
    calls, handle = _head_calls(model)
    generate_with_logits(model, IDS)
    assert any(dim == 3 and not contiguous for dim, contiguous in calls)  # generate slices the last position
    assert fold_head_input(inner)
    calls.clear()
    handle.remove()
    calls, handle = _head_calls(model)  # after ours now
    got_one = generate_with_logits(model, IDS)
    got_mixed = generate_with_logits(model, IDS, adapter_names=names)
    handle.remove()
    assert calls and all(contiguous for _, contiguous in calls)
    for got, expected in ((got_one, expected_one), (got_mixed, expected_mixed)):
        assert torch.equal(got[0], expected[0])
        error = (got[1] - expected[1]).abs().max() / expected[1].abs().max()
        assert error <= 1e-6, error  # one mm instead of a bmm: the products summed in another order


def test_fold_head_input_mixed_rows_match_single_adapters():
    """With the hook, row i of a mixed batch is what the model with adapter names[i] active gives for it."""
    model = _wrapped()
    fold_head_input(model.get_base_model())
    names = ["c", "a", "b", "a"]
    tokens, logits = generate_with_logits(model, IDS, adapter_names=names)
    for i, name in enumerate(names):
        model.set_adapter(name)
        one_tokens, one_logits = generate_with_logits(model, IDS[i : i + 1])
        assert torch.equal(tokens[i], one_tokens[0])
        scale = one_logits.abs().max()
        assert (logits[:, i] - one_logits[:, 0]).abs().max() <= 1e-5 * scale


def test_fold_head_input_idempotent_removable_and_copied():
    """Installing twice installs once; ``on=False`` takes it off; a deep copy has its own; a model without a linear
    output head is left alone (False)."""
    inner = _wrapped(("a",)).get_base_model()
    head = inner.get_output_embeddings()

    def ours(module):
        return [h for h in module._forward_pre_hooks.values() if h is _contiguous_input]

    assert fold_head_input(inner) and fold_head_input(inner)
    assert len(ours(head)) == 1
    twin = copy.deepcopy(inner)
    assert len(ours(twin.get_output_embeddings())) == 1
    assert fold_head_input(twin, on=False)
    assert not ours(twin.get_output_embeddings())
    assert len(ours(head)) == 1  # the original keeps its own
    fold_head_input(inner, on=False)
    assert not ours(head)
    assert not fold_head_input(torch.nn.Linear(3, 4))  # no get_output_embeddings
    # the hook leaves a contiguous or 2-D input alone
    x = torch.randn(2, 3, 4)
    assert _contiguous_input(head, (x,)) is None
    assert _contiguous_input(head, (x[:, -1],)) is None  # 2-D
    sliced = x[:, -1:, :]
    (out,) = _contiguous_input(head, (sliced,))
    assert out.is_contiguous() and torch.equal(out, sliced)


@torch._dynamo.config.patch(recompile_limit=64)  # each change below recompiles, by design
def test_fold_head_input_compiled_one_graph_same_tokens():
    """The inner forward compiled with the hook (fullgraph, inductor): no graph break (torch._dynamo.explain),
    the same tokens as eager and logits within 1e-4 of the largest; a changed coefficient, a new adapter and
    set_adapter are served at once (no stale state)."""
    torch._dynamo.reset()
    model = _wrapped(("a", "b"))
    inner = model.get_base_model()
    fold_head_input(inner)
    ids = IDS[:2]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        # logits_to_keep=1: the head on the last position only, sliced, as in generate
        explained = torch._dynamo.explain(inner.forward)(
            input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1
        )
    assert explained.graph_break_count == 0

    def check(backend="inductor"):
        expected = generate_with_logits(model, ids)
        forward = inner.forward
        inner.forward = torch.compile(forward, fullgraph=True, backend=backend)
        try:
            got = generate_with_logits(model, ids)
        finally:
            inner.forward = forward
        assert torch.equal(got[0], expected[0])
        assert (got[1] - expected[1]).abs().max() <= 1e-4 * expected[1].abs().max()
        return expected

    first = check()
    with torch.no_grad():  # training then serving: a changed coefficient
        for layer in model.spectral_layers().values():
            layer.adapters["a"].coeffs.mul_(-3.0)
    changed = check("eager")  # Dynamo's guards and tracing; the numerics were checked above
    assert not torch.equal(changed[1], first[1])
    config = FourierFTConfig(
        target_modules=["q_proj", "v_proj"], n_frequency=20, init="normal", scaling=50.0, seed=7
    )
    model.add_adapter("new", config)
    model.set_adapter("new")
    added = check("eager")
    assert not torch.equal(added[1], changed[1])
    model.set_adapter("b")
    switched = check("eager")
    assert not torch.equal(switched[1], added[1])


def _head_inputs(model):
    """Record (ndim, contiguous) of each input the head computes on: a forward hook, which sees the arguments as
    every pre-hook left them, whenever those were installed."""
    calls = []
    head = model.get_base_model().get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: calls.append((a[0].dim(), a[0].is_contiguous())))
    return calls, handle


def test_generate_folds_the_head_input_for_the_call_only():
    """``SpectralModel.generate`` makes the head's input contiguous during the call (one adapter and a mixed batch)
    and leaves no hook behind, also when generate raises; the tokens are those without it and the logits equal to
    rounding; a hook the user installed stays; ``fold_head_in_generate = False`` leaves the head alone."""
    model = _wrapped()
    head = model.get_base_model().get_output_embeddings()
    hooks = dict(head._forward_pre_hooks)
    names = ["a", "b", "c", "b"]
    model.fold_head_in_generate = False
    calls, handle = _head_inputs(model)
    expected = [generate_with_logits(model, IDS), generate_with_logits(model, IDS, adapter_names=names)]
    assert any(dim == 3 and not contiguous for dim, contiguous in calls)  # generate slices the last position
    model.fold_head_in_generate = True
    calls.clear()
    got = [generate_with_logits(model, IDS), generate_with_logits(model, IDS, adapter_names=names)]
    assert calls and all(contiguous for _, contiguous in calls)
    assert dict(head._forward_pre_hooks) == hooks  # nothing left behind
    for (tokens, logits), (want_tokens, want_logits) in zip(got, expected, strict=True):
        assert torch.equal(tokens, want_tokens)
        assert (logits - want_logits).abs().max() <= 1e-6 * want_logits.abs().max()
    with pytest.raises(ValueError):
        generate_with_logits(model, IDS, adapter_names=["a", "b", "nope", "a"])  # refused inside the call
    assert dict(head._forward_pre_hooks) == hooks
    fold_head_input(model.get_base_model())  # the user's own: kept after a call
    generate_with_logits(model, IDS)
    assert [h for h in head._forward_pre_hooks.values() if h is _contiguous_input] == [_contiguous_input]
    handle.remove()
