"""torch.compile: a wrapped model compiles into one graph (no breaks) in training, evaluation and generate, for every
method, layer kind and forward path, with one and several active adapters; the compiled model computes what the
eager one computes, and still does after the model changes under it (new adapter, switch, in-place edits).

Most tests use the "eager" and "aot_eager" backends (Dynamo's tracing and AOTAutograd's backward, no code
generation); one uses inductor, for its numerics. Tolerances: float64 through aot_eager, compiled outputs and
gradients within 1e-12 of the eager ones relative to their largest entry (measured: 3e-16); float32 through
inductor, within 1e-5 (measured: 1e-7).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from s2ft import DCTConfig, FourierFTConfig, S2FTConfig, get_spectral_model
from s2ft.tuner.layers import BASE

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

CONFIGS = {"fourierft": FourierFTConfig, "s2ft": S2FTConfig, "dct": DCTConfig}
PATHS = ("auto", "dense", "fft")


class Linears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class Conv1Ds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Conv1D(16, 12), Conv1D(10, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class Conv2ds(nn.Module):
    """A 3x3 convolution (always its dense ΔW) and a pointwise one (the basis's paths on channels-last input)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


KINDS = {
    "linear": (Linears, (2, 5, 12)),
    "conv1d": (Conv1Ds, (2, 5, 12)),
    "conv2d": (Conv2ds, (2, 3, 6, 6)),
}


def ready(model, name: str, seed: int = 1) -> None:
    """Locations (S2FT's random, with random permutations, as a calibration would leave them) and random
    coefficients for adapter ``name``, so that every ΔW is non-zero."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.spectral_layers().values():
        adapter = layer.adapters[name]
        if not adapter.is_ready:
            flat = torch.randperm(layer.d_out * layer.d_in, generator=g)[: adapter.n_frequency]
            perms = torch.randperm(layer.d_out, generator=g), torch.randperm(layer.d_in, generator=g)
            layer.set_locations(flat // layer.d_in, flat % layer.d_in, *perms, adapter_name=name)
        with torch.no_grad():
            adapter.coeffs.copy_(torch.randn(adapter.coeffs.shape, generator=g))


def wrapped(kind: str, method: str, path: str, adapters: int = 1, dtype=torch.float32):
    if kind == "conv1d" and Conv1D is None:  # pragma: no cover
        pytest.skip("transformers' Conv1D is not available")
    torch.manual_seed(0)
    module, shape = KINDS[kind]
    config = CONFIGS[method]
    model = get_spectral_model(
        module(), config(target_modules=["a", "b"], n_frequency=7, scaling=3.0, forward_path=path)
    )
    ready(model, "default")
    if adapters == 2:
        model.add_adapter(
            "second", config(target_modules=["a", "b"], n_frequency=5, scaling=2.0, forward_path=path)
        )
        ready(model, "second", seed=2)
        model.set_adapter(["default", "second"])
    return model.to(dtype), torch.randn(shape, dtype=dtype)


def breaks(fn, *args) -> tuple[int, int, list[str]]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    return explained.graph_count, explained.graph_break_count, [r.reason for r in explained.break_reasons]


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_one_graph_on_every_path(kind, method):
    """0 graph breaks, in training (forward and backward's loss) and in evaluation, on every forward path, with one
    and with two active adapters."""
    for path in PATHS:
        for adapters in (1, 2):
            model, x = wrapped(kind, method, path, adapters)
            for training in (True, False):
                model.train(training)
                with torch.set_grad_enabled(training):
                    graphs, count, reasons = breaks(lambda x, model=model: (model(x) ** 2).sum(), x)
                assert (graphs, count) == (1, 0), (path, adapters, training, reasons)


def _step(model, x):
    """The output and the gradients (input, every trainable parameter) of one loss."""
    x = x.clone().requires_grad_()
    out = model(x)
    (out**2).sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    return [out.detach()] + [g.clone() for g in grads]


def _close(got, expected, tol: float) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert (a - b).abs().max() <= tol * b.abs().max(), ((a - b).abs().max(), b.abs().max())


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_compiled_equals_eager_float64(kind, method):
    """fullgraph=True through AOTAutograd (the compiled backward, the FFT path's included) in float64: outputs and
    gradients equal the eager ones, in training and evaluation (without autograd)."""
    for path in PATHS:
        model, x = wrapped(kind, method, path, adapters=2, dtype=torch.float64)
        model.train()
        expected = _step(model, x)
        model.zero_grad()
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        _close(_step(compiled, x), expected, 1e-12)
        model.zero_grad()
        model.eval()
        with torch.no_grad():
            got = compiled(x)
        # eager serving without autograd runs the FFT path through the layer's float32 bank; the graph computes in
        # the input's dtype, as eager does with autograd on: compare with that
        _close([got], [model(x).detach()], 1e-12)


def test_inductor_fft_path_float32():
    """Inductor's generated code for the FFT path (S2FT with permutations and DCT, two adapters on one layer) in
    float32: a training step's output and gradients equal eager's within 1e-5."""
    torch.manual_seed(0)
    model = get_spectral_model(Linears(), S2FTConfig(target_modules=["a"], n_frequency=7, forward_path="fft"))
    ready(model, "default")
    model.add_adapter("dct", DCTConfig(target_modules=["a"], n_frequency=9, forward_path="fft", scaling=5.0))
    ready(model, "dct", seed=3)
    model.set_adapter(["default", "dct"])
    x = torch.randn(3, 4, 12)
    expected = _step(model.train(), x)
    model.zero_grad()
    torch._dynamo.reset()
    _close(_step(torch.compile(model, fullgraph=True), x), expected, 1e-5)


def test_generate_compiled():
    """generate with the wrapped model's forward compiled (fullgraph, the eager backend): the same tokens as
    uncompiled, on the FFT path and on auto."""
    from tests.helpers import tiny_llama

    for path in ("fft", "auto"):
        config = FourierFTConfig(
            target_modules=["q_proj", "v_proj"],
            n_frequency=20,
            init="normal",
            scaling=50.0,
            forward_path=path,
        )
        model = get_spectral_model(tiny_llama(), config).eval()
        ids = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch._dynamo.reset()
        inner = model.get_base_model()
        inner.forward = torch.compile(inner.forward, fullgraph=True, backend="eager")
        got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(got, expected)


def test_compiled_before_wrapping():
    """A model compiled before it was wrapped computes the wrapped model's result afterwards (Dynamo's guards on
    the replaced modules recompile), not the base model's."""
    torch.manual_seed(0)
    base = Linears()
    x = torch.randn(2, 5, 12)
    compiled = torch.compile(base, backend="eager")
    before = compiled(x)
    model = get_spectral_model(base, FourierFTConfig(target_modules=["a", "b"], n_frequency=7, init="normal"))
    after = compiled(x)
    assert torch.equal(after, model(x))
    assert not torch.allclose(after, before)


def test_changes_after_compiling_are_seen():
    """Wrapped, then compiled (fullgraph): adding an adapter, switching adapters, several active, disabling,
    editing coefficients in place, changing the forward path and unmerging all give the eager result; merged,
    fullgraph refuses with the reason and a plain compile computes the merged model."""
    model, x = wrapped("linear", "s2ft", "fft")
    model.eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)

    def check():
        with torch.no_grad():
            got, expected = compiled(x), model(x)
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
        return got

    first = check()
    model.add_adapter("second", DCTConfig(target_modules=["a", "b"], n_frequency=5, scaling=4.0))
    ready(model, "second", seed=2)
    assert torch.equal(check(), first)  # added, not active
    model.set_adapter("second")
    assert not torch.allclose(check(), first)
    model.set_adapter(["default", "second"])
    check()
    with model.disable_adapters(), torch.no_grad():
        assert torch.equal(compiled(x), model.get_base_model()(x))
    with torch.no_grad():
        for layer in model.spectral_layers().values():
            layer.adapters["default"].coeffs.mul_(2)
    check()
    for layer in model.spectral_layers().values():
        layer.adapters["default"].forward_path = "dense"
    check()
    model.merge()
    with pytest.raises(Exception, match="merged adapters"), torch.no_grad():
        compiled(x)  # fullgraph: the merged layers' check of their coefficients runs in Python
    with torch.no_grad():
        merged = torch.compile(model, backend="eager")(x)
        assert torch.allclose(merged, model(x), rtol=1e-6, atol=1e-6)
    model.unmerge()
    check()


def test_mixed_batch_breaks_in_one_place():
    """A mixed batch (adapter_names) runs outside the graph: fullgraph refuses it with the reason, a plain compile
    serves it right (eager), and the compiled graph of the active adapters stays right afterwards."""
    model, x = wrapped("linear", "fourierft", "fft")
    model.add_adapter("second", FourierFTConfig(target_modules=["a", "b"], n_frequency=5, scaling=2.0))
    ready(model, "second", seed=2)
    model.eval()
    names = ["second", BASE]
    with torch.no_grad():
        expected = model(x, adapter_names=names)
        plain = model(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="mixed batch"), torch.no_grad():
        torch.compile(model, backend="eager", fullgraph=True)(x, adapter_names=names)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x, adapter_names=names), expected, rtol=1e-6, atol=1e-6)
        assert torch.allclose(compiled(x), plain, rtol=1e-6, atol=1e-6)


