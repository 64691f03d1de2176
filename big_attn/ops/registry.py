"""Registry of attention ops by name."""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator

_OPS: dict[str, Callable] = {}
_WITHOUT_CAUSAL_FORM: set[str] = set()


def register(name: str, *, causal: bool = True) -> Callable[[Callable], Callable]:
  """Decorator registering an op under `name`; a second registration of a name raises.

  `causal=False` marks an op without a causal form (it raises `NotImplementedError` for
  `is_causal=True`).
  """
  if not isinstance(name, str) or not name:
    raise TypeError(f"op name must be a non-empty string, got {name!r}")
  if not isinstance(causal, bool):
    raise TypeError(f"register({name!r}): causal must be a bool, got {causal!r}")

  def decorator(fn: Callable) -> Callable:
    if name in _OPS:
      raise ValueError(f"attention op {name!r} is already registered ({_OPS[name].__module__})")
    _OPS[name] = fn
    if not causal:
      _WITHOUT_CAUSAL_FORM.add(name)
    return fn

  return decorator


def get(name: str) -> Callable:
  """The op registered as `name`; a `KeyError` listing the known names otherwise."""
  try:
    return _OPS[name]
  except KeyError:
    raise KeyError(f"unknown attention op {name!r}; known ops: {', '.join(names())}") from None


def has_causal_form(name: str) -> bool:
  """Whether op `name` takes `is_causal=True` (it was not registered with `causal=False`)."""
  get(name)
  return name not in _WITHOUT_CAUSAL_FORM


def accepts(op: str | Callable, argument: str) -> bool:
  """Whether op `op` (a registered name or the function) takes keyword `argument`."""
  return argument in inspect.signature(get(op) if isinstance(op, str) else op).parameters


@contextlib.contextmanager
def wrapped(wrap: Callable[[Callable], Callable]) -> Iterator[None]:
  """Within the context, `get(name)` returns `wrap(op)` for every registered op (process-wide:
  for tools that observe ops without changing the code calling them); restored on exit."""
  saved = dict(_OPS)
  _OPS.update({name: wrap(fn) for name, fn in saved.items()})
  try:
    yield
  finally:
    _OPS.clear()
    _OPS.update(saved)


def names() -> list[str]:
  """Sorted names of all registered ops."""
  return sorted(_OPS)
