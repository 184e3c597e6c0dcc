"""S2FT calibration: the prior ``ΔŴ`` of every adapted matrix, from gradients (its plan: :mod:`s2ft.tuner.planner`).

A layer's gradient ``∂L/∂W`` comes from its weight's ``.grad``, or, for a weight that cannot take a gradient (a
quantized one, or a sharded ``DTensor``), from the layer's inputs ``x`` and output gradients ``δ`` through hooks
(``Σ_tokens δᵀ x``, :meth:`s2ft.tuner.kinds.LayerKind.weight_gradient`). :func:`iter_priors` hands the priors out
in groups of layers, each group over the same batches, so that at most one group's priors are held at once.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from s2ft.config import PRIORS
from s2ft.tuner.distributed import agreed_batches, is_partitioned, is_sharded
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
) -> dict[str, torch.Tensor]:
    """The prior ``ΔŴ`` of each layer's ``base_layer.weight``, from the gradients ``g_b`` of the batches:

    - ``"gradient"`` (the paper): ``ΔŴ = -Σ_b g_b`` at the current weights;
    - ``"adam"``: ``ΔŴ = -Σ_b g_b / sqrt(Σ_b g_b²)`` elementwise (0 where every ``g_b`` is 0): the direction of
      an Adam step whose moments are taken over the batches, so each weight counts by its gradient's
      signal-to-noise ratio rather than by its gradient's size;
    - ``"trajectory"``: ``ΔŴ = W_B - W_0`` after one Adam step (learning rate ``lr``, betas 0.9/0.999, eps 1e-8,
      no weight decay) per batch on these weights alone: the start of the path training takes, gradients taken
      along it. The weights are restored afterwards.

    ``g_b`` is the weight's gradient, or, for layers whose weight takes none (quantized, sharded; all layers with
    ``from_activations=True``, none with ``False``), ``Σ_tokens δᵀ x`` from the layer's inputs and output
    gradients; the trajectory prior needs the weights themselves and refuses such layers before anything changes.

    ``layers`` maps names to adapters (:class:`s2ft.tuner.layers.SpectralLayer`), whose ΔW is switched off meanwhile.
    The model runs in eval mode (no dropout, so the prior is deterministic) and, on return, nothing of it has
    changed: no weight, flag or gradient. Under ``torch.distributed`` each process passes its own batches: the
    ``"gradient"`` and ``"adam"`` sums are taken across processes, so every rank gets the prior one process would
    get from all the batches; a ``"trajectory"`` step sums the ranks' gradients of that step (the ranks' ``b``-th
    batches together make step ``b``; give every rank the same number of batches). Returns float32 ``(d_out, d_in)``
    priors in ``nn.Linear``'s convention.
    """
    return dict(
        iter_priors(model, layers, batches, loss_fn, max_batches, progress, kind, lr, None, from_activations)
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
) -> Iterator[tuple[str, torch.Tensor]]:
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
    hooked = _activation_layers(layers, from_activations)
    if kind == "trajectory" and hooked:
        name = next(n for n in layers if n in hooked)  # the first in module order
        raise ValueError(
            f"the trajectory prior steps the weights themselves, and {name!r} ({kind_of(layers[name].base_layer).label}"
            f"{'' if len(hooked) == 1 else f', and {len(hooked) - 1} more'}) has a weight that takes no gradient: "
            "use prior='gradient' or prior='adam', which are taken from the layer's activations"
        )
    names = list(layers)
    size = len(names) if group_size is None else group_size
    if kind == "trajectory" and size < len(names):
        raise ValueError(
            "the trajectory prior steps every layer's weights together (each layer's path depends on the "
            f"others'), so it cannot be computed in groups of {size} of {len(names)} layers: give no group size, "
            "or use prior='gradient' or prior='adam'"
        )
    groups = [names[i : i + size] for i in range(0, len(names), size)]
    if len(groups) > 1:  # every group sees the very same batches
        batches = list(batches if max_batches is None else itertools.islice(batches, max_batches))
        max_batches = None
    return _grouped(model, layers, groups, batches, loss_fn, max_batches, progress, kind, lr, hooked)


def _activation_layers(layers: Mapping[str, nn.Module], from_activations: bool | None) -> set[str]:
    """The names of the layers whose prior is taken from activations; unsupported ones refused."""
    if from_activations is None:
        return {n for n, layer in layers.items() if not takes_weight_gradient(layer.base_layer)}
    if not from_activations:
        return set()
    for name, layer in layers.items():
        if not kind_of(layer.base_layer).prior_from_activations:
            raise TypeError(f"{name!r} ({kind_of(layer.base_layer).label}) takes no prior from activations")
    return set(layers)


def _grouped(model, layers, groups, batches, loss_fn, max_batches, progress, kind, lr, hooked):
    for index, group in enumerate(groups):
        label = f"calibrating ({kind} prior" + (
            f", group {index + 1}/{len(groups)})" if len(groups) > 1 else ")"
        )
        priors = _group_prior(
            model,
            layers,
            {n: layers[n] for n in group},
            batches,
            loss_fn,
            max_batches,
            progress,
            kind,
            lr,
            hooked,
            label,
        )
        for name in group:
            yield name, priors.pop(name)


def _group_prior(
    model: nn.Module,
    everyone: Mapping[str, nn.Module],
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    loss_fn: LossFn | None,
    max_batches: int | None,
    progress: bool,
    kind: str,
    lr: float,
    hooked: set[str],
    label: str,
) -> dict[str, torch.Tensor]:
    """The priors of ``layers`` (one group) over ``batches``, the ΔW of ``everyone`` off meanwhile: see
    :func:`compute_prior`."""
    weights = [layer.base_layer.weight for n, layer in layers.items() if n not in hooked]
    device = next(iter(layers.values())).base_layer.weight.device
    sums = {n: _hold(torch.zeros((layer.d_out, layer.d_in), device=device)) for n, layer in layers.items()}
    squares = {n: _hold(torch.zeros_like(sums[n])) for n in layers} if kind == "adam" else None
    # adam: a batch's g_b of a hooked layer is summed over its calls first; gradient: -δᵀx goes to the sum at once
    per_batch = (
        {n: _hold(torch.zeros_like(sums[n])) for n in layers if n in hooked} if squares is not None else {}
    )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    # trajectory: Adam on float32 master copies (low-precision weights would round small steps away); the model's
    # weights follow them, rounded, and get their starting values back at the end
    start = [w.detach().clone() for w in weights] if kind == "trajectory" else None
    masters = [w.detach().float().clone() for w in weights] if kind == "trajectory" else []
    optimizer = (
        torch.optim.Adam(masters, lr=lr, betas=_ADAM_BETAS, eps=_ADAM_EPS, foreach=False) if masters else None
    )
    seen = 0
    disabled = {name: layer.disabled for name, layer in everyone.items()}
    iterator: Any = agreed_batches(batches, max_batches)  # in step across ranks; one error on all if uneven
    if progress:
        from tqdm.auto import tqdm

        total = max_batches if max_batches is not None else _len_or_none(batches)
        iterator = tqdm(iterator, total=total, desc=label, unit="batch")
    handles = []
    try:
        for layer in everyone.values():
            layer.disabled = True
        into = {n: per_batch[n] if per_batch else sums[n] for n in hooked if n in layers}
        handles = _attach_hooks(layers, into, sign=1.0 if per_batch else -1.0)
        with _only_weights_require_grad(model, weights):
            for index, batch in enumerate(iterator):
                if max_batches is not None and index >= max_batches:
                    break
                loss = batch_loss(model, _move(batch, device), loss_fn)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"calibration batch {index} gave a non-finite loss ({float(loss.detach())})"
                    )
                if loss.requires_grad:  # it does not when none of the group's layers is used
                    loss.backward()
                if optimizer is not None:
                    for w, master in zip(weights, masters):
                        grad = w.grad if w.grad is not None else torch.zeros_like(w)
                        if distributed:
                            torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
                        master.grad = grad.float()
                    optimizer.step()
                    with torch.no_grad():
                        for w, master in zip(weights, masters):
                            w.copy_(master)
                else:
                    _accumulate(layers, hooked, sums, squares, per_batch)
                for w in weights:
                    w.grad = None
                seen += 1
        for (name, layer), master, w0 in zip(layers.items(), masters, start or []):
            sums[name] = kind_of(layer.base_layer).matrix(layer.base_layer, master - w0.float())
    finally:
        for handle in handles:
            handle.remove()
        if start is not None:
            with torch.no_grad():
                for w, w0 in zip(weights, start):
                    w.copy_(w0)
        for name, layer in everyone.items():
            layer.disabled = disabled[name]
        if progress:
            iterator.close()
    if distributed and kind != "trajectory":
        for tensor in (*sums.values(), *(squares or {}).values()):
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    if squares is not None:
        for name in sums:
            scale = squares[name].sqrt()
            sums[name] = _hold(
                # 0 only where every g_b was 0; a NaN or inf stays one, for _check_priors to report
                torch.where(scale == 0, 0.0, sums[name] / scale.clamp_min(torch.finfo(scale.dtype).tiny))
            )
            del scale
    _check_priors(sums, seen)
    return sums


def _accumulate(layers, hooked, sums, squares, per_batch) -> None:
    """Add one batch's gradients ``g_b`` into the sums: ``-g_b``, and (adam) ``g_b²``."""
    for name, layer in layers.items():
        if name in per_batch:
            grad = per_batch[name]
        elif (
            name in hooked or layer.base_layer.weight.grad is None
        ):  # hooked: subtracted by the hooks already
            continue
        else:
            _hold(layer.base_layer.weight.grad)
            grad = weight_matrix(layer.base_layer, grad=True).float()
        sums[name] -= grad
        if squares is not None:
            squares[name] += grad * grad
        if name in per_batch:
            grad.zero_()