def test_jobs_take_compile(tmp_path):
    """``s2ft finetune --compile`` sets the Trainer's torch_compile."""
    from s2ft.cli import build_parser
    from s2ft.jobs.args import FinetuneArgs
    from s2ft.jobs.training import make_trainer

    assert build_parser().parse_args(["finetune", "--compile"]).compile is True
    assert build_parser().parse_args(["finetune"]).compile is False
    for flag in (True, False):
        args = FinetuneArgs(compile=flag).resolved()
        assert make_trainer(nn.Linear(2, 2), None, args, str(tmp_path)).args.torch_compile is flag


def test_fft_path_frozen_parts_compiled():
    """The FFT path's operator under compile with only one of its inputs requiring a gradient (a frozen adapter, or
    the first adapted layer of a frozen network): the gradient that is needed equals eager's (float64)."""
    from s2ft.ops.apply import spectral_apply

    g = torch.Generator().manual_seed(0)
    flat = torch.randperm(12 * 10, generator=g)[:9]
    rows, cols = flat // 10, flat % 10
    perms = torch.randperm(12, generator=g), torch.randperm(10, generator=g)
    x0 = torch.randn(3, 5, 10, dtype=torch.float64, generator=g)
    c0 = torch.randn(9, dtype=torch.float64, generator=g)

    def run(fn, grad_x: bool):
        x, c = x0.clone().requires_grad_(grad_x), c0.clone().requires_grad_(not grad_x)
        fn(x, c).square().sum().backward()
        return x.grad if grad_x else c.grad

    def apply(x, c):
        return spectral_apply(x, c, rows, cols, 12, 10, 3.0, *perms, path="fft")

    torch._dynamo.reset()
    compiled = torch.compile(apply, backend="aot_eager", fullgraph=True)
    for grad_x in (True, False):
        _close([run(compiled, grad_x)], [run(apply, grad_x)], 1e-12)


