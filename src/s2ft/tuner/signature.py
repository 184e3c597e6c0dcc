"""A wrapper class whose ``forward`` shows the wrapped model's signature.

Tools that inspect ``forward`` (the transformers Trainer's label detection and column pruning) then see the wrapped
model's real argument names. The subclasses are made at run time, one per wrapped class, and rebuilt the same way
when unpickled (:func:`new_specialized`).
"""

from __future__ import annotations

import inspect
from typing import Any

_SPECIALIZED: dict[tuple[type, type], type] = {}


def specialized(wrapper: type[Any], model_class: type[Any]) -> type[Any]:
    """A subclass of ``wrapper`` (same name and module) whose ``forward`` calls ``wrapper.forward`` and has
    ``model_class.forward``'s signature and docstring; ``wrapper`` itself if that signature cannot be read."""
    key = (wrapper, model_class)
    if key not in _SPECIALIZED:
        try:
            signature = inspect.signature(model_class.forward)
        except (TypeError, ValueError):
            return wrapper

        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            return wrapper.forward(self, *args, **kwargs)

        forward.__signature__ = signature  # type: ignore[attr-defined]
        forward.__doc__ = model_class.forward.__doc__
        namespace = {
            "forward": forward,
            "__module__": wrapper.__module__,
            "__qualname__": wrapper.__qualname__,
        }
        _SPECIALIZED[key] = type(wrapper.__name__, (wrapper,), namespace)
    return _SPECIALIZED[key]


def new_specialized(wrapper: type[Any], model_class: type[Any]) -> Any:
    """An empty instance of :func:`specialized`'s class, for unpickling (``__reduce_ex__``)."""
    cls: Any = specialized(wrapper, model_class)
    return cls.__new__(cls)