def _attach_hooks(layers: Mapping[str, nn.Module], into: dict[str, torch.Tensor], sign: float) -> list[Any]:
    """Hooks on the base layers of ``into``'s layers that add ``sign · δᵀx`` of every call into ``into[name]``.

    A layer's input is made to require grad (``x + 0``, the same values) when nothing before it does, so that
    ``δ`` reaches it even when no weight of the model takes a gradient."""
    anchor = torch.zeros((), requires_grad=True)
    handles = []
    for name, target in into.items():
        base = layers[name].base_layer
        layer_kind = kind_of(base)

        def pre(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            if torch.is_grad_enabled() and not x.requires_grad:
                return (x + anchor.to(x.device, x.dtype), *args[1:])
            return None

        def post(module: nn.Module, args: tuple, output: torch.Tensor, target=target, k=layer_kind) -> None:
            if torch.is_grad_enabled() and output.requires_grad:
                x = args[0].detach()
                output.register_hook(lambda delta: _add_gradient(target, k, module, x, delta, sign))

        handles += [base.register_forward_pre_hook(pre), base.register_forward_hook(post)]
    return handles


def _add_gradient(
    target: torch.Tensor, kind: LayerKind, layer: nn.Module, x: torch.Tensor, delta: torch.Tensor, sign: float
) -> None:
    with torch.no_grad():
        grad = _hold(kind.weight_gradient(layer, x, delta))
        target.add_(grad, alpha=sign)


gradient_prior = compute_prior  # its name before it computed the adam and trajectory priors too


def _len_or_none(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_priors(priors: Mapping[str, torch.Tensor], seen: int) -> None:
    if seen == 0 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("calibration got no batches: pass an iterable of at least one batch")
    for name, prior in priors.items():
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
