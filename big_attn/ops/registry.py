"""Registry of attention ops by name."""
from __future__ import annotations

from typing import Callable

_OPS: dict[str, Callable] = {}


def register(name: str) -> Callable[[Callable], Callable]:
  """Decorator registering an op under `name`; a second registration of a name raises."""
  if not isinstance(name, str) or not name:
    raise TypeError(f"op name must be a non-empty string, got {name!r}")

  def decorator(fn: Callable) -> Callable:
    if name in _OPS:
      raise ValueError(f"attention op {name!r} is already registered ({_OPS[name].__module__})")
    _OPS[name] = fn
    return fn

  return decorator


def get(name: str) -> Callable:
  """The op registered as `name`; a `KeyError` listing the known names otherwise."""
  try:
    return _OPS[name]
  except KeyError:
    raise KeyError(f"unknown attention op {name!r}; known ops: {', '.join(names())}") from None


def names() -> list[str]:
  """Sorted names of all registered ops."""
  return sorted(_OPS)
