"""Compiled inference on a mixed batch (``adapter_names``, one adapter per example) is one graph: each adapted
layer's adapters run as one custom operator (``s2ft.tuner.serving.mixed_apply``) whose body is the eager serving
code, so Dynamo reports no break and ``fullgraph=True`` compiles it. What it computes is what the eager model
computes, row ``i`` what the model with adapter ``names[i]`` active computes, and it stays right when the names,
the adapters or their coefficients change after compiling. A mixed batch with autograd keeps its break.

Tolerances: the operator runs the same eager code as the uncompiled model, so compiled (eager and aot_eager
backends) against eager logits: within 1e-6 of the largest entry (float32; measured: 0). Against the
single-adapter model (another code path: the FFT path per adapter, not the mixed bank): 1e-5 of the largest
entry (float32). Inductor-compiled generation: the same tokens, logits within 1e-4 of the largest (float32; the
base layers' GEMMs compiled).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from s2ft import DCTConfig, FourierFTConfig, S2FTConfig, get_spectral_model
from s2ft.tuner.layers import BASE, MIXED_BREAK, SpectralLayer
from tests.helpers import generate_with_logits, tiny_llama

IDS = torch.randint(3, 60, (4, 5), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)


def _wrapped(kinds=("fourierft", "s2ft", "dct")):
    """A tiny Llama with adapters "a", "b", "c" on q_proj and v_proj (FourierFT on the FFT path, S2FT with
    random permutations, DCT: a basis without a mixed bank), random coefficients, eval mode."""
    configs = {"fourierft": FourierFTConfig, "s2ft": S2FTConfig, "dct": DCTConfig}
    model = None
    for i, (name, kind) in enumerate(zip("abc", kinds)):
        extra = {"forward_path": "fft"} if kind == "fourierft" else {}
        config = configs[kind](
            target_modules=["q_proj", "v_proj"], n_frequency=20, init="normal", scaling=50.0, seed=i, **extra
        )
        if model is None:
            model = get_spectral_model(tiny_llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        if kind == "s2ft":  # planned: random locations and permutations, as a calibration would install
            g = torch.Generator().manual_seed(10 + i)
            for layer in model.spectral_layers().values():
                d_out, d_in = layer.d_out, layer.d_in
                flat = torch.randperm(d_out * d_in, generator=g)[:20]
                layer.set_locations(
                    flat // d_in,
                    flat % d_in,
                    torch.randperm(d_out, generator=g),
                    torch.randperm(d_in, generator=g),
                    adapter_name=name,
                )
    assert model is not None
    return model.eval()


def _logits(model, names, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names).logits


def _close(got, expected, tol):
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= tol * scale, ((got - expected).abs().max(), scale)


class _Compiled:
    """The inner model's forward compiled (``fullgraph=True``) while inside."""

    def __init__(self, model, backend="aot_eager"):
        self.inner, self.backend = model.get_base_model(), backend

    def __enter__(self):
        self.forward = self.inner.forward
        self.inner.forward = torch.compile(self.forward, fullgraph=True, backend=self.backend)
        return self

    def __exit__(self, *exc):
        self.inner.forward = self.forward


def test_mixed_inference_is_one_graph():
    """torch._dynamo.explain on the inner forward under a mixed batch: one graph, no break (every adapted layer
    one operator), with FourierFT, S2FT (permutations) and DCT (no bank) adapters and the base model."""
    torch._dynamo.reset()
    model = _wrapped()
    inner = model.get_base_model()
    with torch.no_grad(), model._serving(["c", BASE, "a", "b"]):
        explained = torch._dynamo.explain(inner.forward)(input_ids=IDS, attention_mask=MASK, use_cache=False)
    assert explained.graph_count == 1
    assert explained.graph_break_count == 0, explained.break_reasons
    ops = [
        node.target
        for graph in explained.graphs
        for node in graph.graph.nodes
        if node.op == "call_function" and "mixed_apply" in str(node.target)
    ]
    assert len(ops) == 4  # q_proj and v_proj of both decoder layers


def test_compiled_mixed_equals_eager_and_single_adapters():
    """fullgraph=True (aot_eager): the logits of the eager mixed batch; row i that of the model with adapter
    names[i] active (BASE: the base model); then a different names list, served without a stale result."""
    torch._dynamo.reset()
    model = _wrapped()
    names = ["c", BASE, "a", "b"]
    expected = _logits(model, names)
    with _Compiled(model):
        got = _logits(model, names)
        other = ["b", "b", "c", "a"]
        got_other = _logits(model, other)
    _close(got, expected, 1e-6)
    _close(got_other, _logits(model, other), 1e-6)
    for i, name in enumerate(names):
        if name == BASE:
            with model.disable_adapter(), torch.no_grad():
                single = model(input_ids=IDS[i : i + 1], attention_mask=MASK[i : i + 1]).logits
        else:
            model.set_adapter(name)
            with torch.no_grad():
                single = model(input_ids=IDS[i : i + 1], attention_mask=MASK[i : i + 1]).logits
        _close(got[i : i + 1], single, 1e-5)


