"""Registry of attention ops by name."""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax.numpy as jnp

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


# Parameter modules: the learned weights of a mechanism, registered by its op's name in the
# op's own file, so that a mechanism is one file. `big_attn.layers.Attention` calls one as
#   extra_args = cls(num_heads=..., num_kv_heads=..., head_dim=..., op_args=..., dtype=...,
#                    param_dtype=...)(inputs_q, query, key, value)
# with `query/key/value` the projected `[batch, seq, heads, head_dim]` arrays, and passes
# `extra_args` (the weights, as keyword arguments of the op) to the op.

_PARAMS: dict[str, type[nn.Module]] = {}


class OpParams(nn.Module):
  """Base of the parameter modules (the fields `big_attn.layers.Attention` sets)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  op_args: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32


def register_params(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
  """Class decorator registering the Linen module that owns op `name`'s weights; a second
  registration of a name raises."""

  def decorator(cls: type[nn.Module]) -> type[nn.Module]:
    if name in _PARAMS:
      raise ValueError(f"parameters for op {name!r} are already registered "
                       f"({_PARAMS[name].__module__})")
    _PARAMS[name] = cls
    return cls

  return decorator


def params_module(name: str) -> type[nn.Module] | None:
  """The module owning op `name`'s weights, or None for a mechanism without weights."""
  return _PARAMS.get(name)
