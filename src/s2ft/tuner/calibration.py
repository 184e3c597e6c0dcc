"""S2FT calibration: the prior ``ΔŴ`` of every adapted matrix, from gradients (its plan: :mod:`s2ft.tuner.planner`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from s2ft.config import PRIORS
from s2ft.tuner.kinds import kind_of, weight_matrix

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
        return loss_fn(outputs, batch)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            "the model returned no loss for a calibration batch: include labels in the batches, "
            "or pass loss_fn(outputs, batch) -> scalar tensor"
        )
    return loss


@contextlib.contextmanager
def _only_weights_require_grad(model: nn.Module, weights: list[nn.Parameter]) -> Any:
    """Inside: eval mode, and only ``weights`` require grad. On exit everything is as it was, grads included."""
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.eval()
        for p, _, _ in flags:
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)


_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


def compute_prior(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    kind: str = "gradient",
    lr: float = 1e-4,
) -> dict[str, torch.Tensor]:
    """The prior ``ΔŴ`` of each layer's ``base_layer.weight``, from the gradients ``g_b`` of the batches:

    - ``"gradient"`` (the paper): ``ΔŴ = -Σ_b g_b`` at the current weights;
    - ``"adam"``: ``ΔŴ = -Σ_b g_b / sqrt(Σ_b g_b²)`` elementwise (0 where every ``g_b`` is 0): the direction of
      an Adam step whose moments are taken over the batches, so each weight counts by its gradient's
      signal-to-noise ratio rather than by its gradient's size;
    - ``"trajectory"``: ``ΔŴ = W_B - W_0`` after one Adam step (learning rate ``lr``, betas 0.9/0.999, eps 1e-8,
      no weight decay) per batch on these weights alone: the start of the path training takes, gradients taken
      along it. The weights are restored afterwards.

    ``layers`` maps names to adapters (:class:`s2ft.tuner.layers.SpectralLayer`), whose ΔW is switched off meanwhile.
    The model runs in eval mode (no dropout, so the prior is deterministic) and, on return, nothing of it has
    changed: no weight, flag or gradient. Under ``torch.distributed`` each process passes its own batches: the
    ``"gradient"`` and ``"adam"`` sums are taken across processes, so every rank gets the prior one process would
    get from all the batches; a ``"trajectory"`` step sums the ranks' gradients of that step (the ranks' ``b``-th
    batches together make step ``b``; give every rank the same number of batches). Returns float32 ``(d_out, d_in)``
    priors in ``nn.Linear``'s convention.
    """
    if kind not in PRIORS:
        raise ValueError(f"unknown prior {kind!r}; choose from {PRIORS}")
    if not (lr > 0 and lr < float("inf")):
        raise ValueError(f"the trajectory prior's learning rate must be a finite number > 0, got {lr!r}")
    weights = [layer.base_layer.weight for layer in layers.values()]
    device = weights[0].device
    shape = {name: (layer.d_out, layer.d_in) for name, layer in layers.items()}
    sums = {name: torch.zeros(shape[name], device=device) for name in layers}
    squares = {name: torch.zeros(shape[name], device=device) for name in layers} if kind == "adam" else None
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    # trajectory: Adam on float32 master copies (low-precision weights would round small steps away); the model's
    # weights follow them, rounded, and get their starting values back at the end
    start = [w.detach().clone() for w in weights] if kind == "trajectory" else None
    masters = [w.detach().float().clone() for w in weights] if kind == "trajectory" else []
    optimizer = (
        torch.optim.Adam(masters, lr=lr, betas=_ADAM_BETAS, eps=_ADAM_EPS, foreach=False) if masters else None
    )
    seen = 0
    disabled = {name: layer.disabled for name, layer in layers.items()}
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        total = max_batches if max_batches is not None else _len_or_none(batches)
        iterator = tqdm(batches, total=total, desc=f"calibrating ({kind} prior)", unit="batch")
    try:
        for layer in layers.values():
            layer.disabled = True
        with _only_weights_require_grad(model, weights):
            for index, batch in enumerate(iterator):
                if max_batches is not None and index >= max_batches:
                    break
                loss = batch_loss(model, _move(batch, device), loss_fn)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"calibration batch {index} gave a non-finite loss ({float(loss.detach())})"
                    )
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
                    for name, layer in layers.items():
                        if layer.base_layer.weight.grad is None:
                            continue
                        grad = weight_matrix(layer.base_layer, grad=True).float()
                        sums[name] -= grad
                        if squares is not None:
                            squares[name] += grad * grad
                for w in weights:
                    w.grad = None
                seen += 1
        for (name, layer), master, w0 in zip(layers.items(), masters, start or []):
            sums[name] = kind_of(layer.base_layer).matrix(layer.base_layer, master - w0.float())
    finally:
        if start is not None:
            with torch.no_grad():
                for w, w0 in zip(weights, start):
                    w.copy_(w0)
        for name, layer in layers.items():
            layer.disabled = disabled[name]
        if progress:
            iterator.close()
    if distributed and kind != "trajectory":
        for tensor in (*sums.values(), *(squares or {}).values()):
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    if squares is not None:
        for name in sums:
            scale = squares[name].sqrt()
            sums[name] = torch.where(
                scale > 0, sums[name] / scale.clamp_min(torch.finfo(scale.dtype).tiny), 0.0
            )
    _check_priors(sums, seen)
    return sums


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
