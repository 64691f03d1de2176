"""Deprecated: the parameter modules live with their ops in `big_attn.ops` (one file per
mechanism), registered with `big_attn.ops.register_params` and found with
`big_attn.ops.params_module`. This module forwards those names (and the modules' class names)
with a `DeprecationWarning`."""
from __future__ import annotations

import warnings

from big_attn.ops import registry

_FORWARDED = {"OpParams": registry.OpParams, "params_module": registry.params_module,
              "register_params": registry.register_params}


def __getattr__(name: str):
  if name in _FORWARDED:
    value = _FORWARDED[name]
  else:
    classes = [registry.params_module(op) for op in registry.names()]
    value = next((cls for cls in classes if cls is not None and cls.__name__ == name), None)
    if value is None:
      raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  warnings.warn(f"big_attn.layers.op_params.{name} is deprecated: use big_attn.ops "
                f"({value.__module__}.{value.__name__})", DeprecationWarning, stacklevel=2)
  return value
