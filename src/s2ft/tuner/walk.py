"""Walking a wrapped model at the cost of the model, however many adapters it holds."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


def outer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` without what the s2ft wrappers hold once per adapter (the children a module names
    in its class attribute ``per_adapter_children``: a spectral layer's adapters, a trained copy's copies), in the
    same order: a walk over a model with 1,000 adapters costs what it costs with one."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        skip = getattr(type(module), "per_adapter_children", ())
        children = [(k, c) for k, c in module._modules.items() if c is not None and k not in skip]
        stack.extend((f"{name}.{k}" if name else k, c) for k, c in reversed(children))


def outer_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters of :func:`outer_modules` by name (the base model's and the wrappers' own, not the
    adapters'), every name of a parameter shared between modules."""
    for prefix, module in outer_modules(model):
        for key, param in module._parameters.items():
            if param is not None:
                yield (f"{prefix}.{key}" if prefix else key), param