def test_fft_path_compiled_keeps_plans_by_content(monkeypatch):
    """The compiled FFT path's operator receives index tensors derived in the graph (new objects on every call): it
    keeps one plan per distinct contents, reuses it in the next steps (forward and backward), builds a new one when
    the locations change in place, and its results equal eager's (float64) throughout; the store is bounded."""
    from s2ft.ops import apply as ops

    monkeypatch.setattr(ops, "_CONTENT_PLANS", type(ops._CONTENT_PLANS)())
    model, x = wrapped("linear", "s2ft", "fft", dtype=torch.float64)
    model.train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    expected = _step(model, x)
    model.zero_grad()
    _close(_step(compiled, x), expected, 1e-12)
    model.zero_grad()
    plans = list(ops._CONTENT_PLANS.values())
    assert len(plans) == 2  # one per adapted layer
    _close(_step(compiled, x), expected, 1e-12)
    model.zero_grad()
    assert all(a is b for a, b in zip(ops._CONTENT_PLANS.values(), plans, strict=True))

    layer = model.spectral_layers()["a"]
    adapter = layer.adapters["default"]
    with torch.no_grad():  # the same buffer, new contents
        adapter.locations.copy_((adapter.locations + 1) % (layer.d_out * layer.d_in))
    expected = _step(model, x)
    model.zero_grad()
    _close(_step(compiled, x), expected, 1e-12)
    assert len(ops._CONTENT_PLANS) == 3

    monkeypatch.setattr(ops, "_CONTENT_PLANS_MAX", 1)
    ops._CONTENT_PLANS.clear()
    model.zero_grad()
    _close(_step(compiled, x), expected, 1e-12)
    assert len(ops._CONTENT_PLANS) == 1


def test_fft_operator_name_follows_its_schema():
    """A compile cache keys graphs by the operators they call, not by the backward registered for them: the FFT
    operator's name carries a digest of both schemas, so a backward with other arguments gets another name (and
    misses a cache filled by another s2ft) while the same schema keeps its name."""
    from s2ft.ops import apply

    assert hasattr(torch.ops.s2ft, apply.FFT_OPERATOR)
    assert hasattr(torch.ops.s2ft, apply.FFT_OPERATOR + "_backward")

    def backward_without_need_x(
        grad_y: torch.Tensor, x: torch.Tensor, coeffs: torch.Tensor, need_c: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise AssertionError("never called")

    same = apply._schema_digest(apply._fft_apply_impl, apply._fft_apply_backward_impl)
    assert f"fft_apply_{same}" == apply.FFT_OPERATOR
    assert apply._schema_digest(apply._fft_apply_impl, backward_without_need_x) != same
    assert apply._schema_digest(apply._fft_apply_backward_impl, apply._fft_apply_impl) != same
