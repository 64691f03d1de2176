"""Registry of attention ops by name, with the arguments each op declares."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """A registered op and what it declares (never read from its signature).

  Attributes:
    name: the registry name.
    fn: the op, `fn(query, key, value, *, mask=None, is_causal=False, scale=None, ...)`.
    causal: it has a causal form (`is_causal=True`); False: it raises `NotImplementedError`.
    segment_ids: it takes `segment_ids` (otherwise a caller folds them into the mask).
    implementation: it takes `implementation` ("xla", "pallas", "cudnn" or None).
    bias: it takes an additive logit `bias`.
    grid: it takes the `(h, w)` token `grid` of an image.
    softmax_form: for ops that are softmax attention of transformed queries and keys, the
      transform `(query, key, scale, **op_args) -> (query, key, scale)`; such ops also run
      sequence-parallel and over a key/value cache (the ring and the cache see the transformed
      queries and keys). None: no such form.
  """
  name: str
  fn: Callable
  causal: bool = True
  segment_ids: bool = False
  implementation: bool = False
  bias: bool = False
  grid: bool = False
  softmax_form: Callable | None = None


_OPS: dict[str, OpSpec] = {}


def register(name: str, *, causal: bool = True, segment_ids: bool = False,
             implementation: bool = False, bias: bool = False, grid: bool = False,
             softmax_form: Callable | None = None) -> Callable[[Callable], Callable]:
  """Decorator registering an op under `name` with the flags of `OpSpec`; a second
  registration of a name raises."""
  if not isinstance(name, str) or not name:
    raise TypeError(f"op name must be a non-empty string, got {name!r}")
  flags = dict(causal=causal, segment_ids=segment_ids, implementation=implementation,
               bias=bias, grid=grid)
  for flag, value in flags.items():
    if not isinstance(value, bool):
      raise TypeError(f"register({name!r}): {flag} must be a bool, got {value!r}")
  if softmax_form is not None and not callable(softmax_form):
    raise TypeError(f"register({name!r}): softmax_form must be None or callable, got "
                    f"{softmax_form!r}")

  def decorator(fn: Callable) -> Callable:
    if name in _OPS:
      raise ValueError(f"attention op {name!r} is already registered "
                       f"({_OPS[name].fn.__module__})")
    _OPS[name] = OpSpec(name=name, fn=fn, softmax_form=softmax_form, **flags)
    return fn

  return decorator


def spec(name: str) -> OpSpec:
  """The `OpSpec` of op `name`; a `KeyError` listing the known names otherwise."""
  try:
    return _OPS[name]
  except KeyError:
    raise KeyError(f"unknown attention op {name!r}; known ops: {', '.join(names())}") from None


def get(name: str) -> Callable:
  """The op registered as `name`; a `KeyError` listing the known names otherwise."""
  return spec(name).fn


def has_causal_form(name: str) -> bool:
  """Whether op `name` takes `is_causal=True` (it was not registered with `causal=False`)."""
  return spec(name).causal


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