@torch._dynamo.config.patch(recompile_limit=64)
def test_compiled_mixed_follows_changes():
    """Compiled once, the mixed batch follows what changes under it, as the eager model does: coefficients
    edited in place, a new adapter used in the names, set_adapter (which a mixed batch ignores), a deep copy
    (its own layers), the active adapters served where another thread's mixed batch is open."""
    torch._dynamo.reset()
    model = _wrapped()
    names = ["a", "b", "c", "a"]
    with _Compiled(model, "eager"):
        first = _logits(model, names)
        _close(first, _logits_eager(model, names), 1e-6)
        with torch.no_grad():
            for layer in model.spectral_layers().values():
                layer.adapters["a"].coeffs.mul_(-3.0)
        changed = _logits(model, names)
        assert not torch.allclose(changed, first)
        _close(changed, _logits_eager(model, names), 1e-6)
        model.add_adapter(
            "new", FourierFTConfig(target_modules=["q_proj", "v_proj"], n_frequency=9, init="normal", seed=5)
        )
        added = _logits(model, ["new", "b", "c", "new"])
        _close(added, _logits_eager(model, ["new", "b", "c", "new"]), 1e-6)
        assert not torch.allclose(added, changed)
        model.set_adapter("b")
        _close(_logits(model, names), changed, 1e-6)
    twin = copy.deepcopy(model)
    handles = {layer._mixed_handle for m in (model, twin) for layer in m.spectral_layers().values()}
    assert len(handles) == 2 * len(model.spectral_layers())  # each copy's layers name themselves
    with torch.no_grad():
        for layer in twin.spectral_layers().values():
            layer.adapters["b"].coeffs.zero_()
    with _Compiled(twin, "eager"):
        got_twin = _logits(twin, names)
    _close(got_twin, _logits_eager(twin, names), 1e-6)
    with _Compiled(model, "eager"):
        _close(_logits(model, names), changed, 1e-6)  # the original is unchanged
        # another thread's mixed batch is open while this one serves the active adapter ("b") compiled
        opened, release = threading.Event(), threading.Event()

        def hold():
            with model._serving(names):
                opened.set()
                release.wait(60)

        thread = threading.Thread(target=hold)
        thread.start()
        try:
            assert opened.wait(60)
            with torch.no_grad():
                plain = model(input_ids=IDS, attention_mask=MASK).logits
        finally:
            release.set()
            thread.join()
    with torch.no_grad():
        _close(plain, model(input_ids=IDS, attention_mask=MASK).logits, 1e-6)


def _logits_eager(model, names):
    inner = model.get_base_model()
    compiled = inner.forward
    del inner.forward  # the class's forward: eager
    try:
        return _logits(model, names)
    finally:
        inner.forward = compiled


def test_compiled_mixed_bad_input_and_autograd_break():
    """Compiled: an unknown name and a names list of the wrong length raise as eager does; a mixed batch with
    autograd still breaks the graph (fullgraph refuses it with the reason) and, compiled plainly, is right."""
    torch._dynamo.reset()
    model = _wrapped()
    with _Compiled(model, "eager"):
        with pytest.raises(ValueError, match="unknown adapter names"):
            _logits(model, ["a", "zzz", "b", "c"])
        with pytest.raises(ValueError, match="3 names for a batch of 4"):
            _logits(model, ["a", "b", "c"])
    torch._dynamo.reset()
    names = ["a", "c", BASE, "b"]
    inner = model.get_base_model()
    forward = inner.forward
    expected = model(input_ids=IDS, attention_mask=MASK, adapter_names=names).logits  # with autograd
    inner.forward = torch.compile(forward, fullgraph=True, backend="eager")
    try:
        with pytest.raises(Exception, match="mixed batch"):
            model(input_ids=IDS, attention_mask=MASK, adapter_names=names)
    finally:
        inner.forward = forward
    inner.forward = torch.compile(forward, backend="eager")
    try:
        got = model(input_ids=IDS, attention_mask=MASK, adapter_names=names).logits
    finally:
        inner.forward = forward
    _close(got, expected, 1e-6)
    assert "autograd" in MIXED_BREAK


def test_compiled_mixed_conv2d():
    """A Conv2d model (a 3x3 convolution: its dense ΔW; a pointwise one), mixed batch compiled with
    fullgraph=True: no break, and the eager result."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1)).eval()
    model = get_spectral_model(
        base,
        FourierFTConfig(target_modules=["0", "2"], n_frequency=7, init="normal", seed=0),
        adapter_name="a",
    )
    model.add_adapter("b", FourierFTConfig(target_modules=["0", "2"], n_frequency=5, init="normal", seed=1))
    model.eval()
    x = torch.randn(3, 3, 6, 6)
    names = ["b", BASE, "a"]
    with torch.no_grad():
        expected = model(x, adapter_names=names)
        with model._serving(names):
            explained = torch._dynamo.explain(base.forward)(x)
            assert explained.graph_break_count == 0, explained.break_reasons
        forward = base.forward
        base.forward = torch.compile(forward, fullgraph=True, backend="aot_eager")
        try:
            got = model(x, adapter_names=names)
        finally:
            base.forward = forward
    _close(got, expected, 1e-6)
    assert all(isinstance(m, SpectralLayer) for m in model.spectral_layers().values())


def test_compiled_mixed_generate_inductor():
    """generate with the inner forward compiled by inductor (fullgraph): the eager mixed batch's tokens and its
    logits within 1e-4 of the largest; row i's tokens those of adapter names[i] alone (then padding)."""
    torch._dynamo.reset()
    model = _wrapped()
    names = ["b", "a", BASE, "c"]

    expected = generate_with_logits(model, IDS, adapter_names=names)
    with _Compiled(model, "inductor"):
        got = generate_with_logits(model, IDS, adapter_names=names)
    assert torch.equal(got[0], expected[0])
    _close(got[1], expected[1], 1e-4)
    for i, name in enumerate(names):
        if name == BASE:
            with model.disable_adapter():
                single = generate_with_logits(model, IDS[i : i + 1])
        else:
            model.set_adapter(name)
            single = generate_with_logits(model, IDS[i : i + 1])
        length = single[0].shape[1]  # shorter where that sequence ended (its end token): padded in the batch
        assert torch.equal(got[0][i, :length], single[0][0])
        assert not got[0][i, length:].any()  # pad_token_id
