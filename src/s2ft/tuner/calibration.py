"""S2FT calibration: the prior ``ΔŴ`` of every adapted matrix, from gradients (its plan: :mod:`s2ft.tuner.planner`).

A layer's gradient ``∂L/∂W`` comes from its weight's ``.grad``, or, for a weight that cannot take a gradient (a
quantized one, or a sharded ``DTensor``), from the layer's inputs ``x`` and output gradients ``δ`` through hooks
(``Σ_tokens δᵀ x``, :meth:`s2ft.tuner.kinds.LayerKind.weight_gradient`). :func:`iter_priors` hands the priors out
in groups of layers, each group over the same batches, so that at most one group's priors are held at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from functools import partial
from typing import Any, TypeVar

import torch
from torch import nn

from s2ft.config import AUTO_PRIOR_RANK, AUTO_SKETCH_MIN_WIDTH, PRIORS
from s2ft.ops.sketch import LowRank, low_rank_from_sketches, sketch_matrices
from s2ft.tuner.distributed import agree_across_processes, agreed_batches, is_partitioned, is_sharded
from s2ft.tuner.kinds import LayerKind, kind_of, weight_matrix

LossFn = Callable[[Any, Any], torch.Tensor]


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    return batch


def batch_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    """The loss of one batch: ``loss_fn(outputs, batch)`` if given, else the model's own ``outputs.loss``.

    A mapping is passed as keyword arguments, a tensor as the input, a list or tuple as ``model(batch[0])``
    (the ``(inputs, targets)`` convention).
    """
    if isinstance(batch, Mapping):
        outputs = model(**batch)
    elif isinstance(batch, (list, tuple)):
        outputs = model(batch[0])
    else:
        outputs = model(batch)
    if loss_fn is not None:
        loss = loss_fn(outputs, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = (
                f"a tensor of shape {tuple(loss.shape)}"
                if isinstance(loss, torch.Tensor)
                else type(loss).__name__
            )
            raise ValueError(
                f"loss_fn returned {got}; it must return the batch's loss as a scalar tensor (reduce it, e.g. "
                "with .mean(), and keep it a tensor computed from the outputs)"
            )
        return loss
    own = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if own is None:
        raise ValueError(
            "the model returned no loss for a calibration batch: include labels in the batches, "
            "or pass loss_fn(outputs, batch) -> scalar tensor"
        )
    return own


@contextlib.contextmanager
def _only_weights_require_grad(model: nn.Module, weights: list[nn.Parameter]) -> Any:
    """Inside: eval mode, and only ``weights`` require grad. On exit everything is as it was, grads included.

    A model with gradient checkpointing on (transformers' ``gradient_checkpointing_enable``) keeps it: its
    checkpointed layers alone are flagged as training (their dropouts and everything inside stay in eval mode),
    and the input embeddings' output requires grad so that reentrant checkpointing passes gradients through."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    handle = None
    try:
        model.eval()
        checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
        for m in checkpointed:
            m.training = True  # this module only: what transformers' checkpointing tests
        if checkpointed:
            handle = _input_embeddings_require_grad(model)
        for p, _, _ in flags:
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        if handle is not None:
            handle.remove()
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in modes:
            m.training = mode


def _input_embeddings_require_grad(model: nn.Module) -> Any:
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    if not isinstance(embeddings, nn.Module):
        return None

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, torch.Tensor) and output.is_floating_point() and torch.is_grad_enabled():
            return output.requires_grad_(True) if output.is_leaf else output
        return None

    return embeddings.register_forward_hook(hook)


_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


class PriorMemory:
    """What calibration holds of prior-sized tensors (sums, squares, weight gradients, per-call ``δᵀx``), in
    bytes: ``live`` now and ``peak``. Counted while inside :func:`prior_memory`; each tensor counts until it is
    freed."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def _hold(self, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size


_LEDGERS: list[PriorMemory] = []


@contextlib.contextmanager
def prior_memory() -> Iterator[PriorMemory]:
    """Inside, calibration counts the prior-sized tensors it holds into the :class:`PriorMemory` yielded."""
    ledger = PriorMemory()
    _LEDGERS.append(ledger)
    try:
        yield ledger
    finally:
        _LEDGERS.remove(ledger)


_MaybeTensor = TypeVar("_MaybeTensor", bound=torch.Tensor | None)


def _hold(tensor: _MaybeTensor) -> _MaybeTensor:
    if tensor is not None:
        for ledger in _LEDGERS:
            ledger._hold(tensor)
    return tensor


def takes_weight_gradient(layer: nn.Module) -> bool:
    """Whether a layer's weight can take a gradient itself (a float weight of a float kind, neither sharded by FSDP
    nor partitioned by DeepSpeed ZeRO-3); the prior of any other layer is taken from its activations."""
    weight = layer.weight
    sharded = is_sharded(weight) or is_partitioned(weight)
    return weight.dtype.is_floating_point and not kind_of(layer).quantized and not sharded


def compute_prior(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    kind: str = "gradient",
    lr: float = 1e-4,
    from_activations: bool | None = None,
    rank: int | str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The prior ``ΔŴ`` of each layer's ``base_layer.weight``, from the gradients ``g_b`` of the batches:

    - ``"gradient"`` (the paper): ``ΔŴ = -Σ_b g_b`` at the current weights;
    - ``"adam"``: ``ΔŴ = -Σ_b g_b / sqrt(Σ_b g_b²)`` elementwise (0 where every ``g_b`` is 0): the direction of
      an Adam step whose moments are taken over the batches, so each weight counts by its gradient's
      signal-to-noise ratio rather than by its gradient's size;
    - ``"trajectory"``: ``ΔŴ = W_B - W_0`` after one Adam step (learning rate ``lr``, betas 0.9/0.999, eps 1e-8,
      no weight decay) per batch on these weights alone: the start of the path training takes, gradients taken
      along it. The weights are restored afterwards.

    ``g_b`` is the weight's gradient, or, for layers whose weight takes none (quantized, sharded; all layers with
    ``from_activations=True``, none with ``False``; with a ``rank``, every layer whose kind allows it, unless
    ``False``), ``Σ_tokens δᵀ x`` from the layer's inputs and output
    gradients; the trajectory prior needs the weights themselves and refuses such layers before anything changes.

    ``layers`` maps names to adapters (:class:`s2ft.tuner.layers.SpectralLayer`), whose ΔW is switched off meanwhile.
    The model runs in eval mode (no dropout, so the prior is deterministic) and, on return, nothing of it has
    changed: no weight, flag or gradient. Under ``torch.distributed`` each process passes its own batches: the
    ``"gradient"`` and ``"adam"`` sums are taken across processes, so every rank gets the prior one process would
    get from all the batches; a ``"trajectory"`` step sums the ranks' gradients of that step (the ranks' ``b``-th
    batches together make step ``b``; give every rank the same number of batches). Returns float32 ``(d_out, d_in)``
    priors in ``nn.Linear``'s convention.

    With ``rank=k`` (``"gradient"`` and ``"adam"`` only) each prior is instead a rank-``k``
    :class:`s2ft.ops.sketch.LowRank` (``k`` clamped to ``min(d_out, d_in)`` per layer, where it is exact), built in
    the same one pass from randomized sketches that hold ``O((d_out + d_in)·k)`` numbers per layer (the test
    matrices seeded by ``(seed, shape, k)``, shared by the layers of one shape); the ``"adam"`` second moment is then factored as Adafactor factors it
    (:class:`SketchedAdamPrior`). With ``rank="auto"`` only the layers at least :data:`AUTO_SKETCH_MIN_WIDTH` wide on
    both sides are sketched, at :data:`AUTO_PRIOR_RANK`, and the others get their exact prior, in the same pass
    (:func:`layer_prior_ranks`; a prior with no sketched form is then exact everywhere). Every process must pass
    the same ``rank``.
    """
    return dict(
        iter_priors(
            model,
            layers,
            batches,
            loss_fn,
            max_batches,
            progress,
            kind,
            lr,
            None,
            from_activations,
            rank=rank,
            seed=seed,
        )
    )


