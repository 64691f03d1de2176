"""Linen modules that own the learned weights of attention mechanisms.

The ops in `big_attn.ops` are pure functions that take their weights as arguments. A mechanism
with learned weights registers here, under its op name, a module that creates those weights and
returns them as keyword arguments of the op. `big_attn.layers.Attention` calls it as

    extra_args = ParamsModule(num_heads=..., num_kv_heads=..., head_dim=..., op_args=...,
                              dtype=..., param_dtype=...)(inputs_q, query, key, value)

where `query/key/value` are the projected `[batch, seq, heads, head_dim]` arrays.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

_PARAMS: dict[str, type[nn.Module]] = {}


def register_params(op_name: str):
  """Class decorator: registers the Linen module owning the weights of op `op_name`."""

  def decorator(cls):
    if op_name in _PARAMS:
      raise ValueError(f"parameters for op {op_name!r} are already registered")
    _PARAMS[op_name] = cls
    return cls

  return decorator


def params_module(op_name: str) -> type[nn.Module] | None:
  """The module owning op `op_name`'s weights, or None for a mechanism without weights."""
  return _PARAMS.get(op_name)


class OpParams(nn.Module):
  """Base of the per-op parameter modules (fields shared by all)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  op_args: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
