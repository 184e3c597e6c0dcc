"""s2ft under ``torch.distributed``, under FSDP2 (``torch.distributed.fsdp.fully_shard``, which Accelerate's FSDP
plugin also uses): sharded parameters are ``DTensor`` s, each rank holding a slice; and under DeepSpeed ZeRO-3:
*partitioned* parameters are empty outside the forward of the module that owns them, each rank holding a slice in
``ds_tensor`` (DeepSpeed gathers a :class:`s2ft.tuner.layers.SpectralLayer`'s parameters, its base layer's and its
adapters', for its forward: the layer is a ZeRO-3 leaf module).

- :func:`full`: a tensor whole on every rank (a collective for a sharded or partitioned one: every rank calls it);
- :func:`copy_into`: a whole tensor copied into a possibly sharded or partitioned parameter (each rank keeps its
  slice);
- :func:`agreed_batches`: calibration batches taken in step on every rank, with one error on every rank (no hang)
  when one rank runs out before another;
- :class:`LocalGradients`: each rank's own, whole gradient of a sharded weight, caught in backward before FSDP
  reduces and shards it (calibration sums it and all-reduces one layer's sum at a time, as under DDP);
- :func:`on_main_then_wait`: rank 0 writes, the others wait for it.

Without ``torch.distributed`` (or with plain tensors) each of them does what one process does.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import nn

from s2ft.tuner.walk import outer_named_parameters

# torch.distributed.tensor (1-2 s to import) is not imported here: a tensor can only be a DTensor once something
# (FSDP2, Accelerate, the user) imported it, so :func:`is_sharded` looks it up in ``sys.modules``.
_DTENSOR_MODULE = "torch.distributed.tensor"

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_sharded(tensor: Any) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a ``DTensor`` (a parameter FSDP has sharded, or its gradient)."""
    module = sys.modules.get(_DTENSOR_MODULE)
    return module is not None and isinstance(tensor, module.DTensor)


def is_partitioned(tensor: Any) -> bool:
    """Whether ``tensor`` is a parameter DeepSpeed ZeRO-3 manages (partitioned across ranks)."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_tensor")


def is_sharded_model(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is sharded (FSDP) or partitioned (DeepSpeed ZeRO-3)."""
    return any(
        is_sharded(p) or is_partitioned(p) for _, p in outer_named_parameters(model)
    )  # sharded adapters come with a sharded base