def iter_priors(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    kind: str = "gradient",
    lr: float = 1e-4,
    group_size: int | None = None,
    from_activations: bool | None = None,
    rank: int | str | None = None,
    seed: int = 0,
) -> Iterator[tuple[str, Any]]:
    """``(name, prior)`` for every layer, as :func:`compute_prior` computes them, ``group_size`` layers at a time
    (None: all at once): each group's priors are computed over the same batches (kept in a list when there are
    several groups), handed out, and forgotten before the next group starts, so a caller that plans and drops
    each prior holds at most one group's. A group's priors are the same as with any other grouping. Everything
    is checked before anything runs."""
    if kind not in PRIORS:
        raise ValueError(f"unknown prior {kind!r}; choose from {PRIORS}")
    if not (lr > 0 and lr < float("inf")):
        raise ValueError(f"the trajectory prior's learning rate must be a finite number > 0, got {lr!r}")
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
    ):
        raise ValueError(f"the calibration group size must be a positive integer or None, got {group_size!r}")
    ranks = layer_prior_ranks(layers, rank, kind)
    exact, sketched = PRIOR_STRATEGIES[kind], SKETCHED_STRATEGIES.get(kind)
    hooked = _activation_layers(
        layers, from_activations, prefer={n for n, k in ranks.items() if k is not None}
    )
    if exact.steps_weights and hooked:
        name = next(n for n in layers if n in hooked)  # the first in module order
        raise ValueError(
            f"the {kind} prior steps the weights themselves, and {name!r} ({kind_of(layers[name].base_layer).label}"
            f"{'' if len(hooked) == 1 else f', and {len(hooked) - 1} more'}) has a weight that takes no gradient: "
            "use prior='gradient' or prior='adam', which are taken from the layer's activations"
        )
    names = list(layers)
    size = len(names) if group_size is None else group_size
    if exact.steps_weights and size < len(names):
        raise ValueError(
            f"the {kind} prior steps every layer's weights together (each layer's path depends on the "
            f"others'), so it cannot be computed in groups of {size} of {len(names)} layers: give no group size, "
            "or use prior='gradient' or prior='adam'"
        )
    groups = [names[i : i + size] for i in range(0, len(names), size)]
    if len(groups) > 1:  # every group sees the very same batches
        batches = list(batches if max_batches is None else itertools.islice(batches, max_batches))
        max_batches = None
    agree_across_processes(
        {None: -1, "auto": -2}.get(rank, rank),  # type: ignore[arg-type]
        "prior_rank (-1: None, the exact prior; -2: 'auto')",
    )
    run = _Run(model, layers, batches, loss_fn, max_batches, progress, hooked)
    sketch_rank = {k for k in ranks.values() if k is not None}
    label = kind if not sketch_rank else f"{kind}, rank {rank}" if rank != "auto" else f"{kind}, auto rank"

    def make(group: Mapping[str, nn.Module]) -> list[PriorStrategy]:
        """The group's strategies: the exact prior of its layers without a rank, the sketch of those with one."""
        parts: list[PriorStrategy] = []
        plain = {n: layer for n, layer in group.items() if ranks[n] is None}
        if plain:
            parts.append(exact(plain, lr=lr, seed=seed))
        for k in sorted(sketch_rank):
            ranked = {n: layer for n, layer in group.items() if ranks[n] == k}
            if ranked and sketched is not None:
                parts.append(sketched(ranked, lr=lr, rank=k, seed=seed))
        return parts

    return _grouped(run, groups, make, label)


