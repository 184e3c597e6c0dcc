"""S2FT calibration: the gradient prior ``ΔŴ`` of every adapted matrix (the plan from it: :mod:`s2ft.tuner.planner`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from s2ft.tuner.layers import weight_matrix

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


def gradient_prior(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """``ΔŴ = -Σ_batches ∇_W L`` at the current weights, for each layer's ``base_layer.weight``.

    ``layers`` maps names to adapters (:class:`s2ft.tuner.layers.SpectralLinear`), whose ΔW is switched off meanwhile.
    The model runs in eval mode (no dropout, so the prior is deterministic) and nothing of it changes: no weight,
    flag or gradient. Under ``torch.distributed`` each process passes its own batches and the priors are summed
    across processes, so every rank gets the same prior, equal to one process's over all the batches.
    Returns float32 ``(d_out, d_in)`` priors in ``nn.Linear``'s convention.
    """
    weights = [layer.base_layer.weight for layer in layers.values()]
    device = weights[0].device
    priors = {name: torch.zeros(layer.d_out, layer.d_in, device=device) for name, layer in layers.items()}
    seen = 0
    disabled = {name: layer.disabled for name, layer in layers.items()}
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        total = max_batches if max_batches is not None else _len_or_none(batches)
        iterator = tqdm(batches, total=total, desc="calibrating (gradient prior)", unit="batch")
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
                for name, layer in layers.items():
                    if layer.base_layer.weight.grad is None:
                        continue
                    priors[name] -= weight_matrix(layer.base_layer, grad=True).float()
                    layer.base_layer.weight.grad = None
                seen += 1
    finally:
        for name, layer in layers.items():
            layer.disabled = disabled[name]
        if progress:
            iterator.close()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for prior in priors.values():
            torch.distributed.all_reduce(prior, op=torch.distributed.ReduceOp.SUM)
    _check_priors(priors, seen)
    return priors


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
