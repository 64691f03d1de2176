"""Registry of attention ops by name, with the arguments each op declares."""
from __future__ import annotations

import dataclasses
from typing import Callable


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