def check_prior_rank(rank: Any, kind: str) -> None:
    """Refuse a ``prior_rank`` that is not None, ``"auto"`` or a positive integer, or a rank given to a prior with
    no sketch (``"auto"`` gives such a prior the exact form everywhere)."""
    if rank is None or rank == "auto":
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(
            f"prior_rank must be a positive integer (the rank of the sketched prior), 'auto' (sketched where a "
            f"layer is at least {AUTO_SKETCH_MIN_WIDTH} wide on both sides) or None (the exact prior), got {rank!r}"
        )
    if kind not in SKETCHED_STRATEGIES:
        raise ValueError(
            f"the {kind} prior has no sketched form (it steps the weights themselves, so it needs their whole "
            f"gradients): leave prior_rank=None, or use prior={' or '.join(map(repr, SKETCHED_STRATEGIES))} with "
            "a rank"
        )


def layer_prior_ranks(
    layers: Mapping[str, nn.Module], rank: int | str | None, kind: str
) -> dict[str, int | None]:
    """Each layer's sketch rank under ``prior_rank=rank`` (None: its exact prior): ``rank`` itself for every layer,
    or with ``"auto"`` :data:`AUTO_PRIOR_RANK` for the layers with ``min(d_out, d_in) >=``
    :data:`AUTO_SKETCH_MIN_WIDTH` (none for a prior with no sketched form) and None for the others."""
    check_prior_rank(rank, kind)
    if rank != "auto":
        return dict.fromkeys(layers, rank)  # type: ignore[arg-type]
    sketchable = kind in SKETCHED_STRATEGIES
    return {
        name: AUTO_PRIOR_RANK
        if sketchable and min(layer.d_out, layer.d_in) >= AUTO_SKETCH_MIN_WIDTH
        else None
        for name, layer in layers.items()
    }


def _activation_layers(
    layers: Mapping[str, nn.Module], from_activations: bool | None, prefer: Collection[str] = ()
) -> set[str]:
    """The names of the layers whose prior is taken from activations; unsupported ones refused. None: those whose
    weight takes no gradient, and those in ``prefer`` (sketched, which then never form a dense ``g_b``) whose kind
    gives a gradient from activations."""
    if from_activations is None:
        return {
            n
            for n, layer in layers.items()
            if not takes_weight_gradient(layer.base_layer)
            or (n in prefer and kind_of(layer.base_layer).prior_from_activations)
        }
    if not from_activations:
        return set()
    for name, layer in layers.items():
        if not kind_of(layer.base_layer).prior_from_activations:
            raise TypeError(f"{name!r} ({kind_of(layer.base_layer).label}) takes no prior from activations")
    return set(layers)