def full(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole, as a plain tensor: a ``DTensor`` or a ZeRO-3 parameter is gathered (every rank must call
    this; pass the parameter itself, not a detached view), others are returned as they are."""
    if is_sharded(tensor):
        return tensor.full_tensor()
    if is_partitioned(tensor):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.detach().clone()
    return tensor


@torch.no_grad()
def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole ``value`` (same shape as ``param``'s global shape) into ``param``; a sharded or partitioned
    ``param`` keeps its own slice of it (every rank passes the same ``value``)."""
    if is_partitioned(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.copy_(value)
        return
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor  # imported already: param is a DTensor

        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    param.copy_(value)


def _rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return _rank() == 0


@contextlib.contextmanager
def on_main_then_wait(collective: bool = True) -> Iterator[bool]:
    """Yield whether this process writes: with ``collective`` (every rank is here, as for a sharded model) rank 0
    writes and, on leaving, every rank waits for the others (a barrier), so no rank reads a file before rank 0 has
    written it; without it, whoever calls writes and nobody waits (a DDP job's rank 0 saving alone). An error on
    rank 0 is raised there before the barrier; the other ranks then wait for it (the launcher ends them)."""
    if not collective or not is_distributed():
        yield True
        return
    yield is_main_process()
    torch.distributed.barrier()


def agreed_batches(batches: Iterable[Any], limit: int | None = None) -> Iterator[Any]:
    """The first ``limit`` (all if None) of ``batches``, taken in step with the other ranks: before each batch the
    ranks agree (a one-element all-reduce) that every one of them has one. If some have and others have not, every
    rank raises the same ``ValueError``, instead of the ranks that still have batches waiting for the others in
    the model's next collective."""
    iterator, index = iter(batches), 0
    end = object()
    while True:
        batch = end if limit is not None and index >= limit else next(iterator, end)
        if is_distributed():
            counts = torch.tensor([int(batch is not end), int(batch is end)])
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
            if counts[0] > 0 and counts[1] > 0:
                raise ValueError(
                    f"calibration batches differ across processes: {int(counts[1])} of "
                    f"{torch.distributed.get_world_size()} ranks ran out after {index} batches while the others "
                    f"have more (this is rank {_rank()}); give every rank the same number of batches"
                )
        if batch is end:
            return
        yield batch
        index += 1


def agree_across_processes(value: int, what: str) -> None:
    """Raise the same ``ValueError`` on every rank (a two-element all-reduce) when the ranks' integer ``value`` s of
    ``what`` differ; one process, or all alike: nothing."""
    if not is_distributed():
        return
    bounds = torch.tensor([value, -value], dtype=torch.int64)
    torch.distributed.all_reduce(bounds, op=torch.distributed.ReduceOp.MAX)
    if int(bounds[0]) != -int(bounds[1]):
        raise ValueError(
            f"the processes disagree on {what}: this is rank {_rank()} with {value}, others have values from "
            f"{-int(bounds[1])} to {int(bounds[0])}; give every process the same configuration"
        )


class LocalGradients:
    """Each rank's own, whole gradient of the weights of ``layers`` (``{name: SpectralLayer}``), per backward.

    Under FSDP a weight is whole only inside its module's forward, and its gradient is reduced across ranks and
    sharded as soon as backward produces it. A forward pre-hook on each ``base_layer`` puts a tensor hook on the
    whole weight in use, which sees the gradient first. :meth:`take` returns ``{name: gradient}`` (the weight's
    shape) for the last backward and removes the tensor hooks. Use as a context manager (the pre-hooks go on
    exit)."""

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self._grads: dict[str, torch.Tensor] = {}
        self._tensor_hooks: dict[str, Any] = {}
        self._hooks = [
            layer.base_layer.register_forward_pre_hook(self._pre_hook(name)) for name, layer in layers.items()
        ]

    def _pre_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            weight = module.weight
            if (
                weight.requires_grad and name not in self._tensor_hooks
            ):  # one hook per backward, even if reused
                self._tensor_hooks[name] = weight.register_hook(lambda grad: self._store(name, grad))

        return hook

    def _store(self, name: str, grad: torch.Tensor) -> None:
        self._grads[name] = grad.detach().clone()

    def take(self) -> dict[str, torch.Tensor]:
        for handle in self._tensor_hooks.values():
            handle.remove()
        grads, self._grads, self._tensor_hooks = self._grads, {}, {}
        return grads

    def __enter__(self) -> LocalGradients:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.take()
        for handle in self._hooks:
            handle.remove()


MERGE_UNSHARDED = (
    "save the adapter with save_pretrained (rank 0 writes it), then, in one process, load it onto the unsharded "
    "base model and merge there: SpectralModel.from_pretrained(base_model, folder).merge_and_unload()"
)


def refuse_sharded(model: nn.Module, action: str, remedy: str) -> None:
    """Refuse ``action`` (merge, add an adapter to) on a model whose weights FSDP has sharded or DeepSpeed ZeRO-3
    has partitioned, naming ``remedy``."""
    if any(is_partitioned(p) for _, p in outer_named_parameters(model)):
        raise RuntimeError(
            f"cannot {action} a model whose weights DeepSpeed ZeRO-3 has partitioned: {remedy}"
        )
    if is_sharded_model(model):
        raise RuntimeError(f"cannot {action} a model whose weights FSDP has sharded (DTensor): {remedy}")