# ------------------------------------------------------------------------------------------------ the priors
class PriorStrategy:
    """One prior's running state over the calibration batches, for one group of layers (``{name: adapter layer}``):
    made at the start, given each batch's gradient ``g_b`` of each layer (:meth:`add`, ``(d_out, d_in)`` float32 or
    float64), told when a batch ends (:meth:`end_batch`), and asked for the priors at the end (:meth:`finish`, which
    sums across processes). :meth:`restore` undoes what it changed of the model, whatever happened.

    ``per_call``: the prior is linear in ``g_b``, so the gradient of each call of a layer may be added as it comes
    (:meth:`add_call`, from a call's input ``x`` and output gradient ``δ``); otherwise calibration sums a batch's
    calls first. ``steps_weights``: the prior moves the weights themselves (no activations, no groups).

    The strategies: :data:`PRIOR_STRATEGIES` (exact, by ``S2FTConfig.prior``) and :data:`SKETCHED_STRATEGIES`
    (``prior_rank=k``)."""

    per_call = False
    steps_weights = False
    keeps_float64 = False  # whether a float64 weight's gradient is added as it is (else in float32)
    # per-call strategies only: whether a batch's calls of a layer are also handed over together, when its last
    # has come (add_calls), for what is not linear in g_b (the Adam prior's squares)
    collects_calls = False

    def __init__(self, layers: Mapping[str, nn.Module], **options: Any) -> None:
        self.layers = layers
        self.device = next(iter(layers.values())).base_layer.weight.device

    def add(self, name: str, grad: torch.Tensor) -> None:
        raise NotImplementedError

    def add_call(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        """A call's share of ``g_b``, ``Σ_tokens δᵀ x`` (only where :attr:`per_call`)."""
        base = self.layers[name].base_layer
        self.add(name, _hold(kind_of(base).weight_gradient(base, x, delta)))

    def add_calls(self, name: str, calls: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A batch's calls ``(x, δ)`` of a layer, together (only where :attr:`collects_calls`)."""

    def end_batch(self) -> None:
        pass

    def finish(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def restore(self) -> None:
        pass

    def _zeros(self, name: str) -> torch.Tensor:
        layer = self.layers[name]
        return _hold(torch.zeros((layer.d_out, layer.d_in), device=self.device))


class GradientPrior(PriorStrategy):
    """``ΔŴ = -Σ_b g_b`` (the paper)."""

    per_call = True

    def __init__(self, layers: Mapping[str, nn.Module], **options: Any) -> None:
        super().__init__(layers)
        self.sums = {n: self._zeros(n) for n in layers}

    def add(self, name: str, grad: torch.Tensor) -> None:
        self.sums[name] -= grad

    def finish(self) -> dict[str, torch.Tensor]:
        _all_reduce(self.sums.values())
        return self.sums


class AdamPrior(GradientPrior):
    """``ΔŴ = -Σ_b g_b / sqrt(Σ_b g_b²)`` elementwise, 0 where every ``g_b`` is 0."""

    per_call = False

    def __init__(self, layers: Mapping[str, nn.Module], **options: Any) -> None:
        super().__init__(layers)
        self.squares = {n: self._zeros(n) for n in layers}

    def add(self, name: str, grad: torch.Tensor) -> None:
        self.sums[name] -= grad
        self.squares[name] += grad * grad

    def finish(self) -> dict[str, torch.Tensor]:
        _all_reduce((*self.sums.values(), *self.squares.values()))
        priors = {}
        for name in list(self.sums):
            total, scale = self.sums.pop(name), self.squares.pop(name).sqrt_()
            # 0 only where every g_b was 0; a NaN or inf stays one, for _check_priors to report
            priors[name] = _hold(
                torch.where(scale == 0, 0.0, total / scale.clamp_min(torch.finfo(scale.dtype).tiny))
            )
            del total, scale
        return priors


class TrajectoryPrior(PriorStrategy):
    """``ΔŴ = W_B - W_0`` after one Adam step per batch (betas 0.9/0.999, eps 1e-8, no weight decay) on float32
    master copies of the weights (low-precision weights would round small steps away); the model's weights follow
    them, rounded, and get their starting values back in :meth:`restore`. Under ``torch.distributed`` each step
    sums the ranks' gradients of that step."""

    steps_weights = True

    def __init__(self, layers: Mapping[str, nn.Module], lr: float = 1e-4, **options: Any) -> None:
        super().__init__(layers)
        self.weights = [layer.base_layer.weight for layer in layers.values()]
        self.start = [w.detach().clone() for w in self.weights]
        self.masters = [w.detach().float().clone() for w in self.weights]
        self.optimizer = torch.optim.Adam(
            self.masters, lr=lr, betas=_ADAM_BETAS, eps=_ADAM_EPS, foreach=False
        )

    def add(self, name: str, grad: torch.Tensor) -> None:
        pass  # end_batch reads the weights' own gradients

    def end_batch(self) -> None:
        for w, master in zip(self.weights, self.masters):
            grad = w.grad if w.grad is not None else torch.zeros_like(w)
            _all_reduce([grad])
            master.grad = grad.float()
        self.optimizer.step()
        with torch.no_grad():
            for w, master in zip(self.weights, self.masters):
                w.copy_(master)

    def finish(self) -> dict[str, torch.Tensor]:
        return {
            name: kind_of(layer.base_layer).matrix(layer.base_layer, master - w0.float())
            for (name, layer), master, w0 in zip(self.layers.items(), self.masters, self.start)
        }

    def restore(self) -> None:
        with torch.no_grad():
            for w, w0 in zip(self.weights, self.start):
                w.copy_(w0)


# one strategy per prior of s2ft.config.PRIORS
PRIOR_STRATEGIES: dict[str, type[PriorStrategy]] = {
    "gradient": GradientPrior,
    "adam": AdamPrior,
    "trajectory": TrajectoryPrior,
}


def sketch_dtype_of(layer: nn.Module) -> torch.dtype:
    """The dtype a sketched prior holds a layer's sketches and test matrices in: float64 for a float64 weight,
    bfloat16 for a layer computing in 16 bits (bfloat16 or float16: its ``x`` and ``δ``, hence every ``g_b``, carry
    16-bit precision already; bfloat16 for float16 too, whose range the sums could leave), float32 otherwise. Each
    batch's share is computed in float32 (in bfloat16 on an accelerator: :func:`product_dtype`) and rounded once
    into the running sum; sums across processes are taken in float32."""
    base = layer.base_layer
    kind = kind_of(base)
    compute_dtype = getattr(kind, "compute_dtype", None)  # quantized kinds say it; a float weight is its own
    dtype = compute_dtype(base) if kind.quantized and compute_dtype is not None else base.weight.dtype
    if dtype == torch.float64:
        return torch.float64
    return torch.bfloat16 if dtype in (torch.bfloat16, torch.float16) else torch.float32


class SketchedGradientPrior(PriorStrategy):
    """The gradient prior ``-Σ_b g_b`` as a rank-``k`` :class:`s2ft.ops.sketch.LowRank`, from its range and
    co-range sketches ``-Σ_b g_b Ω`` ``(d_out, k)`` and ``-Σ_b Ψ g_b`` ``(l, d_in)``: ``O((d_out + d_in)·k)`` per
    layer. From activations, a call adds ``δᵀ(xΩ)`` and ``(Ψδᵀ)x`` without forming ``δᵀx``. ``k`` is
    ``min(rank, d_out, d_in)`` per layer (at ``min(d_out, d_in)`` the sketch is exact); ``l = min(k + p, d_out)``
    (:func:`s2ft.ops.sketch.corange_width`, ``oversample`` ``p``, None: its default). A layer with
    ``d_out < d_in`` is sketched transposed (``g_bᵀ``: ``Y`` ``(d_in, k)``, ``W`` ``(l, d_out)``, the factors
    swapped back at the end), so that the wider ``W`` always runs along the smaller side. The sketches are held in
    ``sketch_dtype`` (None: :func:`sketch_dtype_of` per layer). The test matrices come from ``(seed, shape, k)``
    (:func:`sketch_generator`), the same on every process and shared by the layers of a shape."""

    per_call = True
    keeps_float64 = True

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        rank: int = 16,
        seed: int = 0,
        oversample: int | None = None,
        sketch_dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        super().__init__(layers)
        self.omega, self.psi, self.y, self.w = {}, {}, {}, {}
        self.sums: dict[str, torch.dtype] = {}  # the dtype of each layer's exact sums (float32, float64)
        self.flipped: set[str] = set()  # the layers sketched transposed (d_out < d_in)
        shared: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # one Ω, Ψ per shape, rank and dtype
        for name, layer in layers.items():
            k = min(rank, layer.d_out, layer.d_in)
            dtype = sketch_dtype if sketch_dtype is not None else sketch_dtype_of(layer)
            self.sums[name] = torch.float64 if dtype == torch.float64 else torch.float32
            if layer.d_out < layer.d_in:
                self.flipped.add(name)
            rows, cols = (layer.d_in, layer.d_out) if name in self.flipped else (layer.d_out, layer.d_in)
            key = (layer.d_out, layer.d_in, k, dtype)
            if key not in shared:
                omega, psi = sketch_matrices(
                    rows, cols, k, sketch_generator(seed, *key[:3]), dtype, oversample
                )
                shared[key] = _hold(omega.to(self.device)), _hold(psi.to(self.device))
            self.omega[name], self.psi[name] = shared[key]
            psi = self.psi[name]
            self.y[name] = _hold(torch.zeros(rows, k, device=self.device, dtype=dtype))
            self.w[name] = _hold(torch.zeros(psi.shape[0], cols, device=self.device, dtype=dtype))

    def add(self, name: str, grad: torch.Tensor) -> None:
        self._take(name, *self._grad_products(name, grad))

    def add_call(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        base = self.layers[name].base_layer
        if type(kind_of(base)).weight_gradient is not LayerKind.weight_gradient:
            # a kind of its own: δᵀx formed, one call's transient
            grad = _hold(kind_of(base).weight_gradient(base, x, delta))
            self._take(name, *self._grad_products(name, grad))
            return
        self._take(name, *self._call_products(name, x, delta))

    def _grad_products(self, name: str, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g Ω, Ψ g)`` of a whole ``g`` (``gᵀ`` for a layer sketched transposed), in ``grad``'s dtype."""
        grad = grad.T if name in self.flipped else grad
        return grad @ self.omega[name].to(grad.dtype), self.psi[name].to(grad.dtype) @ grad

    def _call_products(
        self, name: str, x: torch.Tensor, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g Ω, Ψ g)`` of a call's ``g = δᵀx``, never forming ``g``: ``δᵀ(xΩ)`` ``(d_out, k)`` and ``(Ψδᵀ)x``
        ``(l, d_in)`` (transposed roles for a layer sketched transposed), in :func:`product_dtype`."""
        dtype = product_dtype(x, delta, self.sums[name])
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (tokens, d_in)
        d2 = delta.reshape(-1, delta.shape[-1]).to(dtype)  # (tokens, d_out)
        if name in self.flipped:  # g_bᵀ = x2ᵀ d2
            x2, d2 = d2, x2
        return d2.T @ (x2 @ self.omega[name].to(dtype)), (self.psi[name].to(dtype) @ d2.T) @ x2

    def _take(self, name: str, y: torch.Tensor, w: torch.Tensor) -> None:
        """Subtract a share's sketches from the running ones (the prior is ``-Σ g_b``), rounded once into them."""
        self.y[name].sub_(y)
        self.w[name].sub_(w)

    def _reduce(self) -> None:
        for name in self.layers:  # in float32 (or float64) where held in bfloat16, a layer at a time
            for sketch in (self.y[name], self.w[name]):
                if sketch.dtype == self.sums[name]:
                    _all_reduce((sketch,))
                elif torch.distributed.is_available() and torch.distributed.is_initialized():
                    wide = sketch.to(self.sums[name])
                    _all_reduce((wide,))
                    sketch.copy_(wide)

    def _low_rank(
        self, name: str, row_scale: torch.Tensor | None = None, col_scale: torch.Tensor | None = None
    ) -> LowRank:
        """The layer's ``LowRank`` ``(d_out, d_in)`` from its sketches (dropped), scaled as given."""
        y, w, psi = self.y.pop(name), self.w.pop(name), self.psi.pop(name)
        if name not in self.flipped:
            return low_rank_from_sketches(y, w, psi, row_scale, col_scale)
        flipped = low_rank_from_sketches(y, w, psi, col_scale, row_scale)
        return LowRank(flipped.v, flipped.s, flipped.u)

    def finish(self) -> dict[str, Any]:
        self._reduce()
        return {n: self._low_rank(n) for n in self.layers}


class SketchedAdamPrior(SketchedGradientPrior):
    """The Adam prior with its second moment factored as Adafactor factors it: ``V ≈ R Cᵀ / Σ R`` from the row and
    column sums ``R = Σ_b (g_b²) 1`` ``(d_out,)`` and ``C = Σ_b 1ᵀ(g_b²)`` ``(d_in,)``, so that
    ``ΔŴ = -Σ_b g_b / sqrt(V) = -sqrt(ΣR) · diag(R^-1/2) (Σ_b g_b) diag(C^-1/2)`` (0 on a row or column whose
    gradient was always 0) is the gradient sketch's matrix scaled on both sides: a rank-``k`` ``LowRank`` from the
    same sketches.

    ``squares`` says how ``R`` and ``C`` are taken (:data:`SKETCH_SQUARES`):

    - ``"sketch"``: estimated from each batch's own sketches, ``R_i ≈ ‖(g_b Ω)_i‖² / k`` and
      ``C_j ≈ ‖(Ψ g_b)_j‖² / l`` (``Ω``, ``Ψ`` Gaussian: unbiased, relative standard deviation ``sqrt(2/k)`` and
      ``sqrt(2/l)`` per row and column), at no cost beyond the sketches: a layer's batch share ``(g_b Ω, Ψ g_b)``
      is held until its batch ends for the layer (``O((d_out + d_in)·k)``), then folded into the sketches and the
      sums;
    - ``"exact"``: from activations, the squares of ``g_b = Dᵀ X`` (a batch's calls' output gradients and inputs,
      tokens stacked) come from ``(d_out, d_in)``-free products (:func:`row_col_squares`), one more product as
      large as the layer's own per batch; from a weight's gradient, ``g_b`` is there whole anyway."""

    collects_calls = True

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        rank: int = 16,
        seed: int = 0,
        squares: str | None = None,
        **options: Any,
    ) -> None:
        squares = SKETCH_SQUARES if squares is None else squares
        if squares not in ("sketch", "exact"):
            raise ValueError(f"squares must be 'sketch' or 'exact', got {squares!r}")
        super().__init__(layers, rank=rank, seed=seed, **options)
        self.squares = squares
        self.batch: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # squares="sketch": this batch's shares
        self.row_sq = {
            n: _hold(self.y[n].new_zeros(layer.d_out, dtype=self.sums[n])) for n, layer in layers.items()
        }
        self.col_sq = {
            n: _hold(self.y[n].new_zeros(layer.d_in, dtype=self.sums[n])) for n, layer in layers.items()
        }

    def _take(self, name: str, y: torch.Tensor, w: torch.Tensor) -> None:
        if self.squares == "exact":
            super()._take(name, y, w)
            return
        held = self.batch.get(name)
        if held is None:
            self.batch[name] = (_hold(y.to(self.sums[name])), _hold(w.to(self.sums[name])))
        else:
            held[0].add_(y)
            held[1].add_(w)

    def _fold(self, name: str) -> None:
        """A layer's batch share (squares="sketch"): into the sketches, and its squares' estimates into the sums."""
        if name not in self.batch:
            return
        y, w = self.batch.pop(name)
        super()._take(name, y, w)
        out_sq = y.square().sum(dim=1).div_(y.shape[1])  # rows of the sketched matrix: g_b's, or g_bᵀ's
        in_sq = w.square().sum(dim=0).div_(w.shape[0])
        rows, cols = (in_sq, out_sq) if name in self.flipped else (out_sq, in_sq)
        self.row_sq[name] += rows
        self.col_sq[name] += cols

    def add(self, name: str, grad: torch.Tensor) -> None:
        """A batch's ``g_b`` of a layer whose weight takes a gradient (once per batch)."""
        super().add(name, grad)
        if self.squares == "sketch":
            self._fold(name)
            return
        square = grad * grad
        self.row_sq[name] += square.sum(dim=1)
        self.col_sq[name] += square.sum(dim=0)
        del square

    def add_calls(self, name: str, calls: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if self.squares == "sketch":
            self._fold(name)
            return
        base = self.layers[name].base_layer
        if (
            type(kind_of(base)).weight_gradient is not LayerKind.weight_gradient
        ):  # a kind of its own: g_b whole
            grad = _hold(kind_of(base).weight_gradient(base, *calls[0]))
            for x, d in calls[1:]:
                grad += kind_of(base).weight_gradient(base, x, d)
            square = grad * grad
            self.row_sq[name] += square.sum(dim=1).to(self.row_sq[name].dtype)
            self.col_sq[name] += square.sum(dim=0).to(self.col_sq[name].dtype)
            return
        dtype = product_dtype(calls[0][0], calls[0][1], self.row_sq[name].dtype)
        x = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in calls]).to(dtype)  # (tokens, d_in)
        d = torch.cat([d.reshape(-1, d.shape[-1]) for _, d in calls]).to(dtype)  # (tokens, d_out)
        rows, cols = row_col_squares(d, x, self.row_sq[name].dtype)
        self.row_sq[name] += rows
        self.col_sq[name] += cols

    def end_batch(self) -> None:
        for name in list(self.batch):  # layers whose calls never reached the loss's end of the batch
            self._fold(name)

    def finish(self) -> dict[str, Any]:
        self.end_batch()
        self._reduce()
        _all_reduce((*self.row_sq.values(), *self.col_sq.values()))
        priors = {}
        for name in self.layers:
            rows, cols = self.row_sq.pop(name).double(), self.col_sq.pop(name).double()
            total = rows.sum()
            row_scale = torch.where(rows > 0, (total / torch.where(rows > 0, rows, 1.0)).sqrt(), 0.0)
            col_scale = torch.where(cols > 0, torch.where(cols > 0, cols, 1.0).rsqrt(), 0.0)
            priors[name] = self._low_rank(name, row_scale, col_scale)
        return priors


# How a sketched Adam prior takes its second moment's row and column sums (SketchedAdamPrior's ``squares``).
SKETCH_SQUARES = "sketch"

SQUARES_BLOCK_ENTRIES = 2**20  # entries of the (rows, d_in) or (tokens, tokens) blocks of row_col_squares

# Whether a 16-bit layer's sketch products and squares are multiplied in 16 bits on the CPU too (tests set it: the
# CPU path is then the accelerator's).
SIXTEEN_BIT_PRODUCTS_ON_CPU = False


def product_dtype(x: torch.Tensor, delta: torch.Tensor, sums: torch.dtype) -> torch.dtype:
    """The dtype a sketched prior multiplies a call's ``x`` and ``δ`` in: bfloat16 for a 16-bit layer (bfloat16 or
    float16: float16's range could not hold ``xΩ``) on an accelerator, whose 16-bit matrix units are many times
    faster than its float32 ones (an H100's bfloat16 tensor cores: ~15x its float32 rate) and accumulate in float32
    inside the product; otherwise ``sums`` (float32, float64) or wider. On a CPU, 16-bit products are float32
    products (oneDNN widens them, many CPUs slowly), so float32 there. In bfloat16, each product's result is rounded
    once to 8 significant bits before it is summed in ``sums``' dtype (the sketches of a 16-bit layer are held in
    bfloat16 anyway)."""
    sixteen = (torch.bfloat16, torch.float16)
    accelerator = x.device.type != "cpu" or SIXTEEN_BIT_PRODUCTS_ON_CPU
    if x.dtype in sixteen and delta.dtype in sixteen and accelerator:
        return torch.bfloat16
    return torch.promote_types(torch.promote_types(x.dtype, delta.dtype), sums)


def row_col_squares(
    d: torch.Tensor, x: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and column sums of ``g²`` for ``g = dᵀ x`` ``(d_out, d_in)``, from ``d`` ``(T, d_out)`` and ``x``
    ``(T, d_in)``, never holding ``g``: ``(d_out,)`` and ``(d_in,)`` in ``dtype`` (None: the inputs').

    With few tokens (``2T(d_out + d_in) < d_out·d_in``) and float32 or float64 inputs, through the tokens' Gram
    matrices, ``Σ_j g_ij² = (dᵀ K d)_ii`` with ``K = x xᵀ`` and ``Σ_i g_ij² = (xᵀ L x)_jj`` with ``L = d dᵀ``,
    ``O(T²(d_out + d_in))`` (``K``, ``L`` a block of token rows at a time; the Gram form sums terms of both signs, so
    its rounding is relative to ``Σ|terms|``; clamped at 0); otherwise ``g`` a block of rows at a time,
    ``O(T·d_out·d_in)``, each block multiplied in the inputs' dtype and squared and summed in ``dtype``. 16-bit
    inputs (an accelerator's, :func:`product_dtype`) always take the second way: one product as large as the
    layer's own, on the 16-bit units, costs less than the Gram route in float32 at ~1/15 their rate.
    Either way ``O(SQUARES_BLOCK_ENTRIES + T·(d_out + d_in))`` memory."""
    tokens, d_out = d.shape
    d_in = x.shape[1]
    dtype = d.dtype if dtype is None else dtype
    rows = d.new_zeros(d_out, dtype=dtype)
    cols = d.new_zeros(d_in, dtype=dtype)
    sixteen = d.dtype in (torch.bfloat16, torch.float16)
    if not sixteen and 2 * tokens * (d_out + d_in) < d_out * d_in:
        step = max(1, SQUARES_BLOCK_ENTRIES // max(tokens, d_out, d_in))
        for start in range(0, tokens, step):
            xb, db = x[start : start + step], d[start : start + step]
            rows += (db * ((xb @ x.T) @ d)).sum(dim=0)  # Σ_{t in block} d_ti (K d)_ti
            cols += (xb * ((db @ d.T) @ x)).sum(dim=0)
        return rows.clamp_min_(0.0), cols.clamp_min_(0.0)
    step = max(1, SQUARES_BLOCK_ENTRIES // d_in)
    for start in range(0, d_out, step):
        square = (d[:, start : start + step].T @ x).to(dtype).square_()  # rows of g, squared
        rows[start : start + step] = square.sum(dim=1)
        cols += square.sum(dim=0)
    return rows, cols


# the sketched strategy of a prior, where it has one (S2FTConfig.prior_rank)
SKETCHED_STRATEGIES: dict[str, type[PriorStrategy]] = {
    "gradient": SketchedGradientPrior,
    "adam": SketchedAdamPrior,
}


def sketch_generator(seed: int, d_out: int, d_in: int, rank: int) -> torch.Generator:
    """A CPU generator for the test matrices of the ``(d_out, d_in)`` layers sketched at ``rank``, seeded through
    SHA-256: the same on every machine and process. Layers of one shape share their test matrices (a sketch needs
    them independent of the matrix, not of the other layers'), so they are held once per shape."""
    digest = hashlib.sha256(f"sketch:{seed}:{d_out}x{d_in}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _all_reduce(tensors: Iterable[torch.Tensor]) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for tensor in tensors:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)


# ------------------------------------------------------------------------------------------------ the pass
class _Run:
    """What every group's pass shares: the model, all the adapter layers (their ΔW off meanwhile), the batches and
    the names of the layers whose gradient comes from activations."""

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        batches: Iterable[Any],
        loss_fn: LossFn | None,
        max_batches: int | None,
        progress: bool,
        hooked: set[str],
    ) -> None:
        self.model, self.everyone, self.batches, self.loss_fn = model, layers, batches, loss_fn
        self.max_batches, self.progress, self.hooked = max_batches, progress, hooked


def _grouped(
    run: _Run,
    groups: list[list[str]],
    make: Callable[[Mapping[str, nn.Module]], list[PriorStrategy]],
    kind: str,
) -> Iterator[tuple[str, Any]]:
    for index, group in enumerate(groups):
        label = f"calibrating ({kind} prior" + (
            f", group {index + 1}/{len(groups)})" if len(groups) > 1 else ")"
        )
        priors = _group_prior(run, make({n: run.everyone[n] for n in group}), label)
        for name in group:
            yield name, priors.pop(name)


def _group_prior(run: _Run, parts: list[PriorStrategy], label: str) -> dict[str, Any]:
    """One pass over the batches for one group's layers, split between the strategies ``parts`` (each its own
    layers: exact and sketched priors side by side with ``prior_rank="auto"``), every adapter's ΔW off meanwhile:
    see :func:`compute_prior`."""
    owner = {name: part for part in parts for name in part.layers}
    weights = {n: owner[n].layers[n].base_layer.weight for n in owner if n not in run.hooked}
    seen = 0
    disabled = {name: layer.disabled for name, layer in run.everyone.items()}
    # in step across ranks; one error on all if uneven
    iterator: Any = agreed_batches(run.batches, run.max_batches)
    if run.progress:
        from tqdm.auto import tqdm

        total = run.max_batches if run.max_batches is not None else _len_or_none(run.batches)
        iterator = tqdm(iterator, total=total, desc=label, unit="batch")
    hooks = [_ActivationGradients(part, [n for n in part.layers if n in run.hooked]) for part in parts]
    try:
        for layer in run.everyone.values():
            layer.disabled = True
        for hook in hooks:
            hook.attach()
        with _only_weights_require_grad(run.model, list(weights.values())):
            for index, batch in enumerate(iterator):
                if run.max_batches is not None and index >= run.max_batches:
                    break
                loss = batch_loss(run.model, _move(batch, parts[0].device), run.loss_fn)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"calibration batch {index} gave a non-finite loss ({float(loss.detach())})"
                    )
                if loss.requires_grad:  # it does not when none of the group's layers is used
                    loss.backward()
                for hook in hooks:
                    hook.end_batch()
                for name, w in weights.items():
                    if w.grad is not None:
                        _hold(w.grad)
                        part = owner[name]
                        grad = weight_matrix(part.layers[name].base_layer, grad=True)
                        keep = part.keeps_float64 and grad.dtype == torch.float64
                        part.add(name, grad if keep else grad.float())
                        del grad
                for part in parts:
                    part.end_batch()
                for w in weights.values():
                    w.grad = None
                seen += 1
    finally:
        for hook in hooks:
            hook.detach()
        for part in parts:
            part.restore()
        for name, layer in run.everyone.items():
            layer.disabled = disabled[name]
        if run.progress:
            iterator.close()
    priors = {}
    for part in parts:
        priors.update(part.finish())
    _check_priors(priors, seen)
    return priors


class _ActivationGradients:
    """Hooks on the base layers of ``names`` that hand ``strategy`` each batch's ``g_b = Σ_calls Σ_tokens δᵀx``.

    A per-call strategy gets every call's share as it comes (and, where it collects calls, the batch's calls
    ``(x, δ)`` of a layer together once the last has come). Any other gets ``g_b`` whole: the forward counts a
    layer's calls that will see a gradient, and the sum of their ``δᵀx`` goes to the strategy when the last one
    has come (what is left at the end of the batch too), so one layer's ``g_b`` is held at a time however many
    layers there are. A call's ``x`` reaches ``δ`` through the graph (:class:`_Tap`), so gradient checkpointing
    frees and recomputes it as it does the layer's own activations. Calls made during the backward pass (gradient checkpointing's forward run again) count only
    for a layer with no call in the forward pass of the batch: non-reentrant checkpointing runs the forward with
    gradients first and again in the backward pass, where no gradient reaches the outputs of the second run;
    reentrant checkpointing runs it without gradients first, then with them in the backward pass. (A layer called
    both inside and outside a reentrant checkpoint gets its calls' shares one by one, as separate ``g_b``.)
    A layer's input is made to require grad (``x + 0``, the same values) when nothing before
    it does, so that ``δ`` reaches it even when no weight of the model takes a gradient."""

    def __init__(self, strategy: PriorStrategy, names: list[str]) -> None:
        self.strategy, self.names = strategy, names
        self.handles: list[Any] = []
        self.forward_calls = dict.fromkeys(names, 0)
        self.backward_calls = dict.fromkeys(names, 0)  # the forward run again by gradient checkpointing
        self.arrived = dict.fromkeys(names, 0)
        self.pending: dict[str, torch.Tensor] = {}
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # collects_calls: this batch's

    def attach(self) -> None:
        anchor = torch.zeros((), requires_grad=True)

        def pre(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            if torch.is_grad_enabled() and not x.requires_grad:
                return (x + anchor.to(x.device, x.dtype), *args[1:])
            return None

        for name in self.names:
            base = self.strategy.layers[name].base_layer

            def post(module: nn.Module, args: tuple, output: torch.Tensor, name: str = name) -> Any:
                if torch.is_grad_enabled() and output.requires_grad:
                    in_backward = torch._C._current_graph_task_id() != -1
                    calls = self.backward_calls if in_backward else self.forward_calls
                    calls[name] += 1
                    return _Tap.apply(output, args[0].detach(), partial(self._arrive, name))
                return None

            self.handles += [base.register_forward_pre_hook(pre), base.register_forward_hook(post)]

    @torch.no_grad()
    def _arrive(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        if self.strategy.per_call:
            self.strategy.add_call(name, x, delta)
            if self.strategy.collects_calls:
                self.calls.setdefault(name, []).append((x, delta))
                self.arrived[name] += 1
                self._hand_over_if_complete(name)
            return
        base = self.strategy.layers[name].base_layer
        grad = _hold(kind_of(base).weight_gradient(base, x, delta))
        if name in self.pending:
            self.pending[name].add_(grad)
        elif grad.dtype == torch.float32 or (self.strategy.keeps_float64 and grad.dtype == torch.float64):
            self.pending[name] = grad
        else:  # the batch's sum in float32, as the priors are
            self.pending[name] = _hold(grad.float())
        del grad
        self.arrived[name] += 1
        self._hand_over_if_complete(name)

    def _hand_over_if_complete(self, name: str) -> None:
        expected = self.forward_calls[name] or self.backward_calls[name]
        if self.arrived[name] < expected:
            return
        if name in self.pending:
            self.strategy.add(name, self.pending.pop(name))
        if name in self.calls:
            self.strategy.add_calls(name, self.calls.pop(name))

    def end_batch(self) -> None:
        for name in list(self.pending):  # calls whose output never reached the loss
            self.strategy.add(name, self.pending.pop(name))
        for name in list(self.calls):
            self.strategy.add_calls(name, self.calls.pop(name))
        self.forward_calls = dict.fromkeys(self.names, 0)
        self.backward_calls = dict.fromkeys(self.names, 0)
        self.arrived = dict.fromkeys(self.names, 0)

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.pending.clear()
        self.calls.clear()


class _Tap(torch.autograd.Function):
    """``output`` (a copy), whose gradient ``δ`` is handed to ``arrive(x, δ)`` with the layer's input ``x``. ``x``
    is a saved tensor of the graph, not a Python reference: under non-reentrant gradient checkpointing it is
    dropped after the forward pass and computed again in the backward pass, as the layer's own activations are,
    so calibration holds no layer input across the forward pass that training would not."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, x: torch.Tensor, arrive: Callable) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.arrive = arrive
        return output.clone()  # not a view: the model may change its layers' outputs in place

    @staticmethod
    def backward(ctx: Any, delta: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors
        ctx.arrive(x, delta)
        return delta, None, None


gradient_prior = compute_prior  # its name before it computed the adam and trajectory priors too


def _len_or_none(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_priors(priors: Mapping[str, Any], seen: int) -> None:
    if seen == 0 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("calibration got no batches: pass an iterable of at least one batch")
    for name, prior in priors.items():
        if isinstance(prior, LowRank):
            finite = all(bool(torch.isfinite(t).all()) for t in (prior.u, prior.s, prior.v))
            prior = prior.s if finite else torch.full((1,), float("nan"))  # what the checks below read
        if not torch.isfinite(prior).all():
            raise FloatingPointError(
                f"the calibration gradient of {name!r} holds NaN or inf; check the batches and the loss "
                "(e.g. run calibration in float32, or lower the learning-rate-independent loss scale)"
            )
        if not prior.abs().amax() > 0:
            raise ValueError(
                f"no gradient reached {name!r} during calibration: is the layer used by the model's forward, "
                "and does the loss depend on its output?"
            )
